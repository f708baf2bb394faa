"""Fixtures for the page's browser tests (helpers in kt_browser.py): `browser` is Debian's headless chromium;
`stack` is the API (uvicorn, passthrough mode) in front of the Kubernetes emulator with RBAC, from tests/api."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))
from kt_api import MakeStack, Stack, stack_factory
from kt_browser import chromium


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    make: MakeStack = stack_factory(tmp_path)
    async with make() as s:
        yield s
