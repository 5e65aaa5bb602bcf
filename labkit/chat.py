"""`labkit chat MODEL_OR_WORKSPACE`: a terminal chat like `lmdeploy chat turbomind`.

Type a message and press Enter; the answer streams back. `end` starts a new session,
`exit` quits. Works with piped stdin (one message per line), so scripts and tests can drive it.
"""
from __future__ import annotations

import sys

from labkit.config import GenerationConfig
from labkit.pipeline import Pipeline

BANNER = "labkit chat: type a message and press Enter; 'end' resets the session, 'exit' quits."


def run_chat(pipe: Pipeline, gen_config: GenerationConfig, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    engine, session_len = pipe.engine, pipe.engine.config.session_len
    history: list[dict] = []
    print(BANNER, file=stdout, flush=True)
    turn = 0
    while True:
        if interactive:
            print(f"\n[{turn}] >>> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:                       # EOF
            break
        prompt = line.strip()
        if not prompt:
            continue
        if prompt == "exit":
            break
        if prompt == "end":
            history, turn = [], 0
            print("(session reset)", file=stdout, flush=True)
            continue
        messages = history + [{"role": "user", "content": prompt}]
        n_prompt = len(engine.tokenizer.prompt_to_ids(messages))
        if n_prompt >= session_len - 1:
            print(f"(this session would exceed session_len={session_len} tokens "
                  f"({n_prompt} in the history and prompt); type 'end' to start a new session)",
                  file=stdout, flush=True)
            continue
        gc = gen_config.replace(max_new_tokens=min(gen_config.max_new_tokens, session_len - n_prompt))
        if not interactive:
            print(f"[{turn}] >>> {prompt}", file=stdout)
        reply, reason = [], None
        for r in pipe.stream_infer([messages], gen_config=gc):
            print(r.text, end="", file=stdout, flush=True)
            reply.append(r.text)
            reason = r.finish_reason or reason
        print(file=stdout, flush=True)
        if reason == "length" and n_prompt + gc.max_new_tokens >= session_len:
            print(f"(reached session_len={session_len}; type 'end' to start a new session)",
                  file=stdout, flush=True)
        history = messages + [{"role": "assistant", "content": "".join(reply)}]
        turn += 1
    return 0


def main(args) -> int:
    from labkit.engine_args import engine_config_from_args, generation_config_from_args
    from labkit.pipeline import pipeline
    pipe = pipeline(args.model, backend_config=engine_config_from_args(args), log_level="WARNING")
    try:
        return run_chat(pipe, generation_config_from_args(args))
    finally:
        pipe.close()
