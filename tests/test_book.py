"""The book builds: every chapter in _toc.yml executes without error and becomes an HTML page."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def toc_files() -> list[str]:
    return re.findall(r"(?:root|file):\s*(\S+)", (ROOT / "_toc.yml").read_text())


def test_every_toc_entry_exists():
    for name in toc_files():
        assert (ROOT / f"{name}.md").exists() or (ROOT / f"{name}.ipynb").exists(), name


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_book_builds_with_every_chapter_executed(tmp_path):
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run(
        [str(jb), "build", str(ROOT), "--path-output", str(tmp_path), "--builder", "html"],
        capture_output=True, text=True, timeout=1200,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    for marker in ("Executing notebook failed", "CellExecutionError", "Traceback (most recent call last)"):
        assert marker not in log, log[-5000:]
    html = tmp_path / "_build" / "html"
    for name in toc_files():
        page = html / f"{name}.html"
        assert page.exists(), f"{page} was not built"
        text = page.read_text()
        assert "output traceback" not in text, f"{name} shows an error output"
        if Path(name).name.startswith("ch"):
            assert "cell_output" in text, f"{name} has no executed output"
