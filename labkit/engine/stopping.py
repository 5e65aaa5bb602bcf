"""When a request stops, and the text it streams.

A request stops (in this order of checks) on
  - a stop token: eos / end-of-turn (unless ignore_eos) or one of stop_token_ids  -> "stop"
    (never before min_new_tokens: the sampler bans those ids until then)
  - a stop word appearing in the text (the text is cut before it)                -> "stop"
  - max_new_tokens generated, or prompt + output reaching session_len            -> "length"

Text is built lazily: without stop words a sampled id is only queued, and is detokenized
when someone asks for text (`take_delta`: each step for a streaming request, once at the end
otherwise). Detokenizing every token of every sequence was half of the engine's host time
per step at batch 256 (docs/PERF.md). With stop words each token is detokenized at once.

Streaming and stop words: text that could still turn out to be the start of a stop word is
held back (at most len(longest stop word) - 1 characters), so a client never receives part
of a stop word.
"""
from __future__ import annotations

from labkit.config import GenerationConfig


class StopChecker:
    def __init__(self, tokenizer, gc: GenerationConfig, num_prompt_tokens: int, session_len: int):
        from labkit.tokenizer import IncrementalDetokenizer
        self.gc, self.session_len = gc, session_len
        ids = set(gc.stop_token_ids or ())
        if not gc.ignore_eos:
            ids |= set(tokenizer.stop_token_ids)
        self.stop_ids = tuple(sorted(ids))
        self.stop_words = [w for w in (gc.stop_words or []) if w]
        self.hold = max((len(w) for w in self.stop_words), default=1) - 1
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=gc.skip_special_tokens)
        self.num_output = 0
        self.text = ""          # text so far (up to the queued ids), stop word cut off once found
        self._queued: list[int] = []    # ids not detokenized yet (no stop words only)
        self._sent = 0          # characters of text already handed out
        self._stopped_by_word = False

    def on_token(self, token: int, num_tokens: int) -> str | None:
        """Feed one sampled token; return a finish reason or None."""
        self.num_output += 1
        is_stop_token = token in self.stop_ids
        if is_stop_token:           # the stop token itself adds no text
            return "stop"
        if not self.stop_words:
            self._queued.append(token)
        else:
            self.text += self.detok.step(token)
            if self._cut_at_stop_word():
                return "stop"
        if self.num_output >= self.gc.max_new_tokens or num_tokens >= self.session_len:
            return "length"
        return None

    def _cut_at_stop_word(self) -> bool:
        # only the tail can contain a new match: the last token's text + the longest word
        start = max(0, self._sent - self.hold - 1)
        hits = [i for w in self.stop_words for i in [self.text.find(w, start)] if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self._stopped_by_word = True
        return bool(hits)

    def take_delta(self, final: bool = False) -> str:
        """Text not handed out yet (holding back a possible stop-word prefix unless final)."""
        if final and not self._stopped_by_word:
            self.text += self.detok.finish(self._queued)
        elif self._queued:
            self.text += self.detok.step(self._queued)
        self._queued.clear()
        end = len(self.text) if final else max(self._sent, len(self.text) - self.hold)
        delta = self.text[self._sent:end]
        self._sent = end
        return delta
