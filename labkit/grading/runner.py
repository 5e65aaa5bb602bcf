"""Run the graded tests against a submission in a child pytest, with a timeout per test.

    grade(submission) -> GradeReport

The child (`python -m pytest tests/homework -p labkit.grading.plugin ...`) reports each event
as it happens (plugin.py). This process watches those events:
- a test running longer than `timeout` seconds: the child's whole process group is killed,
  the test scores 0 ("timed out"), and a new child runs the tests not yet done;
- a child that dies inside a test (os._exit, a segfault): that test scores 0, the rest go on;
- tests never reached keep a zero-score entry with the reason, so every collected test is
  always in the report.
A student's sys.exit() inside a test is an ordinary failure (pytest catches SystemExit); one
while importing their file is a readable import error (submission.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labkit.grading.plugin import EVENTS_ENV, MAX_CAPTURED, truncate
from labkit.grading.results import GradeReport, TestResult
from labkit.grading.submission import ENV as SUBMISSION_ENV

REPO = Path(__file__).resolve().parents[2]
COLLECT_TIMEOUT = 300.0      # seconds for a child to start and collect (imports torch, labkit)
POLL = 0.05


class GradingError(ValueError):
    """A bad grading request (missing submission or tests folder): one line for the user."""


def find_tests_dir(tests_dir=None) -> Path:
    """The graded tests: --tests, else $LABKIT_HOMEWORK_TESTS, else tests/homework of this
    checkout, else ./tests/homework."""
    candidates = [tests_dir, os.environ.get("LABKIT_HOMEWORK_TESTS"), REPO / "tests" / "homework",
                  Path.cwd() / "tests" / "homework"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c).resolve()
    if tests_dir:
        raise GradingError(f"tests={tests_dir!s} is not a folder: pass the graded tests folder "
                           f"(tests/homework of a labkit checkout)")
    raise GradingError("the graded tests (tests/homework) were not found: run from a labkit "
                       "checkout or pass --tests DIR")


def grade(submission=None, tests_dir=None, timeout: float = 60.0, keyword: str | None = None,
          verbose: bool = False) -> GradeReport:
    """Grade `submission` (a folder with the homework files; default homework/)."""
    from labkit.grading.submission import submission_dir
    sub = Path(submission).resolve() if submission else submission_dir()
    if not sub.is_dir():
        raise GradingError(f"submission={str(submission)!r} is not a folder: pass the folder that "
                           f"holds a1_block_manager.py ... a5_tensor_parallel.py")
    if not timeout > 0:
        raise GradingError(f"timeout={timeout} is not allowed: give seconds per test, > 0")
    tests = find_tests_dir(tests_dir)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
        run = _Run(sub, tests, timeout, Path(tmp), verbose)
        run.all(keyword)
    report = GradeReport([run.results.get(n) or run.unfinished(n) for n in run.order],
                         execution_time=time.monotonic() - t0, notes=run.notes)
    return report


class _Run:
    def __init__(self, submission: Path, tests: Path, timeout: float, tmp: Path, verbose: bool):
        self.submission, self.tests, self.timeout, self.tmp = submission, tests, timeout, tmp
        self.verbose = verbose
        self.root = tests.parent.parent                # nodeids are relative to the repo root
        self.info: dict[str, dict] = {}                # nodeid -> collected info
        self.order: list[str] = []
        self.results: dict[str, TestResult] = {}
        self.notes: list[str] = []

    # ------------------------------------------------------------------ the loop
    def all(self, keyword: str | None) -> None:
        targets = [str(self.tests)] + (["-k", keyword] if keyword else [])
        for attempt in range(10_000):                  # each restart settles >= 1 test
            progressed = self._child(targets, attempt)
            todo = [n for n in self.order if n not in self.results]
            if not todo or not progressed:
                return
            targets = todo

    def _child(self, targets: list[str], attempt: int) -> bool:
        """One pytest child; returns whether it settled any test (else stop restarting)."""
        events, log = self.tmp / f"events{attempt}.jsonl", self.tmp / f"child{attempt}.log"
        env = dict(os.environ)
        # No third-party pytest plugins in the child: the graded tests need none, and some
        # (hypothesis, schemathesis, nbmake) cost seconds of imports per (re)start.
        env.update({SUBMISSION_ENV: str(self.submission), EVENTS_ENV: str(events),
                    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                    "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])})
        cmd = [sys.executable, "-m", "pytest", *targets, "-p", "labkit.grading.plugin", "--homework",
               "--rootdir", str(self.root), "-o", "addopts=", "-q", "--tb=short",
               "-p", "no:cacheprovider", "--no-header"]
        settled_before = len(self.results)
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                self._watch(proc, events)
            finally:
                if proc.poll() is None:
                    _kill(proc)
        if self.verbose:
            sys.stderr.write(log.read_text(errors="replace"))
        if not self.info:
            self.notes.append("the grader could not collect the tests:\n"
                              + truncate(log.read_text(errors="replace"), MAX_CAPTURED))
            return False
        return len(self.results) > settled_before

    def _watch(self, proc: subprocess.Popen, events: Path) -> None:
        offset, current, started = 0, None, time.monotonic()
        buf = b""
        while True:
            rc = proc.poll()
            if events.exists():
                with open(events, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    current = self._event(json.loads(line), current)
            now = time.monotonic()
            if current is not None and now - current[1] > self.timeout:
                _kill(proc)
                self._settle(current[0], f"timed out after {self.timeout:g} s (an endless loop, or "
                                         f"far too slow?); the remaining tests ran in a new process")
                return
            if current is None and not self.info and now - started > COLLECT_TIMEOUT:
                _kill(proc)
                return
            if rc is not None:
                if current is not None:
                    why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                    self._settle(current[0], f"the test process died during this test ({why}): "
                                             f"did the code call os._exit() or crash in native code?")
                return
            time.sleep(POLL)

    def _event(self, ev: dict, current):
        kind = ev["event"]
        if kind == "collected":
            for t in ev["tests"]:
                if t["nodeid"] not in self.info:
                    self.info[t["nodeid"]] = t
                    self.order.append(t["nodeid"])
        elif kind == "collect_error":
            self.notes.append(f"collection error in {ev['nodeid']}:\n{ev['message']}")
        elif kind == "start":
            return (ev["nodeid"], time.monotonic())    # its clock starts when we read it
        elif kind == "result":
            t = self.info.get(ev["nodeid"])
            if t is not None:
                self.results[t["nodeid"]] = TestResult(
                    t["nodeid"], t["name"], t["points"], t["assign"], t["visibility"],
                    ev["passed"], ev["output"], ev["duration"])
            return None
        return current

    def _settle(self, nodeid: str, message: str) -> None:
        t = self.info.get(nodeid)
        if t is not None and nodeid not in self.results:
            self.results[nodeid] = TestResult(nodeid, t["name"], t["points"], t["assign"],
                                              t["visibility"], False, message)

    def unfinished(self, nodeid: str) -> TestResult:
        t = self.info[nodeid]
        return TestResult(nodeid, t["name"], t["points"], t["assign"], t["visibility"], False,
                          "not run: the grader stopped before this test (see the notes)")


def _kill(proc: subprocess.Popen) -> None:
    """Kill the child and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
