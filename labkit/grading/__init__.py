"""Homework grading: `labkit grade` runs the graded tests (tests/homework) against a
submission and writes Gradescope's results.json.

    runner.py      the parent: a pytest child per run, a timeout per test, restarts after hangs
    plugin.py      the pytest plugin in the child: points marker -> one JSON event per test
    results.py     score table, Gradescope's results.json (written atomically)
    submission.py  find and import the student's files, readable import errors
    distributed.py run a check on N gloo ranks (assignment 5) with a deadline
    stubs.py       the ASSIGN regions of homework/: parse, check they are stubs, fill them
    autograder.py  the Gradescope bundle (setup.sh, run_autograder)
    reference/     labkit's reference for the quantization assignments (until lessons 08/09 land)

From Python: `from labkit.grading import grade; print(grade("homework", keyword="a1").table())`.
"""
from labkit.grading.results import GradeReport, TestResult


def grade(submission=None, tests_dir=None, timeout: float = 60.0, keyword=None) -> GradeReport:
    """Grade a submission folder (default homework/); see labkit/grading/runner.py."""
    from labkit.grading.runner import grade as _grade
    return _grade(submission, tests_dir, timeout, keyword)


__all__ = ["grade", "GradeReport", "TestResult"]
