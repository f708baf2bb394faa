"""The chart's Argo CD health check (charts/kubetune/argocd/health.lua), run by a real Lua runtime (lupa) on
the statuses the operator writes: reconcile() outputs for every phase, not hand-made dicts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from lupa import LuaRuntime

sys.path.insert(0, str(Path(__file__).parent))
from kubetune_operator.reconcile import reconcile
from test_reconcile import CASES, after, body, snapshot

SCRIPT = (Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "argocd" / "health.lua").read_text()
EXPECTED = {"Pending": "Progressing", "Queued": "Progressing", "Running": "Progressing", "Succeeded": "Healthy",
            "Failed": "Degraded", "Suspended": "Suspended"}


def health(obj: dict[str, Any]) -> dict[str, str]:
    """What Argo CD does: the object as a Lua table in the global `obj`, the script's returned table."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize(("case", "snap"), [(c[0], c[1]) for c in CASES], ids=[c[0] for c in CASES])
def test_every_status_the_operator_writes(case: str, snap: Any) -> None:
    status = after(snap, reconcile(snap))
    obj = {**snap.body, "status": status}
    assessed = health(obj)
    assert assessed["status"] == EXPECTED[status["phase"]], (case, status["phase"], assessed)
    assert assessed["message"]


def test_all_phases_are_covered_by_the_tables() -> None:
    phases = {after(c[1], reconcile(c[1]))["phase"] for c in CASES}
    assert phases == set(EXPECTED)


def test_no_status_and_a_stale_status_are_progressing() -> None:
    assert health(body())["status"] == "Progressing"
    snap = snapshot(body())
    succeeded = {**after(snap, reconcile(snap)), "phase": "Succeeded"}
    stale = {**body(generation=2), "status": {**succeeded, "observedGeneration": 1,
                                              "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded",
                                                              "message": "adapter written"}]}}
    assert health(stale) == {"status": "Progressing", "message": "the operator has not seen the latest spec yet"}


def test_the_message_says_why() -> None:
    snap = snapshot(body(lora={"r": -4}))
    obj = {**snap.body, "status": after(snap, reconcile(snap))}
    assessed = health(obj)
    assert assessed["status"] == "Degraded" and assessed["message"].startswith("InvalidSpec: spec.lora.r")
