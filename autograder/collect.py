"""Find the submissions to grade, in any of three layouts, without trusting file names.

    submitted/<student>/<lab>/<lab>.ipynb     nbgrader's layout (SUBMISSIONS is the submitted/ folder)
    <folder>/<student>.ipynb                  a flat folder, one notebook per student
    <file>.zip                                an LMS download: either layout above, or <student>/<any>.ipynb

A student folder with exactly one notebook of another name is graded (the note says so); a folder
with none, or several and none named <lab>.ipynb, gets the status `missing`. Student ids become file
names (feedback/<student>/...), so they are reduced to ASCII letters, digits and `_.@-`; names that
reduce to the same id are kept apart. Symbolic links and anything outside the submissions are refused.
"""

from __future__ import annotations

import hashlib
import re
import stat
import unicodedata
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


MAX_ID = 64  # characters of a student id (a folder name: well under the file system's 255 bytes)


def student_id(name: str) -> str:
    """A safe id for a submission's name: ASCII letters, digits and `_.@-` ("Zoë Brontë" -> "Zoe_Bronte"),
    at most MAX_ID characters; a name that had to be cut, or that leaves nothing, keeps a short hash of
    itself so that two such names stay apart."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^A-Za-z0-9_.@-]", "_", ascii_name).lstrip(".")
    if not cleaned.strip("_") or len(cleaned) > MAX_ID:
        cleaned = f"{(cleaned.strip('_') or 'unnamed')[:MAX_ID - 9]}-{_digest(name)}"
    return cleaned


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


# What collection found: {submission name as written (folder, file stem, zip folder): {file name: bytes,
# its size if too large, or (status, reason) if it cannot be graded}}
Found = dict[str, dict[str, "bytes | int | tuple[str, str]"]]


def collect(path: Path, lab: str) -> list[Submission]:
    """The submissions under `path` (a folder or a .zip), one per student, sorted by student id.

    Nothing found can stop the collection: an unreadable entry becomes that student's problem (status
    and reason), symbolic links and anything that resolves outside the folder are refused, and two
    names that reduce to the same id (`erin smith`, `erin_smith`) are both kept, with a note."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        found = _from_zip(path, lab)
    elif path.is_dir():
        found = _from_folder(path, lab)
    else:
        raise ValueError(f"{path} is neither a folder nor a zip file of submissions")
    submissions = []
    for name, student, note in _assign_ids(sorted(found)):
        submission = _choose(student, lab, found[name])
        if note:
            submission = Submission(submission.student, submission.name, submission.data, submission.problem,
                                    "; ".join(filter(None, [note, submission.note])))
        submissions.append(submission)
    return sorted(submissions, key=lambda submission: submission.student)


def _assign_ids(names: list[str]) -> list[tuple[str, str, str | None]]:
    """(name, student id, note) for each submission name; names that reduce to one id all stay, apart."""
    by_id = {}
    for name in names:
        by_id.setdefault(student_id(name), []).append(name)
    assigned = []
    for student, group in by_id.items():
        if len(group) == 1:
            assigned.append((group[0], student, None))
            continue
        keeper = student if student in group else None  # a name that already is its id keeps it
        for name in group:
            if name == keeper:
                assigned.append((name, student, f"another submission's name ({_shown(next(n for n in group if n != name))}) "
                                                 f"also reduces to the id {student!r}; it was graded separately"))
            else:
                unique = f"{student[:MAX_ID - 9]}-{_digest(name)}"
                assigned.append((name, unique, f"the submission {_shown(name)} was graded as {unique!r}: its name reduces to "
                                               f"{student!r}, like another submission's"))
    return assigned


def _shown(name: str) -> str:
    """A submission name as notes may repeat it: printable ASCII, at most 80 characters."""
    return repr(name.encode("ascii", "backslashreplace").decode("ascii")[:80])


