"""The HTTP API's request and response bodies (pydantic), as OpenAI and lmdeploy 0.1 define them.

Requests validate themselves: a bad field is a 400 in the OpenAI error envelope whose message
names the field and what is allowed (errors.py turns pydantic's errors into that). Options we
do not implement (n > 1, logprobs, tools, penalties other than repetition_penalty, ...) are a
400 that says so, never silently ignored. Unknown extra fields are ignored, as OpenAI does.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from labkit.config import GenerationConfig


INT64 = 2**63 - 1
TOP_K_MAX = 1 << 20             # any k >= the vocabulary means "no top-k"
GREEDY_EPS = 1e-5               # temperatures below this are greedy (as vLLM): 1/T overflows


def _not_supported(name: str, what: str):
    raise ValueError(f"{name} is not supported by this server: {what}")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------- sampling
class SamplingFields(_Request):
    """Sampling and stopping knobs shared by chat and completions."""
    model: Optional[str] = Field(None, description="a model id from GET /v1/models (optional here)")
    max_tokens: Optional[int] = Field(None, ge=1, description="tokens to generate at most")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, le=TOP_K_MAX, description="-1 or 0 = no top-k filter")
    seed: Optional[int] = Field(None, ge=-INT64 - 1, le=INT64, description="makes sampling repeatable")
    stop: Optional[Union[str, list[str]]] = Field(None, description="stop strings (cut off)")
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=100, description="1 = off")
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    n: int = Field(1, ge=1, description="choices per request: only 1 is supported")
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            _not_supported(f"n={v}", "ask for one choice per request (n=1)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_words(cls, v):
        words = [v] if isinstance(v, str) else (v or [])
        if any(not w for w in words):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalties(cls, v, info):
        if v not in (None, 0):
            _not_supported(info.field_name, "use repetition_penalty (1 = off)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v:
            _not_supported("logit_bias", "send null or {}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def generation_config(self, max_tokens: int) -> GenerationConfig:
        temperature = 1.0 if self.temperature is None else self.temperature   # OpenAI's default
        temperature = 0.0 if temperature < GREEDY_EPS else temperature
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return GenerationConfig(
            max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0), random_seed=self.seed,
            repetition_penalty=self.repetition_penalty or 1.0, stop_words=stop or None,
            ignore_eos=self.ignore_eos, min_new_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens)


class StreamOptions(_Request):
    include_usage: bool = False


# ---------------------------------------------------------------------------- chat
class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict]] = None
    tool_choice: Optional[Union[str, dict]] = None
    response_format: Optional[dict] = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs or self.top_logprobs is not None:
            _not_supported("logprobs", "send logprobs=false")
        if self.tools or self.tool_choice not in (None, "none"):
            _not_supported("tools", "this model has no tool calling")
        if self.response_format and self.response_format.get("type") != "text":
            _not_supported("response_format", "only {'type': 'text'}")
        return self


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(
        description="text (no chat template is applied) or token ids; one prompt per request")
    echo: bool = False
    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                _not_supported(f"a batch of {len(v)} prompts", "send one prompt per request")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name, bad in (("echo", self.echo), ("suffix", self.suffix),
                          ("logprobs", self.logprobs is not None),
                          ("best_of", self.best_of not in (None, 1))):
            if bad:
                _not_supported(name, "leave it out")
        return self


# ---------------------------------------------------------------------------- interactive
class InteractiveRequest(_Request):
    """lmdeploy 0.1's /v1/chat/interactive: the server keeps each session's history (and KV)."""
    prompt: Union[str, list[ChatMessage]] = Field(
        description="this turn: a user message, or messages to append; '' with "
                    "interactive_mode=false just ends the session")
    session_id: int = Field(-1, description="-1: a new session with a fresh id")
    interactive_mode: bool = Field(False, description="true: keep the session after this turn; "
                                   "false: end it (and free its KV) after this turn")
    stream: bool = False
    stop: bool = Field(False, description="true: stop the session's running request")
    request_output_len: int = Field(512, ge=1)
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(40, ge=0, le=TOP_K_MAX)
    temperature: float = Field(0.8, ge=0, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    ignore_eos: bool = False
    seed: Optional[int] = Field(None, ge=-INT64 - 1, le=INT64)

    def messages(self) -> list[dict]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}] if self.prompt else []
        return [m.as_dict() for m in self.prompt]

    def generation_config(self, max_tokens: int) -> GenerationConfig:
        temperature = 0.0 if self.temperature < GREEDY_EPS else self.temperature
        return GenerationConfig(max_new_tokens=max_tokens, do_sample=temperature > 0,
                                temperature=temperature, top_p=self.top_p, top_k=self.top_k,
                                repetition_penalty=self.repetition_penalty,
                                ignore_eos=self.ignore_eos, random_seed=self.seed)


class InteractiveChunk(BaseModel):
    text: str                            # new text (stream) or the whole answer
    tokens: int                          # tokens generated so far
    finish_reason: Optional[str] = None
    session_id: int
    input_tokens: int = 0                # the conversation as sent to the engine this turn
    prefix_hit_tokens: int = 0           # of those, KV found cached instead of computed


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[dict] = None    # {"cached_tokens": prefix-cache hits}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "labkit"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Optional[str] = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[str] = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


SamplingFields.model_rebuild()
