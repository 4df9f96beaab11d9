"""Grade the same lab-1 submissions with `nbgrader autograde` and with `python -m autograder grade`.

    python bench/autograde.py          # N = 20 submissions
    python bench/autograde.py --n 40 --workers 2

Both graders run in one go, each in its own copy of labs/ under a temporary folder, on a mix of
submissions (complete, partly blank, wrong analysis answer, blank). Prints both wall-clock times, the
ratio, and whether the two graders agree on every student's total. Run as root for the full sandbox.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from labs.release import release_lab, run_nbgrader  # noqa: E402

LAB = "lab1"
SOURCE = ROOT / "labs" / "source" / LAB / f"{LAB}.ipynb"
STUB = "# YOUR CODE HERE\nraise NotImplementedError()"


def submission(kind: str) -> nbformat.NotebookNode:
    """A student's notebook: the solutions without markers and only the visible tests, then made worse by kind."""
    nb = nbformat.read(SOURCE, as_version=4)
    blank = {"full": set(), "wrong_why": set(), "no_packing": {"packing"}, "half": {"sqnr", "granularity", "packing"},
             "blank": {"quantize_symmetric", "quantize_asymmetric", "sqnr", "granularity", "packing", "analysis"}}[kind]
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            lines = [line for line in cell.source.splitlines() if "### " not in line]
            cell.source = STUB if meta["grade_id"] in blank else "\n".join(lines)
            if kind == "wrong_why":
                cell.source = cell.source.replace('why = "b"', 'why = "c"')
        elif meta.get("grade"):
            cell.source = cell.source.split("### BEGIN HIDDEN TESTS")[0]
    return nb


def make_course(folder: Path, n: int) -> Path:
    """A copy of labs/ with the lab released (so nbgrader's gradebook knows it) and n submissions."""
    folder.mkdir()
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", folder)
    shutil.copytree(ROOT / "labs" / "source", folder / "source")
    release_lab(LAB, folder)
    kinds = ["full", "full", "wrong_why", "no_packing", "half", "blank"]
    for index in range(n):
        target = folder / "submitted" / f"student{index:03d}" / LAB
        target.mkdir(parents=True)
        nbformat.write(submission(kinds[index % len(kinds)]), target / f"{LAB}.ipynb")
    return folder


def nbgrader_totals(course: Path) -> dict[str, float]:
    from nbgrader.api import Gradebook

    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        return {s.student.id: float(s.score) for s in gradebook.find_assignment(LAB).submissions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20, help="number of submissions (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="autograder workers (default: all cores)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain_course = make_course(Path(tmp) / "nbgrader", args.n)
        ours_course = make_course(Path(tmp) / "autograder", args.n)

        start = time.perf_counter()
        run_nbgrader(["autograde", LAB, "--force"], plain_course)
        nbgrader_seconds = time.perf_counter() - start

        command = [sys.executable, "-m", "autograder", "--course", str(ours_course), "grade", LAB,
                   str(ours_course / "submitted"), "--quiet"] + (["--workers", str(args.workers)] if args.workers else [])
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        ours_seconds = time.perf_counter() - start

        theirs, ours = nbgrader_totals(plain_course), nbgrader_totals(ours_course)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    print(f"lab1, {args.n} submissions, on {machine} ({'root' if os.geteuid() == 0 else 'not root'})")
    print(f"  nbgrader autograde (serial, one kernel per notebook): {nbgrader_seconds:7.1f} s  ({nbgrader_seconds / args.n:.2f} s per notebook)")
    print(f"  python -m autograder grade (sandboxed, {args.workers or os.cpu_count()} workers):    {ours_seconds:7.1f} s  ({ours_seconds / args.n:.2f} s per notebook)")
    print(f"  speed-up: {nbgrader_seconds / ours_seconds:.1f}x")
    agree = theirs == ours
    print(f"  same total for every student: {agree}" + ("" if agree else f"\n  nbgrader {theirs}\n  ours     {ours}"))


if __name__ == "__main__":
    main()
