"""Make the student release of each lab, and check that it leaks no solution and no hidden test.

    python -m labs.release              # every lab in labs/source
    python -m labs.release lab1 lab2    # only these
    python -m labs.release --force      # even the labs whose source did not change since their last release

Run it from the repository root with the course's Python (the venv). A lab is a folder
labs/source/<lab>/ holding nbgrader source notebooks. nbgrader makes the release
(`nbgrader generate_assignment <lab> --force`, run inside labs/ so that labs/nbgrader_config.py
applies): it replaces each `### BEGIN SOLUTION` ... `### END SOLUTION` block with a stub and deletes
each `### BEGIN HIDDEN TESTS` ... `### END HIDDEN TESTS` block.

`check_release` then verifies the result without trusting nbgrader: the release may contain no block
marker, and no non-trivial line of a secret block (solution, hidden test, mark scheme), unless that
same text is also public in the source (outside every secret block). The exit status is 1 on a leak.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

LABS_DIR = Path(__file__).resolve().parent

# Each secret block runs from a line containing the first marker to a line containing the second.
SECRET_BLOCKS = {
    "BEGIN SOLUTION": "END SOLUTION",
    "BEGIN HIDDEN TESTS": "END HIDDEN TESTS",
    "BEGIN MARK SCHEME": "END MARK SCHEME",
}
MARKERS = [*SECRET_BLOCKS, *SECRET_BLOCKS.values()]
# What nbgrader writes in place of a solution (labs/nbgrader_config.py): public by construction.
STUBS = "# YOUR CODE HERE\nraise NotImplementedError()\nYOUR ANSWER HERE"


def all_labs(root: Path = LABS_DIR) -> list[str]:
    """Names of the labs: the folders of root/source that hold at least one notebook, sorted."""
    source = Path(root) / "source"
    return sorted(d.name for d in source.iterdir() if d.is_dir() and any(d.glob("*.ipynb")))


def run_nbgrader(args: list[str], root: Path = LABS_DIR) -> subprocess.CompletedProcess:
    """Run `nbgrader ARGS...` with this Python in the course folder `root`; raise RuntimeError if it fails."""
    # nbgrader shells out to `alembic` (installed next to this Python) to version the gradebook.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    command = [sys.executable, "-m", "nbgrader", *args]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"`nbgrader {' '.join(args)}` failed in {root} (exit status {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


def release_lab(name: str, root: Path = LABS_DIR) -> Path:
    """Generate the student release of lab `name` with nbgrader; return the release folder.

    Raises:
        ValueError: if there is no lab `name` in root/source.
        RuntimeError: if nbgrader fails (its output is in the message).
    """
    root = Path(root)
    labs = all_labs(root)
    if name not in labs:
        raise ValueError(f"no lab {name!r} in {root / 'source'}; the labs are {labs}")
    release = root / "release" / name
    shutil.rmtree(release, ignore_errors=True)  # never check a stale release
    result = run_nbgrader(["generate_assignment", name, "--force"], root)
    log = result.stdout + result.stderr
    # nbgrader logs a failed conversion and still exits with status 0.
    expected = [release / path.name for path in sorted((root / "source" / name).glob("*.ipynb"))]
    if "| ERROR]" in log or not all(path.is_file() for path in expected):
        raise RuntimeError(f"`nbgrader generate_assignment {name}` failed in {root}:\n{log}")
    return release


def _cell_text(cell: nbformat.NotebookNode) -> str:
    """A cell's source and the text of its outputs: everything a student could read in it."""
    parts = [cell.source]
    for output in cell.get("outputs", []):
        parts.append(str(output.get("text", "")))
        parts.extend(str(value) for value in output.get("data", {}).values())
        parts.extend(output.get("traceback", []))
    return "\n".join(parts)


def _split_secret(cell: nbformat.NotebookNode) -> tuple[list[str], list[str]]:
    """Split one source cell into (secret lines, public lines); marker lines are in neither."""
    lines = cell.source.splitlines()
    meta = cell.metadata.get("nbgrader", {})
    has_markers = any(marker in line for line in lines for marker in MARKERS)
    if meta.get("solution") and not has_markers:
        return lines, []  # nbgrader replaces a solution cell without markers as a whole
    secret, public, end = [], [], None
    for line in lines:
        if end is None:
            begin = next((b for b in SECRET_BLOCKS if b in line), None)
            if begin is not None:
                end = SECRET_BLOCKS[begin]
            else:
                public.append(line)
        elif end in line:
            end = None
        else:
            secret.append(line)
    return secret, public


