"""Shared test settings, and the one book build that test_book and test_site share."""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Small tensors on a 2-core machine run far faster on one thread: two OpenMP threads spin against
# each other (and against notebook kernels the tests start) and make tiny ops 10x slower.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # labs/ and autograder/ are folders of the repository, not installed packages


@dataclass(frozen=True)
class BookBuild:
    returncode: int
    log: str
    html: Path


@pytest.fixture(scope="session")
def book_build(tmp_path_factory) -> BookBuild:
    """One `jupyter-book build` of the whole book (every chapter executed) per test session: test_book checks
    the build, test_site reads the pages in a browser. QLAB_BOOK_HTML=<folder of a build's html> reuses that
    build instead (to iterate on the browser tests); make test always builds."""
    if os.environ.get("QLAB_BOOK_HTML"):
        return BookBuild(0, "", Path(os.environ["QLAB_BOOK_HTML"]))
    out = tmp_path_factory.mktemp("book")
    # The labs page links the student releases: make them in a copy of labs/ (the repository stays clean).
    labs = tmp_path_factory.mktemp("labs")
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", labs)
    shutil.copytree(ROOT / "labs" / "source", labs / "source")
    from labs.release import all_labs, release_lab

    for lab in all_labs(labs):
        release_lab(lab, root=labs)
    jb = Path(sys.executable).with_name("jupyter-book")
    env = dict(os.environ, QLAB_LABS_RELEASE=str(labs / "release"))
    proc = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(out), "--builder", "html"],
                          capture_output=True, text=True, timeout=1500, env=env)
    return BookBuild(proc.returncode, proc.stdout + proc.stderr, out / "_build" / "html")
