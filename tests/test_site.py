"""The built book as students meet it: every page read in a real browser (headless Chromium via Playwright),
with the network cut off, on a desktop and on a 390 px phone viewport.

Checked on every page: it loads with no console error and no uncaught exception, requests nothing from the
network, every formula is typeset (no raw `\\(`, `\\[` or `$$` left outside code), every image loads, no raw
Markdown table text is left, every internal link and anchor exists, and on the phone the sidebar opens.
Screenshots of each page are written to _build/screenshots/ for people to look at.

Needs Playwright (in requirements.lock) and a Chromium: Debian's `chromium` (`make test` installs it with
apt-get when run as root, as CI does), or set QLAB_CHROMIUM to a Chromium/Chrome binary. Without one these
tests are skipped with a message that says how to get it.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

from test_book import toc_files

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


def chromium() -> str | None:
    path = os.environ.get("QLAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: run `make test` (it installs "
                               "requirements.lock) or `pip install playwright`")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium() is None, reason="no Chromium found: `apt-get install chromium` (make test does it as "
                       "root) or set QLAB_CHROMIUM=/path/to/chrome"),
]


def pages() -> list[str]:
    return [*toc_files(), "search", "genindex"]


@pytest.fixture(scope="module")
def site(book_build) -> Path:
    if book_build.returncode != 0:
        pytest.fail("the book did not build (see test_book)")
    return book_build.html


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Visit:
    """One page opened offline: what the browser reported while loading and typesetting it."""

    def __init__(self, browser, html: Path, name: str, viewport: dict, server: str | None = None) -> None:
        """server: the page's http://127.0.0.1:PORT root, served from html, instead of file://."""
        self.server = server
        self.context = browser.new_context(viewport=viewport, offline=server is None)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.network: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.route("**/*", self._route)
        self.page.goto(f"{server}/{name}.html" if server else (html / f"{name}.html").as_uri(), wait_until="load")
        self.page.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise "
                           "? MathJax.startup.promise.then(() => true) : true")

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:", "about:")) or (self.server and url.startswith(self.server + "/")):
            route.continue_()
        else:
            self.network.append(url)
            route.abort()

    def text_outside_code(self) -> str:
        return self.page.evaluate("""() => {
            const main = (document.querySelector('main') || document.body).cloneNode(true);
            main.querySelectorAll('pre, code, script, style, mjx-container, .highlight, textarea').forEach(e => e.remove());
            return main.innerText; }""")

    def close(self) -> None:
        self.context.close()


