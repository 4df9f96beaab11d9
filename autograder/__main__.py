"""Hardened, parallel autograder for the QLab labs: release, grade, feedback, export.

    python -m autograder release lab1                          # student version + leak check
    python -m autograder grade lab1 submitted/ --workers 8     # sandboxed, parallel grading
    python -m autograder grade lab1 canvas.zip --scheduler tcp://10.0.0.5:8786   # on a dask cluster
    python -m autograder feedback lab1                         # rewrite feedback pages from the records
    python -m autograder export lab1                           # grades_lab1.csv, grades_all.csv from the gradebook

The course folder (--course, default labs/ of this repository) is nbgrader's: source/<lab>/,
gradebook.db; grading writes autograded/, feedback/, grades_<lab>.csv and grades_all.csv into it.
Run `grade` as root (for example in a container) for the full sandbox: see autograder/sandbox.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COURSE = Path(__file__).resolve().parents[1] / "labs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--course", type=Path, default=COURSE, help="nbgrader course folder (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    release = commands.add_parser("release", help="generate the student version with nbgrader and check it leaks nothing")
    release.add_argument("lab")
    grade = commands.add_parser("grade", help="grade submissions in sandboxes; write gradebook, grades CSVs, feedback")
    grade.add_argument("lab")
    grade.add_argument("submissions", type=Path,
                       help="nbgrader's submitted/ folder, a flat folder of <student>.ipynb, or an LMS zip")
    grade.add_argument("--workers", type=int, default=None, help="sandboxes at once (default: one per CPU core)")
    grade.add_argument("--timeout", type=float, default=120, help="seconds for a whole notebook (default: %(default)s)")
    grade.add_argument("--cell-timeout", type=float, default=30, help="seconds for one cell or one test's probes (default: %(default)s)")
    grade.add_argument("--memory", type=int, default=2048, help="MB of memory per notebook (default: %(default)s)")
    grade.add_argument("--scheduler", default=None, help="address of a dask.distributed scheduler to grade on (start its workers as root, "
                       "with DASK_DISTRIBUTED__WORKER__DAEMON=False)")
    grade.add_argument("--quiet", action="store_true", help="no progress bar")
    feedback = commands.add_parser("feedback", help="rewrite every feedback page of a lab from the stored results")
    feedback.add_argument("lab")
    export = commands.add_parser("export", help="write grades_<lab>.csv and grades_all.csv from the gradebook "
                                 "(manual overrides included)")
    export.add_argument("lab")
    export.add_argument("--output", type=Path, default=None, help="write the lab's CSV here instead and leave the course's "
                        "CSV files as they are (default: <course>/grades_<lab>.csv, then grades_all.csv)")
    args = parser.parse_args(argv)
    course = args.course.resolve()

    if args.command == "release":
        from labs.release import check_release, release_lab

        release_lab(args.lab, course)
        problems = check_release(args.lab, course)
        for problem in problems:
            print("LEAK:", problem, file=sys.stderr)
        print(f"{args.lab}: released to {course / 'release' / args.lab}" + ("" if problems else ", no leaks"))
        return 1 if problems else 0

    from autograder.records import Records, feedback_html, open_gradebook, write_all_labs_csv, write_atomic

    records = Records(course, args.lab)
    if args.command == "grade":
        from autograder.grade import grade as run_grade
        from autograder.sandbox import Limits

        limits = Limits(timeout=args.timeout, cell_timeout=min(args.cell_timeout, args.timeout), memory_mb=args.memory)
        results = run_grade(args.lab, args.submissions, course, args.workers, limits, args.scheduler, not args.quiet)
        statuses = {}
        for result in results:
            statuses[result.status] = statuses.get(result.status, 0) + 1
        print(f"{args.lab}: graded {len(results)} submissions ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); "
              f"wrote {records.csv_path()}, {course / 'grades_all.csv'}, the gradebook and feedback/")
    elif args.command == "feedback":
        results = records.results()
        with open_gradebook(course) as gradebook:  # scores changed in formgrader win over the stored ones
            scores = records.gradebook_scores(gradebook, args.lab)
        for result in results:
            for part in result.parts:
                part.points = scores.get(result.student, {}).get(part.grade_id, part.points)
            write_atomic(records.feedback_path(result.student), feedback_html(result))
        print(f"{args.lab}: wrote {len(results)} feedback pages under {course / 'feedback'}")
    elif args.command == "export":
        with open_gradebook(course) as gradebook:
            scores = records.gradebook_scores(gradebook, args.lab)
        path = records.write_csv(args.output, scores)
        also = "" if args.output else f" and {write_all_labs_csv(course)}"
        print(f"{args.lab}: exported {len(scores)} students to {path}{also}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
