"""Checks shared by the lab tests (tests/test_lab*.py): nbgrader source validity, points, and grading in a copy of labs/.

Releases and grading run in a copy of labs/ under pytest's tmp_path, so the repository stays clean.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook
from nbgrader.nbgraderformat import MetadataValidator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # labs/ is a folder of the repository, not an installed package
from labs.release import release_lab, run_nbgrader  # noqa: E402


def source_path(lab: str) -> Path:
    return ROOT / "labs" / "source" / lab / f"{lab}.ipynb"


def nbgrader_cells(nb):
    return [(cell, cell.metadata["nbgrader"]) for cell in nb.cells if "nbgrader" in cell.metadata]


def check_source_is_valid(nb) -> None:
    """nbgrader's own checks, unique grade_ids, locked instructions, marked solutions, visible and hidden tests."""
    nbformat.validate(nb)
    MetadataValidator().validate_nb(nb)  # nbgrader's own checks: schema 3, grade_ids, points
    cells = nbgrader_cells(nb)
    assert len(cells) == len(nb.cells), "every cell is locked, a solution, or graded"
    grade_ids = [meta["grade_id"] for _, meta in cells]
    assert len(grade_ids) == len(set(grade_ids)), "grade_ids must be unique"
    for cell, meta in cells:
        assert meta["schema_version"] == 3
        if meta["solution"]:
            assert not meta["locked"] and cell.cell_type == "code", meta["grade_id"]
            assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source, meta["grade_id"]
        else:
            assert meta["locked"], f"{meta['grade_id']}: instructions and tests must be read-only"
        if meta["grade"]:
            visible, _, hidden = cell.source.partition("### BEGIN HIDDEN TESTS")
            assert "assert" in visible, f"{meta['grade_id']}: students need visible checks"
            assert "assert" in hidden and "### END HIDDEN TESTS" in hidden, f"{meta['grade_id']}: no hidden tests"


def check_points(nb, total: int) -> None:
    """Points sum to `total`, stated in the introduction, per "## Part N: ... (P points)" heading and in the table."""
    cells = nbgrader_cells(nb)
    assert sum(meta.get("points", 0) for _, meta in cells if meta["grade"]) == total
    assert f"**{total} points**" in nb.cells[0].source
    # Each "## Part N: ... (P points)" heading states the points of the graded cells that follow it.
    stated, actual, part = {}, {}, None
    for cell, meta in cells:
        heading = re.search(r"^## Part (\d+):.*\((\d+) points\)", cell.source, re.MULTILINE)
        if heading:
            part = int(heading[1])
            stated[part] = int(heading[2])
        if meta["grade"]:
            actual[part] = actual.get(part, 0) + meta["points"]
    assert stated == actual
    table = dict(re.findall(r"^\| (\d+) \|.*\| (\d+) \|$", nb.cells[0].source, re.MULTILINE))
    assert {int(k): int(v) for k, v in table.items()} == stated, "the points table in the introduction is out of date"


def make_course(tmp_path_factory, lab: str) -> Path:
    """A copy of labs/ (sources and nbgrader config) with a fresh release of the lab."""
    root = tmp_path_factory.mktemp("labs")
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", root)
    shutil.copytree(ROOT / "labs" / "source", root / "source")
    release_lab(lab, root=root)
    return root


def release_notebook(course: Path, lab: str):
    return nbformat.read(course / "release" / lab / f"{lab}.ipynb", as_version=4)


def check_release_stubs(course: Path, lab: str, source_nb) -> None:
    """The release keeps every cell (same grade_ids in order) and stubs every solution."""
    released = release_notebook(course, lab)
    assert [meta["grade_id"] for _, meta in nbgrader_cells(released)] == [
        meta["grade_id"] for _, meta in nbgrader_cells(source_nb)
    ]
    for cell, meta in nbgrader_cells(released):
        if meta["solution"]:
            assert "raise NotImplementedError()" in cell.source, meta["grade_id"]


def student_submission(source_nb, released_nb, answers: dict[str, str] | None = None):
    """The release with every solution cell answered as in the source (markers dropped).

    answers: {variable: value}: replace the line `variable = "..."` of a solution with that value.
    """
    solutions = {meta["grade_id"]: cell.source for cell, meta in nbgrader_cells(source_nb) if meta["solution"]}
    for cell, meta in nbgrader_cells(released_nb):
        if meta["solution"]:
            lines = solutions[meta["grade_id"]].splitlines()
            cell.source = "\n".join(line for line in lines if "### " not in line)
            for variable, value in (answers or {}).items():
                cell.source = re.sub(rf'^{variable} = ".*"$', f"{variable} = {value!r}", cell.source, flags=re.MULTILINE)
    return released_nb


def autograde(course: Path, lab: str, submissions: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """Run real `nbgrader autograde` on {student: notebook}; return {student: {grade_id: (score, max_score)}}."""
    for student, notebook in submissions.items():
        folder = course / "submitted" / student / lab
        folder.mkdir(parents=True)
        nbformat.write(notebook, folder / f"{lab}.ipynb")
    run_nbgrader(["autograde", lab, "--force"], course)
    scores = {}
    # nbgrader's Gradebook shells out to `alembic`, installed next to this Python.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
            for student in submissions:
                notebook = gradebook.find_submission_notebook(lab, lab, student)
                scores[student] = {grade.name: (grade.score, grade.max_score) for grade in notebook.grades}
    return scores


def check_full_marks(scores: dict, source_nb, total: int) -> None:
    assert set(scores) == {meta["grade_id"] for _, meta in nbgrader_cells(source_nb) if meta["grade"]}
    assert {name: score for name, (score, _) in scores.items()} == {name: top for name, (_, top) in scores.items()}
    assert sum(score for score, _ in scores.values()) == total


def check_no_marks(scores: dict, source_nb) -> None:
    # Every graded cell of these labs depends on the student's code, so the blank release must score 0 in each.
    assert set(scores) == {meta["grade_id"] for _, meta in nbgrader_cells(source_nb) if meta["grade"]}
    assert {name: score for name, (score, _) in scores.items()} == dict.fromkeys(scores, 0)
