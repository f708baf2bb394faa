"""`kubetune serve-manifest NAME` reads the FineTuneJob from a cluster (the emulator over HTTP, with a kubeconfig)
and prints its serving text; `-f job.yaml --adapter-uri` renders it offline."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from kt_cluster import NS, Cluster, finetunejob
from test_cluster_plans import bare  # noqa: F401  (the fixture)
from test_plan_cli_cluster import kubeconfig, kubetune

from kubetune.contracts import ServingFinding
from kubetune.serving import serving_status
from kubetune.spec import parse_spec

URI = "s3://adapters/bot/adapter"


async def test_serve_manifest_from_the_cluster(bare: Cluster, tmp_path: Path) -> None:  # noqa: F811
    config = kubeconfig(tmp_path / "kubeconfig", bare.url)
    cluster = ("--kubeconfig", str(config), "--context", "emulator", "-n", NS)
    job = finetunejob("bot")
    await bare.apply(job)
    await bare.api.patch_object("finetunejobs", NS, "bot", {"status": {"phase": "Running"}})
    code, _, err = await kubetune("serve-manifest", "bot", *cluster)
    assert code == 1 and "has no adapter yet (phase Running)" in err and "Traceback" not in err

    rank = ServingFinding(rule="RankAboveMax", severity="Warning", message="LoRA rank 32 is above 16")
    serving = serving_status("bot", NS, parse_spec(job["spec"]), URI, [rank])
    await bare.api.patch_object("finetunejobs", NS, "bot", {"status": {
        "phase": "Succeeded", "adapterUri": URI, "serving": serving}})
    code, out, err = await kubetune("serve-manifest", "bot", *cluster)
    assert code == 0, err
    assert "# Warning RankAboveMax: LoRA rank 32 is above 16" in out
    manifest = yaml.safe_load(out)  # the comments are comments: `| kubectl apply -f -` takes it as it is
    assert manifest["kind"] == "LLMInferenceService"
    assert manifest["spec"]["model"]["lora"]["adapters"] == [{"name": "bot", "uri": URI}]
    code, out, _ = await kubetune("serve-manifest", "bot", *cluster, "-o", "vllm")
    assert code == 0 and "--enable-lora --max-lora-rank 16 --lora-modules bot=/models/adapters/bot" in out
    code, _, err = await kubetune("serve-manifest", "nobody", *cluster)
    assert code == 1 and f"finetunejob {NS}/nobody not found" in err


async def test_serve_manifest_offline(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(finetunejob("bot", output={"serving": {"maxLoraRank": 64}})))
    code, out, err = await kubetune("serve-manifest", "-f", str(path), "--adapter-uri", URI)
    assert code == 0, err
    assert "was not checked by the trainer" in out
    assert yaml.safe_load(out)["spec"]["model"]["lora"]["maxRank"] == 64
    code, _, err = await kubetune("serve-manifest", "-f", str(path))
    assert code == 1 and "-f needs --adapter-uri" in err
