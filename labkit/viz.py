"""Pictures of the engine's state for the notebooks, read from a live engine.

    snap = block_snapshot(engine)       # who owns which KV block right now
    draw_block_pool(snap)               # the block pool as a grid + every request's block table
    trace = trace_steps(engine)         # run the queued requests to the end, step by step,
    draw_timeline(trace)                #   recording who was computed in each step (a Gantt chart)

Nothing here changes what the engine does: `trace_steps` only calls `engine.step()` and looks
at the scheduler's queues and each Sequence's counters before and after. matplotlib is
imported inside the drawing functions, so `import labkit.viz` stays light.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from labkit.engine.sequence import SequenceStatus

# One colour per request (tab10 without its grey), cycled.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
STATE_COLOURS = {"waiting": "#dddddd", "prefill": "#ff7f0e", "recompute": "#d62728",
                 "decode": "#1f77b4", "paused": "#aec7e8"}


# ---------------------------------------------------------------------------- block tables
@dataclass
class BlockSnapshot:
    """The KV block pool at one moment: block tables of live requests and every block's state."""
    block_size: int
    ref_counts: list[int]                 # per physical block
    cached: list[bool]                    # named (prefix cache) and unused: reusable on a hit
    tables: dict[str, list[int]]          # request id -> block table (logical -> physical)
    kv_tokens: dict[str, int]             # request id -> tokens whose K/V are in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    def owners(self) -> dict[int, list[str]]:
        """Physical block id -> the requests whose block table holds it."""
        out: dict[int, list[str]] = {}
        for rid, table in self.tables.items():
            for b in table:
                out.setdefault(b, []).append(rid)
        return out


def block_snapshot(engine) -> BlockSnapshot:
    bm = engine.block_manager
    return BlockSnapshot(
        block_size=bm.block_size,
        ref_counts=[b.ref_count for b in bm.blocks],
        cached=[b.ref_count == 0 and b.hash is not None for b in bm.blocks],
        tables={rid: list(s.block_table) for rid, s in engine.seqs.items() if s.block_table},
        kv_tokens={rid: s.num_computed_tokens for rid, s in engine.seqs.items() if s.block_table})


def _colour_of(rids) -> dict[str, str]:
    return {rid: PALETTE[i % len(PALETTE)] for i, rid in enumerate(rids)}


def draw_block_pool(snap: BlockSnapshot, cols: int = 16, title: str | None = None):
    """Left: each request's block table (logical block j -> physical block id, shaded by how
    full it is). Right: the physical pool, each block coloured by the request that owns it."""
    import matplotlib.pyplot as plt

    colour = _colour_of(list(snap.tables))
    width = max([len(t) for t in snap.tables.values()] + [1])
    rows = -(-snap.num_blocks // cols)
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.55 * max(len(snap.tables), rows)),
                                     gridspec_kw={"width_ratios": [width + 3, cols]})
    draw_tables(ax_t, snap, colour)
    draw_pool(ax_p, snap, colour, cols)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def draw_tables(ax, snap: BlockSnapshot, colour: dict[str, str]) -> None:
    """Each request's block table on `ax`, one row per request."""
    from matplotlib.patches import Rectangle
    rids = list(snap.tables)
    width = max([len(t) for t in snap.tables.values()] + [1])
    bs = snap.block_size
    for r, rid in enumerate(rids):
        y = len(rids) - 1 - r
        for j, b in enumerate(snap.tables[rid]):
            filled = min(bs, max(0, snap.kv_tokens[rid] - j * bs)) / bs
            ax.add_patch(Rectangle((j, y), 1, 1, facecolor="white", edgecolor="black"))
            ax.add_patch(Rectangle((j, y), filled, 1, facecolor=colour[rid], alpha=0.85))
            ax.text(j + 0.5, y + 0.5, str(b), ha="center", va="center", fontsize=8)
        ax.text(-0.2, y + 0.5, f"{rid} ({snap.kv_tokens[rid]} tok)", ha="right", va="center", fontsize=9)
    ax.set_xlim(-0.1, width + 0.1)
    ax.set_ylim(-0.1, max(len(rids), 1) + 0.1)
    ax.set_xticks([j + 0.5 for j in range(width)], [str(j) for j in range(width)])
    ax.set_yticks([])
    ax.set_xlabel("logical block (number inside = physical block id; fill = tokens written)")
    ax.set_title("block tables")
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)


def draw_pool(ax, snap: BlockSnapshot, colour: dict[str, str], cols: int = 16) -> None:
    """The physical block pool on `ax`, each block coloured by its owner, with a legend."""
    from matplotlib.patches import Patch, Rectangle
    owners = snap.owners()
    rows = -(-snap.num_blocks // cols)
    for b in range(snap.num_blocks):
        x, y = b % cols, rows - 1 - b // cols
        who = owners.get(b, [])
        if who:
            face, hatch = colour[who[0]], "//" if len(who) > 1 else None
        elif snap.cached[b]:
            face, hatch = "#bbbbbb", "xx"
        else:
            face, hatch = "white", None
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=face, edgecolor="black", hatch=hatch,
                               alpha=0.85 if who else 1.0))
        ax.text(x + 0.5, y + 0.5, str(b), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, cols)
    ax.set_ylim(0, rows)
    ax.set_aspect("equal")
    ax.axis("off")
    used = sum(1 for c in snap.ref_counts if c > 0)
    ax.set_title(f"physical block pool: {used} used, {sum(snap.cached)} cached, "
                 f"{snap.num_blocks - used - sum(snap.cached)} never used / wiped "
                 f"({snap.block_size} tokens per block)")
    handles = [Patch(facecolor=colour[r], label=r) for r in snap.tables]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="//", label="shared (ref > 1)"),
                Patch(facecolor="#bbbbbb", edgecolor="black", hatch="xx", label="cached, free"),
                Patch(facecolor="white", edgecolor="black", label="free")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


