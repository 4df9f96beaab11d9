"""Sphinx glue for the QLab book: fixes for what the pinned theme stack does wrong in a browser.

- sphinx-thebe adds its inline configuration script once per `env-before-read-docs`, which jupyter-book fires
  twice (once as filename None, once as ''): every page declared `const THEBE_JS_URL` twice and threw a SyntaxError. Identical scripts are kept once.
- sphinx-book-theme 1.3 does not pass pydata-sphinx-theme 0.17's `default_mode`, so a first visit (nothing in
  localStorage) logged "Got invalid theme mode". The mode defaults to "auto" (follow the system setting).
- On a phone the visible menu buttons did nothing (pydata wires only the first, hidden, one): qlab-nav.js
  (book/_static) forwards their clicks.
"""

from __future__ import annotations


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


def setup(app):
    app.connect("html-page-context", _page_context, priority=900)
    app.add_js_file("qlab-nav.js")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
