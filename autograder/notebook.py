"""Turn a submitted notebook into the program the sandbox runs, matching cells by nbgrader grade_id.

The program is rebuilt from the instructor's source notebook, in the source's order:

    markdown cell            skipped (nothing to run)
    locked code cell         the source's text (restored, whatever the student did to it)
    solution cell            the student's cell with that grade_id (the first, if duplicated)
    graded (test) cell       a probe: the judge's checks for that grade_id run here, at this point
    student's own cells      run where the student put them: after the last known cell above them

So a submission cannot edit, delete or fake a test: test cells are never taken from it. A solution
cell that was deleted or turned into markdown is missing (its parts will fail, with that reason);
a re-IDed solution cell still runs, as one of the student's own cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import nbformat

MAX_NOTEBOOK_BYTES = 20 * 2**20
SECRET_MARKERS = ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "BEGIN MARK SCHEME")


class Unreadable(Exception):
    """The submission is not a notebook that can be graded; `status` is a short code for grades.csv."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Cell:
    """One cell as submitted: its type, its text, and its nbgrader grade_id (None if it has none)."""

    cell_type: str
    source: str
    grade_id: str | None


@dataclass
class Program:
    """The steps to run: ("cell", grade_id, source) and ("probe", grade_id); notes explain what was fixed."""

    steps: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # solution grade_ids not found in the submission


def parse(data: bytes) -> list[Cell]:
    """The cells of a submitted notebook file, tolerating what Jupyter versions write; raise Unreadable."""
    if not data.strip():
        raise Unreadable("empty", "the submitted file is empty")
    if len(data) > MAX_NOTEBOOK_BYTES:
        raise Unreadable("corrupt", f"the notebook is larger than {MAX_NOTEBOOK_BYTES // 2**20} MiB")
    try:
        content = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise Unreadable("corrupt", "the file's JSON is nested too deeply to be a notebook") from None
    except ValueError as error:  # not UTF-8, not JSON, or an integer longer than Python reads
        raise Unreadable("corrupt", f"the file is not valid JSON ({type(error).__name__}): is it a saved .ipynb?") from None
    if isinstance(content, dict) and content.get("nbformat") == 3:
        try:
            content = nbformat.convert(nbformat.from_dict(content), 4)  # very old Jupyter
        except Exception as error:  # whatever a malformed old notebook makes nbformat raise
            raise Unreadable("corrupt", f"the file claims to be an nbformat-3 notebook but could not be converted "
                                        f"({type(error).__name__}): open it in Jupyter and save it again") from None
    if not isinstance(content, dict) or not isinstance(content.get("cells"), list):
        raise Unreadable("not_a_notebook", "the file is JSON but not a Jupyter notebook (no list of cells)")
    cells = []
    for raw in content["cells"]:
        if not isinstance(raw, dict):
            continue
        source = raw.get("source", "")
        source = "".join(s for s in source if isinstance(s, str)) if isinstance(source, list) else source
        metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
        nbgrader = metadata.get("nbgrader") if isinstance(metadata.get("nbgrader"), dict) else {}
        grade_id = nbgrader.get("grade_id") if isinstance(nbgrader.get("grade_id"), str) else None
        cells.append(Cell(str(raw.get("cell_type")), source if isinstance(source, str) else "", grade_id))
    if not cells:
        raise Unreadable("empty", "the notebook has no cells")
    return cells


def assemble(source: nbformat.NotebookNode, cells: list[Cell]) -> Program:
    """The program for a submission's cells, built on the source notebook (see the module docstring)."""
    roles = {cell.metadata["nbgrader"]["grade_id"]: _role(cell) for cell in source.cells if "nbgrader" in cell.metadata}
    program = Program()
    # 1) the student's solution cells, by grade_id, and their own cells, by the known cell above them
    answers, extras, anchor, ignored = {}, {}, None, set()
    for cell in cells:
        role = roles.get(cell.grade_id)
        if role is None:
            if cell.cell_type == "code" and cell.source.strip():
                extras.setdefault(anchor, []).append(cell.source)
            continue
        anchor = cell.grade_id
        if role == "solution" and cell.cell_type == "code":
            if cell.grade_id in answers:
                ignored.add(cell.grade_id)
            else:
                answers[cell.grade_id] = cell.source
    program.notes += [f"cell {grade_id} appears more than once: the first copy was graded" for grade_id in sorted(ignored)]
    # 2) the source's order, with the student's cells put in
    _add_extras(program, extras.get(None, []), "before the first cell")
    for cell in source.cells:
        grade_id = cell.metadata["nbgrader"]["grade_id"]
        role = roles[grade_id]
        if role == "test":
            program.steps.append({"kind": "probe", "grade_id": grade_id})
        elif role == "solution":
            if grade_id in answers:
                program.steps.append({"kind": "cell", "grade_id": grade_id, "source": answers[grade_id]})
            else:
                program.missing.append(grade_id)
                program.notes.append(f"solution cell {grade_id} is missing from the submission (deleted, or not a code cell)")
        elif role == "locked_code":
            if any(marker in cell.source for marker in SECRET_MARKERS):
                raise ValueError(f"locked cell {grade_id} of the source holds a secret block: it would run in the sandbox")
            program.steps.append({"kind": "cell", "grade_id": grade_id, "source": cell.source})
        _add_extras(program, extras.get(grade_id, []), f"after {grade_id}")
    return program


def _role(cell: nbformat.NotebookNode) -> str:
    meta = cell.metadata["nbgrader"]
    if meta.get("grade") and not meta.get("solution"):
        return "test"
    if meta.get("solution"):
        return "solution"
    return "locked_code" if cell.cell_type == "code" else "text"


def _add_extras(program: Program, sources: list[str], where: str) -> None:
    for index, source in enumerate(sources):
        program.steps.append({"kind": "cell", "grade_id": f"own cell {index + 1} {where}", "source": source})