# ---------------------------------------------------------------------------- timelines
@dataclass
class StepRecord:
    step: int
    kind: str                                  # "prefill" or "decode"
    states: dict[str, str]                     # request id -> waiting|prefill|recompute|decode|paused
    finished: list[str]
    preempted: list[str]
    running: int                               # sequences in the running batch after the step
    blocks_used: int
    seconds: float


@dataclass
class Trace:
    requests: list[str]                        # in arrival order
    steps: list[StepRecord] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)   # request id -> final RequestOutput
    max_batch_size: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def count(self, state: str) -> int:
        return sum(1 for s in self.steps for v in s.states.values() if v == state)


def trace_steps(engine, max_steps: int = 100_000) -> Trace:
    """Call engine.step() until nothing is left, recording for every live request what it did
    in each step: computed (prefill, recompute after a preemption, or decode), sat in the running
    batch without being computed (paused by another request's prefill step), or waited."""
    seen = list(engine.seqs)
    trace = Trace(requests=seen, max_batch_size=engine.scheduler.max_batch_size)
    while engine.has_unfinished() and trace.num_steps < max_steps:
        before = {rid: (s, s.status, s.num_computed_tokens, s.num_preemptions)
                  for rid, s in engine.seqs.items()}
        for rid in before:
            if rid not in trace.requests:
                trace.requests.append(rid)
        t0 = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - t0
        states, preempted = {}, []
        for rid, (seq, status, computed, npre) in before.items():
            if seq.num_preemptions > npre:
                preempted.append(rid)
                states[rid] = "waiting"
            elif seq.num_computed_tokens > computed:
                if status is SequenceStatus.WAITING:
                    states[rid] = "recompute" if seq.num_preemptions else "prefill"
                else:
                    states[rid] = "decode"
            elif status is SequenceStatus.RUNNING:
                states[rid] = "paused"
            else:
                states[rid] = "waiting"
        kind = "prefill" if any(v in ("prefill", "recompute") for v in states.values()) else "decode"
        finished = [o.request_id for o in outs if o.finished]
        for o in outs:
            if o.finished:
                trace.outputs[o.request_id] = o
        trace.steps.append(StepRecord(trace.num_steps, kind, states, finished, preempted,
                                      len(engine.scheduler.running), engine.block_manager.num_used,
                                      seconds))
    return trace


def draw_timeline(trace: Trace, title: str | None = None):
    """Gantt chart: one row per request, one column per engine step, coloured by what the
    request did in that step; below it, how many requests each step computed."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(12, 1.6 + 0.38 * len(trace.requests)), sharex=True,
                                   gridspec_kw={"height_ratios": [max(3, len(trace.requests) / 2), 1.4]})
    n = len(trace.requests)
    for r, rid in enumerate(trace.requests):
        y = n - 1 - r
        for s in trace.steps:
            state = s.states.get(rid)
            if state is not None:
                ax.broken_barh([(s.step, 1)], (y + 0.1, 0.8), facecolors=STATE_COLOURS[state])
            if rid in s.finished:
                ax.plot(s.step + 1, y + 0.5, marker="|", color="black", markersize=12)
            if rid in s.preempted:
                ax.plot(s.step + 0.5, y + 0.5, marker="x", color="black", markersize=8)
        out = trace.outputs.get(rid)
        if out is not None:
            last = max(s.step for s in trace.steps if rid in s.states)
            ax.text(last + 1.3, y + 0.5, f"{len(out.token_ids)} tok", va="center", fontsize=8)
    ax.set_yticks([n - 1 - r + 0.5 for r in range(n)], trace.requests)
    ax.set_ylim(0, n)
    ax.set_ylabel("request")
    handles = [Patch(facecolor=c, label=k) for k, c in STATE_COLOURS.items()
               if trace.count(k) or k in ("prefill", "decode", "waiting")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    for kind, colour in (("prefill", STATE_COLOURS["prefill"]), ("decode", STATE_COLOURS["decode"])):
        picked = [s for s in trace.steps if s.kind == kind]
        computed = [sum(v in ("prefill", "recompute", "decode") for v in s.states.values()) for s in picked]
        ax_n.bar([s.step + 0.5 for s in picked], computed, width=0.8, color=colour, label=f"{kind} step")
    if trace.max_batch_size:
        ax_n.axhline(trace.max_batch_size, ls="--", color="grey", lw=1, label="max_batch_size")
    ax_n.set_ylim(0, trace.max_batch_size + 1)
    ax_n.set_ylabel("requests\ncomputed")
    ax_n.set_xlabel("engine step")
    ax_n.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax_n.set_xlim(0, trace.num_steps + 4)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
