"""Labs 2 (calibration and static W8A8 PTQ of the digits CNN) and 3 (quantization-aware training: STE, LSQ,
4-bit QAT of the digits CNN): each nbgrader source is valid, its release leaks nothing, the solution earns
full marks under real `nbgrader autograde`, and the blank release earns nothing.

Releases and grading run in a copy of labs/ under pytest's tmp_path, so the repository stays clean.
"""

import re

import nbformat
import pytest

from lab_helpers import (
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
)
from labs.release import check_release

TOTAL_POINTS = 100


@pytest.fixture(scope="module", params=["lab2", "lab3", "lab4", "lab5", "lab6", "lab7", "lab8"])
def lab(request):
    return request.param


@pytest.fixture(scope="module")
def source_nb(lab):
    return nbformat.read(source_path(lab), as_version=4)


def test_source_is_valid_nbgrader(source_nb):
    check_source_is_valid(source_nb)


def test_points_add_up_to_the_stated_total(source_nb):
    check_points(source_nb, TOTAL_POINTS)


def test_solutions_do_not_use_qlab(source_nb):
    # The locked cells load the model and provide qlab's glue; grading switches qlab's versions of the lab's
    # functions off, so the students' answers must not need qlab.
    for cell, meta in nbgrader_cells(source_nb):
        if meta["solution"]:
            assert not re.search(r"\bql\.|qlab", cell.source), f"{meta['grade_id']} uses qlab"


def test_setup_limits_torch_threads(source_nb):
    assert "torch.set_num_threads(1)" in source_nb.cells[1].source


@pytest.fixture(scope="module")
def course(tmp_path_factory, lab):
    return make_course(tmp_path_factory, lab)


@pytest.mark.slow
def test_release_has_no_leaks(course, lab, source_nb):
    assert check_release(lab, root=course) == []
    check_release_stubs(course, lab, source_nb)


@pytest.fixture(scope="module")
def grades(course, lab):
    """One autograde run: the source notebook (solutions and hidden tests) and the blank release."""
    return autograde(course, lab, {"solution": nbformat.read(source_path(lab), as_version=4), "blank": release_notebook(course, lab)})


@pytest.mark.slow
def test_solution_earns_full_marks(grades, source_nb):
    check_full_marks(grades["solution"], source_nb, TOTAL_POINTS)


@pytest.mark.slow
def test_blank_release_earns_nothing(grades, source_nb):
    check_no_marks(grades["blank"], source_nb)
