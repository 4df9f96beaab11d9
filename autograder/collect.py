"""Find the submissions to grade, in any of three layouts, without trusting file names.

    submitted/<student>/<lab>/<lab>.ipynb     nbgrader's layout (SUBMISSIONS is the submitted/ folder)
    <folder>/<student>.ipynb                  a flat folder, one notebook per student
    <file>.zip                                an LMS download: either layout above, or <student>/<any>.ipynb

A student folder with exactly one notebook of another name is graded (the note says so); a folder
with none, or several and none named <lab>.ipynb, gets the status `missing`. Student ids become file
names (feedback/<student>/...), so they are reduced to letters, digits and `_.@-`.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from autograder.notebook import MAX_NOTEBOOK_BYTES


@dataclass(frozen=True)
class Submission:
    """One student's notebook as bytes (None if there is none: then `problem` is (status, reason))."""

    student: str
    name: str
    data: bytes | None
    problem: tuple[str, str] | None = None
    note: str | None = None


def student_id(name: str) -> str:
    cleaned = re.sub(r"[^\w.@-]", "_", name).lstrip(".")
    return cleaned[:100] or "unnamed"


def collect(path: Path, lab: str) -> list[Submission]:
    """The submissions under `path` (a folder or a .zip), one per student, sorted by student id."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        found = _from_zip(path, lab)
    elif path.is_dir():
        found = _from_folder(path, lab)
    else:
        raise ValueError(f"{path} is neither a folder nor a zip file of submissions")
    return [_choose(student, lab, files) for student, files in sorted(found.items())]


def _from_folder(path: Path, lab: str) -> dict[str, dict[str, bytes | int]]:
    found = {}
    for student_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        lab_dir = student_dir / lab if (student_dir / lab).is_dir() else student_dir
        found[student_id(student_dir.name)] = {p.name: _read(p) for p in sorted(lab_dir.glob("*.ipynb")) if p.is_file()}
    for notebook in sorted(path.glob("*.ipynb")):
        found.setdefault(student_id(notebook.stem), {})[f"{lab}.ipynb"] = _read(notebook)
    return found


def _from_zip(path: Path, lab: str) -> dict[str, dict[str, bytes | int]]:
    found = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            parts = tuple(p for p in PurePosixPath(info.filename).parts if p not in ("/", ".", ".."))
            if info.is_dir() or not parts or parts[-1].startswith(".") or not parts[-1].endswith(".ipynb"):
                continue
            if "__MACOSX" in parts or ".ipynb_checkpoints" in parts:
                continue
            if len(parts) >= 3 and parts[-2] == lab:
                student, name = parts[-3], parts[-1]  # .../submitted/<student>/<lab>/<name>
            elif len(parts) >= 2:
                student, name = parts[-2], parts[-1]  # <student>/<name>
            else:
                student, name = PurePosixPath(parts[-1]).stem, f"{lab}.ipynb"  # <student>.ipynb
            too_big = info.file_size > MAX_NOTEBOOK_BYTES
            found.setdefault(student_id(student), {})[name] = info.file_size if too_big else archive.read(info)
    return found


def _read(path: Path) -> bytes | int:
    size = path.stat().st_size
    return size if size > MAX_NOTEBOOK_BYTES else path.read_bytes()


def _choose(student: str, lab: str, files: dict[str, bytes | int]) -> Submission:
    expected = f"{lab}.ipynb"
    if expected in files:
        name = expected
    elif len(files) == 1:
        name = next(iter(files))
    else:
        names = ", ".join(sorted(files)) or "none"
        return Submission(student, expected, None, ("missing", f"no notebook named {expected} (found: {names})"))
    data = files[name]
    if isinstance(data, int):
        return Submission(student, name, None, ("corrupt", f"{name} is {data // 2**20} MiB, more than a notebook can be"))
    note = None if name == expected else f"the notebook was named {name!r}, not {expected!r}; it was graded anyway"
    return Submission(student, expected, data, note=note)