@pytest.mark.parametrize("name", pages())
def test_page_reads_offline(browser, site, name):
    visit = Visit(browser, site, name, DESKTOP)
    try:
        assert visit.errors == [], f"{name}: {visit.errors}"
        assert visit.network == [], f"{name} requested from the network: {visit.network}"
        text = visit.text_outside_code()
        raw = [m for m in re.findall(r".{0,30}(?:\\\(|\\\[|\$\$).{0,30}", text)]
        assert raw == [], f"{name}: formulas left untypeset: {raw[:5]}"
        typeset = visit.page.locator("mjx-container").count()
        source = (site / f"{name}.html").read_text()
        autolinked = re.findall(r'href="https?://(?:torch|ql|qlab|nn|F)\.[a-z_]+', source)
        assert autolinked == [], f"{name}: Python names auto-linked as web addresses: {autolinked[:3]}"
        if 'class="math' in source:
            assert typeset > 0, f"{name} has math but MathJax typeset none of it"
        tables = [line for line in text.splitlines() if re.fullmatch(r"\s*\|.*\|\s*", line)]
        assert tables == [], f"{name}: raw Markdown table text: {tables[:3]}"
        broken = visit.page.evaluate("() => Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                                     ".map(i => i.getAttribute('src'))")
        assert broken == [], f"{name}: images that did not load: {broken}"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        visit.page.screenshot(path=str(SCREENSHOTS / f"{Path(name).name}.png"), full_page=True)
    finally:
        visit.close()


@pytest.mark.parametrize("name", ["book/intro", "book/ch05_outliers"])
def test_phone_navigation_opens_the_sidebar(browser, site, name):
    visit = Visit(browser, site, name, PHONE)
    try:
        assert visit.errors == [], f"{name} at 390 px: {visit.errors}"
        toggle = visit.page.locator("button.primary-toggle:visible").first
        assert toggle.count() == 1, f"{name}: no visible menu button at 390 px"
        menu = visit.page.locator("#pst-primary-sidebar-modal")
        assert not menu.is_visible(), f"{name}: the menu is open before it is asked for"
        toggle.click()
        visit.page.wait_for_timeout(500)
        box = menu.bounding_box()
        assert menu.is_visible() and box is not None and box["width"] > 100 and box["x"] + box["width"] > 100, \
            f"{name}: the menu button did not open the sidebar at 390 px ({box})"
        links = menu.locator("a.reference.internal")
        assert links.count() >= len(toc_files()) - 1 and links.first.is_visible(), f"{name}: the opened sidebar shows no chapters"
        visit.page.keyboard.press("Escape")
        visit.page.wait_for_timeout(300)
        outline = visit.page.locator("button.secondary-toggle:visible").first
        if outline.count():  # pages with sections have an "on this page" button
            outline.click()
            visit.page.wait_for_timeout(500)
            assert visit.page.locator("#pst-secondary-sidebar-modal").is_visible(), f"{name}: the page outline did not open"
        visit.page.screenshot(path=str(SCREENSHOTS / f"phone_{Path(name).name}_menu.png"))
    finally:
        visit.close()


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def test_internal_links_and_anchors_exist(site):
    parsed: dict[Path, _Anchors] = {}

    def parse(path: Path) -> _Anchors:
        if path not in parsed:
            parser = _Anchors()
            parser.feed(path.read_text(errors="replace"))
            parsed[path] = parser
        return parsed[path]

    broken = []
    for name in pages():
        page = site / f"{name}.html"
        for href in parse(page).links:
            url = urlparse(href)
            if url.scheme or href.startswith(("mailto:", "javascript:")):
                continue
            target, fragment = urldefrag(href)
            path = (page.parent / unquote(target)).resolve() if target else page
            if path.is_dir():
                path = path / "index.html"
            if not path.exists():
                broken.append(f"{name}: {href} (no file)")
            elif fragment and path.suffix == ".html" and unquote(fragment) not in parse(path).ids:
                broken.append(f"{name}: {href} (no anchor)")
    assert broken == [], broken[:20]


@pytest.fixture(scope="module")
def server(site):
    """The built site on a local HTTP server (search fetches pages, which file:// forbids)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *args: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_search_finds_a_chapter_from_a_local_server(browser, site, server):
    visit = Visit(browser, site, "search", DESKTOP, server=server)
    try:
        for query, title in (("SmoothQuant", "Outliers"), ("GPTQ", "Weight-only")):
            visit.page.goto(f"{server}/search.html?q={query}", wait_until="load")
            visit.page.wait_for_selector("#search-results li", timeout=20000)
            results = visit.page.locator("#search-results li a").all_inner_texts()
            assert any(title in r for r in results), (query, results)
        assert visit.errors == [], visit.errors
        assert visit.network == [], visit.network
    finally:
        visit.close()


def test_labs_page_offers_every_released_notebook(site):
    import nbformat

    from labs.release import all_labs

    page = (site / "book" / "labs.html").read_text()
    for lab in all_labs():
        assert f'href="../labs/{lab}.ipynb"' in page, f"the labs page does not link {lab}.ipynb"
        nb = nbformat.read(site / "labs" / f"{lab}.ipynb", as_version=4)  # a real notebook, the student release
        text = "\n".join(cell.source for cell in nb.cells)
        assert "raise NotImplementedError()" in text and "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text, lab
