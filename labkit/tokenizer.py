"""Tokenizer, chat templates and the streaming (incremental) detokenizer.

`Tokenizer` wraps an HF tokenizer folder (a workspace's `triton_models/tokenizer/`, an HF model
dir, or the bundled SmolLM2 tokenizer) and turns any prompt the pipeline accepts into token ids,
the way LMDeploy's pipeline does: a plain string becomes one user message and is chat-templated.

`IncrementalDetokenizer` turns generated ids into text piece by piece for streaming. Byte-level
BPE splits one emoji or CJK character over several tokens, so decoding a lone token can give
U+FFFD; the detokenizer holds those bytes back until the character is complete (vLLM's
`detokenize_incrementally`, with prefix_offset/read_offset).
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Sequence, Union

ROLES = ("system", "user", "assistant")
# End-of-turn / end-of-text tokens of common chat models. A chat model ends its answer with
# its end-of-turn token, which is not always the tokenizer's eos, so we stop on all of them.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>",
              "<end_of_turn>", "</s>", "<eos>")
# Used when the tokenizer has no chat template (a base model) or model_name="plain".
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content']"
                   " + '<|im_end|>\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# model_name values that pick a built-in template; any other name (e.g. "smollm2", "llama")
# means "the tokenizer's own chat template".
BUILTIN_TEMPLATES = {"plain": PLAIN_TEMPLATE, "base": PLAIN_TEMPLATE, "chatml": CHATML_TEMPLATE}

Messages = Sequence[Mapping[str, str]]
Prompt = Union[str, Messages, Sequence[int]]


def check_messages(messages) -> list[dict]:
    """Validate a chat; raise ValueError naming the bad field (prompt, role or content)."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError(f"prompt must be a non-empty list of messages, got {messages!r}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"prompt[{i}] must be a message dict with 'role' and 'content', "
                             f"got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role={role!r} is not allowed: role must be one of "
                             f"{', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            got = "missing" if "content" not in m else type(m["content"]).__name__
            raise ValueError(f"messages[{i}]: content must be a string (got {got})")
        out.append(dict(m))
    return out


