"""ASSIGN regions of the homework files: find them, check that they are stubs, fill them.

A region is the lines between two marker comments, indented like the code around them:

        # BEGIN ASSIGN 1.2
        raise NotImplementedError("ASSIGN 1.2: ...")
        # END ASSIGN 1.2

The released stubs hold only comments, docstrings, `pass` and one `raise NotImplementedError`
in each region (`is_stub`); a CI test checks that, so no solution text ships to students.
A region lies inside one function (a file may have several regions with the same id, one
per function). `fill` puts code into regions named by their function; the reference
submission of tests/homework is built that way, which also proves that the code around each
region works with a correct answer.
"""
from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN ASSIGN (?P<id>\d+\.\d+)\s*$")
END = re.compile(r"^[ \t]*# END ASSIGN (?P<id>\d+\.\d+)\s*$")
DEF = re.compile(r"^(?P<indent>[ \t]*)def (?P<name>\w+)")


@dataclass
class Region:
    id: str            # "1.2"
    begin: int         # line index of the BEGIN marker (0-based)
    end: int           # line index of the END marker
    indent: str
    body: str          # the lines in between, dedented
    function: str      # the enclosing function ("" at module level)


def regions(text: str, where: str = "<text>") -> list[Region]:
    """Every ASSIGN region of a file, in order. Unbalanced or nested markers are a ValueError."""
    lines = text.splitlines()
    out, open_ = [], None
    for i, line in enumerate(lines):
        if m := BEGIN.match(line):
            if open_ is not None:
                raise ValueError(f"{where}:{i + 1}: BEGIN ASSIGN {m['id']} inside region {open_[1]}")
            open_ = (i, m["id"], m["indent"])
        elif m := END.match(line):
            if open_ is None or m["id"] != open_[1]:
                raise ValueError(f"{where}:{i + 1}: END ASSIGN {m['id']} without its BEGIN")
            start, rid, indent = open_
            body = textwrap.dedent("\n".join(lines[start + 1:i]))
            out.append(Region(rid, start, i, indent, body, _enclosing_function(lines, start, indent)))
            open_ = None
    if open_ is not None:
        raise ValueError(f"{where}:{open_[0] + 1}: BEGIN ASSIGN {open_[1]} has no END")
    return out


def _enclosing_function(lines: list[str], at: int, indent: str) -> str:
    for line in reversed(lines[:at]):
        m = DEF.match(line)
        if m and len(m["indent"]) < len(indent):
            return m["name"]
    return ""


def is_stub(body: str) -> bool:
    """Only comments, docstrings, `pass` and exactly one `raise NotImplementedError(...)`."""
    try:
        tree = ast.parse(body)
    except SyntaxError:
        return False
    raises = 0
    for node in tree.body:
        if isinstance(node, ast.Pass):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            continue                                    # a docstring-like note
        if isinstance(node, ast.Raise) and _names_not_implemented(node.exc):
            raises += 1
            continue
        return False
    return raises == 1


def _names_not_implemented(exc) -> bool:
    if isinstance(exc, ast.Call):
        exc = exc.func
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def fill(text: str, code: dict[str, str], where: str = "<text>") -> str:
    """Replace the body of the region in each function named in `code` by that code
    (dedented source), indented like its markers. Regions not named keep their stub."""
    lines = text.splitlines()
    for r in reversed(regions(text, where)):
        if r.function not in code:
            continue
        new = [(r.indent + ln if ln.strip() else "") for ln in textwrap.dedent(code[r.function]).strip("\n").splitlines()]
        lines[r.begin + 1:r.end] = new
    return "\n".join(lines) + "\n"


def homework_regions(homework_dir: Path) -> dict[str, list[Region]]:
    """{file name: its regions} for every a*.py file of a homework folder."""
    return {p.name: regions(p.read_text(), str(p)) for p in sorted(Path(homework_dir).glob("a*_*.py"))}
