"""Sphinx glue for the QLab book: fixes for what the pinned theme stack does wrong in a browser.

- sphinx-thebe adds its inline configuration script once per `env-before-read-docs`, which jupyter-book fires
  twice (once as filename None, once as ''): every page declared `const THEBE_JS_URL` twice and threw a SyntaxError. Identical scripts are kept once.
- sphinx-book-theme 1.3 does not pass pydata-sphinx-theme 0.17's `default_mode`, so a first visit (nothing in
  localStorage) logged "Got invalid theme mode". The mode defaults to "auto" (follow the system setting).
- On a phone the visible menu buttons did nothing (pydata wires only the first, hidden, one): qlab-nav.js
  (book/_static) forwards their clicks.

It also publishes the student release of every lab: labs/release/<lab>/<lab>.ipynb (made by `make book`
before the build; QLAB_LABS_RELEASE names another release folder) is copied to <html>/labs/<lab>.ipynb, which
the labs page links. A lab source without its release is a build warning (an error under `make book`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)


def _page_context(app, pagename, templatename, context, doctree) -> None:
    scripts, seen = [], set()
    for js in context.get("script_files", []):
        key = (getattr(js, "filename", None) or None, tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            scripts.append(js)
    context["script_files"] = scripts
    if not context.get("default_mode"):
        context["default_mode"] = "auto"


def _release_folder(app) -> Path:
    return Path(os.environ.get("QLAB_LABS_RELEASE") or Path(app.confdir) / "labs" / "release")


def _publish_labs(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, release = Path(app.confdir) / "labs" / "source", _release_folder(app)
    target = Path(app.outdir) / "labs"
    for lab in sorted(d.name for d in source.iterdir() if d.is_dir() and any(d.glob("*.ipynb"))):
        notebook = release / lab / f"{lab}.ipynb"
        if not notebook.is_file():
            logger.warning(f"no student release of {lab} ({notebook}): run `python -m labs.release` (make book does)")
            continue
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(notebook, target / f"{lab}.ipynb")


def setup(app):
    app.connect("build-finished", _publish_labs)
    app.connect("html-page-context", _page_context, priority=900)
    app.add_js_file("qlab-nav.js")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
