"""Lab 1 (uniform quantization): the nbgrader source is valid, its release leaks nothing, the solution
earns full marks under real `nbgrader autograde`, and the blank release earns nothing.

Releases and grading run in a copy of labs/ under pytest's tmp_path, so the repository stays clean.
"""

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
from labs.release import check_release, release_lab, run_nbgrader  # noqa: E402

LAB = "lab1"
SOURCE = ROOT / "labs" / "source" / LAB / f"{LAB}.ipynb"
TOTAL_POINTS = 100


def nbgrader_cells(nb):
    return [(cell, cell.metadata["nbgrader"]) for cell in nb.cells if "nbgrader" in cell.metadata]


@pytest.fixture(scope="module")
def source_nb():
    return nbformat.read(SOURCE, as_version=4)


# -- the source notebook --------------------------------------------------------------------------------


def test_source_is_valid_nbgrader(source_nb):
    nbformat.validate(source_nb)
    MetadataValidator().validate_nb(source_nb)  # nbgrader's own checks: schema 3, grade_ids, points
    cells = nbgrader_cells(source_nb)
    assert len(cells) == len(source_nb.cells), "every cell is locked, a solution, or graded"
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


def test_points_add_up_to_the_stated_total(source_nb):
    cells = nbgrader_cells(source_nb)
    assert sum(meta.get("points", 0) for _, meta in cells if meta["grade"]) == TOTAL_POINTS
    assert f"**{TOTAL_POINTS} points**" in source_nb.cells[0].source
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
    table = dict(re.findall(r"^\| (\d+) \|.*\| (\d+) \|$", source_nb.cells[0].source, re.MULTILINE))
    assert {int(k): int(v) for k, v in table.items()} == stated, "the points table in the introduction is out of date"


def test_only_test_cells_import_qlab(source_nb):
    # Grading switches qlab's reference functions off for student code, so no student-facing cell may need qlab.
    for cell, meta in nbgrader_cells(source_nb):
        if cell.cell_type == "code" and not meta["grade"]:
            assert "qlab" not in cell.source, f"{meta['grade_id']} uses qlab"


# -- release and grading, in a copy of labs/ ---------------------------------------------------------------


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A copy of labs/ (sources and nbgrader config) with a fresh release of the lab."""
    root = tmp_path_factory.mktemp("labs")
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", root)
    shutil.copytree(ROOT / "labs" / "source", root / "source")
    release_lab(LAB, root=root)
    return root


@pytest.mark.slow
def test_release_has_no_leaks(course, source_nb):
    assert check_release(LAB, root=course) == []
    released = nbformat.read(course / "release" / LAB / f"{LAB}.ipynb", as_version=4)
    assert [meta["grade_id"] for _, meta in nbgrader_cells(released)] == [
        meta["grade_id"] for _, meta in nbgrader_cells(source_nb)
    ]
    for cell, meta in nbgrader_cells(released):
        if meta["solution"]:
            assert "raise NotImplementedError()" in cell.source, meta["grade_id"]


@pytest.mark.slow
def test_leak_check_catches_leaks(course, tmp_path):
    shutil.copytree(course / "source", tmp_path / "source")
    released = nbformat.read(course / "release" / LAB / f"{LAB}.ipynb", as_version=4)
    solution = next(cell for cell, meta in nbgrader_cells(released) if meta["solution"])
    solution.source += "\n    qmax = 2 ** (bits - 1) - 1\n    x = x.float()"  # a line that exists only in a solution
    test = next(cell for cell, meta in nbgrader_cells(released) if meta["grade"])
    test.source += "\n### BEGIN HIDDEN TESTS"
    (tmp_path / "release" / LAB).mkdir(parents=True)
    nbformat.write(released, tmp_path / "release" / LAB / f"{LAB}.ipynb")
    problems = check_release(LAB, root=tmp_path)
    assert any("x = x.float()" in problem for problem in problems), problems
    assert not any("qmax = 2 ** (bits - 1) - 1" in problem for problem in problems), "public in the source: no leak"
    assert any("'BEGIN HIDDEN TESTS'" in problem for problem in problems), problems


def student_submission(source_nb, released_nb, why):
    """The release with every solution cell answered as in the source (markers dropped), and `why` set."""
    answers = {meta["grade_id"]: cell.source for cell, meta in nbgrader_cells(source_nb) if meta["solution"]}
    for cell, meta in nbgrader_cells(released_nb):
        if meta["solution"]:
            lines = answers[meta["grade_id"]].splitlines()
            cell.source = "\n".join(line for line in lines if "### " not in line)
            cell.source = re.sub(r'^why = "."$', f"why = {why!r}", cell.source, flags=re.MULTILINE)
    return released_nb


@pytest.fixture(scope="module")
def grades(course, source_nb):
    """Autograde three submissions and return each one's per-cell scores.

    solution: the source notebook, solutions and hidden tests in it;
    blank: the release as students get it;
    wrong_why: the release filled in like a student would, with a wrong answer that only hidden tests check.
    """
    released = course / "release" / LAB / f"{LAB}.ipynb"
    submissions = {
        "solution": nbformat.read(SOURCE, as_version=4),
        "blank": nbformat.read(released, as_version=4),
        "wrong_why": student_submission(source_nb, nbformat.read(released, as_version=4), why="a"),
    }
    for student, notebook in submissions.items():
        folder = course / "submitted" / student / LAB
        folder.mkdir(parents=True)
        nbformat.write(notebook, folder / f"{LAB}.ipynb")
    run_nbgrader(["autograde", LAB, "--force"], course)
    scores = {}
    # nbgrader's Gradebook shells out to `alembic`, installed next to this Python.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
            for student in submissions:
                notebook = gradebook.find_submission_notebook(LAB, LAB, student)
                scores[student] = {grade.name: (grade.score, grade.max_score) for grade in notebook.grades}
    return scores


@pytest.mark.slow
def test_solution_earns_full_marks(grades, source_nb):
    scores = grades["solution"]
    assert set(scores) == {meta["grade_id"] for _, meta in nbgrader_cells(source_nb) if meta["grade"]}
    assert {name: score for name, (score, _) in scores.items()} == {name: top for name, (_, top) in scores.items()}
    assert sum(score for score, _ in scores.values()) == TOTAL_POINTS


@pytest.mark.slow
def test_blank_release_earns_nothing(grades, source_nb):
    # Every graded cell of this lab depends on the student's code, so the blank release must score 0 in each.
    scores = grades["blank"]
    assert set(scores) == {meta["grade_id"] for _, meta in nbgrader_cells(source_nb) if meta["grade"]}
    assert {name: score for name, (score, _) in scores.items()} == dict.fromkeys(scores, 0)


@pytest.mark.slow
def test_hidden_tests_run_when_grading(grades):
    # A student notebook (made from the release) gets the hidden tests back: the wrong `why` passes the
    # visible checks of its cell but fails the hidden one, and every other cell earns full marks.
    scores = grades["wrong_why"]
    assert scores.pop("test_analysis_answer") == (0, 7)
    assert all(score == top for score, top in scores.values()), scores
