"""The real browser for the page's tests: Debian's chromium (apt, by scripts/setup.sh --test) driven by Playwright,
never a browser Playwright downloads. Screenshots go to artifacts/ui/ (gitignored) or $KUBETUNE_UI_ARTIFACTS."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("KUBETUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("KUBETUNE_UI_ARTIFACTS") or ROOT / "artifacts" / "ui")
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}  # an iPhone 12-15 in CSS pixels


def need_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: `scripts/setup.sh --test` installs Debian's "
                    "(or set KUBETUNE_CHROMIUM)")


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    need_chromium()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Tab:
    """A page plus what it logged: any script error fails the test."""

    page: Page
    errors: list[str] = field(default_factory=list)

    async def shot(self, name: str, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path

    async def sign_in(self, url: str, token: str) -> None:
        await self.page.goto(url + "/")
        await self.page.get_by_label("Bearer token").fill(token)
        await self.page.get_by_role("button", name="Sign in").click()
        await self.page.locator("#ns-form").wait_for(state="visible")

    async def open_namespace(self, namespace: str) -> None:
        await self.page.get_by_role("combobox", name="Namespace").fill(namespace)
        await self.page.get_by_role("button", name="Open").click()

    async def paste_job(self, yaml_text: str) -> None:
        await self.page.get_by_role("link", name="New job").click()
        await self.page.locator("#fields fieldset").first.wait_for()
        await self.page.get_by_label("FineTuneJob YAML").fill(yaml_text)

    async def axe(self) -> list[dict[str, Any]]:
        """axe-core's serious and critical violations on the page as it is now."""
        from axe_playwright_python.async_playwright import Axe

        result = await Axe().run(self.page)
        return [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
                for v in result.response["violations"] if v["impact"] in ("serious", "critical")]


@asynccontextmanager
async def tab(browser: Browser, viewport: dict[str, int] = DESKTOP) -> AsyncIterator[Tab]:
    context = await browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = await context.new_page()
    page.set_default_timeout(15_000)
    opened = Tab(page)
    page.on("pageerror", lambda exc: opened.errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: opened.errors.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    try:
        yield opened
    except BaseException:
        with contextlib.suppress(Exception):  # what the page showed when the test failed
            print(f"page status: {await page.locator('#status').inner_text()!r}; saved",
                  await opened.shot(f"failed-{int(time.time())}"))
        raise
    finally:
        await context.close()
    assert not opened.errors, opened.errors
