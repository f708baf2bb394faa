"""`kubetune operator` as a real process: kubeconfig login, /healthz, /readyz, /metrics, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml
from kt_cluster import NS, Cluster, eventually, finetunejob


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_kubetune_operator_command(cluster: Cluster, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": cluster.url}}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
    }))
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_POLL_INTERVAL": "0.5",
           "KUBETUNE_TRAINER_IMAGE": "registry.example/kubetune-trainer:test"}
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from kubetune.cli import main; sys.exit(main())",
         "operator", "--namespace", NS, "--metrics-port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as session:
            async def get(path: str) -> tuple[int, str]:
                try:
                    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                        return response.status, await response.text()
                except aiohttp.ClientError:
                    return 0, ""

            async def answers(path: str) -> bool:
                return (await get(path))[0] == 200

            await eventually(lambda: answers("/healthz"), 20, "/healthz")
            await eventually(lambda: answers("/readyz"), 20, "/readyz")
            await cluster.apply(finetunejob("from-cli"))
            status = await cluster.wait_phase("from-cli", "Queued", timeout=10)
            assert status["gpu"] == "L4 x1"
            job = cluster.api.read("jobs", NS, "from-cli-a1")
            assert job is not None
            assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/kubetune-trainer:test"
            code, text = await get("/metrics")
            assert code == 200
            assert 'kubetune_operator_jobs{phase="Queued"} 1.0' in text
            assert "kubetune_operator_trainer_jobs_created_total 1.0" in text
    except BaseException:
        child.kill()
        print(child.communicate()[0].decode(errors="replace")[-5000:])
        raise
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            output = child.communicate(timeout=20)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            child.kill()
            output = child.communicate()[0].decode(errors="replace")
    assert child.returncode == 0, output[-3000:]

