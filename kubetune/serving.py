"""Ready to serve: the rules a LoRA adapter must meet for vLLM and KServe, and the text that serves it. Pure.

`check_adapter` judges an adapter folder from what it holds (adapter_config.json, the file names, the tensor
names of its safetensors header) against the base architecture's module names and the job's spec. Each rule
is stated from the serving engines' documented behaviour:

- `ModulesToSave`: vLLM loads no adapter whose adapter_config.json lists `modules_to_save` ("vLLM only
  supports modules_to_save being None", vllm/lora/peft_helper.py `_validate_features`) and refuses full
  weights such as `base_model.model.lm_head.weight` ("... is unsupported LoRA weight",
  vllm-project/vllm#9280, vllm/lora/utils.py `parse_fine_tuned_lora_name`). A Warning unless the user asked
  for them (`spec.lora.modulesToSave`); then an Info (serve with PEFT, or export the merged model).
- `EmbeddingWeights`: LoRA on `embed_tokens` / `lm_head` (vLLM v0.12 removed the extra-vocabulary and
  embedding LoRA paths; `lm_head` LoRA is served by few architectures). Same Warning / Info split.
- `RankAboveMax`: vLLM refuses an adapter whose rank (`r`, or any `rank_pattern` value) exceeds
  `--max-lora-rank` (vllm/config/lora.py `LoRAConfig.max_lora_rank`, default 16, one of
  1, 8, 16, 32, 64, 128, 256, 320, 512); KServe's LLMInferenceService passes `spec.model.lora.maxRank` to
  it (pkg/apis/serving/v1alpha2/llm_inference_service_types.go `LoRASpec.MaxRank`). Checked against
  `spec.output.serving.maxLoraRank`.
- `UnknownTargetModule`: a target module (adapter_config.json `target_modules`) or a LoRA tensor whose module
  is not in the base architecture: vLLM raises "expected target modules in ... but received ..."
  (vllm/lora/models.py `check_unexpected_modules`) or, worse, ignores it.
- `NotSafetensors`: weights as `adapter_model.bin` / `.pt` (pickles): KServe's storage initializer and vLLM
  read `adapter_model.safetensors`; a pickle runs code when loaded. Only safetensors passes.
- `NothingServable` (Fatal): no LoRA weight on a module vLLM applies LoRA to (a linear layer of the base
  other than the output head): vLLM would silently serve the base model (vllm-project/vllm#55193). The
  trainer fails the job with exit code 2 (`ExitCode.BAD_INPUT`) and this message.

The rendering half gives the ready-to-apply text: a KServe `LLMInferenceService` (serving.kserve.io/v1alpha2)
with the adapter under `spec.model.lora.adapters[{name, uri}]`, and the vLLM command line
(`--enable-lora --max-lora-rank N --lora-modules name=path`) with the `POST /v1/load_lora_adapter` call.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml

from kubetune import wire
from kubetune.contracts import ServingFinding
from kubetune.errors import KubetuneError
from kubetune.spec import BUNDLED_MODELS, VLLM_MAX_LORA_RANKS, FineTuneJobSpec, parse_spec


class Rule(StrEnum):
    MODULES_TO_SAVE = "ModulesToSave"
    EMBEDDING_WEIGHTS = "EmbeddingWeights"
    RANK_ABOVE_MAX = "RankAboveMax"
    UNKNOWN_TARGET_MODULE = "UnknownTargetModule"
    NOT_SAFETENSORS = "NotSafetensors"
    NOTHING_SERVABLE = "NothingServable"


WARNING, FATAL, INFO = "Warning", "Fatal", "Info"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "output")
LINEAR_CLASSES = re.compile(r"(^|\.)(Linear|Linear4bit|Linear8bitLt|Conv1D)$")
PEFT_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.[^.]+)?"
                        r"(\.weight)?$")
_SAVED_PART = re.compile(r"\.modules_to_save(\.[^.]+)?\.")


@dataclass(frozen=True)
class Adapter:
    """What an adapter folder holds, as the check needs it."""

    config: Mapping[str, Any]  # adapter_config.json
    files: Collection[str]  # the folder's file names (relative)
    tensors: Collection[str]  # tensor names in adapter_model.safetensors


def tensor_names(header: bytes) -> list[str]:
    """The tensor names of a safetensors file from its first bytes (8-byte little-endian length + JSON)."""
    if len(header) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", header[:8])
    if length > len(header) - 8:
        raise ValueError(f"safetensors header says {length} bytes, {len(header) - 8} given")
    meta = json.loads(header[8:8 + length])
    return sorted(k for k in meta if k != "__metadata__")


def module_of(tensor: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> 'model.layers.0.self_attn.q_proj'."""
    name = tensor.removeprefix(PEFT_PREFIX)
    if _SAVED_PART.search(name):
        return _SAVED_PART.split(name)[0]
    stripped = _LORA_PART.sub("", name)
    return stripped if stripped != name else name.rsplit(".", 1)[0]


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def _ranks(config: Mapping[str, Any]) -> list[int]:
    values = [config.get("r"), *list((config.get("rank_pattern") or {}).values())]
    return [int(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def _targets(config: Mapping[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex (PEFT matches it on the full module name) or 'all-linear'
        return []
    return sorted(str(t) for t in targets)


def _extra(modules: Collection[str], asked: Collection[str], rule: Rule, what: str) -> ServingFinding | None:
    if not modules:
        return None
    names = ", ".join(sorted(modules))
    if set(m.rsplit(".", 1)[-1] for m in modules) <= set(asked):
        return ServingFinding(rule=rule, severity=INFO, message=f"{what} ({names}) as spec.lora.modulesToSave asks; "
                              "vLLM does not load them: serve with PEFT/transformers or the merged model")
    return ServingFinding(rule=rule, severity=WARNING, message=f"{what} ({names}): vLLM refuses this adapter "
                          "(vllm-project/vllm#9280); list them in spec.lora.modulesToSave only if you serve with "
                          "PEFT or the merged model")


def _file_findings(adapter: Adapter) -> list[ServingFinding]:
    pickles = sorted(f for f in adapter.files if f.endswith(PICKLE_SUFFIXES))
    findings = []
    if pickles or ADAPTER_WEIGHTS not in adapter.files:
        findings.append(ServingFinding(rule=Rule.NOT_SAFETENSORS, severity=WARNING, message=(
            f"weights must be {ADAPTER_WEIGHTS} only (KServe and vLLM read safetensors; a pickle runs code "
            f"when loaded); found: {', '.join(sorted(adapter.files)) or 'no files'}")))
    return findings


def _module_findings(adapter: Adapter, base_modules: Mapping[str, str],
                     asked: Collection[str]) -> list[ServingFinding]:
    config = adapter.config
    saved = {module_of(t) for t in adapter.tensors if _SAVED_PART.search(t.removeprefix(PEFT_PREFIX))}
    saved |= {m for m in config.get("modules_to_save") or [] if isinstance(m, str)}
    full = {module_of(t) for t in adapter.tensors if not _LORA_PART.search(t) and not _SAVED_PART.search(t)}
    lora = {module_of(t) for t in adapter.tensors if _LORA_PART.search(t)}
    findings = [f for f in (
        _extra(saved | full, asked, Rule.MODULES_TO_SAVE, "full weights saved with the adapter (modules_to_save)"),
        _extra({m for m in lora if _is_embedding(m)}, asked, Rule.EMBEDDING_WEIGHTS,
               "LoRA weights on the embedding or output head"),
    ) if f is not None]
    suffixes = {name.rsplit(".", 1)[-1] for name in base_modules}
    unknown = sorted({t for t in _targets(config) if t not in suffixes and t not in base_modules}
                     | {m for m in lora if m not in base_modules})
    if unknown:
        findings.append(ServingFinding(rule=Rule.UNKNOWN_TARGET_MODULE, severity=WARNING, message=(
            f"target modules not in the base architecture: {', '.join(unknown[:8])}"
            + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
            + "; vLLM refuses or ignores them (check spec.lora.targetModules against the base model)")))
    servable = [m for m in lora if m in base_modules and LINEAR_CLASSES.search(base_modules[m])
                and not _is_embedding(m)]
    if not servable:
        findings.append(ServingFinding(rule=Rule.NOTHING_SERVABLE, severity=FATAL, message=(
            "the adapter has no LoRA weight on a linear layer of the base model that vLLM applies LoRA to "
            f"(LoRA modules: {', '.join(sorted(lora)[:6]) or 'none'}); served, it would answer exactly as the "
            "base model (vllm-project/vllm#55193). Set spec.lora.targetModules to attention/MLP projections, "
            "e.g. [q_proj, v_proj] or all-linear")))
    return findings


def check_adapter(adapter: Adapter, base_modules: Mapping[str, str], *, max_lora_rank: int,
                  modules_to_save: Collection[str] = ()) -> list[ServingFinding]:
    """Every serving rule the adapter breaks ([] = ready to serve). `base_modules`: module name -> class name of
    the base architecture (`model.named_modules()` of the un-wrapped model, e.g. built on the meta device)."""
    findings = _file_findings(adapter)
    ranks = _ranks(adapter.config)
    if ranks and max(ranks) > max_lora_rank:
        fits = next((r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks)), None)
        findings.append(ServingFinding(rule=Rule.RANK_ABOVE_MAX, severity=WARNING, message=(
            f"LoRA rank {max(ranks)} is above spec.output.serving.maxLoraRank {max_lora_rank} (vLLM "
            f"--max-lora-rank, default 16): vLLM refuses it. "
            + (f"Serve with --max-lora-rank {fits} (set spec.output.serving.maxLoraRank: {fits}) or train with "
               f"spec.lora.r <= {max_lora_rank}" if fits else
               f"vLLM serves ranks up to {VLLM_MAX_LORA_RANKS[-1]}: train with a lower spec.lora.r"))))
    return findings + _module_findings(adapter, base_modules, modules_to_save)


def fatal(findings: Sequence[ServingFinding]) -> list[ServingFinding]:
    return [f for f in findings if f.severity == FATAL]


def broken(findings: Sequence[ServingFinding]) -> list[ServingFinding]:
    """The findings that make the adapter not ready to serve (Warnings and Fatals; Infos were asked for)."""
    return [f for f in findings if f.severity in (WARNING, FATAL)]


def summary(findings: Sequence[ServingFinding]) -> str:
    """One line for a condition message or an Event."""
    bad = broken(findings)
    if not bad:
        return "the adapter meets every serving rule (vLLM, KServe)"
    return "; ".join(f"{f.rule}: {f.message}" for f in bad)


# --- ready-to-apply text -------------------------------------------------------------------------------

KSERVE_API = "serving.kserve.io/v1alpha2"
VLLM_PORT = 8000


def base_model_id(spec: FineTuneJobSpec) -> str | None:
    """The hub id the serving engine loads the base from (a bundled model is a copy of a hub model)."""
    if spec.model.name:
        return spec.model.name
    source = spec.model.source or ""
    return BUNDLED_MODELS.get(source.removeprefix("bundled://")) if source.startswith("bundled://") else None


def base_model_uri(spec: FineTuneJobSpec) -> str:
    """KServe's `spec.model.uri` for the base: hf://<id>, or the s3:// source; a local path needs a PVC."""
    hub = base_model_id(spec)
    if spec.model.source and spec.model.source.startswith("s3://"):
        return spec.model.source
    if hub:
        return f"hf://{hub}"
    return f"pvc://REPLACE-WITH-A-PVC/{(spec.model.source or '').lstrip('/')}"


def kserve_manifest(name: str, namespace: str, spec: FineTuneJobSpec, adapter_uri: str,
                    gpus: int = 1) -> dict[str, Any]:
    """A KServe LLMInferenceService serving the base with this adapter (vLLM inside, LoRA enabled)."""
    served = base_model_id(spec) or name + "-base"
    return {
        "apiVersion": KSERVE_API,
        "kind": "LLMInferenceService",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {**wire.MANAGED, wire.JOB_LABEL: name}},
        "spec": {
            "model": {
                "uri": base_model_uri(spec),
                "name": served,
                "lora": {"adapters": [{"name": name, "uri": adapter_uri.rstrip("/")}],
                         "maxRank": spec.output.serving.max_lora_rank},
            },
            "replicas": 1,
            "router": {"scheduler": {}, "route": {}, "gateway": {}},
            "template": {"containers": [{"name": "main", "resources": {
                "limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}}]},
        },
    }


def vllm_text(name: str, spec: FineTuneJobSpec, adapter_uri: str) -> str:
    """The vLLM command lines: fetch the adapter, serve it, or load it into a running server."""
    base = base_model_id(spec) or "/path/to/base-model"
    local = f"/models/adapters/{name}"
    rank = spec.output.serving.max_lora_rank
    fetch = (f"aws s3 cp --recursive {shlex.quote(adapter_uri.rstrip('/') + '/')} {local}/"
             if adapter_uri.startswith("s3://") else f"cp -r {shlex.quote(adapter_uri.rstrip('/'))} {local}")
    body = json.dumps({"lora_name": name, "lora_path": local})
    return "\n".join([
        "# 1. the adapter files on the vLLM host",
        fetch,
        "# 2a. serve the base with the adapter",
        f"vllm serve {shlex.quote(base)} --enable-lora --max-lora-rank {rank} --lora-modules {name}={local}",
        "# 2b. or load it into a running server started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
        f"curl -sf -X POST http://localhost:{VLLM_PORT}/v1/load_lora_adapter -H 'Content-Type: application/json' "
        f"-d '{body}'",
        "# 3. ask the adapter (the OpenAI-compatible API; model = the adapter's name)",
        f"curl -s http://localhost:{VLLM_PORT}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{json.dumps({'model': name, 'messages': [{'role': 'user', 'content': 'Hello'}]})}'",
    ])


def serving_status(name: str, namespace: str, spec: FineTuneJobSpec, adapter_uri: str,
                   findings: Sequence[ServingFinding] | None, gpus: int = 1) -> dict[str, Any]:
    """`status.serving`: whether the adapter meets the rules, and the ready-to-apply text (camelCase keys)."""
    manifest = kserve_manifest(name, namespace, spec, adapter_uri, gpus)
    return {
        "ready": None if findings is None else not broken(findings),
        "adapterName": name,
        "adapterUri": adapter_uri,
        "baseModel": manifest["spec"]["model"]["uri"],
        "maxLoraRank": spec.output.serving.max_lora_rank,
        "findings": [f.model_dump(by_alias=True) for f in findings or []],
        "kserve": yaml.safe_dump(manifest, sort_keys=False),
        "vllm": vllm_text(name, spec, adapter_uri),
        "command": f"kubetune serve-manifest {name} -n {namespace}",
    }


class NoAdapterYet(KubetuneError):
    """The FineTuneJob has not written its adapter yet: there is nothing to serve."""


def serving_of(obj: Mapping[str, Any], adapter_uri: str | None = None) -> dict[str, Any]:
    """`status.serving` of a FineTuneJob as stored (a dict), or rendered from its spec for `adapter_uri` (or its
    status.adapterUri) when the operator has not written one; NoAdapterYet when there is no adapter to serve."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    name, namespace = str(meta.get("name") or "adapter"), str(meta.get("namespace") or "default")
    stored = (status or {}).get("serving")
    if adapter_uri is None and isinstance(stored, dict) and stored.get("kserve"):
        return dict(stored)
    uri = adapter_uri or (status or {}).get("adapterUri")
    if not uri:
        phase = (status or {}).get("phase") or "not started"
        raise NoAdapterYet(f"finetunejob {namespace}/{name} has no adapter yet (phase {phase}); wait for Succeeded "
                           "(kubectl wait --for=condition=Ready ftj/" + name + "), or give --adapter-uri")
    spec = parse_spec(obj.get("spec"))
    gpus = int(((status or {}).get("plan") or {}).get("gpuCount") or 1)
    return serving_status(name, namespace, spec, str(uri), None, gpus)


def render(serving: Mapping[str, Any], output: str) -> str:
    """What `kubetune serve-manifest` prints: `kserve` (YAML for `kubectl apply -f -`, the vLLM lines as
    comments above it), `vllm` (the shell lines), or `json` (status.serving)."""
    if output == "json":
        return json.dumps(dict(serving), indent=2) + "\n"
    if output == "vllm":
        return str(serving["vllm"]) + "\n"
    verdict = {True: "meets every serving rule", False: "BREAKS serving rules (see below)",
               None: "was not checked by the trainer"}[serving.get("ready")]
    head = [f"# kubetune: adapter {serving['adapterName']} at {serving['adapterUri']} {verdict}"]
    head += [f"# {f['severity']} {f['rule']}: {f['message']}" for f in serving.get("findings") or []]
    head += ["# Serve it with KServe: kubectl apply -f - (this document). Or with vLLM:"]
    head += [f"#   {line}" for line in str(serving["vllm"]).splitlines()]
    return "\n".join(head) + "\n" + str(serving["kserve"])