def _is_trivial(line: str) -> bool:
    """Lines too generic to count as a leak: blank, punctuation only, or a lone keyword."""
    return len(line) < 5 or not re.search(r"[A-Za-z0-9]", line) or line in {"else:", "try:", "finally:", "return", "continue"}


def check_release(name: str, root: Path = LABS_DIR) -> list[str]:
    """Problems with the release of lab `name`: leaked markers or secret lines, or missing notebooks.

    Returns:
        one human-readable message per problem; an empty list means the release is clean.
    """
    root = Path(root)
    source_dir, release_dir = root / "source" / name, root / "release" / name
    problems = []
    for source_path in sorted(source_dir.glob("*.ipynb")):
        release_path = release_dir / source_path.name
        if not release_path.is_file():
            problems.append(f"{name}/{source_path.name}: missing from the release {release_dir}")
            continue
        secret, public = [], [STUBS]
        for cell in nbformat.read(source_path, as_version=4).cells:
            cell_secret, cell_public = _split_secret(cell)
            secret += cell_secret
            public += cell_public
        public_text = "\n".join(public)
        raw = release_path.read_text(encoding="utf-8")
        released = "\n".join(_cell_text(c) for c in nbformat.reads(raw, as_version=4).cells)
        for marker in MARKERS:
            if marker in raw:
                problems.append(f"{name}/{release_path.name}: the marker {marker!r} is in the release")
        leaked = {
            line.strip() for line in secret
            if not _is_trivial(line.strip()) and line.strip() in released and line.strip() not in public_text
        }
        problems += [f"{name}/{release_path.name}: secret line in the release: {line!r}" for line in sorted(leaked)]
    return problems


def _summary(name: str, release: Path) -> str:
    notebooks = sorted(release.glob("*.ipynb"))
    graded = [
        cell.metadata["nbgrader"]
        for path in notebooks
        for cell in nbformat.read(path, as_version=4).cells
        if cell.metadata.get("nbgrader", {}).get("grade")
    ]
    points = sum(meta.get("points", 0) for meta in graded)
    return f"{name}: {len(notebooks)} notebook(s), {len(graded)} graded cells, {points:g} points -> {release}"


def source_fingerprint(name: str, root: Path = LABS_DIR) -> str:
    """sha256 of everything a release of lab `name` is made from: its source folder (names and bytes), this
    script and the nbgrader configuration. Equal fingerprints give the same release."""
    import hashlib

    root = Path(root)
    digest = hashlib.sha256()
    files = sorted(p for p in (root / "source" / name).rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts)
    for path in [*files, Path(__file__), root / "nbgrader_config.py"]:
        digest.update(str(path.relative_to(path.parents[1] if path == Path(__file__) else root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _stamp(name: str, root: Path = LABS_DIR) -> Path:
    return Path(root) / "release" / ".stamps" / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labs.release", description=__doc__.split("\n")[0])
    parser.add_argument("labs", nargs="*", metavar="LAB", help="labs to release (default: all of labs/source)")
    parser.add_argument("--force", action="store_true",
                        help="release again even where the source is unchanged since the last release")
    args = parser.parse_args(argv)
    names = args.labs or all_labs()
    unknown = sorted(set(names) - set(all_labs()))
    if unknown:
        parser.error(f"unknown lab(s) {unknown}; the labs are {all_labs()}")
    problems = []
    for name in names:
        fingerprint, stamp = source_fingerprint(name), _stamp(name)
        release = LABS_DIR / "release" / name
        fresh = (not args.force and release.is_dir() and stamp.is_file() and stamp.read_text() == fingerprint)
        if not fresh:  # nbgrader runs only for a changed source (a few seconds per lab)
            stamp.unlink(missing_ok=True)
            try:
                release = release_lab(name)
            except RuntimeError as error:
                print(error, file=sys.stderr)
                return 1
        lab_problems = check_release(name)  # always: a release edited by hand is checked again
        problems += lab_problems
        if not lab_problems:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(fingerprint)
        print(_summary(name, release) + ("" if lab_problems else ", no leaks") + (" (source unchanged)" if fresh else ""))
    if problems:
        print("LEAK: the student release would reveal solutions or hidden tests:", file=sys.stderr)
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
