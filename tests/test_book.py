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


def bib_keys() -> list[str]:
    return re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "book" / "references.bib").read_text(), flags=re.M)


def cited_keys(text: str) -> set[str]:
    """Keys of every {cite}, {cite:p}, {cite:t}... role in MyST text; `{pre}key{post}` keeps only the key."""
    keys = set()
    for targets in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
        keys |= {re.sub(r"\{[^{}]*\}", "", t).strip() for t in targets.split(",")}
    return keys


def test_references_are_citations_of_the_shared_bibliography():
    """Each chapter's References section is its filtered {bibliography}, not a hand-written list; every key a
    page cites is in book/references.bib, and every entry of references.bib is cited by some page."""
    keys = bib_keys()
    assert len(keys) == len(set(keys)), "references.bib has a duplicate key"
    cited: set[str] = set()
    for name in toc_files():
        text = (ROOT / f"{name}.md").read_text()
        page_keys = cited_keys(text)
        assert page_keys <= set(keys), f"{name} cites keys missing from references.bib: {page_keys - set(keys)}"
        cited |= page_keys
        if "\n## References\n" in text:
            section = text.split("\n## References\n", 1)[1].split("\n## ", 1)[0]
            assert "```{bibliography}\n:filter: docname in docnames\n```" in section, f"{name}: References is not its bibliography"
            assert not re.search(r"^\s*[-*] ", section, flags=re.M), f"{name}: References still lists works by hand"
            assert page_keys, f"{name} has a References section but cites nothing"
        elif Path(name).name.startswith("ch"):
            pytest.fail(f"{name} has no References section")
    assert set(keys) <= cited, f"references.bib entries no page cites: {sorted(set(keys) - cited)}"


def test_glossary_defines_every_term_the_pages_link():
    glossary = (ROOT / "book" / "glossary.md").read_text().split("```{glossary}", 1)[1].split("\n```", 1)[0]
    terms = {line.strip().lower() for line in glossary.splitlines() if line.strip() and not line.startswith((" ", ":"))}
    for name in toc_files():
        for role in re.findall(r"\{term\}`([^`]+)`", (ROOT / f"{name}.md").read_text()):
            target = (re.search(r"<([^<>]+)>\s*$", role) or re.match(r"(.*)", role)).group(1).strip().lower()
            assert target in terms, f"{name} links the term '{target}', which book/glossary.md does not define"


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
