"""Sampler: last-position logits (B, V) -> next token ids (B,), one GenerationConfig per row.

Order, as HF `generate` and LMDeploy do it:
  banned ids (-inf) -> repetition penalty -> greedy argmax, or
  temperature -> top-k -> top-p -> multinomial with the row's own torch.Generator.

Everything runs in float32 whatever the model's dtype. The knobs are per-row tensors, so a
batch mixing greedy and sampled requests with different temperatures is one sort and one
softmax; only the draw with per-request generators loops over rows. The filtering functions
are public so tests (and students) can compare them with HF's logits processors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from labkit.config import GenerationConfig

NEG_INF = float("-inf")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with `seed` on `device`; None (use the global RNG) when seed is None."""
    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


@dataclass
class SampleRow:
    """What the sampler needs to know about one sequence of the batch."""

    config: GenerationConfig
    generator: torch.Generator | None = None
    token_ids: Sequence[int] = ()      # prompt + output ids so far (for the repetition penalty)
    banned_ids: Sequence[int] = ()     # ids forced to -inf (eos before min_new_tokens)

    def __post_init__(self):
        assert isinstance(self.config, GenerationConfig), "SampleRow.config must be a GenerationConfig"

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to change in the logits: argmax of the raw logits is the answer."""
        return self.config.greedy and self.config.repetition_penalty == 1.0 and not self.banned_ids


# ---------------------------------------------------------------------------- logits processors
def apply_banned(logits: Tensor, banned: Sequence[Sequence[int]]) -> Tensor:
    """logits[i, banned[i]] = -inf, in place; ids outside the vocab are ignored. logits: (B, V)."""
    V = logits.shape[-1]
    pairs = [(i, t) for i, ids in enumerate(banned) for t in ids if 0 <= t < V]
    if pairs:
        rows, cols = zip(*pairs)
        r = torch.tensor(rows, device=logits.device)  # (N,)
        c = torch.tensor(cols, device=logits.device)  # (N,)
        logits[r, c] = NEG_INF
    return logits


def apply_repetition_penalty(logits: Tensor, token_ids: Sequence[Sequence[int]],
                             penalties: Sequence[float]) -> Tensor:
    """HF semantics, in place: for every id seen in row i, a logit > 0 is divided by the
    penalty and a logit < 0 multiplied (so penalty > 1 always makes a seen token less likely).
    logits: (B, V)."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and len(token_ids[i]) > 0]
    if not rows:
        return logits
    V, width = logits.shape[-1], max(len(token_ids[i]) for i in rows)
    # Pad each row with its own first id: a repeated id gathers and scatters the same value.
    idx = torch.tensor([list(token_ids[i]) + [token_ids[i][0]] * (width - len(token_ids[i]))
                        for i in rows], dtype=torch.long, device=logits.device)  # (R, L)
    idx = idx.clamp(max=V)        # ids past the model's vocab (tokenizer extras) hit a spare column
    r = torch.tensor(rows, device=logits.device)                                  # (R,)
    pen = torch.tensor([float(penalties[i]) for i in rows], dtype=logits.dtype,
                       device=logits.device).unsqueeze(1)                         # (R, 1)
    sub = torch.nn.functional.pad(logits[r], (0, 1))                              # (R, V + 1)
    score = sub.gather(1, idx)                                                    # (R, L)
    score = torch.where(score < 0, score * pen, score / pen)                      # (R, L)
    logits[r] = sub.scatter(1, idx, score)[:, :V]                                 # (R, V)
    return logits


