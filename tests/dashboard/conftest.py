"""Browser fixtures: Debian's Chromium driven by Playwright (never a downloaded browser),
a live API server, and screenshots saved under test-artifacts/.

Without Chromium or Playwright these tests skip locally and FAIL in CI (CI=true);
scripts/setup.sh installs both."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import LiveServer, live_api
from needs import missing

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LAPTOP = {"width": 1366, "height": 860}
PHONE = {"width": 390, "height": 844}
_names = itertools.count()


def chromium_path() -> str | None:
    return os.environ.get("MIXLOOM_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: pip install -e '.[dev]'")
    exe = chromium_path()
    if exe is None:
        missing("chromium is not installed: apt-get install -y chromium (scripts/setup.sh does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_api(tmp_path_factory.mktemp("dash")) as srv:
        yield srv


@pytest.fixture
def api_key(server: LiveServer) -> str:
    return server.new_key(f"web-{next(_names)}")


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, accept_downloads=True, base_url=server.url)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    # what the Content-Security-Policy blocked (an inline style, an outside URL) shows here
    pg.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    yield pg
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def sign_in(page: Any, key: str) -> None:
    page.goto("/")
    page.fill("#api-key", key)
    page.click("#sign-in")
    page.wait_for_selector("#nav:not([hidden])")
