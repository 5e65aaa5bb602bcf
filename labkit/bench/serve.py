"""`labkit bench serve URL`: an API server under load, as vLLM's benchmark_serving measures it.

Workload: N requests from the bench workload (real English text from CPython's bundled docs,
prompt lengths uniform in [a, b] tokens, output lengths uniform in [c, d], ignore_eos so each
produces exactly its length), sent as streaming `/v1/completions` (or `/v1/chat/completions`)
requests arriving as a Poisson process of `--request-rate` requests/s (`inf`: all at once),
optionally at most `--max-concurrency` at a time.

Per request, seen from the client: TTFT (sent -> first text), TPOT ((latency - TTFT) /
(output tokens - 1)), ITL (between two chunks with text), E2E latency. Token counts come from
the server's `usage` (stream_options.include_usage). Reported: mean, p50, p90, p99, and
request / output / total token throughput over the whole run.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

PCTS = (50, 90, 99)


@dataclass
class Result:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list = field(default_factory=list)
    error: str = ""


def make_prompts(tokenizer_dir, n, input_len, output_len, seed) -> list[tuple[str, int]]:
    """(prompt text, output length) pairs; the text is a slice of the corpus of about the
    asked number of tokens (the server's usage gives the exact count)."""
    from labkit.bench.workload import make_workload
    from labkit.models.bundled import bundled_tokenizer_dir
    from labkit.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_dir or bundled_tokenizer_dir())
    return [(tok.decode(r.prompt_ids), r.output_len)
            for r in make_workload(tok, n, input_len, output_len, seed)]


async def one_request(client, url: str, model: str, endpoint: str, prompt: str, out_len: int) -> Result:
    body = {"model": model, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    res, start = Result(), time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    res.error = obj["error"].get("message", "stream error")
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
                for c in obj.get("choices", []):
                    text = c.get("text") if endpoint != "chat" else c.get("delta", {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
    except Exception as e:                   # a dropped connection counts as a failed request
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.ok = last is not None
    return res


def _stats(values: list[float]) -> dict:
    import numpy as np
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PCTS}}
    a = np.asarray(values) * 1e3                                    # ms
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PCTS}}


async def bench_async(url: str, prompts, request_rate: float = float("inf"), model: str | None = None,
                      endpoint: str = "completions", max_concurrency: int | None = None,
                      api_key: str | None = None, seed: int = 0, timeout: float = 600.0) -> dict:
    import httpx
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(prompts) + 1)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        if model is None:
            r = await client.get(url + "/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        warm = await one_request(client, url, model, endpoint, prompts[0][0], 4)   # load, compile
        if not warm.ok:
            raise RuntimeError(f"the warm-up request failed: {warm.error}")
        rng = random.Random(seed)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def send(prompt, out_len):
            if gate is None:
                return await one_request(client, url, model, endpoint, prompt, out_len)
            async with gate:
                return await one_request(client, url, model, endpoint, prompt, out_len)

        tasks, start = [], time.perf_counter()
        for prompt, out_len in prompts:
            tasks.append(asyncio.create_task(send(prompt, out_len)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))    # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    n_in, n_out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    return {"benchmark": "serve", "url": url, "model": model, "endpoint": endpoint,
            "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:5],
            "duration_s": duration, "request_throughput": len(ok) / duration,
            "output_throughput": n_out / duration, "total_token_throughput": (n_in + n_out) / duration,
            "prompt_tokens": n_in, "output_tokens": n_out,
            "ttft_ms": _stats([r.ttft for r in ok]),
            "tpot_ms": _stats([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
            "itl_ms": _stats([x for r in ok for x in r.itl]),
            "e2e_ms": _stats([r.latency for r in ok])}


def run_bench(url: str, num_requests: int = 32, request_rate: float = float("inf"),
              input_len=(16, 256), output_len=(16, 128), seed: int = 0, tokenizer=None, **kw) -> dict:
    """Python entry point (notebooks): build the workload, run it, return the result dict.
    Works inside a running event loop (Jupyter) too: the benchmark then runs in a thread."""
    from labkit.bench.common import commit
    prompts = make_prompts(tokenizer, num_requests, tuple(input_len), tuple(output_len), seed)
    coro = bench_async(url, prompts, request_rate, seed=seed, **kw)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        result = asyncio.run(coro)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(asyncio.run, coro).result()
    result.update(commit=commit(), date=time.strftime("%Y-%m-%d"),
                  workload={"num_requests": num_requests, "request_rate": request_rate,
                            "input_len": list(input_len), "output_len": list(output_len),
                            "seed": seed, "max_concurrency": kw.get("max_concurrency"),
                            "ignore_eos": True})
    return result


def print_table(r: dict) -> None:
    w = r["workload"]
    print(f"bench serve: {w['num_requests']} requests, prompt {w['input_len']}, output "
          f"{w['output_len']}, rate {w['request_rate']} req/s, max concurrency "
          f"{w['max_concurrency'] or 'none'}, seed {w['seed']} | {r['url']} {r['model']} "
          f"({r['endpoint']}) | commit {r['commit']}")
    print(f"completed {r['completed']}, failed {r['failed']}, {r['duration_s']:.2f} s: "
          f"{r['request_throughput']:.2f} req/s, {r['output_throughput']:.1f} output tok/s, "
          f"{r['total_token_throughput']:.1f} total tok/s")
    for e in r["errors"]:
        print(f"  error: {e}")
    print(f"{'(ms)':<6}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p99")))
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = r[f"{name}_ms"]
        print(f"{name.upper():<6}" + "".join(f"{s[k]:>10.1f}" if s[k] is not None else f"{'-':>10}"
                                             for k in ("mean", "p50", "p90", "p99")))


def main(args) -> int:
    r = run_bench(args.url, args.num_requests, args.request_rate, args.input_len, args.output_len,
                  args.seed, args.tokenizer, model=args.model, endpoint=args.endpoint,
                  max_concurrency=args.max_concurrency, api_key=args.api_key)
    print_table(r)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(r, f, indent=1)
    if args.json:
        print(json.dumps(r))
    return 0 if r["completed"] else 1


def add_serve_args(p) -> None:
    from labkit.engine_args import flag
    p.add_argument("url", help="the api_server, e.g. http://127.0.0.1:23333")
    flag(p, "model", default=None, help="model id to send (default: the server's first)")
    flag(p, "endpoint", choices=["completions", "chat"], default="completions")
    flag(p, "num_requests", type=int, default=32)
    flag(p, "request_rate", type=float, default=float("inf"),
         help="requests/s, Poisson arrivals (default inf: all at once)")
    flag(p, "max_concurrency", type=int, default=None, help="requests in flight at most")
    flag(p, "input_len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    flag(p, "output_len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    flag(p, "seed", type=int, default=0)
    flag(p, "api_key", default=None)
    flag(p, "tokenizer", default=None, help="tokenizer folder for the workload (default: the bundled one)")
    flag(p, "output", help="also write the JSON result to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
