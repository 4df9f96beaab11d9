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


def test_intro_chapter_map_matches_the_toc():
    """The intro's chapter map names every chapter of _toc.yml, under its part's caption, and lists nothing
    that exists under "Coming next"."""
    intro = (ROOT / "book" / "intro.md").read_text()
    chapter_map = intro.split("## Chapter map", 1)[1].split("\n## ", 1)[0]
    available, _, coming = chapter_map.partition("**Coming next**")
    toc = (ROOT / "_toc.yml").read_text()
    for caption, body in re.findall(r"- caption: (.+)\n    chapters:\n((?:      - file: .+\n)+)", toc):
        chapters = [Path(f).name for f in re.findall(r"file: (\S+)", body) if Path(f).name.startswith("ch")]
        if chapters:
            assert f": {caption}**" in available, f"the chapter map has no part '{caption}'"
        for name in chapters:
            assert f"{{doc}}`{name}`" in available, f"the intro's chapter map does not list {name}"
    assert "{doc}" not in coming, "a chapter that exists is listed under 'Coming next'"


def test_every_chapter_ends_with_takeaways_and_exercises():
    for name in toc_files():
        if Path(name).name.startswith("ch"):
            text = (ROOT / f"{name}.md").read_text()
            assert "\n## Key takeaways\n" in text, f"{name} has no 'Key takeaways' section"
            assert text.index("## Key takeaways") < text.index("## Try it"), f"{name}: takeaways come before 'Try it'"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_book_builds_with_every_chapter_executed(book_build):
    log = book_build.log
    assert book_build.returncode == 0, log[-5000:]
    for marker in ("Executing notebook failed", "CellExecutionError", "Traceback (most recent call last)"):
        assert marker not in log, log[-5000:]
    html = book_build.html
    for name in toc_files():
        page = html / f"{name}.html"
        assert page.exists(), f"{page} was not built"
        text = page.read_text()
        assert "output traceback" not in text, f"{name} shows an error output"
        if Path(name).name.startswith("ch"):
            assert "cell_output" in text, f"{name} has no executed output"
