"""Token windows of the calibration and evaluation text: the English documentation that ships
with CPython (`pydoc_data.topics`, ~113k SmolLM2 tokens), so nothing is downloaded.

The corpus is split so that calibration never sees the text perplexity is measured on:

    ids[0 : EVAL_TOKENS]          perplexity (16 windows x 1024 tokens, as `labkit eval ppl`)
    ids[EVAL_TOKENS : ]           calibration windows (evenly spaced, non-overlapping)
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("labkit")

EVAL_TOKENS = 16 * 1024


class CalibrationError(ValueError):
    """The calibration text is missing or too short for what was asked."""


def corpus_ids(tokenizer) -> list[int]:
    """All corpus tokens (no BOS), in a fixed order: topics sorted by name, "\\n\\n" between."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise CalibrationError("the calibration text pydoc_data.topics is missing from this "
                               "Python (some distributions strip it); install the full "
                               "python3 standard library")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return tokenizer.encode(text, add_special_tokens=False)


def calibration_windows(ids: list[int], samples: int, seqlen: int) -> torch.Tensor:
    """(S, L) int64: `samples` windows of `seqlen` tokens from the calibration part, evenly
    spread; fewer (with a warning) when the text is too short."""
    if samples < 1 or seqlen < 16:
        raise CalibrationError(f"calib_samples={samples}, calib_seqlen={seqlen} are not allowed: "
                               f"calib_samples must be >= 1 and calib_seqlen >= 16")
    part = ids[EVAL_TOKENS:]
    fit = len(part) // seqlen
    if fit == 0:
        raise CalibrationError(f"calib_seqlen={seqlen} is longer than the calibration text "
                               f"({len(part)} tokens)")
    if samples > fit:
        log.warning(f"calibration text holds {fit} windows of {seqlen} tokens; using {fit} "
                    f"instead of calib_samples={samples}")
        samples = fit
    step = fit // samples                                     # spread over the whole part
    starts = [i * step * seqlen for i in range(samples)]
    return torch.tensor([part[s:s + seqlen] for s in starts], dtype=torch.int64)


def eval_windows(ids: list[int], seqlen: int = 1024, chunks: int = 16) -> torch.Tensor:
    """(chunks, seqlen) int64: consecutive windows from the start of the corpus."""
    if chunks * seqlen > len(ids):
        raise CalibrationError(f"{chunks} x {seqlen} tokens asked, the corpus has {len(ids)}")
    return torch.tensor(ids[:chunks * seqlen], dtype=torch.int64).view(chunks, seqlen)
