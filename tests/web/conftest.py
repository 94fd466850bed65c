"""The web page's end-to-end set-up: headless Chromium driven by Playwright, against the shared production-shaped
stack (`prod_stack` in tests/conftest.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def api_key(prod_stack: Stack) -> str:
    """A key made the way an operator makes one."""
    return prod_stack.create_key("web-page")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never `playwright install`)."""
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the web page's browser tests need it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[dev]')")
    executable = str(CHROMIUM) if CHROMIUM.exists() else str(shutil.which("chromium"))
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser: Any, prod_stack: Stack) -> Iterator[Any]:
    """A fresh browser profile (its own sessionStorage) on a desktop-sized screen."""
    ctx = browser.new_context(
        base_url=prod_stack.base_url, viewport={"width": 1280, "height": 900}, accept_downloads=True,
        color_scheme="light",
    )  # fmt: skip
    ctx.set_default_timeout(20_000)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    """A tab that fails the test on any uncaught script error."""
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture(autouse=True)
def patient_expectations() -> None:
    """The worker shares two CPU cores with everything else: give assertions the context's 20 s, not 5 s."""
    try:
        from playwright.sync_api import expect
    except ImportError:  # the browser tests skip; the others need no browser
        return
    expect.set_options(timeout=20_000)
