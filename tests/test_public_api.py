"""Every public name the course uses resolves: `ql.X.Y` and `from qlab.x import y` in book/, labs/ and the
autograder's specs (which disable functions by dotted name), so a refactor cannot silently break a chapter."""

import importlib
import json
import re
from pathlib import Path

import pytest

import qlab as ql

ROOT = Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"\bql((?:\.[A-Za-z_][A-Za-z_0-9]*)+)")
FROM_IMPORT = re.compile(r"from (qlab(?:\.[a-z_0-9]+)*) import \(?([A-Za-z_0-9, \n]+?)\)?(?:$|\n|\\n|\")", re.M)


def sources():
    for path in [*ROOT.glob("book/*.md"), *ROOT.glob("labs/source/*/*.ipynb"), *ROOT.glob("autograder/specs/*.py")]:
        text = path.read_text()
        if path.suffix == ".ipynb":
            text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"])
        yield path.relative_to(ROOT), text


def uses():
    found = set()
    for path, text in sources():
        for m in DOTTED.finditer(text):
            found.add((str(path), "ql" + m.group(1)))
        for m in FROM_IMPORT.finditer(text):
            for name in m.group(2).split(","):
                name = name.strip().split(" as ")[0].strip()
                if name:
                    found.add((str(path), f"{m.group(1)}:{name}"))
    return sorted(found)


def resolve(use: str):
    if ":" in use:
        module, name = use.split(":")
        return getattr(importlib.import_module(module), name)
    obj = ql
    parts = use.split(".")[1:]
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            # a method/attribute of an instance (ql.models.tiny_gpt(...).blocks) is not checkable statically
            if i > 0 and not isinstance(obj, type(ql)):
                return obj
            raise AttributeError(f"{use}: {part!r} not found")
        obj = getattr(obj, part)
    return obj


def test_the_scan_finds_the_course_uses():
    found = {u for _, u in uses()}
    assert len(found) > 50 and "ql.quantize_" in found and "qlab.observers:MinMaxObserver" in found


@pytest.mark.parametrize("path,use", uses())
def test_public_name_resolves(path, use):
    try:
        resolve(use)
    except (AttributeError, ImportError) as err:
        pytest.fail(f"{path} uses {use}, which does not resolve: {err}")
