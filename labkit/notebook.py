"""Small helpers every course notebook uses.

    LABKIT_FAST = fast_mode()          # the `parameters` cell: CI sets LABKIT_FAST=1
    summary("03 paged KV engine", [("preemptions", st["preemptions"], "> 0"), ...])

`summary` prints the notebook's last cell: each measured number beside what was expected,
and returns them as a dict (so `make course` output can be compared run to run).
"""
from __future__ import annotations

import os


def fast_mode() -> bool:
    return os.environ.get("LABKIT_FAST", "0") == "1"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def summary(title: str, rows: list[tuple]) -> dict:
    """rows: (quantity, measured) or (quantity, measured, expected). Prints a table."""
    width = max(len(r[0]) for r in rows)
    meas = [_fmt(r[1]) for r in rows]
    mw = max(len(m) for m in meas + ["measured"])
    print(f"Summary of {title} (measured in this run)\n")
    print(f"{'quantity':{width}}  {'measured':>{mw}}  expected")
    print(f"{'-' * width}  {'-' * mw}  {'-' * 8}")
    for r, m in zip(rows, meas):
        print(f"{r[0]:{width}}  {m:>{mw}}  {_fmt(r[2]) if len(r) > 2 else ''}")
    return {r[0]: r[1] for r in rows}
