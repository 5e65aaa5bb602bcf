"""Flags of `labkit serve api_server | api_client | gradio` (light: nothing heavy is imported).

Every flag has its kebab-case and snake_case spelling; the lesson's lmdeploy 0.1 commands use
`--server_name`, `--server_port` and `--instance_num`.
"""
from __future__ import annotations

import argparse

from labkit.engine_args import add_engine_args, add_generation_args, flag

DEFAULT_API_PORT = 23333       # lmdeploy's
DEFAULT_GRADIO_PORT = 6006     # the lesson's (lmdeploy 0.1 served gradio on 6006)


def _server_flags(p, port: int) -> None:
    g = p.add_argument_group("server")
    flag(g, "server_name", default="127.0.0.1",
         help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    flag(g, "server_port", type=int, default=port, help=f"port (default {port})")


def add_api_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a workspace, smollm2-135m, an HF directory, a .gguf or dummy:SHAPE")
    _server_flags(p, DEFAULT_API_PORT)
    g = p.add_argument_group("api")
    g.add_argument("--instance-num", "--instance_num", type=int, dest="max_batch_size", help="lmdeploy 0.1's name for --max-batch-size: how many requests run at once")
    flag(g, "api_keys", nargs="+", default=None, metavar="KEY",
         help="accept only requests with `Authorization: Bearer KEY` on /v1/* (401 otherwise; "
              "/health and /metrics stay open)")
    flag(g, "allow_origins", nargs="+", default=None, metavar="ORIGIN",
         help="CORS: origins allowed to call the API from a browser (e.g. http://localhost:6006 or *)")
    flag(g, "served_model_name", default=None,
         help="the model id clients send (default: the alias, or the workspace's folder name)")
    flag(g, "max_waiting_requests", type=int, default=1024,
         help="answer 503 once this many requests wait for a slot (default 1024)")
    flag(g, "max_sessions", type=int, default=256,
         help="interactive sessions kept at once; the least recently used is ended beyond it")
    flag(g, "session_idle_timeout", type=float, default=3600.0,
         help="end an interactive session (and free its KV) after this many idle seconds")
    flag(g, "graceful_timeout", type=float, default=10.0,
         help="on SIGTERM/Ctrl-C: seconds running requests get to finish before they are aborted")
    add_engine_args(p)


def add_api_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the api_server, e.g. http://127.0.0.1:23333")
    flag(p, "api_key", default=None, help="sent as `Authorization: Bearer KEY`")
    flag(p, "session_id", type=int, default=-1,
         help="the session to talk in (default -1: the server picks a new one)")
    flag(p, "timeout", type=float, default=600.0, help="seconds to wait for an answer")
    add_generation_args(p)


def add_gradio_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="http(s)://HOST:PORT of an api_server (through the openai client), "
                                 "or a model/workspace to run here")
    _server_flags(p, DEFAULT_GRADIO_PORT)
    flag(p, "api_key", default=None, help="API key of the api_server (URL mode)")
    flag(p, "share", action="store_true", help="ask Gradio for a public share link (needs internet)")
    add_engine_args(p)
