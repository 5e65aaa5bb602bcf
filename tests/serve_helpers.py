"""A real `labkit serve api_server` in a subprocess, for the serving tests (one per module)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m labkit serve api_server MODEL FLAGS` on a free port; waits for /health."""

    def __init__(self, model, *flags, timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        from tests.helpers import _TMP          # removed when the test process exits
        self.log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=_TMP)[1])
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "labkit", "serve", "api_server", str(model),
               "--server-port", str(self.port), *map(str, flags)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api_server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"api_server not healthy after {timeout} s:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict:
        """/metrics parsed by prometheus-client's own parser: {sample name: value} (unlabelled)."""
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.name: s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples if not s.labels}

    def wait_metric(self, name: str, value: float, within: float) -> float:
        """Poll /metrics until `name` == value; return how long it took (or raise)."""
        t0 = time.monotonic()
        while True:
            got = self.metrics()[name]
            if got == value:
                return time.monotonic() - t0
            if time.monotonic() - t0 > within:
                raise AssertionError(f"{name} is {got}, not {value}, after {within} s")
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
