"""A gated hub model, its token in a Secret named by spec.model.tokenSecret: the whole life, and where the token
is not (its own module: the `model` fixture below replaces conftest's for every test here)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kt_cluster import NS
from kt_life import World

pytestmark = pytest.mark.slow


@pytest.fixture
def model() -> dict[str, Any]:  # overrides conftest's: the gated copy, with its token in a Secret
    from hub_server import GATED_REPO

    return {"name": GATED_REPO, "tokenSecret": {"name": "hf-token", "key": "token"}}


async def test_a_gated_model_trains_with_its_token_secret_and_the_token_leaks_nowhere(
        world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """spec.model.tokenSecret reaches the trainer only through a secretKeyRef (the kubelet's env holds nothing
    else: no token), the gated download works, and the token's value appears in no API object the operator
    writes (status, Events, Job, ConfigMap, pod), in no trainer log or /status, and in no operator log line."""
    from hub_server import GATED_REPO, TEST_TOKEN

    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)  # the operator's own token (the chart's hub.tokenSecret): planning
    await world.cluster.api.put_object("secrets", {"apiVersion": "v1", "kind": "Secret",
                                                   "metadata": {"name": "hf-token", "namespace": NS},
                                                   "stringData": {"token": TEST_TOKEN}})
    world.watch_trainer()
    await world.apply("gated", maxSteps=2, checkpointSteps=2)
    done = await world.wait_phase("gated", "Succeeded")
    assert done["modelCommit"] == world.hub.repos[GATED_REPO].refs["main"]
    assert "model.safetensors" in world.hub.file_downloads(GATED_REPO)

    [job] = world.jobs("gated")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    [token_env] = [e for e in env if e["name"] == "HF_TOKEN"]
    assert "value" not in token_env and token_env["valueFrom"]["secretKeyRef"]["name"] == "hf-token"

    api = world.cluster.api
    written = [*world.history("gated"), *world.events("gated"), *api.items("jobs", NS), *api.items("configmaps", NS),
               *world.pods_seen().values()]
    pods = list(world.pods_seen({job["metadata"]["name"]}))
    texts = {"API objects": json.dumps(written), "trainer logs": "".join(world.trainer_log(p) for p in pods),
             "/status": "".join(world.served.get("/status", [])), "operator logs": caplog.text}
    assert pods and world.served.get("/status") and texts["trainer logs"]
    leaked = [where for where, text in texts.items() if TEST_TOKEN in text]
    assert not leaked, f"the token's value appears in: {leaked}"
