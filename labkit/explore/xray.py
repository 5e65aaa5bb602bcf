"""An X-ray of a live engine: its block tables, block pool and queues after every step.

    for frame in xray_run(pipe.engine, prompts, GenerationConfig(max_new_tokens=32)):
        fig = draw_xray(frame)            # the engine as it is after frame.step steps

Nothing here changes what the engine does: `xray_run` only calls `engine.step()` and reads
the scheduler's queues and the block manager (labkit/viz.py's `block_snapshot`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from labkit.viz import PALETTE, BlockSnapshot, block_snapshot, draw_pool, draw_tables


@dataclass
class XrayFrame:
    step: int                          # engine steps run so far in this x-ray
    snapshot: BlockSnapshot
    running: list[str]                 # request ids, in the scheduler's order
    waiting: list[str]
    finished: list[str]                # finished since the x-ray started
    blocks_used: list[int]             # blocks in use after each step so far (step 0 first)
    blocks_total: int
    colours: dict[str, str] = field(default_factory=dict)   # stable per request across frames


def queues(engine) -> tuple[list[str], list[str]]:
    sched = engine.scheduler
    return [s.request_id for s in sched.running], [s.request_id for s in sched.waiting]


def xray_run(engine, prompts=(), gen_config=None, max_steps: int = 100_000) -> Iterator[XrayFrame]:
    """Queue `prompts` (if any), then yield a frame before the first step and after each step
    until no request is left (or max_steps)."""
    for p in prompts:
        engine.add_request(p, gen_config)
    colours: dict[str, str] = {}
    finished: list[str] = []
    history: list[int] = []
    step = 0
    while True:
        running, waiting = queues(engine)
        for rid in running + waiting:
            colours.setdefault(rid, PALETTE[len(colours) % len(PALETTE)])
        history.append(engine.block_manager.num_used)
        yield XrayFrame(step, block_snapshot(engine), running, waiting, list(finished),
                        list(history), engine.block_manager.num_blocks, dict(colours))
        if not engine.has_unfinished() or step >= max_steps:
            return
        finished += [o.request_id for o in engine.step() if o.finished]
        step += 1


def draw_xray(frame: XrayFrame, cols: int = 16):
    """Block tables | block pool | queues and blocks in use over the steps so far."""
    import matplotlib.pyplot as plt
    snap = frame.snapshot
    width = max([len(t) for t in snap.tables.values()] + [1])
    rows = -(-snap.num_blocks // cols)
    fig = plt.figure(figsize=(15, 1.6 + 0.5 * max(len(snap.tables), rows, 4)))
    grid = fig.add_gridspec(2, 3, width_ratios=[width + 3, cols, 7], height_ratios=[1, 1])
    ax_t, ax_p = fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[:, 1])
    ax_q, ax_h = fig.add_subplot(grid[0, 2]), fig.add_subplot(grid[1, 2])
    colour = {rid: frame.colours.get(rid, "#999999") for rid in snap.tables}
    draw_tables(ax_t, snap, colour)
    draw_pool(ax_p, snap, colour, cols)
    ax_p.get_legend().remove()                         # the queue panel names the requests
    ax_q.axis("off")
    ax_q.set_title(f"after step {frame.step}", fontsize=10)
    for y, (name, ids) in enumerate((("running", frame.running), ("waiting", frame.waiting),
                                     ("finished", frame.finished))):
        ax_q.text(0, 0.8 - 0.32 * y, f"{name} ({len(ids)}):", fontsize=9, weight="bold",
                  transform=ax_q.transAxes)
        for j, rid in enumerate(ids[:8]):
            ax_q.text(0.32 + 0.085 * j, 0.8 - 0.32 * y, "■", color=frame.colours.get(rid, "#999999"),
                      fontsize=12, transform=ax_q.transAxes)
        if len(ids) > 8:
            ax_q.text(0.32 + 0.085 * 8, 0.8 - 0.32 * y, f"+{len(ids) - 8}", fontsize=8,
                      transform=ax_q.transAxes)
    ax_h.plot(range(len(frame.blocks_used)), frame.blocks_used, "-", color="#dd8452")
    ax_h.axhline(frame.blocks_total, ls="--", color="grey", lw=1)
    ax_h.set(xlabel="engine step", ylabel="blocks used", ylim=(0, frame.blocks_total * 1.1),
             xlim=(0, max(len(frame.blocks_used), 8)))
    fig.tight_layout()
    return fig
