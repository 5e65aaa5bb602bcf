"""The two pictures of notebook 04 (matplotlib is imported inside, as in labkit.viz)."""
from __future__ import annotations

from labkit.dist.comm import bytes_per_token

# (hidden, layers, vocab) of models to place on the bytes-per-token plot
MODELS = {"SmolLM2-135M": (576, 30, 49152), "Llama-3.2-1B": (2048, 16, 128256),
          "Llama-2-7B": (4096, 32, 32000), "Llama-2-70B": (8192, 80, 32000)}


def draw_bytes_per_token(tps=(2, 4, 8), elem_bytes: int = 2, models=MODELS):
    """Bytes each rank sends per generated token, against hidden size, one line per tp."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    hidden = [h for h, _, _ in models.values()]
    for tp in tps:
        sent = [bytes_per_token(h, l, v, tp, elem_bytes)["sent"] / 2**10 for h, l, v in models.values()]
        ax.plot(hidden, sent, "o-", label=f"tp={tp}")
    for name, (h, l, v) in models.items():
        ax.annotate(name, (h, bytes_per_token(h, l, v, tps[0], elem_bytes)["sent"] / 2**10),
                    textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="hidden size H", ylabel="KiB sent per token per rank",
           title=f"tensor-parallel traffic per generated token ({8 * elem_bytes}-bit activations)")
    ax.legend()
    fig.tight_layout()
    return fig


def draw_all_reduce(rows: list[dict], alpha: float, beta: float, marks: dict | None = None,
                    title: str = "all-reduce time vs message size"):
    """Measured time per all-reduce (log-log), the fitted alpha + n/beta, and marked sizes."""
    import matplotlib.pyplot as plt
    n = [r["bytes"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(n, [r["seconds"] * 1e6 for r in rows], "o", label="measured (median)")
    ax.plot(n, [(alpha + x / beta) * 1e6 for x in n], "-",
            label=f"fit: {alpha * 1e6:.0f} us + n / {beta / 1e9:.2f} GB/s")
    for name, size in (marks or {}).items():
        ax.axvline(size, color="grey", ls=":")
        ax.annotate(name, (size, (alpha + size / beta) * 1e6), fontsize=8, rotation=90,
                    textcoords="offset points", xytext=(3, 5))
    ax.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="time (us)", title=title)
    ax.legend()
    fig.tight_layout()
    return fig
