"""`kubetune operator` SIGKILLed in the middle of a burst and started again: nothing lost, nothing twice.

The operator is the real command in a child process (kubeconfig login to the emulator); the burst is
BURST FineTuneJobs POSTed at once; the kill comes as the emulator receives the POST of half their trainer
Jobs, when some jobs have their Job but no status yet, some have their Event but no status, and some have
nothing. The operator that starts after it must finish every one: exactly one Job, the status Queued with
attempt 1, exactly one JobCreated Event (Events are named per transition, so posting one again meets 409).
bench/operator_scale.py `--kill 500` is the same at scale.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml
from kt_cluster import NS, Cluster, eventually, finetunejob

BURST = 40


def start(kubeconfig: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_POLL_INTERVAL": "1",
           "KUBETUNE_TRAINER_IMAGE": "registry.example/kubetune-trainer:test"}
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from kubetune.cli import main; sys.exit(main())",
         "operator", "--namespace", NS, "--metrics-port", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"),
    )


async def test_an_operator_killed_mid_burst_loses_nothing_and_doubles_nothing(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    kubeconfig, log = tmp_path / "kubeconfig", tmp_path / "operator.log"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": cluster.url}}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}],
    }))
    names = [f"burst-{i:02d}" for i in range(BURST)]
    child = start(kubeconfig, log)
    try:
        await eventually(lambda: cluster.api.request_count("GET", "finetunejobs") > 0, 30, "the operator's watch")
        def kill_at_half_the_jobs(method: str, plural: str) -> None:
            # In the emulator's handler of that POST, before it is answered: the kill lands mid-burst however
            # fast the operator runs (polling for the count let it finish the burst first on a loaded machine).
            if (method, plural) == ("POST", "jobs") and cluster.api.request_count("POST", "jobs") == BURST // 2:
                child.send_signal(signal.SIGKILL)
                child.wait(10)

        cluster.api.observers.append(kill_at_half_the_jobs)
        creates = asyncio.gather(*(cluster.apply(finetunejob(name)) for name in names))
        await eventually(lambda: child.poll() is not None, 30, "the kill at half the Jobs")
        await creates
        cluster.api.observers.remove(kill_at_half_the_jobs)
        partial = sum(1 for name in names if cluster.status(name).get("phase"))
        child = start(kubeconfig, log)
        for name in names:
            await cluster.wait_phase(name, "Queued", timeout=40)
        await asyncio.sleep(1.0)  # anything the restarted operator would still post
    except BaseException:
        print(log.read_text()[-5000:])
        raise
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()

    owners = Counter(job["metadata"]["labels"]["kubetune.io/finetunejob"] for job in cluster.jobs())
    assert owners == Counter({name: 1 for name in names}), "each FineTuneJob has exactly one trainer Job"
    for name in names:
        status = cluster.status(name)
        assert status["jobName"] == f"{name}-a1" and [a["attempt"] for a in status["attempts"]] == [1], status
        reasons = [event["reason"] for event in cluster.events(name)]
        assert reasons == ["JobCreated"], (name, reasons)
    assert partial < BURST, "the kill came after every status was written: it tested nothing"
