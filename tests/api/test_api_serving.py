"""GET /v1/namespaces/{ns}/finetunejobs/{name}/serving: the adapter's serving text, behind the caller's `get`."""

from __future__ import annotations

import yaml
from kt_api import JOB

from kubetune.contracts import ServingFinding
from kubetune.serving import serving_status
from kubetune.spec import parse_spec

BASE = "/v1/namespaces/team-a/finetunejobs"
URI = "s3://adapters/support-bot/adapter"


async def test_serving_text_of_a_finished_job(stack) -> None:
    assert (await stack.client.post(BASE, json=JOB)).status_code == 201
    early = await stack.client.get(f"{BASE}/support-bot/serving")
    assert early.status_code == 409, early.text
    assert "has no adapter yet" in early.json()["detail"]

    await stack.kube.patch_object("finetunejobs", "team-a", "support-bot", {"status": {
        "phase": "Succeeded", "adapterUri": URI}})  # an operator that wrote no status.serving: rendered from spec
    rendered = (await stack.client.get(f"{BASE}/support-bot/serving")).json()
    assert rendered["ready"] is None and rendered["adapterUri"] == URI
    assert yaml.safe_load(rendered["kserve"])["spec"]["model"]["lora"]["adapters"] == [
        {"name": "support-bot", "uri": URI}]

    finding = ServingFinding(rule="RankAboveMax", severity="Warning", message="LoRA rank 32 is above 16")
    status = serving_status("support-bot", "team-a", parse_spec(JOB["spec"]), URI, [finding])
    await stack.kube.patch_object("finetunejobs", "team-a", "support-bot", {"status": {"serving": status}})
    stored = await stack.client.get(f"{BASE}/support-bot/serving")
    assert stored.status_code == 200 and stored.json() == status

    assert (await stack.client.get(f"{BASE}/nobody/serving")).status_code == 404
    assert (await stack.client.get(f"{BASE}/support-bot/serving", headers={"Authorization": ""})).status_code == 401
