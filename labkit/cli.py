"""`labkit` command line (also `python -m labkit`), shaped like `lmdeploy`'s.

    labkit check_env                                  what is installed, is the bundled model there
    labkit convert MODEL --dst-path ./workspace       offline conversion into a TurboMind workspace
    labkit inspect WORKSPACE_OR_MODEL [--tensors]     read (and validate) a workspace's config.ini
    labkit lite auto_awq MODEL --work-dir DIR         4-bit AWQ weights (then convert --model-format awq)
    labkit grade [--submission DIR] [--gradescope]    grade homework, write results.json

Conventions
- Every flag has its kebab-case and its snake_case spelling (`--dst-path` / `--dst_path`),
  because the course's lmdeploy commands use both; subcommands likewise (`check_env` / `check-env`).
- Heavy imports (torch, transformers, serving stacks) happen only when a command runs: a
  command's handler is either a small function here that imports inside, or `_lazy(module, func)`,
  which imports `module` and calls `func(args)` when the command is chosen.
- Errors a user can fix (labkit's ConfigError, SourceError, ConversionError, BundledModelMissing,
  which are ValueError / FileNotFoundError subclasses, and other bad-path OSErrors) print ONE
  line `labkit: error: <message>` to stderr and exit 2. `--debug` (or LABKIT_DEBUG=1) shows the
  traceback instead. Ctrl-C and SIGTERM exit 130; a conversion interrupted that way leaves
  neither the destination nor its partial folder behind.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys
from typing import Callable

from labkit import interrupt

EXIT_ERROR = 2          # argparse's own exit status for bad usage; we use it for every user error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

Handler = Callable[[argparse.Namespace], "int | None"]


# ---------------------------------------------------------------------------- helpers
def _lazy(module: str, func: str) -> Handler:
    """A handler that imports `module` only when its command runs, then calls `func(args)`."""
    def run(args: argparse.Namespace):
        return getattr(importlib.import_module(module), func)(args)
    run.__qualname__ = f"_lazy({module}.{func})"
    return run


def _flag(p: argparse.ArgumentParser, name: str, *more: str, **kw) -> None:
    """Register `--a-b` and `--a_b` (plus any extra spellings) as one option."""
    spellings = [name]
    if name.startswith("--") and ("-" in name[2:] or "_" in name[2:]):
        kebab, snake = "--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")
        spellings = [kebab] + ([snake] if snake != kebab else [])
    kw.setdefault("dest", spellings[0][2:].replace("-", "_"))
    p.add_argument(*spellings, *more, **kw)


def _command(sub, name: str, help: str, handler: Handler, **kw) -> argparse.ArgumentParser:
    """Add a subcommand reachable as `name` and its kebab/snake twin."""
    twin = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    aliases = [twin] if twin != name else []
    p = sub.add_parser(name, aliases=aliases, help=help, description=help, parents=[_COMMON], **kw)
    p.set_defaults(handler=handler, command=name)
    return p


_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("--debug", action="store_true",
                     help="show the full traceback on errors (same as LABKIT_DEBUG=1)")
_flag(_COMMON, "--log-level", default="info", choices=["debug", "info", "warning", "error"],
      help="what the labkit logger prints to stderr (default: info)")


# ---------------------------------------------------------------------------- commands
# Each register_* adds one subcommand. New commands: write a register_* below, keep their
# imports inside the handler (or use _lazy), and append it to REGISTRARS.
def register_check_env(sub) -> None:
    p = _command(sub, "check_env", "Report the Python packages, the machine and the bundled model; "
                 "exit 1 when a required piece is missing.", _lazy("labkit.check_env", "main"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def register_convert(sub) -> None:
    p = _command(sub, "convert", "Convert a model (the alias smollm2-135m, an HF directory or a "
                 ".gguf file) into a TurboMind-style workspace.", _run_convert)
    p.add_argument("model", help="smollm2-135m | tiny-llama | HF directory | file.gguf")
    _flag(p, "--dst-path", default="./workspace", help="workspace to create (default: ./workspace)")
    _flag(p, "--tp", type=int, default=1,
          help="tensor-parallel ranks to shard for; must divide heads, KV heads, MLP and vocab")
    _flag(p, "--model-format", choices=["hf", "gguf", "awq"], default=None,
          help="source format (default: detected; awq: a folder made by `labkit lite auto_awq`, "
               "stored as an int4 workspace)")
    _flag(p, "--model-name", default=None, help="chat template name recorded in config.ini")
    _flag(p, "--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
          help="stored weight dtype (auto: the source's; GGUF dequantizes to fp32)")
    _flag(p, "--session-len", type=int, default=None,
          help="session_len written to config.ini (default: the model's context length)")
    _flag(p, "--overwrite", action="store_true", help="replace a non-empty --dst-path")
    _flag(p, "--no-progress", action="store_true", help="no progress bar")


def register_inspect(sub) -> None:
    p = _command(sub, "inspect", "Read and validate a workspace's config.ini (or describe a model "
                 "source) and list the tensors of each rank.", _lazy("labkit.check_env", "inspect_main"))
    p.add_argument("model", help="a workspace made by `labkit convert`, or a model source")
    _flag(p, "--tensors", action="store_true", help="also list tensor names, shapes and dtypes per rank")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def register_chat(sub) -> None:
    from labkit.engine_args import add_engine_args, add_generation_args
    p = _command(sub, "chat", "Chat with a model in the terminal (like `lmdeploy chat turbomind`): "
                 "streaming, multi-turn; 'end' resets the session, 'exit' quits.",
                 _lazy("labkit.chat", "main"))
    p.add_argument("model", help="a workspace, smollm2-135m, an HF directory or a .gguf")
    add_engine_args(p)
    add_generation_args(p)


def register_bench(sub) -> None:
    p = _command(sub, "bench", "Benchmarks: print a table; --json adds one JSON object on the "
                 "last line.", None)
    bsub = p.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True)
    t = _command(bsub, "throughput", "Continuous batching vs HF generate (static padded batches) "
                 "on a mixed-length workload.", _lazy("labkit.bench.throughput", "main"))
    from labkit.bench.throughput import add_throughput_args
    add_throughput_args(t)
    d = _command(bsub, "decode", "Decode step time vs HF transformers (eager, static cache + "
                 "torch.compile) and the memory-bandwidth roofline.", _lazy("labkit.bench.decode", "main"))
    from labkit.bench.args import add_decode_args
    add_decode_args(d)
    k = _command(bsub, "kernels", "Paged attention kernels vs torch SDPA on contiguous KV (GPU).",
                 _lazy("labkit.bench.kernels", "main"))
    from labkit.bench.args import add_kernels_args
    add_kernels_args(k)
    s = _command(bsub, "serve", "An api_server under load (vLLM's benchmark_serving): Poisson "
                 "arrivals, streaming; TTFT, TPOT, ITL, latency percentiles and throughput.",
                 _lazy("labkit.bench.serve", "main"))
    from labkit.bench.serve import add_serve_args
    add_serve_args(s)


def register_serve(sub) -> None:
    from labkit.serve.cli import add_api_client_args, add_api_server_args, add_gradio_args
    p = _command(sub, "serve", "Serve a model: the OpenAI-compatible api_server, its terminal "
                 "client, a Gradio web UI.", None)
    ssub = p.add_subparsers(title="servers", metavar="WHAT", required=True)
    add_api_server_args(_command(
        ssub, "api_server", "OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine: "
        "/v1/models, /v1/chat/completions, /v1/completions, /v1/chat/interactive, /health, "
        "/metrics. --instance-num is lmdeploy 0.1's name for --max-batch-size.",
        _lazy("labkit.serve.api_server", "main")))
    add_api_client_args(_command(
        ssub, "api_client", "Terminal chat with an api_server through /v1/chat/interactive "
        "(streaming, multi-turn; 'end' resets the session, 'exit' quits; reads piped stdin).",
        _lazy("labkit.serve.api_client", "main")))
    add_gradio_args(_command(
        ssub, "gradio", "Gradio chat web UI, either on an api_server (http(s)://... argument) or "
        "on a model loaded here.", _lazy("labkit.serve.gradio_app", "main")))


# `labkit lite STEP`: one module per quantization lesson, each with `register(lite_sub)`
LITE_MODULES = ("labkit.quant.cli_kv",      # calibrate, kv_qparams, k_smooth (KV cache, lesson 08)
                "labkit.quant.cli_awq")     # auto_awq (W4A16, lesson 10)


def register_lite(sub) -> None:
    import importlib.util
    p = _command(sub, "lite", "Quantization, the lesson's offline flow: calibrate -> "
                 "[k_smooth ->] kv_qparams (KV cache) or auto_awq (weights).", None)
    lsub = p.add_subparsers(title="steps", metavar="STEP", required=True)
    for module in LITE_MODULES:
        if importlib.util.find_spec(module) is not None:   # (a lesson's module may be absent)
            register = importlib.import_module(module).register
            if register.__code__.co_argcount == 3:         # register(lite_sub, command, flag)
                register(lsub, _command, _flag)
            else:                                          # register(lite_sub)
                register(lsub)


def register_eval(sub) -> None:
    p = _command(sub, "eval", "Quality measurements: print a table; --json adds one JSON object "
                 "on the last line.", None)
    esub = p.add_subparsers(title="evaluations", metavar="EVAL", required=True)
    from labkit.eval import add_ppl_args
    add_ppl_args(_command(esub, "ppl", "Perplexity through the engine's paged path (prefill in "
                          "chunks over the paged KV cache, quantized with --quant-policy 4/8).",
                          _lazy("labkit.eval", "main")))


def register_grade(sub) -> None:
    p = _command(sub, "grade", "Grade a homework submission with the graded tests (tests/homework): "
                 "a score table and Gradescope's results.json; or build the Gradescope autograder.",
                 _lazy("labkit.grading.cli", "main"))
    from labkit.grading.cli import add_grade_args
    add_grade_args(p, _flag)


REGISTRARS = [register_check_env, register_convert, register_inspect, register_chat, register_bench,
              register_serve, register_lite, register_eval, register_grade]


def _run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labkit.convert import convert, weights_dir

    dst = convert(args.model, args.dst_path, tp=args.tp, model_format=args.model_format,
                  model_name=args.model_name, dtype=args.dtype, overwrite=args.overwrite,
                  session_len=args.session_len, progress=not args.no_progress)
    files = sorted(p for p in Path(dst).rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"converted {args.model} -> {dst}  (tp={args.tp}, {total / 2**20:.1f} MiB, {len(files)} files)")
    for p in files:
        print(f"  {str(p.relative_to(dst)):<48} {p.stat().st_size / 2**20:9.2f} MiB")
    print(f"edit inference knobs in {weights_dir(dst) / 'config.ini'}; "
          f"check it with: labkit inspect {args.dst_path}")
    return 0


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labkit", description="labkit: the LMDeploy/TurboMind lesson's commands on a small, "
        "real inference engine. Flags accept kebab-case and snake_case.")
    parser.add_argument("--version", action="version", version=f"labkit {_version()}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("labkit")
    except Exception:
        return "(not installed)"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())        # collapse newlines: the contract is ONE line
    return text or type(e).__name__


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, (ValueError, FileNotFoundError)) and type(e).__module__.startswith("labkit"):
        return True
    # A path the user typed that is missing, unreadable or the wrong kind of thing.
    return isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                          PermissionError, FileExistsError))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    debug = args.debug or os.environ.get("LABKIT_DEBUG", "") not in ("", "0")
    _setup_logging(args.log_level)
    _dump_stacks_on_sigusr1()
    previous = interrupt.install()
    try:
        rc = args.handler(args)
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, interrupt.Terminated) else "interrupted"
        print(f"labkit: {what}; nothing was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:          # `labkit ... | head`: the reader left, that is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if debug or not isinstance(e, (ValueError, OSError)):
            raise
        if _is_user_error(e):
            print(f"labkit: error: {_one_line(e)}", file=sys.stderr)
        else:   # not one of ours: still one line, but say where the traceback is
            print(f"labkit: error: {type(e).__name__}: {_one_line(e)} (--debug shows the "
                  f"traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        terminated = interrupt.restore(previous)
    if terminated:                # it arrived after the last commit point: the work is whole,
        print("labkit: terminated (after the command had finished its work)", file=sys.stderr)
        return EXIT_INTERRUPTED   # but whoever sent it should still see that it stopped us
    return int(rc or 0)


def _dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID`: every thread's stack to stderr, for a run that seems to hang. Skipped
    where stderr is no file (main() called in-process under a capturing test or notebook)."""
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):      # io.UnsupportedOperation: no fileno()
        pass


def _setup_logging(level: str) -> None:
    log = logging.getLogger("labkit")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[labkit] %(message)s"))
        log.addHandler(h)
    log.setLevel(level.upper())
    log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
