"""The Python API, shaped like LMDeploy's `pipeline`:

    pipe = pipeline("./workspace", backend_config=EngineConfig(max_batch_size=32))
    pipe(["Hi", [{"role": "user", "content": "Hi"}]], gen_config=GenerationConfig(max_new_tokens=64))
    for r in pipe.stream_infer(prompts): print(r.index, r.text, end="")
    sess = pipe.chat("Hi"); sess = pipe.chat("and then?", session=sess)

All prompts of one call run together in one continuous batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

from typing import TYPE_CHECKING

from labkit.config import EngineConfig, GenerationConfig

if TYPE_CHECKING:                  # the engine (and torch) load when a pipeline is built
    from labkit.engine.engine import RequestOutput


@dataclass
class Response:
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: Optional[str] = None    # stop | length | abort; None while streaming
    token_ids: list[int] = field(default_factory=list)
    index: int = 0                          # which prompt of the call this answers


@dataclass
class Session:
    """A multi-turn chat: the messages so far and the last reply. Each turn re-sends the whole
    history; its KV blocks are found in the prefix cache, so only the new turn is computed."""
    history: list[dict] = field(default_factory=list)
    response: Optional[Response] = None
    prefix_hit_tokens: int = 0              # tokens of this turn served from the prefix cache


def _is_single(prompts) -> bool:
    """One prompt (a string or one chat) rather than a batch of them."""
    if isinstance(prompts, str):
        return True
    return bool(prompts) and isinstance(prompts, (list, tuple)) and isinstance(prompts[0], dict)


class Pipeline:
    def __init__(self, model, backend_config: EngineConfig | None = None):
        from labkit.engine.engine import LLMEngine
        self.engine = LLMEngine(model, backend_config)
        self.tokenizer = self.engine.tokenizer

    def _submit(self, prompts: list, gen_config, stream: bool = True) -> list[str]:
        gcs = gen_config if isinstance(gen_config, list) else [gen_config] * len(prompts)
        if len(gcs) != len(prompts):
            raise ValueError(f"gen_config: got {len(gcs)} configs for {len(prompts)} prompts")
        rids = []
        try:
            for p, g in zip(prompts, gcs):
                rids.append(self.engine.add_request(p, g or GenerationConfig(), stream=stream))
        except BaseException:                 # one bad prompt: queue none of this call
            for rid in rids:
                self.engine.abort(rid)
            raise
        return rids

    def __call__(self, prompts, gen_config: GenerationConfig | list | None = None):
        """Generate for one prompt (-> Response) or a list of prompts (-> list[Response])."""
        single = _is_single(prompts)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("prompts must not be empty")
        final: dict[int, Response] = {}
        for r in self._stream(batch, gen_config, cumulative=True, stream=False):
            if r.finish_reason is not None:
                final[r.index] = r
        out = [final[i] for i in range(len(batch))]
        return out[0] if single else out

    batch_infer = __call__

    def stream_infer(self, prompts, gen_config: GenerationConfig | list | None = None) -> Iterator[Response]:
        """Yield incremental Responses (text = the new piece) as tokens are generated."""
        batch = [prompts] if _is_single(prompts) else list(prompts)
        yield from self._stream(batch, gen_config, cumulative=False)

    def _stream(self, batch, gen_config, cumulative: bool, stream: bool = True) -> Iterator[Response]:
        rids = self._submit(batch, gen_config, stream)
        index = {rid: i for i, rid in enumerate(rids)}
        try:
            while any(rid in self.engine.seqs for rid in rids):
                for out in self.engine.step():
                    if out.request_id in index:
                        yield self._response(out, index[out.request_id], cumulative)
        finally:                               # the caller stopped early: free the blocks
            for rid in rids:
                self.engine.abort(rid)

    @staticmethod
    def _response(out: RequestOutput, index: int, cumulative: bool) -> Response:
        return Response(text=out.text if cumulative else out.delta_text,
                        generate_token_len=len(out.token_ids), input_token_len=out.num_prompt_tokens,
                        finish_reason=out.finish_reason if out.finished else None,
                        token_ids=list(out.token_ids if cumulative else out.new_token_ids), index=index)

    def chat(self, prompt: str, session: Session | None = None,
             gen_config: GenerationConfig | None = None) -> Session:
        """One turn of a multi-turn chat; returns the updated session (reply in .response)."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        session = session or Session()
        messages = session.history + [{"role": "user", "content": prompt}]
        rid = self._submit([messages], gen_config, stream=False)[0]
        out = None
        while rid in self.engine.seqs:
            for o in self.engine.step():
                if o.request_id == rid:
                    out = o
        resp = self._response(out, 0, cumulative=True)
        return Session(messages + [{"role": "assistant", "content": resp.text}], resp,
                       out.num_prefix_hit_tokens)

    def stats(self) -> dict:
        return self.engine.stats()

    def close(self) -> None:
        """Free the KV cache and stop tensor-parallel ranks (tp > 1). Safe to call twice."""
        for rid in list(self.engine.seqs):
            self.engine.abort(rid)
        self.engine.runner.kv_cache.clear()
        for layer in self.engine.model.layers:
            layer.attention.attn.k_cache = layer.attention.attn.v_cache = None
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pipeline(model, backend_config: EngineConfig | None = None, log_level: str = "WARNING") -> Pipeline:
    """Build a Pipeline over a workspace, the alias `smollm2-135m`, an HF directory or a .gguf."""
    logging.getLogger("labkit").setLevel(log_level)
    return Pipeline(model, backend_config)