class Tokenizer:
    """An HF tokenizer plus chat template, stop tokens and prompt validation."""

    def __init__(self, path, model_name: str | None = None):
        from transformers import AutoTokenizer  # lazy: `import labkit` stays light

        self.path = str(path)
        self.model_name = model_name
        self.hf = AutoTokenizer.from_pretrained(self.path)
        if self.hf.pad_token is None:          # GGUF tokenizers have none; batching wants one
            self.hf.pad_token = self.hf.eos_token
        self.vocab_size: int = len(self.hf)   # includes added tokens
        self.bos_token_id: int | None = self.hf.bos_token_id
        self.eos_token_id: int | None = self.hf.eos_token_id
        # Only special/added tokens count: a plain BPE piece spelled "</s>" is not an end token.
        special = {t.content: i for i, t in self.hf.added_tokens_decoder.items()}
        for t in self.hf.all_special_tokens:
            special.setdefault(t, self.hf.convert_tokens_to_ids(t))
        ids = [self.eos_token_id] + [special[t] for t in END_TOKENS if t in special]
        self.stop_token_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))
        builtin = BUILTIN_TEMPLATES.get((model_name or "").lower())
        self.has_chat_template = builtin is not None or bool(self.hf.chat_template)
        self.chat_template: str = builtin or self.hf.chat_template or PLAIN_TEMPLATE

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token_id}, stop={self.stop_token_ids})")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The chat as the model sees it (text), after validation."""
        return self.hf.apply_chat_template(check_messages(messages), chat_template=self.chat_template,
                                           tokenize=False, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        # A real chat template writes its own bos/special tokens (HF tokenizes its output with
        # add_special_tokens=False); the plain fallback is raw text, so let the tokenizer add
        # whatever it adds to a raw prompt (a Llama bos, say).
        return self.encode(text, add_special_tokens=self.chat_template is PLAIN_TEMPLATE)

    def prompt_to_ids(self, prompt: Prompt) -> list[int]:
        """str -> one user message, chat-templated; messages -> chat-templated; ids -> as is."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must be a non-empty string, a list of messages or a "
                                 "list of token ids; got an empty string")
            return self.apply_chat_template([{"role": "user", "content": prompt}])
        if isinstance(prompt, (list, tuple)):
            if len(prompt) == 0:
                raise ValueError("prompt must not be empty (an empty list has no messages or ids)")
            if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
                bad = [int(t) for t in prompt if not 0 <= t < self.vocab_size]
                if bad:
                    raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}); "
                                     f"got {bad[:5]}")
                return [int(t) for t in prompt]
            return self.apply_chat_template(prompt)
        raise ValueError(f"prompt must be a string, a list of messages or a list of token ids, "
                         f"got {type(prompt).__name__}")


class IncrementalDetokenizer:
    """Generated ids -> text pieces for streaming, never splitting a UTF-8 character.

    State (as vLLM): ids[prefix:read] are already emitted and only give context (a tokenizer
    may decode a token differently at the start of a string); ids[read:] are pending. Each step
    decodes just that window and emits the text past the context. While the window's text ends
    in U+FFFD the last character is incomplete: what comes before it is emitted (kept in
    `_partial`), the rest waits for the next token.

    Byte-level BPE can chain: one token ends a character and starts the next, so the window
    grows until a token ends on a character boundary (in real text within 2-3 tokens).
    Past MAX_PENDING such tokens (byte soup from a degenerate model)
    the window is emitted as it is, U+FFFD included, so a step never decodes more than
    CONTEXT + MAX_PENDING ids; only then may the stream differ from a full decode.
    """

    CONTEXT = 5          # prompt/old tokens kept as context (vLLM's initial offset is 5 too)
    MAX_PENDING = 128    # longest held-back run, in tokens (see above)

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # With prompt_ids the first token is decoded as a continuation of the prompt (its
        # leading space survives with sentencepiece tokenizers).
        self._ids: list[int] = list(prompt_ids[-self.CONTEXT:]) if prompt_ids else []
        self._prefix = 0
        self._read = len(self._ids)
        self._partial = ""        # text of ids[read:] already emitted (a held tail follows it)
        self.text = ""            # everything emitted so far
        self.token_ids: list[int] = []  # every generated id

    def step(self, new_ids: Sequence[int] | int) -> str:
        """Add generated ids; return only the text that is new and complete."""
        if isinstance(new_ids, numbers.Integral):
            new_ids = [new_ids]
        out = []
        for t in new_ids:      # one id at a time: a clean boundary inside a chunk is found too
            self._ids.append(int(t))
            self.token_ids.append(int(t))
            out.append(self._emit(final=False))
        return "".join(out)

    def finish(self, new_ids: Sequence[int]) -> str:
        """End of generation: add the last ids and emit everything, with two decodes in all
        (for a caller that did not stream: its whole output in one window)."""
        ids = [int(t) for t in new_ids]
        self._ids.extend(ids)
        self.token_ids.extend(ids)
        return self._emit(final=True)

    def flush(self) -> str:
        """At the end of generation: emit whatever is still held back."""
        return self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, final: bool) -> str:
        n = len(self._ids)
        if self._read == n:
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        window_text = self._decode(self._ids[self._prefix:])
        new = window_text[len(prefix_text) + len(self._partial):]
        if not final and window_text.endswith("\ufffd") and n - self._read <= self.MAX_PENDING:
            safe = new.rstrip("\ufffd")          # hold back the unfinished character
            self._partial += safe
        else:
            safe = new
            # Everything up to n is emitted; keep a few ids as context for the next window
            # (none after a forced cut: its ids end inside a character).
            clean = final or not window_text.endswith("\ufffd")
            self._prefix = max(self._read, n - self.CONTEXT) if clean else n
            self._read, self._partial = n, ""
            if self._prefix > 0:                 # drop ids no window will read again
                del self._ids[:self._prefix]
                self._read -= self._prefix
                self._prefix = 0
        self.text += safe
        return safe