def sorted_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k then top-p (as HF's TopK/TopP warpers), in descending-sorted order.

    logits (S, V) already divided by the temperature; top_k (S,) int, 0 = off; top_p (S,) in
    (0, 1], 1 = off. Returns (sorted logits with removed entries at -inf, their vocab ids).
    """
    V = logits.shape[-1]
    srt, ids = logits.sort(dim=-1, descending=True)                      # (S, V), (S, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V).to(torch.long)     # (S,)
    kth = srt.gather(1, (k - 1).unsqueeze(1))                            # (S, 1)
    srt = srt.masked_fill(srt < kth, NEG_INF)     # strict <: ties with the k-th stay, as in HF
    probs = srt.softmax(dim=-1)                                          # (S, V)
    above = probs.cumsum(dim=-1) - probs          # (S, V) mass of the tokens ranked higher
    p = top_p.to(probs.dtype).unsqueeze(1)                               # (S, 1)
    # Keep the smallest top set whose mass reaches p: drop a token once the ones above it
    # already reach p. p == 1 rows are skipped: cumsum rounding can reach 1.0 early.
    remove = (above >= p) & (p < 1.0)                                    # (S, V)
    remove[:, 0] = False                          # always keep the most likely token
    return srt.masked_fill(remove, NEG_INF), ids


def top_k_top_p_filter(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """`sorted_top_k_top_p` in vocabulary order: removed tokens at -inf. logits: (S, V)."""
    srt, ids = sorted_top_k_top_p(logits, top_k, top_p)                  # (S, V), (S, V)
    return torch.empty_like(srt).scatter_(1, ids, srt)                   # (S, V)


# ---------------------------------------------------------------------------- the sampler
class Sampler:
    """`sampler(logits (B, V), rows) -> token ids (B,) int64` on the logits' device."""

    def __call__(self, logits: Tensor, rows: list[SampleRow]) -> Tensor:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), \
            f"logits {tuple(logits.shape)} must be (B, V) with B == len(rows) == {len(rows)}"
        if all(r.plain_greedy for r in rows):
            # Fast path: float32 conversion is exact, so argmax of the raw dtype is the same.
            return logits.argmax(dim=-1)                                 # (B,)
        x = logits.to(torch.float32, copy=True)   # (B, V) never touch the caller's tensor
        apply_banned(x, [r.banned_ids for r in rows])
        apply_repetition_penalty(x, [r.token_ids for r in rows],
                                 [r.config.repetition_penalty for r in rows])
        out = x.argmax(dim=-1)                    # (B,) the greedy rows' answer
        sampled = [i for i, r in enumerate(rows) if not r.config.greedy]
        if sampled:
            sel = torch.tensor(sampled, device=x.device)                 # (S,)
            out[sel] = self.sample(x[sel], [rows[i] for i in sampled])
        return out

    @staticmethod
    def sample(logits: Tensor, rows: list[SampleRow]) -> Tensor:
        """Temperature, top-k, top-p, then one draw per row. logits: (S, V) float32."""
        dev = logits.device
        temp = torch.tensor([r.config.temperature for r in rows], dtype=torch.float32, device=dev)
        top_k = torch.tensor([r.config.top_k for r in rows], dtype=torch.long, device=dev)
        top_p = torch.tensor([r.config.top_p for r in rows], dtype=torch.float32, device=dev)
        srt, ids = sorted_top_k_top_p(logits / temp.unsqueeze(1), top_k, top_p)  # (S, V) x2
        probs = srt.softmax(dim=-1)                                      # (S, V)
        choice = torch.empty(len(rows), dtype=torch.long, device=dev)    # (S,) index in sorted order
        shared = [j for j, r in enumerate(rows) if r.generator is None]
        if shared:                                # unseeded rows: one draw from the global RNG
            js = torch.tensor(shared, device=dev)
            choice[js] = torch.multinomial(probs[js], 1).squeeze(1)
        for j, r in enumerate(rows):              # seeded rows: each from its own generator, so
            if r.generator is not None:           # a request's samples do not depend on its batch
                choice[j] = torch.multinomial(probs[j], 1, generator=r.generator)[0]
        return ids.gather(1, choice.unsqueeze(1)).squeeze(1)             # (S,) vocab ids
