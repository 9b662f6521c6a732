"""Open a report page the way a reviewer does: headless Chromium (Debian's package, which
`make test` installs), driven by Playwright. Returns what the page shows: every image's load
state and every figure cell (``data-key`` -> text), and saves a full-page screenshot."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("UNCLIP_CHROMIUM", "/usr/bin/chromium")
# The flags a root user on a closed network needs (see ../shared/ENVIRONMENT.md).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def chromium_or_skip() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("UNCLIP_REQUIRE_BROWSER") == "1":       # `make test` installs it: absent is a failure
        pytest.fail(f"{CHROMIUM} is missing (make test installs Debian's chromium package)")
    pytest.skip(f"{CHROMIUM} is missing: `make test` installs it")


def open_page(path: Path, screenshot: Path) -> dict:
    binary = chromium_or_skip()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
                                   " width: i.naturalWidth, height: i.naturalHeight}))")
            cells = page.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('td[data-key], b[data-key]'))"
                                  ".map(c => [c.dataset.key, c.textContent]))")
            rows = page.evaluate("Array.from(document.querySelectorAll('tr[data-key]')).map(r => ({key: r.dataset.key,"
                                 " cls: r.className, cells: Array.from(r.cells).map(c => c.textContent)}))")
            title = page.title()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    keep = os.environ.get("UNCLIP_SCREENSHOT_DIR")        # where a reviewer wants to see them
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / Path(screenshot).name)
    return {"images": images, "cells": cells, "rows": rows, "title": title}
