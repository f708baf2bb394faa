"""The trainer's HTTP port (/metrics, /healthz, /readyz, /status) while it trains, and a real Prometheus
server scraping it: the loss is read back with PromQL over HTTP."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubetune_trainer.metrics import Telemetry
from kubetune_trainer.server import build_app

METRICS = (
    "kubetune_train_loss", "kubetune_eval_loss", "kubetune_train_step", "kubetune_train_total_steps",
    "kubetune_learning_rate", "kubetune_grad_norm", "kubetune_tokens_processed_total", "kubetune_tokens_per_second",
    "kubetune_gpu_memory_allocated_bytes", "kubetune_gpu_memory_reserved_bytes", "kubetune_gpu_memory_peak_bytes",
    "kubetune_vram_estimate_bytes", "kubetune_checkpoint_duration_seconds_count", "kubetune_uploaded_bytes_total",
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_app_endpoints_and_labels() -> None:
    from fastapi.testclient import TestClient

    telemetry = Telemetry("team-a", "support-bot", vram_estimate_bytes=5 * 2**30)
    client = TestClient(build_app(telemetry))
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 503
    telemetry.phase("Training")
    telemetry.update(step=3, total=10, loss=1.5, lr=1e-4, grad_norm=0.2, tokens=512, tokens_per_second=100.0,
                     eta_seconds=7.0)
    assert client.get("/readyz").status_code == 200
    status = client.get("/status").json()
    assert status["phase"] == "Training" and status["step"] == 3 and status["totalSteps"] == 10
    assert status["loss"] == 1.5 and status["tokensPerSecond"] == 100.0 and status["etaSeconds"] == 7.0
    assert status["peakMemoryBytes"] > 0
    text = client.get("/metrics").text
    assert 'kubetune_train_loss{job="support-bot",namespace="team-a"} 1.5' in text
    assert 'kubetune_vram_estimate_bytes{job="support-bot",namespace="team-a"} 5.36870912e+09' in text
    assert 'kubetune_tokens_processed_total{job="support-bot",namespace="team-a"} 512.0' in text


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's prometheus is not installed (scripts/setup.sh --test installs it)")
        pytest.skip("prometheus binary not installed (apt-get install prometheus)")
    return found


@pytest.fixture
def prometheus(prometheus_binary: str, tmp_path: Path) -> Iterator[Callable[[int], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: kubetune-trainer\n"
            "    honor_labels: true\n"  # keep the trainer's own `job` label (the FineTuneJob name)
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        log = (tmp_path / "prometheus.log").open("w")
        procs.append(subprocess.Popen(
            [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text()[-2000:])

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_prometheus_scrapes_the_training_loss(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                              spec_for: Callable[..., dict[str, Any]],
                                              write_config: Callable[..., Path], start_trainer: Any,
                                              prometheus: Callable[[int], str]) -> None:
    port = free_port()
    spec = spec_for(tiny_model_dir, chat_file, str(tmp_path / "out"), maxSteps=6, checkpointSteps=3)
    spec["dataset"]["evalFraction"] = 0.2
    proc = start_trainer(write_config(spec, name="scraped", estimate=987654321), metrics_port=port,
                         env={"KUBETUNE_METRICS_LINGER_SECONDS": "60"})
    prom = prometheus(port)
    base = f"http://127.0.0.1:{port}"
    proc.wait_for(lambda: '"event": "done"' in proc.log, what="the end of training")

    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").status_code == 200
    status = httpx.get(f"{base}/status").json()
    assert status["phase"] == "Succeeded" and status["step"] == 6 and status["totalSteps"] == 6
    assert status["adapterUri"] == str(tmp_path / "out" / "adapter")
    text = httpx.get(f"{base}/metrics").text
    for name in METRICS:
        assert f'{name}{{job="scraped",namespace="team-a"}}' in text, name

    query = 'kubetune_train_loss{namespace="team-a", job="scraped"}'
    final = proc_final_loss(proc.log)
    deadline = time.monotonic() + 45
    seen: list[float] = []
    while time.monotonic() < deadline:  # the latest scrape after the run ended holds the final loss
        body = httpx.get(f"{prom}/api/v1/query", params={"query": query}).json()
        seen = [float(r["value"][1]) for r in body["data"]["result"]]
        if seen and seen[0] == pytest.approx(final, rel=1e-6):
            break
        time.sleep(0.5)
    assert seen == [pytest.approx(final, rel=1e-6)], f"Prometheus answered {seen} for {query}, want [{final}]"
    estimate = httpx.get(f"{prom}/api/v1/query", params={"query": "kubetune_vram_estimate_bytes"}).json()
    assert [float(r["value"][1]) for r in estimate["data"]["result"]] == [987654321.0]
    proc.kill()


def proc_final_loss(log: str) -> float:
    import json

    steps = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"event": "step"' in line]
    return float(steps[-1]["loss"])
