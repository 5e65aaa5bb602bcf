"""The pytest plugin of `labkit grade`, loaded in the grading child (`-p labkit.grading.plugin`).

Graded tests carry their points in a marker:

    @pytest.mark.points(2, assign="1.2")          # visibility="visible" by default
    def test_free_returns_every_block(): ...

The plugin writes one JSON line per event to `$LABKIT_GRADING_EVENTS`, flushed at once, so
the parent (labkit/grading/runner.py) knows which test is running (for its timeout) and keeps
every finished result even if this process hangs or dies later:

    {"event": "collected", "tests": [{nodeid, name, points, assign, visibility}], "errors": [...]}
    {"event": "start", "nodeid": ...}
    {"event": "result", "nodeid": ..., "passed": bool, "output": "...", "duration": s}

Outputs are cut to a few kB here (a test that prints megabytes costs nothing downstream).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

EVENTS_ENV = "LABKIT_GRADING_EVENTS"
MAX_OUTPUT = 4000          # characters of a test's message kept in results.json
MAX_CAPTURED = 1500        # characters of its captured stdout/stderr


def truncate(text: str, limit: int) -> str:
    """Head and tail of `text`, with what was cut in between."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def _emit(record: dict) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def test_info(item) -> dict:
    """Name, points and visibility of a graded test, from its marker and docstring."""
    mark = item.get_closest_marker("points")
    if mark is None or not mark.args:
        raise pytest.UsageError(f"{item.nodeid}: a graded test needs @pytest.mark.points(N, assign=...)")
    assign = mark.kwargs.get("assign", "")
    doc = (getattr(item, "function", None).__doc__ or "").strip().splitlines()
    title = doc[0].strip() if doc else item.name
    params = f" [{item.callspec.id}]" if hasattr(item, "callspec") else ""
    return {"nodeid": item.nodeid, "name": f"{assign} {title}{params}".strip(),
            "points": float(mark.args[0]), "assign": assign,
            "visibility": mark.kwargs.get("visibility", "visible")}


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n, assign='1.2', visibility='visible'): "
                            "points of a graded homework test")


def pytest_collectreport(report):
    if report.failed:
        _emit({"event": "collect_error", "nodeid": report.nodeid,
               "message": truncate(str(report.longrepr), MAX_OUTPUT)})


def pytest_collection_finish(session):
    tests = [test_info(item) for item in session.items]
    _emit({"event": "collected", "tests": tests})


def pytest_runtest_logstart(nodeid, location):
    _emit({"event": "start", "nodeid": nodeid, "time": time.time()})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.failed:
        report.user_properties.append(("message", _message(call.excinfo, report)))


_RECORDS: dict[str, dict] = {}     # nodeid -> outcome so far (setup, call, teardown)


def pytest_runtest_logreport(report):
    rec = _RECORDS.setdefault(report.nodeid, {"passed": True, "messages": [], "duration": 0.0,
                                              "captured": ""})
    rec["duration"] += report.duration
    if report.failed or report.skipped:
        rec["passed"] = False
        msg = dict(report.user_properties).get("message")
        if msg is None:
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                msg = f"skipped: {reason}"
            else:
                msg = str(report.longrepr)
        if report.when != "call":
            msg = f"(in test {report.when}) {msg}"
        rec["messages"].append(msg)
    captured = "".join(text for name, text in report.sections if "stdout" in name or "stderr" in name)
    if captured:
        rec["captured"] = captured


def pytest_runtest_logfinish(nodeid, location):
    rec = _RECORDS.pop(nodeid, {"passed": False, "messages": ["no report"], "duration": 0.0,
                                "captured": ""})
    output = "\n".join(rec["messages"]) if rec["messages"] else "passed"
    output = truncate(output, MAX_OUTPUT)
    if rec["captured"].strip():
        output += "\n--- output ---\n" + truncate(rec["captured"], MAX_CAPTURED)
    _emit({"event": "result", "nodeid": nodeid, "passed": rec["passed"], "output": output,
           "duration": rec["duration"]})


def _message(excinfo, report) -> str:
    """One readable message for a failure: the error, and where in the student's file."""
    from labkit.grading.submission import SubmissionError, submission_dir
    e = _root_cause(excinfo.value)
    where = ""
    root = submission_dir()
    for entry in excinfo.traceback:
        path = Path(str(entry.path))
        if path.is_relative_to(root):
            where = f" ({path.name} line {entry.lineno + 1})"          # the deepest student line
    if isinstance(e, SubmissionError):
        return str(e)
    if isinstance(e, NotImplementedError):
        return f"not implemented yet: {e}{where}"
    if isinstance(e, SystemExit):
        return f"the code called sys.exit({e.code!r}){where}"
    if isinstance(e, AssertionError):
        return truncate(str(e) or "assertion failed" + where, MAX_OUTPUT)
    return truncate(f"{type(e).__name__}: {e}{where}\n{report.longreprtext}", MAX_OUTPUT)


def _root_cause(e: BaseException) -> BaseException:
    """The student's own exception inside a wrapper (the Triton interpreter wraps errors
    raised in a kernel in an InterpreterError)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (NotImplementedError, SystemExit)) or type(e).__name__ == "SubmissionError":
            return e
        inner = e.__cause__ or e.__context__
        if inner is None:
            return e
        if isinstance(inner, (NotImplementedError, SystemExit)):
            return inner
        e = inner
    return e
