"""`kubetune plan --kubeconfig/--context` against a live cluster (the emulator over HTTP): the plan takes the
GPU classes that cluster has; without the flags it plans against the whole catalog."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from kt_cluster import Cluster, finetunejob
from test_cluster_plans import G5_P4D, bare  # noqa: F401  (the fixture)

KUBETUNE = str(Path(sys.executable).parent / "kubetune")


def kubeconfig(path: Path, server: str) -> Path:
    """Two contexts: the current one points nowhere, `emulator` at the test's API server."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "elsewhere",
        "clusters": [{"name": "emu", "cluster": {"server": server}},
                     {"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emu", "user": "me"}},
                     {"name": "elsewhere", "context": {"cluster": "nowhere", "user": "me"}}],
    }))
    return path


async def kubetune(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(KUBETUNE, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_plan_against_the_clusters_inventory(bare: Cluster, tmp_path: Path) -> None:  # noqa: F811
    await bare.add_nodes(G5_P4D)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(finetunejob("small")))
    config = kubeconfig(tmp_path / "kubeconfig", bare.url)

    code, out, err = await kubetune("plan", "-f", str(job), "-o", "json")
    assert code == 0, err
    assert json.loads(out)["gpuClass"] == "L4"  # no cluster: the whole catalog

    code, out, err = await kubetune("plan", "-f", str(job), "-o", "json", "--kubeconfig", str(config),
                                    "--context", "emulator")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["gpuClass"] == "A10G"
    assert "L4: no nodes in the cluster and not provisionable" in plan["reasons"]
    assert bare.api.request_count("GET", "nodes") >= 1

    code, out, err = await kubetune("plan", "-f", str(job), "-o", "json", "--kubeconfig", str(config),
                                    "--context", "emulator", "--provisionable", "L4")
    assert code == 0 and json.loads(out)["gpuClass"] == "L4", err


async def test_a_missing_context_or_an_unreachable_cluster_is_a_clear_error(bare: Cluster, tmp_path: Path) -> None:  # noqa: F811
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(finetunejob("small")))
    config = kubeconfig(tmp_path / "kubeconfig", bare.url)
    code, _, err = await kubetune("plan", "-f", str(job), "--kubeconfig", str(config), "--context", "typo")
    assert code == 1 and "--context typo" in err and "Traceback" not in err
    code, _, err = await kubetune("plan", "-f", str(job), "--kubeconfig", str(config))  # current-context: nowhere
    assert code == 1 and "cannot list Nodes at http://127.0.0.1:9" in err and "Traceback" not in err
