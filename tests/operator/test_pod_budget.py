"""What the trainer pod gets besides GPUs: the hub token by reference, the hub endpoint, the model cache
(emptyDir sized by the plan, or the chart's shared PVC), an ephemeral-storage request, a grace period that
covers a step and a checkpoint upload, and names and labels a real API server accepts whatever the
FineTuneJob's name."""

from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate
import pytest
from kubetune_operator import resources
from kubetune_operator.settings import Settings
from kubetune_operator.shape import shape_of

from kubetune.planning.budget import pod_budget
from kubetune.planning.gpus import load_catalog
from kubetune.planning.models import resolve_architecture
from kubetune.planning.plan import Plan, make_plan
from kubetune.spec import FineTuneJobSpec, parse_spec

CATALOG = load_catalog()
K8S = "1.31.0"
UID = "0b8f6f3e-1111-2222-3333-444455556666"
# The API server's rules (k8s.io/apimachinery/pkg/util/validation).
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def spec(model: dict[str, Any] | None = None, **extra: Any) -> FineTuneJobSpec:
    return parse_spec({"model": model or {"name": "meta-llama/Llama-3.1-8B-Instruct"},
                       "dataset": {"source": "s3://datasets/train.jsonl"},
                       "output": {"uri": "s3://adapters/x/", "credentialsSecret": "s3-creds"}, **extra})


def plan_for(s: FineTuneJobSpec) -> Plan:
    return make_plan(s, resolve_architecture(s.model.name, s.model.source), CATALOG)


def job_for(s: FineTuneJobSpec, settings: Settings | None = None, name: str = "support-bot",
            attempt: int = 1) -> dict[str, Any]:
    plan = plan_for(s)
    owner = resources.Owner(name, "ml", UID, {})
    gpu = CATALOG.get(plan.gpu_class, "x")
    return resources.trainer_job(owner, s, plan, gpu, attempt, settings or Settings(),
                                 shape_of(plan.strategy, plan.gpu_count, gpu))


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = job["spec"]["template"]["spec"]
    return pod


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod_of(job)["containers"][0]["env"]}


def test_the_token_reaches_the_pod_only_by_reference() -> None:
    s = spec({"name": "meta-llama/Llama-3.1-8B-Instruct", "tokenSecret": {"name": "hf-token", "key": "token"}})
    settings = Settings(hf_endpoint="https://hub-mirror.internal", hf_token_secret="team-default")
    job = job_for(s, settings)
    env = env_of(job)
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "hf-token", "key": "token", "optional": False}}}
    assert env["HF_ENDPOINT"]["value"] == "https://hub-mirror.internal"
    assert env["HF_HUB_CACHE"]["value"] == "/models/hub"
    config = resources.config_map(resources.Owner("support-bot", "ml", UID, {}), s, plan_for(s), 1, settings)
    assert "HF_TOKEN" not in json.dumps(config)  # the ConfigMap names the Secret, never its key's value
    kubernetes_validate.validate(job, K8S, strict=True)

    default = env_of(job_for(spec(), settings))["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert default == {"name": "team-default", "key": "HF_TOKEN", "optional": True}  # not in every namespace
    keyed = Settings(hf_token_secret="shared/hf")
    assert env_of(job_for(spec(), keyed))["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "hf"
    assert "HF_TOKEN" not in env_of(job_for(spec())) and "HF_ENDPOINT" not in env_of(job_for(spec()))


def test_token_secret_is_validated_like_every_secret_name() -> None:
    from kubetune.errors import SpecError

    with pytest.raises(SpecError, match=r"spec\.model\.tokenSecret\.name"):
        spec({"name": "x/y", "tokenSecret": {"name": "Not_A_Secret"}})
    with pytest.raises(SpecError, match=r"spec\.model\.tokenSecret\.key"):
        spec({"name": "x/y", "tokenSecret": {"name": "hf", "key": "a key"}})
    token = spec({"name": "x/y", "tokenSecret": {"name": "hf"}}).model.token_secret
    assert token is not None and token.key == "HF_TOKEN"


def test_model_cache_is_an_emptydir_sized_by_the_plan_or_the_shared_pvc() -> None:
    s = spec()  # Llama-3.1-8B: about 16 GB of bf16 safetensors
    job = job_for(s)
    pod = pod_of(job)
    volumes = {v["name"]: v for v in pod["volumes"]}
    container = pod["containers"][0]
    assert {"name": "model-cache", "mountPath": "/models"} in container["volumeMounts"]
    size = volumes["model-cache"]["emptyDir"]["sizeLimit"]
    assert 16 <= int(size.removesuffix("Gi")) <= 20
    ephemeral = int(container["resources"]["requests"]["ephemeral-storage"].removesuffix("Gi"))
    assert ephemeral >= int(size.removesuffix("Gi")) + 2  # the weights + checkpoint staging + scratch
    assert "ephemeral-storage" not in container["resources"]["limits"]  # a request: no eviction on a guess

    shared = job_for(s, Settings(model_cache_claim="model-cache"))
    shared_pod = pod_of(shared)
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}} in shared_pod["volumes"]
    assert int(shared_pod["containers"][0]["resources"]["requests"]["ephemeral-storage"].removesuffix("Gi")) < 8
    kubernetes_validate.validate(shared, K8S, strict=True)

    big = job_for(spec({"name": "meta-llama/Llama-3.1-70B"}, method="lora"))
    big_ephemeral = pod_of(big)["containers"][0]["resources"]["requests"]["ephemeral-storage"]
    assert int(big_ephemeral.removesuffix("Gi")) >= 130  # 140 GB of weights


