"""The self-serve REST API against the Kubernetes emulator, both over real HTTP on 127.0.0.1."""

from __future__ import annotations

from typing import Any

from kt_api import JOB

BASE = "/v1/namespaces/team-a/finetunejobs"


def stored(stack, name: str = "support-bot") -> dict[str, Any] | None:
    return stack.kube.get("finetunejobs", "team-a", name)


async def test_submit_validates_plans_and_creates_the_resource(stack) -> None:
    response = await stack.client.post(BASE, json=JOB)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["plan"]["gpuClass"] == "L4"
    assert body["plan"]["vramEstimateBytes"] == sum(body["plan"]["breakdown"].values())
    assert body["summary"]["name"] == "support-bot" and body["summary"]["namespace"] == "team-a"
    obj = stored(stack)
    assert obj is not None and obj["spec"]["model"]["name"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert obj["metadata"]["uid"]


async def test_invalid_spec_is_422_with_field_lines_and_nothing_is_created(stack) -> None:
    bad = {**JOB, "spec": {**JOB["spec"], "lora": {"r": -4, "rank": 8}}}
    response = await stack.client.post(BASE, json=bad)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        "spec.lora.r: must be >= 1, got -4",
        "spec.lora.rank: unknown field; allowed fields here: r, alpha, dropout, targetModules, modulesToSave",
    ]
    assert stored(stack) is None


async def test_a_job_no_gpu_can_hold_is_refused_before_the_cluster_sees_it(stack) -> None:
    pinned = {**JOB, "spec": {**JOB["spec"], "model": {"name": "meta-llama/Llama-3.1-70B"},
                              "resources": {"gpuClass": "L4", "gpuCount": 1}}}
    response = await stack.client.post(BASE, json=pinned)
    assert response.status_code == 422
    assert "spec.resources.gpuClass: L4" in response.json()["errors"][0]
    assert stored(stack) is None


async def test_namespace_mismatch_is_named(stack) -> None:
    other = {**JOB, "metadata": {"name": "x", "namespace": "team-b"}}
    response = await stack.client.post(BASE, json=other)
    assert response.status_code == 422
    assert response.json()["errors"] == ["metadata.namespace: must match the URL's namespace 'team-a', got 'team-b'"]


async def test_duplicate_is_409(stack) -> None:
    assert (await stack.client.post(BASE, json=JOB)).status_code == 201
    again = await stack.client.post(BASE, json=JOB)
    assert again.status_code == 409


async def test_list_get_suspend_resume_delete(stack) -> None:
    await stack.client.post(BASE, json=JOB)
    await stack.kube.patch_object("finetunejobs", "team-a", "support-bot", {"status": {
        "phase": "Running", "gpu": "L4 x1", "vram": "17.1Gi", "step": "120/500", "loss": "1.234"}})
    listed = (await stack.client.get(BASE)).json()
    assert listed == [{"name": "support-bot", "namespace": "team-a", "phase": "Running", "gpu": "L4 x1",
                       "vram": "17.1Gi", "step": "120/500", "loss": "1.234", "adapterUri": None, "result": None,
                       "message": None, "created": listed[0]["created"]}]
    one = (await stack.client.get(f"{BASE}/support-bot")).json()
    assert one["summary"]["step"] == "120/500"
    evaluated = {"summary": "held-out loss 2.413 -> 1.052 (perplexity 11.2 -> 2.86) on 6 rows, 1,204 tokens",
                 "answers": [{"prompt": "Warranty?", "base": "Unsure.", "adapter": "Two years."}]}
    await stack.kube.patch_object("finetunejobs", "team-a", "support-bot", {"status": {"result": evaluated}})
    one = (await stack.client.get(f"{BASE}/support-bot")).json()
    assert one["summary"]["result"] == evaluated["summary"] and one["resource"]["status"]["result"] == evaluated

    assert (await stack.client.post(f"{BASE}/support-bot/suspend")).status_code == 200
    assert stored(stack)["spec"]["suspend"] is True
    assert (await stack.client.post(f"{BASE}/support-bot/resume")).status_code == 200
    assert stored(stack)["spec"]["suspend"] is False

    assert (await stack.client.delete(f"{BASE}/support-bot")).status_code == 202
    assert stored(stack) is None
    assert (await stack.client.get(f"{BASE}/support-bot")).status_code == 404


async def test_requests_without_a_token_are_refused(stack) -> None:
    response = await stack.client.get(BASE, headers={"Authorization": ""})
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["detail"]


async def test_the_callers_token_reaches_kubernetes(stack) -> None:
    await stack.client.get(BASE)
    seen = [r.headers.get("Authorization") for r in stack.kube if "finetunejobs" in str(r.url)]
    assert seen and all(h == "Bearer team-a-token" for h in seen)


async def test_kubernetes_errors_are_passed_on_not_crashed_on(stack) -> None:
    stack.kube.inject("POST", "finetunejobs", 500, times=1)
    response = await stack.client.post(BASE, json=JOB)
    assert response.status_code == 502
    assert (await stack.client.post(BASE, json=JOB)).status_code == 201


async def test_plan_preview_needs_no_cluster(stack) -> None:
    response = await stack.client.post("/v1/plan", json={**JOB, "spec": {**JOB["spec"], "method": "lora"}})
    assert response.status_code == 200
    assert response.json()["gpuClass"] == "L4"  # the whole catalog: a 16-bit 8B LoRA fits a 24 GB class


async def test_malformed_body_is_422_not_500(stack) -> None:
    response = await stack.client.post(BASE, content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"]


async def test_openapi_schema_is_served(stack) -> None:
    schema = (await stack.client.get("/openapi.json")).json()
    assert "/v1/namespaces/{namespace}/finetunejobs" in schema["paths"]


async def test_a_hub_that_does_not_answer_is_503_with_retry_after_and_nothing_is_created(
        stack, monkeypatch, tmp_path) -> None:
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # nothing listens
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    unlisted = {**JOB, "spec": {**JOB["spec"], "model": {"name": "acme/uncatalogued-9b"}}}
    response = await stack.client.post(BASE, json=unlisted)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "10"
    assert "cannot read 'acme/uncatalogued-9b'" in response.json()["errors"][0]
    assert stored(stack) is None