def _from_folder(path: Path, lab: str) -> Found:
    found, root = {}, path.resolve()
    for entry in sorted(path.iterdir(), key=lambda entry: entry.name):
        if entry.name.startswith("."):
            continue
        if entry.suffix != ".ipynb" and not entry.is_dir():
            continue  # a stray file that is no notebook (README.txt, grades.csv)
        name = entry.stem if entry.suffix == ".ipynb" and not entry.is_dir() else entry.name
        refused = _refused(entry, root)
        if refused:
            found.setdefault(name, {})[f"{lab}.ipynb"] = ("refused", refused)
            continue
        if entry.is_dir():
            lab_dir = entry / lab if (entry / lab).is_dir() and not (entry / lab).is_symlink() else entry
            try:
                notebooks = sorted(lab_dir.glob("*.ipynb"))
            except OSError as error:
                found.setdefault(name, {})[f"{lab}.ipynb"] = ("corrupt", f"the folder could not be read ({error.strerror})")
                continue
            files = found.setdefault(name, {})
            for notebook in notebooks:
                refused = _refused(notebook, root)
                files[notebook.name] = ("refused", refused) if refused else _read(notebook)
        elif entry.suffix == ".ipynb":
            found.setdefault(name, {})[f"{lab}.ipynb"] = _read(entry)
    return found


def _refused(path: Path, root: Path) -> str | None:
    """Why `path` may not be graded (a symbolic link, or something outside the submissions), or None."""
    if path.is_symlink():
        return f"{path.name} is a symbolic link: only files submitted as they are can be graded"
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return f"{path.name} could not be resolved"
    if resolved != root and root not in resolved.parents:
        return f"{path.name} is outside the submissions folder"
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a named pipe would block the reader, a device read for ever
        return f"{path.name} is not a regular file"
    return None


def _from_zip(path: Path, lab: str) -> Found:
    found = {}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable zip file ({error}): download the submissions again") from None
    with archive:
        for info in archive.infolist():
            parts = tuple(p for p in PurePosixPath(info.filename.replace("\\", "/")).parts if p not in ("/", ".", ".."))
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
            found.setdefault(student, {})[name] = _read_entry(archive, info)
    return found


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes | int | tuple[str, str]:
    """A zip entry's bytes, its size if too large, or (status, reason) if it cannot be read."""
    if stat.S_ISLNK(info.external_attr >> 16):
        return ("refused", f"{info.filename[-80:]!r} is a symbolic link in the zip: only files can be graded")
    if info.flag_bits & 0x1:
        return ("corrupt", "the notebook is encrypted in the zip (password-protected): submit it without a password")
    if info.file_size > MAX_NOTEBOOK_BYTES:
        return info.file_size
    try:
        with archive.open(info) as entry:
            data = entry.read(MAX_NOTEBOOK_BYTES + 1)
    except Exception as error:  # BadZipFile (CRC), zlib.error, NotImplementedError (compression), EOFError, ...
        return ("corrupt", f"the notebook could not be extracted from the zip ({type(error).__name__})")
    return len(data) if len(data) > MAX_NOTEBOOK_BYTES else data


def _read(path: Path) -> bytes | int | tuple[str, str]:
    try:
        size = path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            return size
        return path.read_bytes()
    except OSError as error:
        return ("corrupt", f"the file could not be read ({error.strerror})")


def _choose(student: str, lab: str, files: dict[str, bytes | int | tuple[str, str]]) -> Submission:
    expected = f"{lab}.ipynb"
    if expected in files:
        name = expected
    elif len(files) == 1:
        name = next(iter(files))
    else:
        names = ", ".join(_shown(name) for name in sorted(files)[:10]) or "none"
        return Submission(student, expected, None, ("missing", f"no notebook named {expected} (found: {names})"))
    data = files[name]
    if isinstance(data, tuple):
        return Submission(student, expected, None, data)
    if isinstance(data, int):
        return Submission(student, name, None, ("corrupt", f"{_shown(name)} is {data // 2**20} MiB, more than a notebook can be"))
    note = None if name == expected else f"the notebook was named {_shown(name)}, not {expected!r}; it was graded anyway"
    return Submission(student, expected, data, note=note)