def test_grace_period_covers_a_step_and_a_checkpoint_upload() -> None:
    small = pod_of(job_for(spec({"name": "meta-llama/Llama-3.2-1B-Instruct"})))["terminationGracePeriodSeconds"]
    large = pod_of(job_for(spec({"name": "meta-llama/Llama-3.1-70B"}, method="lora")))[
        "terminationGracePeriodSeconds"]
    assert 60 <= small < large <= 3600
    budget = pod_budget(model_params=8_000_000_000, lora_params=42_000_000, tokens_per_step=8 * 2048,
                        gradient_checkpointing=True)
    step = 6 * 8e9 * 8 * 2048 * 4 / 3 / 20e12
    upload = 42e6 * 12 / 20e6
    assert budget.grace_period_seconds >= step + upload + 30  # with margin, never less than the work
    assert budget.grace_period_seconds > 30  # Kubernetes' default would cut the upload short


def valid_names(job: dict[str, Any], config: dict[str, Any]) -> None:
    for obj in (job, config):
        name = obj["metadata"]["name"]
        # a Job's name becomes its pods' job-name label value: a DNS subdomain of 63 characters at most
        assert len(name) <= 63 and DNS1123_SUBDOMAIN.match(name) and LABEL_VALUE.match(name), name
        for key, value in obj["metadata"]["labels"].items():
            assert len(value) <= 63 and LABEL_VALUE.match(value), (key, value)
    for value in job["spec"]["template"]["metadata"]["labels"].values():
        assert len(value) <= 63 and LABEL_VALUE.match(value), value
    kubernetes_validate.validate(job, K8S, strict=True)
    kubernetes_validate.validate(config, K8S, strict=True)


