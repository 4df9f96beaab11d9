"""Where grades go: nbgrader's gradebook, one CSV per lab and one for all labs, one feedback page and one JSON
record per student.

Only the grading process writes, one result at a time (`Records.write`), so there is a single writer.
Each file is written to a temporary name and renamed over the old one (atomic on POSIX), and each
student's gradebook rows change in one transaction. Grading the same submission again rewrites the
same rows and files, so re-running a batch is idempotent.

    <course>/gradebook.db                                  auto_score of each graded cell (nbgrader export, formgrader)
    <course>/autograded/<student>/<lab>/autograder.json    the full Result (status, reason, messages)
    <course>/feedback/<student>/<lab>/<lab>.html           what the student sees: points and a message per part
    <course>/grades_<lab>.csv                              student_id, lab, score, max_score, status, reason, then
                                                           one column per test cell, in the notebook's order
    <course>/grades_all.csv                                student_id, then one column per lab: its score (for an LMS)
"""

from __future__ import annotations

import csv
import html
import io
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import nbformat

from autograder.judge import Result

FIXED_COLUMNS = ("student_id", "lab", "score", "max_score", "status", "reason")  # then the test cells
ALL_LABS = "grades_all.csv"


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
        file.write(text)
    os.replace(temporary, path)


def open_gradebook(course: Path):
    """nbgrader's Gradebook for the course (it shells out to `alembic`, installed next to this Python)."""
    from nbgrader.api import Gradebook

    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return Gradebook(f"sqlite:///{Path(course) / 'gradebook.db'}")


