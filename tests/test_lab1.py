"""Lab 1 (uniform quantization): the nbgrader source is valid, its release leaks nothing, the solution
earns full marks under real `nbgrader autograde`, and the blank release earns nothing.

Releases and grading run in a copy of labs/ under pytest's tmp_path, so the repository stays clean.
"""

import shutil

import nbformat
import pytest

from lab_helpers import (
    ROOT,
    autograde,
    check_full_marks,
    check_no_marks,
    check_points,
    check_release_stubs,
    check_source_is_valid,
    make_course,
    nbgrader_cells,
    release_notebook,
    source_path,
    student_submission,
)
from labs.release import check_release

LAB = "lab1"
SOURCE = source_path(LAB)
TOTAL_POINTS = 100


@pytest.fixture(scope="module")
def source_nb():
    return nbformat.read(SOURCE, as_version=4)


# -- the source notebook --------------------------------------------------------------------------------


def test_source_is_valid_nbgrader(source_nb):
    check_source_is_valid(source_nb)


def test_points_add_up_to_the_stated_total(source_nb):
    check_points(source_nb, TOTAL_POINTS)


def test_only_test_cells_use_qlab(source_nb):
    # Grading switches qlab's reference functions off for student code, so no student-facing cell may need qlab;
    # the setup cell only switches them off here too (ql.labs), and the test cells use reference_ql.
    switch = ("import qlab as ql", 'ql.labs.forbid("lab1")', "reference_ql = ql.labs.oracle()")
    for cell, meta in nbgrader_cells(source_nb):
        if cell.cell_type == "code" and not meta["grade"]:
            code = [line for line in cell.source.splitlines() if line.strip() not in switch and not line.lstrip().startswith("#")]
            assert not any("qlab" in line or "ql." in line for line in code), f"{meta['grade_id']} uses qlab"
    setup = next(cell for cell, meta in nbgrader_cells(source_nb) if meta["grade_id"] == "setup")
    assert all(line in setup.source for line in switch)


# -- release and grading, in a copy of labs/ ---------------------------------------------------------------


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A copy of labs/ (sources and nbgrader config) with a fresh release of the lab."""
    return make_course(tmp_path_factory, LAB)


@pytest.mark.slow
def test_release_has_no_leaks(course, source_nb):
    assert check_release(LAB, root=course) == []
    check_release_stubs(course, LAB, source_nb)


@pytest.mark.slow
def test_leak_check_catches_leaks(course, tmp_path):
    shutil.copytree(course / "source", tmp_path / "source")
    released = release_notebook(course, LAB)
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


@pytest.fixture(scope="module")
def grades(course, source_nb):
    """Autograde three submissions and return each one's per-cell scores.

    solution: the source notebook, solutions and hidden tests in it;
    blank: the release as students get it;
    wrong_why: the release filled in like a student would, with a wrong answer that only hidden tests check.
    """
    return autograde(course, LAB, {
        "solution": nbformat.read(SOURCE, as_version=4),
        "blank": release_notebook(course, LAB),
        "wrong_why": student_submission(source_nb, release_notebook(course, LAB), {"why": "a"}),
    })


@pytest.mark.slow
def test_solution_earns_full_marks(grades, source_nb):
    check_full_marks(grades["solution"], source_nb, TOTAL_POINTS)


@pytest.mark.slow
def test_blank_release_earns_nothing(grades, source_nb):
    check_no_marks(grades["blank"], source_nb)


@pytest.mark.slow
def test_hidden_tests_run_when_grading(grades):
    # A student notebook (made from the release) gets the hidden tests back: the wrong `why` passes the
    # visible checks of its cell but fails the hidden one, and every other cell earns full marks.
    scores = grades["wrong_why"]
    assert scores.pop("test_analysis_answer") == (0, 7)
    assert all(score == top for score, top in scores.values()), scores


def test_release_fingerprint_follows_the_source_content(tmp_path):
    """make book skips nbgrader for a lab whose source did not change: the fingerprint must change with any
    byte of the source (and only then)."""
    from labs.release import source_fingerprint

    root = tmp_path / "labs"
    shutil.copytree(ROOT / "labs" / "source" / "lab1", root / "source" / "lab1")
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", root)
    first = source_fingerprint("lab1", root)
    (root / "source" / "lab1" / "lab1.ipynb").touch()
    assert source_fingerprint("lab1", root) == first  # a new timestamp is not a new source
    notebook = root / "source" / "lab1" / "lab1.ipynb"
    notebook.write_text(notebook.read_text().replace("quantiz", "Quantiz", 1))
    assert source_fingerprint("lab1", root) != first
    (root / "source" / "lab1" / "extra.txt").write_text("data")
    assert len({first, source_fingerprint("lab1", root)}) == 2
