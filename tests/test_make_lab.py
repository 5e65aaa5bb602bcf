"""Acceptance: `make lab` reaches a running JupyterLab.

Starts `make lab LAB_PORT=<free port>` in its own process group, reads its output until the URL
with `?token=` appears (the Makefile converts ./workspace first if it is missing, ~10 s), fetches
`/lab?token=...` (HTTP 200, a JupyterLab page) and the contents API (the course notebooks are
served), then stops the whole process group.

Runs under `make test`, where the .venv already exists. Skipped (with the reason) when `make` or
.venv is missing, or when LABKIT_SKIP_MAKE_LAB=1.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
URL_RE = re.compile(r"(https?://[\w.\-]+:\d+)/lab\?token=(\w+)")
START_TIMEOUT_S = 600      # covers a re-install when pyproject.toml changed since the last one


def _skip_reason() -> str | None:
    if os.environ.get("LABKIT_SKIP_MAKE_LAB", "0") == "1":
        return "LABKIT_SKIP_MAKE_LAB=1"
    if shutil.which("make") is None:
        return "`make` is not installed"
    if not (REPO / ".venv" / "bin" / "jupyter").exists():
        return ".venv is missing (run `make install`; `make test` does it)"
    return None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTHONPATH"):   # a clean `make`, the venv's labkit
        env.pop(k, None)
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop make, jupyter and its kernels: the whole process group, TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _get(url: str, retry_s: float = 60) -> tuple[int, str]:
    """GET with retries: jupyter prints its URL a moment before it accepts connections."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.URLError as e:
            if not isinstance(e.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_make_lab_serves_jupyterlab_with_token():
    port = _free_port()
    proc = subprocess.Popen(["make", "lab", f"LAB_PORT={port}"], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()        # a reader thread, so waiting can time out

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)                         # end of output: make has exited
    threading.Thread(target=pump, daemon=True).start()
    out, match = [], None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while match is None:
            left = deadline - time.monotonic()
            assert left > 0, "no URL with ?token= within the timeout:\n" + "".join(out[-40:])
            try:
                line = lines.get(timeout=min(left, 5))
            except queue.Empty:
                continue
            assert line is not None, f"make lab exited ({proc.poll()}):\n" + "".join(out[-40:])
            out.append(line)
            match = URL_RE.search(line)
        base, token = match.group(1), match.group(2)
        status, body = _get(f"{base}/lab?token={token}")
        assert status == 200 and "JupyterLab" in body, body[:500]
        status, body = _get(f"{base}/api/contents?token={token}")
        names = {item["name"] for item in json.loads(body)["content"]}
        assert status == 200 and "00_environment.ipynb" in names, names
        assert (REPO / "workspace" / "triton_models" / "weights" / "config.ini").is_file()
    finally:
        _stop(proc)