class Records:
    """The grade records of one lab in one course folder."""

    def __init__(self, course: Path, lab: str):
        self.course, self.lab = Path(course), lab

    def record_path(self, student: str) -> Path:
        return self.course / "autograded" / student / self.lab / "autograder.json"

    def feedback_path(self, student: str) -> Path:
        return self.course / "feedback" / student / self.lab / f"{self.lab}.html"

    def csv_path(self) -> Path:
        return self.course / f"grades_{self.lab}.csv"

    def test_cells(self) -> list[str]:
        """The grade_ids of the lab's graded cells, in the order of its source notebook."""
        source = nbformat.read(self.course / "source" / self.lab / f"{self.lab}.ipynb", as_version=4)
        return [cell.metadata["nbgrader"]["grade_id"] for cell in source.cells
                if cell.metadata.get("nbgrader", {}).get("grade")]

    def results(self) -> list[Result]:
        """Every stored Result of this lab, sorted by student."""
        results = []
        for path in sorted(self.course.glob(f"autograded/*/{self.lab}/autograder.json")):
            try:
                results.append(Result.from_json(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError) as error:  # a damaged record: the others still count
                warnings.warn(f"skipped the unreadable record {path} ({type(error).__name__}): grade that student again",
                              stacklevel=2)
        return results

    # -- writing ---------------------------------------------------------------------------------------

    def check_registered(self, gradebook, notebook: str, points: dict[str, float]) -> bool:
        """Whether nbgrader's gradebook knows the lab with these graded cells (`nbgrader generate_assignment`
        puts them there, with the solution and source cells formgrader needs)."""
        from nbgrader.api import MissingEntry

        try:
            cells = gradebook.find_notebook(notebook, self.lab).grade_cells
        except MissingEntry:
            return False
        return {cell.name: cell.max_score for cell in cells} == points

    def write(self, gradebook, notebook: str, result: Result) -> None:
        """Store one student's result: gradebook (one transaction), JSON record, feedback page."""
        with warnings.catch_warnings():  # nbgrader's own SQLAlchemy usage warns on every new submission
            warnings.simplefilter("ignore")
            gradebook.update_or_create_student(result.student)
            gradebook.update_or_create_submission(self.lab, result.student)
        try:
            for part in result.parts:
                grade = gradebook.find_grade(part.grade_id, notebook, self.lab, result.student)
                grade.auto_score = part.points
                grade.needs_manual_grade = False
            gradebook.db.commit()
        except Exception:
            gradebook.db.rollback()
            raise
        write_atomic(self.record_path(result.student), result.to_json())
        write_atomic(self.feedback_path(result.student), feedback_html(result))

    def write_csv(self, path: Path | None = None, scores: dict[str, dict[str, float]] | None = None) -> Path:
        """The lab's CSV (default grades_<lab>.csv) from the stored results, or with the gradebook's `scores`:
        FIXED_COLUMNS, then one column per test cell in the notebook's order (cells the source no longer has last)."""
        results = self.results()
        grade_ids = list(dict.fromkeys(self.test_cells() + [part.grade_id for result in results for part in result.parts]))
        rows = []
        for result in results:
            by_part = {part.grade_id: part.points for part in result.parts}
            by_part.update((scores or {}).get(result.student, {}))
            rows.append({"student_id": result.student, "lab": self.lab, "score": _number(sum(by_part.values())),
                         "max_score": _number(result.max_score), "status": result.status,
                         "reason": result.reason or "; ".join(result.notes),
                         **{grade_id: _number(by_part.get(grade_id, 0)) for grade_id in grade_ids}})
        path = Path(path) if path else self.csv_path()
        write_atomic(path, _csv_text([*FIXED_COLUMNS, *grade_ids], rows))
        return path

    def gradebook_scores(self, gradebook, notebook: str) -> dict[str, dict[str, float]]:
        """The current score of each graded cell per student, manual overrides (formgrader) included."""
        scores = {}
        for result in self.results():
            try:
                submitted = gradebook.find_submission_notebook(notebook, self.lab, result.student)
            except Exception:  # nbgrader raises MissingEntry: not in this gradebook
                continue
            scores[result.student] = {grade.name: float(grade.score) for grade in submitted.grades}
        return scores


def write_all_labs_csv(course: Path) -> Path:
    """grades_all.csv, for an LMS: student_id, then one column per lab (lab1, lab2, ..., lab10) holding the
    score of its grades_<lab>.csv; empty where a student has no row for that lab."""
    course = Path(course)
    tables = {}
    for path in course.glob("grades_*.csv"):
        if path.name != ALL_LABS:
            tables[path.stem.removeprefix("grades_")] = {row["student_id"]: row["score"] for row in read_csv(path)}
    labs = sorted(tables, key=lambda lab: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", lab)])
    students = sorted({student for table in tables.values() for student in table})
    rows = [{"student_id": student, **{lab: tables[lab].get(student, "") for lab in labs}} for student in students]
    path = course / ALL_LABS
    write_atomic(path, _csv_text(["student_id", *labs], rows))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a grades CSV; a reason field may be longer than the csv module's default limit (128 KiB)."""
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _csv_text(columns: list[str], rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _number(value: float) -> str:
    return f"{value:g}"


def feedback_html(result: Result) -> str:
    """The student's feedback page: total, status, and each part's points and message. No hidden test text."""
    escape = html.escape
    rows = "\n".join(
        f"<tr><td>{escape(part.grade_id)}</td><td>{_number(part.points)} / {_number(part.max_points)}</td>"
        f"<td>{escape(part.message)}</td></tr>" for part in result.parts)
    notes = "".join(f"<li>{escape(note)}</li>" for note in result.notes)
    status = "" if result.status == "graded" else f"<p><b>{escape(result.status)}</b>: {escape(result.reason)}</p>"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{escape(result.lab)} feedback for {escape(result.student)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{border:1px solid #ccc;padding:.3em .6em}}
table{{border-collapse:collapse}}</style></head><body>
<h1>{escape(result.lab)}: {_number(result.score)} / {_number(result.max_score)} points</h1>
<p>Student: {escape(result.student)}</p>
{status}
<table><tr><th>test cell</th><th>points</th><th>message</th></tr>
{rows}
</table>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<p>Each test cell earns its points only if all of its checks pass, the visible ones and the hidden ones.</p>
</body></html>
"""
