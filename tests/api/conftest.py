"""Fixtures for the API tests (helpers in kt_api.py): `stack` is the API in passthrough mode over plain HTTP;
`make_stack(auth=..., tls=..., **settings)` builds any mode, over HTTPS with a test CA when asked."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kt_api import MakeStack, Stack, stack_factory


@pytest.fixture
def make_stack(tmp_path: Path) -> MakeStack:
    return stack_factory(tmp_path)


@pytest.fixture
async def stack(make_stack: MakeStack) -> AsyncIterator[Stack]:
    async with make_stack() as s:
        yield s
