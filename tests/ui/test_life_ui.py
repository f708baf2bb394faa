"""A person who never used kubectl: sign in on the page, paste a FineTuneJob, see the plan `kubetune plan -o json`
gives, submit, suspend and resume it, and watch it reach Succeeded with a loss curve and the adapter URI.

The whole stack is real, as in tests/e2e (whose fixtures this reuses): the API under uvicorn in passthrough
mode, the Kubernetes emulator enforcing RBAC on the page's token (tests/api/kt_auth.py), the kopf operator,
the test kubelet running the real trainer on SmolLM2-135M from the test hub, and moto's S3.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import kmock
import pytest
from kmock._internal import rendering
from kt_api import TOKENS, Rule, serve_api
from kt_auth import AuthEmulator
from kt_browser import DESKTOP, PHONE, chromium, tab
from kt_cluster import NS, Cluster
from kt_emulator import KubeEmulator
from playwright.async_api import expect

from kubetune.api import ApiSettings

ROOT = Path(__file__).resolve().parents[2]
_e2e = importlib.util.spec_from_file_location("kt_e2e_fixtures", ROOT / "tests" / "e2e" / "conftest.py")
assert _e2e and _e2e.loader
e2e = importlib.util.module_from_spec(_e2e)
_e2e.loader.exec_module(e2e)
s3, bucket, model, world = e2e.s3, e2e.bucket, e2e.model, e2e.world  # the e2e fixtures, on the cluster below
World = e2e.World

pytestmark = pytest.mark.slow
FTJ = "finetunejobs.kubetune.io"
TOKEN = "team-a-token"  # alice: FineTuneJobs and their Events in `ml`; may list Nodes (the plan) and Namespaces
RULES = [Rule("team-a-devs", "*", FTJ, NS), Rule("team-a-devs", "list", "events", NS),
         Rule("team-a-devs", "watch", "events", NS), Rule("team-a-devs", "list", "nodes"),
         Rule("team-a-devs", "list", "namespaces")]


@attrs.define(kw_only=True)
class ClusterEmulator(AuthEmulator):
    """RBAC for every bearer token; the operator in this test connects without one, standing for its own
    service account (cluster-admin over what the chart grants it)."""

    async def _handle(self, request: rendering.Request) -> Any:
        if not request.headers.get("Authorization"):
            return await KubeEmulator._handle(self, request)
        return await super()._handle(request)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with ClusterEmulator(tokens=dict(TOKENS), rules=RULES) as api, kmock.Server(api) as server:
        running = Cluster(api, str(server.url).rstrip("/"))
        await running.add_namespaces("default", NS, "team-a", "team-b", "kubetune-system")
        await running.add_nodes()
        try:
            yield running
        finally:
            for operator in running.operators:
                await operator.stop()


async def cli_plan(world: Any, manifest: Path) -> dict[str, Any]:
    """`kubetune plan -o json` against the same cluster with the same token, as the person's colleague would."""
    kubeconfig = world.folder / "alice.kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": world.cluster.url}}],
        "users": [{"name": "alice", "user": {"token": TOKEN}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "alice", "namespace": NS}}]}))
    command = [sys.executable, "-m", "kubetune.cli", "plan", "-f", str(manifest), "-o", "json", "--kubeconfig",
               str(kubeconfig)]
    run = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


async def test_submit_watch_and_get_the_adapter_from_the_page(world: Any) -> None:
    manifest = world.folder / "ui-life.yaml"
    manifest.write_text(world.manifest("ui-life"))
    expected = await cli_plan(world, manifest)
    settings = ApiSettings(kube_url=world.cluster.url)
    async with serve_api(settings) as url, chromium() as browser, tab(browser) as t:
        page = t.page
        await t.sign_in(url, TOKEN)
        offered = await page.locator("#ns-list option").evaluate_all("o => o.map(x => x.value)")
        if offered != [NS]:
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                again = (await client.get("/v1/namespaces")).text
            raise AssertionError(f"offered {offered}; the API now answers {again}; "
                                 f"status {await page.locator('#status').inner_text()!r}; denied "
                                 f"{world.cluster.api.denied[-5:]}; reviews {world.cluster.api.reviews[-8:]}")
        await t.open_namespace(NS)
        await page.locator("#jobs-empty").wait_for()
        await t.paste_job(manifest.read_text())
        await page.get_by_role("button", name="Plan").click()
        shown = page.locator("#plan .gpu-class")
        await shown.wait_for()
        assert await shown.inner_text() == f"{expected['gpuClass']} × {expected['gpuCount']}"
        await t.shot("life-plan")

        # Submit, then suspend at once and resume: the page acts with alice's token, the operator follows.
        await page.get_by_role("button", name="Submit").click()
        await page.locator("#job-title", has_text="ui-life").wait_for()
        await page.get_by_role("button", name="Suspend").click()
        await page.locator("#job-phase", has_text="Suspended").wait_for(timeout=60_000)
        assert world.ftj("ui-life")["spec"]["suspend"] is True
        await page.get_by_role("button", name="Resume").click()
        await expect(page.locator("#job-phase")).not_to_have_text("Suspended", timeout=60_000)
        assert world.ftj("ui-life")["spec"]["suspend"] is False

        # Live over SSE, no reload: Succeeded, the loss curve, the adapter URI, the Events, the attempts.
        await page.locator("#job-phase", has_text="Succeeded").wait_for(timeout=400_000)
        status = world.ftj("ui-life")["status"]
        assert await page.locator("#adapter-uri").inner_text() == status["adapterUri"]
        assert await page.locator("#loss-svg circle").count() >= len(status["lossHistory"]) >= 1
        assert await page.locator("#loss-source").inner_text() == "From the job's status, and live."

        assert await page.locator("#job-progress").evaluate("p => p.value") == 100
        reasons = await page.locator("#events-list strong").all_inner_texts()
        assert "Succeeded" in reasons, reasons
        assert await page.locator("#attempts-table tbody tr").count() == len(status["attempts"]) >= 1
        assert await t.axe() == [], "job view"
        await t.shot("life-job")
        await page.set_viewport_size(PHONE)  # the same view on a phone: nothing scrolls sideways
        assert await page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        await t.shot("life-job-phone", full_page=False)
        await page.set_viewport_size(DESKTOP)

        # The list shows it with kubectl's columns.
        await page.get_by_role("link", name="kubetune").click()
        await page.locator("#jobs-table td[data-col=phase]", has_text="Succeeded").wait_for()
        await t.shot("life-list")
