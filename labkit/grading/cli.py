"""`labkit grade`: grade a homework submission, or build the Gradescope autograder bundle.

    labkit grade [--submission DIR] [--results results.json] [--timeout S] [-k EXPR] [--gradescope]
    labkit grade --make-autograder OUT.zip

Exit status: 0 when every graded test passed, 1 when some did not, 2 for a bad request
(missing folder, bad timeout). With --gradescope it is always 0 and results.json is written
even when grading itself fails (Gradescope reads the file, not the status).
"""
from __future__ import annotations

import argparse
import sys
import traceback

from labkit.grading.results import GradeReport, write_json_atomic


def add_grade_args(p: argparse.ArgumentParser, flag) -> None:
    flag(p, "--submission", default=None, metavar="DIR",
         help="folder with the homework files (default: this checkout's homework/)")
    flag(p, "--results", default="results.json", metavar="PATH",
         help="where to write Gradescope's results.json (default: ./results.json)")
    flag(p, "--timeout", type=float, default=60.0, metavar="S",
         help="seconds each test may run before it scores 0 (default: 60)")
    p.add_argument("-k", dest="keyword", default=None, metavar="EXPR",
                   help="grade only the tests matching this pytest -k expression (e.g. a1, a2_)")
    flag(p, "--tests", default=None, metavar="DIR", help="the graded tests (default: tests/homework)")
    flag(p, "--gradescope", action="store_true",
         help="for Gradescope's run_autograder: always exit 0, always write results.json")
    flag(p, "--verbose", action="store_true", help="also print the test processes' own output")
    flag(p, "--make-autograder", default=None, metavar="OUT.zip",
         help="instead of grading, write the Gradescope autograder bundle (setup.sh, run_autograder)")


def main(args: argparse.Namespace) -> int:
    if args.make_autograder:
        from labkit.grading.autograder import make_autograder
        out, size = make_autograder(args.make_autograder)
        print(f"wrote {out} ({size / 2**20:.1f} MiB): upload it as the Gradescope autograder "
              f"(Ubuntu image); students submit a1_block_manager.py ... a5_tensor_parallel.py")
        return 0
    from labkit.grading.runner import GradingError, grade
    try:
        report = grade(args.submission, args.tests, args.timeout, args.keyword, args.verbose)
    except GradingError as e:
        if not args.gradescope:
            raise
        report = GradeReport(notes=[f"the grader could not run: {e}"])
    except Exception as e:                         # a grader bug must not lose the results file
        if not args.gradescope:
            raise
        report = GradeReport(notes=["the grader failed; please tell the course staff:\n"
                                    + "".join(traceback.format_exception_only(type(e), e))])
    path = write_json_atomic(report.gradescope(), args.results)
    print(report.table())
    print(f"results: {path} ({report.execution_time:.0f} s)", file=sys.stderr)
    if args.gradescope:
        return 0
    return 0 if report.tests and report.score == report.max_score else 1