@pytest.mark.parametrize("length", [1, 52, 59, 60, 61, 63, 64, 100, 253])
def test_children_and_labels_of_any_valid_name_pass_the_api_servers_rules(length: int) -> None:
    name = ("team-a.support-bot-" * 20)[:length].strip(".-") or "a"
    assert DNS1123_SUBDOMAIN.match(name)
    s = spec()
    plan = plan_for(s)
    owner = resources.Owner(name, "ml", UID, {})
    for attempt in (1, 12):
        gpu = CATALOG.get(plan.gpu_class, "x")
        shape = shape_of(plan.strategy, plan.gpu_count, gpu)
        job = resources.trainer_job(owner, s, plan, gpu, attempt, Settings(), shape)
        config = resources.config_map(owner, s, plan, attempt, Settings())
        valid_names(job, config)
        assert job["metadata"]["name"].endswith(f"-a{attempt}")
        labels = job["metadata"]["labels"]
        assert labels[resources.LABEL_UID] == UID
        # the operator finds a pod's FineTuneJob and Job from the pod's labels alone
        assert resources.child_name(labels[resources.LABEL_JOB], attempt) == job["metadata"]["name"]
        assert resources.job_label(name) == labels[resources.LABEL_JOB]
    if len(name) <= 59:
        assert resources.child_name(name, 3) == f"{name}-a3"  # short names stay readable


def test_two_long_names_that_share_a_prefix_never_collide() -> None:
    prefix = "nightly-support-bot-finetune-llama-3-1-8b-instruct-with-a-lon"  # 61 characters
    one, two = prefix + "g-name-one", prefix + "g-name-two"
    assert resources.child_name(one, 1) != resources.child_name(two, 1)
    assert resources.job_label(one) != resources.job_label(two)
    first, second = prefix[:60] + "aaa", prefix[:60] + "aab"  # 63 characters each, identical 60-prefix
    assert resources.child_name(first, 1) != resources.child_name(second, 1)
    assert resources.job_label(first) == first and resources.job_label(second) == second


def test_fsdp_ranks_get_the_host_memory_to_load_the_model_each() -> None:
    """Each FSDP rank loads and quantizes the whole model into host memory before fully_shard moves its shards
    (kubetune_trainer.fsdp): 70B QLoRA on 4 L4s asks for 4 x (a 4-bit copy + a process), not 4 x 12Gi. One GPU
    and DDP load straight onto the GPU and keep the operator's memoryPerGpu."""
    seventy = spec({"name": "meta-llama/Llama-3.1-70B-Instruct"})
    plan = plan_for(seventy)
    assert (plan.gpu_class, plan.gpu_count, plan.strategy) == ("L4", 4, "fsdp")
    limits = pod_of(job_for(seventy))["containers"][0]["resources"]["limits"]
    want = 4 * (0.55 * plan.model_params + 3 * 2**30)
    assert resources.quantity_bytes(limits["memory"]) >= want > 4 * 12 * 2**30
    one = job_for(spec({"name": "meta-llama/Llama-3.1-70B-Instruct"}, resources={"maxGpuCount": 1}))
    assert pod_of(one)["containers"][0]["resources"]["limits"]["memory"] == "12Gi"
    ddp = job_for(spec(resources={"strategy": "ddp", "gpuCount": 2}))
    assert pod_of(ddp)["containers"][0]["resources"]["limits"]["memory"] == "24Gi"
    budget = pod_budget(70_000_000_000, 200_000_000, 16384, True, gpu_count=4, sharded=True)
    assert budget.host_memory_bytes == -(-int(4 * (0.55 * 70e9 + 3 * 2**30)) // 2**30) * 2**30


@pytest.mark.parametrize(("text", "size"), [("12Gi", 12 * 2**30), ("1.5Gi", 1.5 * 2**30), ("16G", 16e9),
                                            ("512Mi", 2**29), ("1000", 1000)])
def test_memory_quantities_are_read_as_kubernetes_writes_them(text: str, size: float) -> None:
    assert resources.quantity_bytes(text) == size
    with pytest.raises(ValueError, match="12Gi"):
        resources.quantity_bytes("12 gigs")


def test_a_malformed_memory_setting_stops_the_operator_at_start_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"KUBETUNE_MEMORY_PER_GPU.*'12 gigs'.*12Gi"):
        Settings(memory_per_gpu="12 gigs")
    assert resources._memory("500m", 4) == "2000m"  # CPU quantities keep their unit
