"""A grading run's results: the score table and Gradescope's results.json (written atomically).

results.json follows Gradescope's autograder specification:

    {"score": 31.0, "execution_time": 74.2, "output": "...", "visibility": "visible",
     "stdout_visibility": "visible",
     "tests": [{"name": "1.2 free returns every block", "number": "1.2", "score": 2.0,
                "max_score": 2.0, "status": "passed", "output": "...", "visibility": "visible"}]}
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class TestResult:
    nodeid: str
    name: str
    points: float
    assign: str = ""
    visibility: str = "visible"
    passed: bool = False
    output: str = ""
    duration: float = 0.0

    @property
    def score(self) -> float:
        return self.points if self.passed else 0.0


@dataclass
class GradeReport:
    tests: list[TestResult] = field(default_factory=list)
    execution_time: float = 0.0
    notes: list[str] = field(default_factory=list)     # grader-level messages (collection errors)

    @property
    def score(self) -> float:
        return sum(t.score for t in self.tests)

    @property
    def max_score(self) -> float:
        return sum(t.points for t in self.tests)

    def by_name(self) -> dict[str, TestResult]:
        return {t.name: t for t in self.tests}

    def gradescope(self) -> dict:
        summary = f"{self.score:g} / {self.max_score:g} points from {len(self.tests)} graded tests"
        return {
            "score": self.score,
            "execution_time": round(self.execution_time, 2),
            "output": "\n".join([summary, *self.notes]),
            "visibility": "visible",
            "stdout_visibility": "visible",
            "tests": [{"name": t.name, "number": t.assign, "score": t.score, "max_score": t.points,
                       "status": "passed" if t.passed else "failed", "output": t.output,
                       "visibility": t.visibility} for t in self.tests],
        }

    def table(self, width: int = 88) -> str:
        """The score table: one line per test, a failure's first line under it, the total."""
        lines = [f"{'test':<{width - 10}}{'points':>10}", "-" * width]
        for t in self.tests:
            lines.append(f"{_fit(t.name, width - 12):<{width - 10}}{f'{t.score:g}/{t.points:g}':>10}")
            if not t.passed:
                first = next((ln for ln in t.output.splitlines() if ln.strip()), "failed")
                lines.append(f"    {_fit(first, width - 4)}")
        lines.append("-" * width)
        lines.append(f"{'total':<{width - 10}}{f'{self.score:g}/{self.max_score:g}':>10}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"tests": [asdict(t) for t in self.tests], "execution_time": self.execution_time,
                "notes": self.notes}


def _fit(text: str, n: int) -> str:
    """Cut the middle of a long line (a test's parameters sit at its end)."""
    return text if len(text) <= n else text[:n - 12] + "..." + text[-9:]


def write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it over `path` (a reader sees
    the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
