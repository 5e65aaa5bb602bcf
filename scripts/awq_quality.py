"""AWQ quality on the bundled model (issue 10's acceptance): perplexity on the pydoc corpus
(16 x 1024 tokens, never seen by calibration) measured by HF transformers on the dequantized
weights, for: unquantized, RTN g64, AWQ alpha 0.5 g64 and AWQ --search-scale g64 (each also
with --auto-clip); and RTN g32, aligned to the bundled Q4_1 GGUF blocks (same steps and codes;
the AWQ format's integer zero point is what it loses against them, notebook 09), and AWQ with
--auto-clip at g32.

    python scripts/awq_quality.py [--out build/awq_quality.json] [--calib-samples 32]
                                  [--rows "awq g64 alpha 0.5 clip" ...]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from labkit.quant.awq_data import corpus_ids, eval_windows
from labkit.quant.awq_lite import auto_awq
from labkit.quant.awq_quality import hf_fp_model, hf_model_from_awq, perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/awq_quality.json")
    ap.add_argument("--work", default="build/awq_quality")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--rows", nargs="*", help="only these rows (names as printed), after "
                    "'unquantized' (the baseline every percentage is taken against)")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from labkit.models.bundled import bundled_tokenizer_dir
    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    windows = eval_windows(corpus_ids(tok))                     # (16, 1024)
    rows = []

    def record(name, model, extra):
        t0 = time.perf_counter()
        ppl = perplexity(model, windows)
        rows.append(dict(name=name, ppl=ppl, eval_s=time.perf_counter() - t0, **extra))
        base = rows[0]["ppl"]
        print(f"{name:28s} ppl {ppl:8.3f}  {100 * (ppl / base - 1):+6.1f}%  {extra}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))

    record("unquantized", hf_fp_model(), {})
    for name, group, method, search, clip in [("rtn g64", 64, "rtn", False, False),
                                              ("awq g64 alpha 0.5", 64, "awq", False, False),
                                              ("awq g64 alpha 0.5 clip", 64, "awq", False, True),
                                              ("awq g64 search", 64, "awq", True, False),
                                              ("awq g64 search clip", 64, "awq", True, True),
                                              ("rtn g32", 32, "rtn", False, False),
                                              ("awq g32 alpha 0.5 clip", 32, "awq", False, True),
                                              ("awq g32 search clip", 32, "awq", True, True)]:
        if args.rows and name not in args.rows:
            continue
        t0 = time.perf_counter()
        d = Path(args.work) / name.replace(" ", "_").replace(".", "")
        auto_awq("smollm2-135m", d, w_group_size=group, method=method, search_scale=search,
                 auto_clip=clip, calib_samples=args.calib_samples,
                 calib_seqlen=args.calib_seqlen, overwrite=True, progress=False)
        record(name, hf_model_from_awq(d), dict(group=group, method=method, search=search,
                                                clip=clip,
                                                quantize_s=round(time.perf_counter() - t0, 1)))


if __name__ == "__main__":
    main()
