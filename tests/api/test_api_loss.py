"""The loss curve route: the operator's status.lossHistory, or Debian's Prometheus scraping a trainer's metrics."""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kt_api import JOB, MakeStack, Stack, free_port

LOSS = "/v1/namespaces/team-a/finetunejobs/support-bot/loss"


async def put_job(stack: Stack, status: dict[str, object]) -> None:
    await stack.kube.put_object("finetunejobs", {**JOB, "metadata": {"name": "support-bot", "namespace": "team-a"}})
    await stack.kube.patch_object("finetunejobs", "team-a", "support-bot", {"status": status})


async def test_the_curve_is_the_operators_history_without_prometheus(stack: Stack) -> None:
    history = [{"step": 10, "loss": 2.5}, {"step": 20, "loss": 2.1}]
    await put_job(stack, {"phase": "Running", "lossHistory": history})
    assert (await stack.client.get(LOSS)).json() == {"source": "status", "points": history, "message": ""}
    bob = await stack.client.get(LOSS, headers={"Authorization": "Bearer team-b-token"})
    assert bob.status_code == 403


class Trainer(http.server.BaseHTTPRequestHandler):
    """A trainer's /metrics as Prometheus scrapes it: one more step (and a lower loss) at each scrape."""

    step = 0

    def do_GET(self) -> None:
        Trainer.step += 1
        labels = 'job="support-bot",namespace="team-a"'
        body = (f"kubetune_train_step{{{labels}}} {Trainer.step}\n"
                f"kubetune_train_loss{{{labels}}} {3.0 / Trainer.step}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None and os.environ.get("CI") == "true":
        pytest.fail("Debian's prometheus is not installed (scripts/setup.sh --test installs it)")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (scripts/setup.sh --test installs it)")
    trainer = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trainer)
    threading.Thread(target=trainer.serve_forever, daemon=True).start()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: trainer\n    honor_labels: true\n"
                      f"    static_configs: [{{targets: ['127.0.0.1:{trainer.server_port}']}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        trainer.shutdown()


async def test_with_prometheus_the_curve_is_the_scraped_loss_by_step(make_stack: MakeStack, prometheus: str) -> None:
    async with make_stack(prometheus_url=prometheus) as stack:
        await put_job(stack, {"phase": "Running", "lossHistory": [{"step": 1, "loss": 9.9}]})
        body: dict[str, object] = {}
        for _ in range(60):  # a few scrapes, one a second
            body = (await stack.client.get(LOSS)).json()
            if len(body["points"]) >= 3:  # type: ignore[arg-type]
                break
            await asyncio.sleep(0.5)
        assert body["source"] == "prometheus" and body["message"] == ""
        points = body["points"]
        assert isinstance(points, list) and len(points) >= 3
        steps = [p["step"] for p in points]
        assert steps == sorted(set(steps))
        assert all(p["loss"] == pytest.approx(3.0 / p["step"], abs=1e-4) for p in points)

    async with make_stack(prometheus_url=f"http://127.0.0.1:{free_port()}") as stack:  # nothing listens there
        await put_job(stack, {"phase": "Running", "lossHistory": [{"step": 1, "loss": 2.0}]})
        body = (await stack.client.get(LOSS)).json()
        assert body["source"] == "status" and body["points"] == [{"step": 1, "loss": 2.0}]
        assert body["message"].startswith("Prometheus did not answer (ConnectError")
