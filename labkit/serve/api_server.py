"""`labkit serve api_server MODEL`: load the engine once, serve it over HTTP with uvicorn.

    api_server (uvicorn, FastAPI routes: app.py)  =>  AsyncEngine (its own thread)  =>  LLMEngine

SIGTERM or Ctrl-C: uvicorn stops accepting connections, running requests get
--graceful-timeout seconds to finish (then they are cancelled, which aborts them in the
engine), the engine thread stops, and the process exits 0.
"""
from __future__ import annotations

import logging
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

from labkit.config import ConfigError

log = logging.getLogger("labkit")


def default_model_name(model: str, config_name: str | None = None) -> str:
    """The id clients send: the alias or dummy:SHAPE as typed; for a workspace its config.ini
    model_name (as lmdeploy); else the folder or file name."""
    from labkit.models import bundled, dummy
    from labkit.models.loader import is_workspace
    model = str(model)
    if bundled.is_alias(model) or dummy.is_dummy(model):
        return model
    if config_name and is_workspace(model):
        return config_name
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.resolve().name


def check_port_free(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound."""
    if not 0 < port < 65536:
        raise ConfigError(f"server_port={port} is not allowed: server_port must be in 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"server_port={port} on server_name={host!r} cannot be used "
                              f"({e.strerror}): pick another --server-port") from None


@contextmanager
def signals_end_quietly():
    """uvicorn turns SIGINT/SIGTERM into a graceful shutdown and then re-raises them for the
    handlers it found; with these no-op handlers in place the process then exits 0."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda *_: None) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def build_server(args):
    """Engine + AsyncEngine + app + uvicorn.Server from the parsed flags (not started)."""
    import uvicorn

    from labkit.engine.async_engine import AsyncEngine
    from labkit.engine.engine import LLMEngine
    from labkit.engine_args import engine_config_from_args
    from labkit.serve.app import build_app

    engine = LLMEngine(args.model, engine_config_from_args(args))
    aeng = AsyncEngine(engine, max_waiting=args.max_waiting_requests)
    name = args.served_model_name or default_model_name(args.model, engine.model_config.model_name)
    app = build_app(aeng, name, api_keys=args.api_keys or (), allow_origins=args.allow_origins or (),
                    max_sessions=args.max_sessions, session_idle_timeout=args.session_idle_timeout)
    config = uvicorn.Config(app, host=args.server_name, port=args.server_port,
                            log_level=args.log_level, timeout_graceful_shutdown=args.graceful_timeout,
                            access_log=args.log_level == "debug")
    return uvicorn.Server(config), aeng, app


def main(args) -> int:
    check_port_free(args.server_name, args.server_port)
    server, aeng, app = build_server(args)
    ec, st = aeng.engine.config, aeng.stats()
    host = f"[{args.server_name}]" if ":" in args.server_name else args.server_name
    url = f"http://{host}:{args.server_port}"
    print(f"labkit api_server: model {app.state.labkit.model_name!r} on {st['device']} {st['dtype']}, "
          f"max_batch_size {ec.max_batch_size}, session_len {ec.session_len}, KV cache "
          f"{st['blocks_total']} blocks x {st['block_size']} tokens"
          f"{', API keys required' if args.api_keys else ''}", flush=True)
    print(f"serving on {url}  (Swagger UI: {url}/docs, health: {url}/health, metrics: {url}/metrics)",
          flush=True)
    try:
        with signals_end_quietly():
            server.run()
    finally:
        app.state.labkit.sessions.close()
        aeng.close()
    if not server.started:             # uvicorn could not start (it logged why)
        return 2
    print("labkit api_server: stopped", flush=True)
    return 0
