"""Fixtures for the test-cluster tests: the emulator (tests/operator/kt_cluster.py) with a kubelet attached."""

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "operator"))

from kt_cluster import Cluster, cluster
from kt_kubelet import Kubelet


@pytest.fixture
async def kubelet(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Kubelet]:
    async with Kubelet(cluster.api, tmp_path / "kubelet") as running:
        yield running
    assert not running.errors, running.errors


__all__ = ["cluster", "kubelet"]
