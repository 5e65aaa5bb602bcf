"""`labkit lite auto_awq` (registered into the `lite` group by labkit/cli.py's register_lite).

Kept light: argparse only; torch and the quantizer are imported when the command runs.
"""
from __future__ import annotations

import argparse


def register(lite_sub, command, flag) -> None:
    """Add `auto_awq` to the `lite` subcommands. `command`/`flag` are labkit.cli's helpers
    (kebab and snake spellings of subcommands and flags)."""
    p = command(lite_sub, "auto_awq", "Quantize a model's weights to 4 bits with AWQ "
                "(calibrated on CPython's docs) into an HF-style AWQ folder; then `labkit convert "
                "DIR --model-format awq` makes an int4 workspace.", main)
    p.add_argument("model", help="smollm2-135m | HF directory | file.gguf | fp workspace")
    flag(p, "--work-dir", required=True, help="the AWQ folder to write")
    flag(p, "--w-bits", type=int, default=4, help="weight bits (only 4)")
    flag(p, "--w-group-size", type=int, default=None,
         help="columns per scale: 32, 64 or 128 (default: the largest dividing every Linear's "
              "in_features; 64 for smollm2-135m, whose hidden size is 576)")
    flag(p, "--w-sym", action="store_true", help="symmetric codes (zero point 8) instead of min-max")
    flag(p, "--calib-samples", type=int, default=32,
         help="calibration windows (default 32; lmdeploy uses 128 on a GPU)")
    flag(p, "--calib-seqlen", type=int, default=512,
         help="tokens per calibration window (default 512; lmdeploy uses 2048 on a GPU)")
    flag(p, "--search-scale", action="store_true",
         help="grid-search AWQ's alpha (20 points) per group instead of alpha = 0.5")
    flag(p, "--auto-clip", action="store_true",
         help="weight clipping after smoothing (AutoAWQ's auto_clip, each end of the range on "
              "its own): per group, the range [r_lo min, r_hi max], r in 1.0 .. 0.55, with the "
              "smallest output error on calibration tokens")
    flag(p, "--rtn", action="store_true",
         help="plain round-to-nearest, no AWQ smoothing (the baseline AWQ is compared with)")
    flag(p, "--device", default="cpu", help="where calibration runs: cpu | cuda | cuda:N")
    flag(p, "--overwrite", action="store_true", help="replace a non-empty --work-dir")
    flag(p, "--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from labkit.quant.awq_lite import auto_awq
    out = auto_awq(args.model, args.work_dir, w_bits=args.w_bits, w_group_size=args.w_group_size,
                   w_sym=args.w_sym, calib_samples=args.calib_samples,
                   calib_seqlen=args.calib_seqlen, search_scale=args.search_scale,
                   method="rtn" if args.rtn else "awq", auto_clip=args.auto_clip,
                   overwrite=args.overwrite,
                   device=args.device, progress=not args.no_progress)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"quantized {args.model} -> {out}  ({total / 2**20:.1f} MiB, {len(files)} files)")
    print(f"next: labkit convert {args.work_dir} --model-format awq --dst-path ./workspace_awq")
    return 0
