"""Grading time per notebook for every lab: the solution, as a student would submit it, graded in the sandbox.

    python bench/grading_time.py               # labs 1-8, 2 copies each, one sandbox at a time
    python bench/grading_time.py --labs lab2 lab3 --copies 4

For each lab, a copy of labs/ under a temporary folder gets `copies` submissions (the source notebook's
solutions without their markers, visible tests only) and `python -m autograder grade` runs them with
one worker, so each sandbox has a core to itself. Prints, per lab: the sandbox's seconds per notebook
(fork to last answer, from each result's `seconds`), the batch's wall-clock time including the
fork server's start, and the score each copy got (it must be 100). Run as root for the full sandbox.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder import sandbox  # noqa: E402
from autograder.grade import grade  # noqa: E402

LABS = [f"lab{n}" for n in range(1, 9)]


def solution(lab: str) -> nbformat.NotebookNode:
    """The lab's source with solutions unmarked and hidden tests removed: what a complete submission looks like."""
    nb = nbformat.read(ROOT / "labs" / "source" / lab / f"{lab}.ipynb", as_version=4)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            cell.source = "\n".join(line for line in cell.source.splitlines() if "### " not in line)
        elif meta.get("grade"):
            cell.source = cell.source.split("### BEGIN HIDDEN TESTS")[0]
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labs", nargs="+", default=LABS, help="labs to time (default: all)")
    parser.add_argument("--copies", type=int, default=2, help="submissions per lab (default: %(default)s)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"sandbox: {', '.join(sandbox.isolation_level())}")
    print(f"{'lab':6} {'sandbox s/notebook':>20} {'batch wall s':>13}  scores")
    limits = sandbox.Limits(timeout=300, cell_timeout=120, memory_mb=4096)
    with tempfile.TemporaryDirectory() as tmp:
        course = Path(tmp) / "course"
        course.mkdir()
        shutil.copy(ROOT / "labs" / "nbgrader_config.py", course)
        shutil.copytree(ROOT / "labs" / "source", course / "source")
        for lab in args.labs:
            submissions = Path(tmp) / f"submitted-{lab}"
            submissions.mkdir()
            for index in range(args.copies):
                nbformat.write(solution(lab), submissions / f"student{index}.ipynb")
            start = time.perf_counter()
            results = grade(lab, submissions, course, workers=1, limits=limits, progress=False)
            wall = time.perf_counter() - start
            seconds = [result.seconds for result in results]
            scores = ", ".join(f"{result.score:g}" for result in results)
            print(f"{lab:6} {statistics.median(seconds):20.1f} {wall:13.1f}  {scores}")


if __name__ == "__main__":
    main()
