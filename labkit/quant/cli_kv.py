"""`labkit lite calibrate` and `labkit lite kv_qparams`: the KV-cache steps of the lesson's
offline quantization flow (registered by `register_lite` in labkit/cli.py).

    labkit lite calibrate MODEL --work-dir DIR [--calib-samples 128] [--calib-seqlen 2048]
    labkit lite kv_qparams DIR WORKSPACE/triton_models/weights [--kv-bits 8] [--kv-sym] [--num-tp N]
    labkit lite k_smooth DIR WORKSPACE/triton_models/weights [--alpha 0.5]

Importing this module is cheap (argparse only); the work is imported when a command runs.
"""
from __future__ import annotations

import argparse


def register(lite_sub) -> None:
    """Add calibrate and kv_qparams under `labkit lite`."""
    from labkit.cli import _command, _flag, _lazy

    p = _command(lite_sub, "calibrate", "Per-layer activation statistics (Linear inputs; K and V "
                 "per KV head and channel) on the pydoc corpus, saved as .pth files.",
                 _lazy("labkit.quant.cli_kv", "run_calibrate"))
    p.add_argument("model", help="a workspace, smollm2-135m, an HF directory or a .gguf")
    _flag(p, "--work-dir", required=True, help="where the statistics go (created if missing)")
    _flag(p, "--calib-samples", type=int, default=128,
          help="samples of --calib-seqlen tokens (default 128; capped at what the text holds)")
    _flag(p, "--calib-seqlen", type=int, default=2048, help="tokens per sample (default 2048)")
    _flag(p, "--device", default="cpu", help="cpu | cuda (default cpu)")
    _flag(p, "--no-progress", action="store_true", help="no progress bar")

    q = _command(lite_sub, "kv_qparams", "Static int8/int4 KV-cache parameters per layer and KV "
                 "head from calibrate's statistics, written into the workspace (quant_policy 8 "
                 "then uses them).", _lazy("labkit.quant.cli_kv", "run_kv_qparams"))
    q.add_argument("work_dir", help="the --work-dir of `labkit lite calibrate`")
    q.add_argument("turbomind_dir", help="WORKSPACE/triton_models/weights")
    _flag(q, "--kv-bits", type=int, default=8, help="8 (default) or 4")
    _flag(q, "--kv-sym", action="store_true", help="symmetric (zero = 2^(bits-1)) instead of min/max")
    _flag(q, "--num-tp", type=int, default=None,
          help="tensor-parallel ranks to split the heads for (default: the workspace's)")

    s = _command(lite_sub, "k_smooth", "K smoothing for the int4 KV cache: per-channel factors "
                 "from calibrate's K statistics, folded into w_qkv when the workspace loads "
                 "(q.k unchanged, K rows flatter).", _lazy("labkit.quant.cli_kv", "run_k_smooth"))
    s.add_argument("work_dir", help="the --work-dir of `labkit lite calibrate`")
    s.add_argument("turbomind_dir", help="WORKSPACE/triton_models/weights")
    _flag(s, "--alpha", type=float, default=0.5,
          help="migration strength in (0, 1]: c = absmax^alpha (default 0.5)")


def run_calibrate(args: argparse.Namespace) -> int:
    from labkit.quant.calibrate import FILES, calibrate
    dst = calibrate(args.model, args.work_dir, args.calib_samples, args.calib_seqlen,
                    device=args.device, progress=not args.no_progress)
    print(f"statistics of {args.model} -> {dst}: {', '.join(FILES)}")
    print(f"next: labkit lite kv_qparams {args.work_dir} WORKSPACE/triton_models/weights")
    return 0


def run_kv_qparams(args: argparse.Namespace) -> int:
    from labkit.quant.kv_qparams import write_kv_qparams
    dst = write_kv_qparams(args.work_dir, args.turbomind_dir, args.kv_bits, args.kv_sym, args.num_tp)
    print(f"int{args.kv_bits} {'symmetric' if args.kv_sym else 'asymmetric'} KV parameters -> {dst}")
    print(f"quant_policy={args.kv_bits} now uses them (set it in config.ini or pass --quant-policy)")
    return 0


def run_k_smooth(args: argparse.Namespace) -> int:
    from labkit.quant.k_smooth import write_k_smooth
    from labkit.quant.kv_qparams import QPARAMS_FILE
    dst = write_k_smooth(args.work_dir, args.turbomind_dir, args.alpha)
    print(f"K smoothing factors (alpha {args.alpha}) -> {dst}; the workspace loads with them "
          f"folded into w_qkv (delete the file to undo)")
    if (dst.parent / QPARAMS_FILE).is_file():
        print(f"the workspace's {QPARAMS_FILE} assumes the previous smoothing: rerun "
              f"`labkit lite kv_qparams {args.work_dir} {args.turbomind_dir}`")
    return 0
