"""The documentation's screenshots, taken with headless Chromium (as the browser tests do).

    python docs/screenshot.py page RUN_DIR/report.html docs/report.png [HEIGHT]
    python docs/screenshot.py terminal demo.out docs/demo_terminal.png

`page` shows a file as a browser does (its top HEIGHT pixels, default 1500); `terminal` shows a
captured terminal output as it reads in a terminal: the text, unchanged, light on dark, monospaced.
"""

from __future__ import annotations

import html
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
TERMINAL = ("<!doctype html><meta charset=utf-8><body style='margin:0;background:#101828'>"
            "<pre style='margin:0;padding:14px 18px;color:#e4e7ec;font:13px/1.35 DejaVu Sans Mono,"
            "monospace;white-space:pre'>{}</pre>")


def shoot(url: str, out: Path, height: int | None, width: int = 1200) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": width, "height": height or 600})
        page.goto(url)
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        page.screenshot(path=str(out), full_page=height is None)
        browser.close()


def main(argv: list[str]) -> int:
    kind, source, out = argv[0], Path(argv[1]), Path(argv[2])
    if kind == "page":
        shoot(source.resolve().as_uri(), out, int(argv[3]) if len(argv) > 3 else 1500)
    elif kind == "terminal":
        with tempfile.NamedTemporaryFile("w", suffix=".html", delete=False) as f:
            f.write(TERMINAL.format(html.escape(source.read_text())))
        shoot(Path(f.name).as_uri(), out, None, width=980)
        Path(f.name).unlink()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
