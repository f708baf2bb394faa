"""Fixtures for the operator tests (defined in kt_cluster.py, which the benchmark reuses)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from kt_cluster import cluster, trainer_standin

__all__ = ["cluster", "trainer_standin"]
