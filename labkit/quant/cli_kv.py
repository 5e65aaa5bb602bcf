"""`labkit lite calibrate` and `labkit lite kv_qparams`: the KV-cache steps of the lesson's
offline quantization flow (registered by `register_lite` in labkit/cli.py).

    labkit lite calibrate MODEL --work-dir DIR [--calib-samples 128] [--calib-seqlen 2048]
    labkit lite kv_qparams DIR WORKSPACE/triton_models/weights [--kv-bits 8] [--kv-sym] [--num-tp N]

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
