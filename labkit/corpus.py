"""The text labkit measures quality on and calibrates with, without downloading anything.

The English documentation that ships with CPython, `pydoc_data.topics` (~113k tokens for the
SmolLM2 tokenizer): the topics joined by blank lines, in the order the module lists them.

Perplexity (`labkit eval ppl`) reads the first `chunks x seqlen` tokens; calibration
(`labkit lite calibrate`) starts after EVAL_TOKENS, so a calibrated model is not scored on
the text it was calibrated with.
"""
from __future__ import annotations

from pathlib import Path

import torch

EVAL_TOKENS = 16 * 1024          # what `labkit eval ppl` reads by default (16 chunks of 1024)


class CorpusError(ValueError):
    """Not enough text for what was asked."""


def pydoc_text() -> str:
    import pydoc_data.topics
    return "\n\n".join(pydoc_data.topics.topics.values())


def read_text(path: str | Path | None) -> str:
    """A text file's content, or the pydoc corpus when `path` is None."""
    if path is None:
        return pydoc_text()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text {p}: no such file")
    return p.read_text(encoding="utf-8", errors="replace")


def token_chunks(token_ids: list[int], seqlen: int, count: int, start: int = 0,
                 what: str = "text") -> torch.Tensor:
    """`count` consecutive chunks of `seqlen` tokens from token `start` on: (count, seqlen) int64.
    Fewer are available than asked -> as many as there are (at least one, else an error)."""
    avail = (len(token_ids) - start) // seqlen
    if avail < 1:
        raise CorpusError(f"the {what} has {len(token_ids)} tokens, not enough for one chunk of "
                         f"{seqlen} after token {start}: lower --seqlen or give a longer --text")
    n = min(count, avail)
    ids = torch.tensor(token_ids[start:start + n * seqlen], dtype=torch.long)
    return ids.view(n, seqlen)                                              # (n, seqlen)
