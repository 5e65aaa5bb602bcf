"""GPU run of the serving path: `labkit serve api_server` on one GPU, then `labkit bench serve`.

    python scripts/gpu_serve.py [--model dummy:smollm2-135m] [--rates 4 16 64 inf] [--num-requests 200]

The model defaults to `dummy:smollm2-135m` (random weights in SmolLM2-135M's shape, made on the
device: the bundled GGUF does not travel). The server runs with `--max-batch-size 64`, bf16, the
Triton kernels (whatever the engine picks on CUDA). Checks first that a streamed greedy answer equals
the non-streamed one, then sweeps the request rate, then stops the server with SIGTERM (exit 0).
Prints a table last and writes every bench result to gpu_serve.json.

The device image has no serving stack: carry the wheels and the tokenizer folder, e.g.

    # here (pick the device's Python version):
    pip download --only-binary=:all: --python-version 3.11 -d wheels fastapi uvicorn httpx prometheus-client
    # there:
    pip install --no-index --find-links wheels fastapi uvicorn httpx prometheus-client
    export LABKIT_CACHE=$PWD/labkit_cache   # holding smollm2-tokenizer/ (from ~/.cache/labkit here)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:smollm2-135m")
    ap.add_argument("--rates", nargs="+", default=["4", "16", "64", "inf"])
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--input-len", type=int, nargs=2, default=[64, 512])
    ap.add_argument("--output-len", type=int, nargs=2, default=[64, 256])
    ap.add_argument("--max-batch-size", type=int, default=64)
    args = ap.parse_args()

    import httpx
    from labkit.bench.serve import print_table, run_bench

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open("gpu_serve_server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "labkit", "serve", "api_server", args.model, "--server-port", str(port),
         "--max-batch-size", str(args.max_batch_size), "--session-len", "2048",
         "--cache-max-entry-count", "0.5", "--max-waiting-requests", "100000"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1",
                 PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    try:
        t0 = time.time()
        while True:
            if server.poll() is not None:
                print(open("gpu_serve_server.log").read())
                raise SystemExit("the api_server died")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(f"api_server healthy after {time.time() - t0:.1f} s")

        body = {"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0}
        full = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        streamed = ""
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streamed += json.loads(line[6:])["choices"][0]["text"]
        print(f"stream == non-stream (greedy, 32 tokens): {streamed == full}")

        results = []
        for rate in args.rates:
            r = run_bench(url, args.num_requests, float(rate), args.input_len, args.output_len, seed=0)
            print_table(r)
            results.append(r)
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(120)
    with open("gpu_serve.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nSIGTERM -> exit {rc}; KV blocks used after the runs: "
          f"{[ln for ln in metrics.splitlines() if ln.startswith('labkit_kv_blocks_used')]}")
    print(f"\nbench serve on {args.model}, {args.num_requests} requests, prompt {args.input_len}, "
          f"output {args.output_len}, max_batch_size {args.max_batch_size}, commit {results[0]['commit']}")
    print(f"{'rate':>6}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}"
          f"{'ITL p99':>9}{'E2E p50':>9}{'failed':>8}   (ms)")
    for rate, r in zip(args.rates, results):
        print(f"{rate:>6}{r['request_throughput']:>8.2f}{r['output_throughput']:>11.1f}"
              f"{r['ttft_ms']['p50']:>10.1f}{r['ttft_ms']['p99']:>10.1f}{r['tpot_ms']['p50']:>10.2f}"
              f"{r['itl_ms']['p99']:>9.1f}{r['e2e_ms']['p50']:>9.0f}{r['failed']:>8}")
    return 0 if streamed == full and rc == 0 and all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
