"""SIGTERM handled like Ctrl-C by the `labkit` command line, and the commit-point check.

Commands that write (convert, lite auto_awq, lite calibrate, lite kv_qparams) build their
output under a hidden name and rename it into place at the end. A SIGTERM (or Ctrl-C) before
that rename must leave nothing behind:

    install()    SIGTERM -> `Terminated` (a KeyboardInterrupt), so `finally` and
                 `except BaseException` blocks clean up as they do for Ctrl-C
    check()      called right before a rename: raises `Terminated` if a SIGTERM has arrived
    restore()    the previous handler back, the record cleared; says whether one arrived

Why both: Python runs a signal handler in the main thread at the next bytecode, wherever that
is, and an exception raised inside library code that catches everything is lost; the handler
therefore also records the signal, and `check()` turns a lost one back into an exception
before anything is published. (CI once saw a conversion exit 0 after its SIGTERM.)
"""
from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt."""


_received = threading.Event()


def _on_sigterm(signum, frame):
    _received.set()
    raise Terminated()


def install():
    """Make SIGTERM raise `Terminated`; returns the handler it replaced, or None when it left
    things alone (not the main thread, or someone (a server, a notebook kernel) already handles
    SIGTERM, or the parent asked for it to be ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None
    _received.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)
    return previous


def restore(previous) -> bool:
    """Put back what `install()` replaced and forget the signal (a later conversion in the same
    process, e.g. a test or a notebook, must not see it). Returns whether one had arrived."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    arrived = _received.is_set()
    _received.clear()
    return arrived


def check() -> None:
    """The commit point: raise `Terminated` if a SIGTERM has arrived, even one whose exception
    some library swallowed. Cheap; call it right before renaming results into place."""
    if _received.is_set():
        raise Terminated()
