"""The serving rules (kubetune.serving.check_adapter), one row per rule, and the text that serves an adapter."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import yaml

from kubetune.serving import (
    Adapter,
    Rule,
    broken,
    check_adapter,
    fatal,
    kserve_manifest,
    module_of,
    serving_status,
    summary,
    tensor_names,
    vllm_text,
)
from kubetune.spec import parse_spec

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
# A two-layer Llama as `named_modules()` lists it (name -> class name).
BASE: dict[str, str] = {"model": "LlamaModel", "model.embed_tokens": "Embedding", "model.norm": "LlamaRMSNorm",
                        "lm_head": "Linear", "model.layers": "ModuleList"}
for _layer in range(2):
    BASE[f"model.layers.{_layer}"] = "LlamaDecoderLayer"
    BASE.update({f"model.layers.{_layer}.{m}": "Linear" for m in LINEARS})


def lora(modules: list[str], layers: int = 2) -> list[str]:
    return [f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight" for i in range(layers) for m in modules
            for ab in "AB"]


def adapter(tensors: list[str], files: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors"),
            **config: Any) -> Adapter:
    base_config = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "modules_to_save": None}
    return Adapter(config={**base_config, **config}, files=files, tensors=tensors)


GOOD = lora(["self_attn.q_proj", "self_attn.v_proj"])

# (id, adapter, maxLoraRank, spec.lora.modulesToSave, [(rule, severity)])
CASES: list[tuple[str, Adapter, int, list[str], list[tuple[str, str]]]] = [
    ("ready", adapter(GOOD), 16, [], []),
    ("rank at the limit", adapter(GOOD, r=16), 16, [], []),
    ("rank above the limit", adapter(GOOD, r=32), 16, [], [(Rule.RANK_ABOVE_MAX, "Warning")]),
    ("rank_pattern above the limit", adapter(GOOD, r=8, rank_pattern={"q_proj": 64}), 32, [],
     [(Rule.RANK_ABOVE_MAX, "Warning")]),
    ("rank within a raised limit", adapter(GOOD, r=64), 64, [], []),
    ("modules_to_save not asked", adapter([*GOOD, "base_model.model.lm_head.weight"], modules_to_save=["lm_head"]),
     16, [], [(Rule.MODULES_TO_SAVE, "Warning")]),
    ("modules_to_save asked", adapter([*GOOD, "base_model.model.lm_head.weight"], modules_to_save=["lm_head"]),
     16, ["lm_head"], [(Rule.MODULES_TO_SAVE, "Info")]),
    ("a full embedding weight, config silent", adapter([*GOOD, "base_model.model.model.embed_tokens.weight"]),
     16, [], [(Rule.MODULES_TO_SAVE, "Warning")]),
    ("LoRA on lm_head", adapter([*GOOD, "base_model.model.lm_head.lora_A.weight",
                                         "base_model.model.lm_head.lora_B.weight"],
                                target_modules=["q_proj", "v_proj", "lm_head"]),
     16, [], [(Rule.EMBEDDING_WEIGHTS, "Warning")]),
    ("a target the base lacks", adapter(GOOD, target_modules=["q_proj", "v_proj", "c_attn"]), 16, [],
     [(Rule.UNKNOWN_TARGET_MODULE, "Warning")]),
    ("a pickle beside the safetensors", adapter(GOOD, files=("adapter_config.json", "adapter_model.safetensors",
                                                             "adapter_model.bin")),
     16, [], [(Rule.NOT_SAFETENSORS, "Warning")]),
    ("a pickle only", adapter(GOOD, files=("adapter_config.json", "adapter_model.bin")), 16, [],
     [(Rule.NOT_SAFETENSORS, "Warning")]),
    ("only the embedding: nothing servable",
     adapter(["base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens."
              "lora_embedding_B"], target_modules=["embed_tokens"]),
     16, [], [(Rule.EMBEDDING_WEIGHTS, "Warning"), (Rule.NOTHING_SERVABLE, "Fatal")]),
    ("no LoRA weights at all", adapter([], target_modules=["q_proj"]), 16, [], [(Rule.NOTHING_SERVABLE, "Fatal")]),
    ("several at once", adapter([*GOOD, "base_model.model.lm_head.weight"], r=128, modules_to_save=["lm_head"]),
     16, [], [(Rule.RANK_ABOVE_MAX, "Warning"), (Rule.MODULES_TO_SAVE, "Warning")]),
]


@pytest.mark.parametrize(("adapter_", "max_rank", "asked", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_serving_rules(adapter_: Adapter, max_rank: int, asked: list[str], expected: list[tuple[str, str]]) -> None:
    findings = check_adapter(adapter_, BASE, max_lora_rank=max_rank, modules_to_save=asked)
    assert [(f.rule, f.severity) for f in findings] == expected
    assert all(f.message for f in findings)


def test_messages_say_what_to_do() -> None:
    [rank] = check_adapter(adapter(GOOD, r=24), BASE, max_lora_rank=16)
    assert "rank 24 is above spec.output.serving.maxLoraRank 16" in rank.message
    assert "--max-lora-rank 32" in rank.message and "spec.lora.r <= 16" in rank.message
    [unknown] = check_adapter(adapter(GOOD, target_modules=["q_proj", "c_attn"]), BASE, max_lora_rank=16)
    assert "c_attn" in unknown.message and "spec.lora.targetModules" in unknown.message
    nothing = fatal(check_adapter(adapter([]), BASE, max_lora_rank=16))
    assert "answer exactly as the base model" in nothing[0].message
    assert summary([]) == "the adapter meets every serving rule (vLLM, KServe)"
    asked = check_adapter(adapter([*GOOD, "base_model.model.lm_head.weight"]), BASE, max_lora_rank=16,
                          modules_to_save=["lm_head"])
    assert broken(asked) == []  # asked for: reported, not a violation


@pytest.mark.parametrize(("tensor", "module"), [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj"),
    ("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight", "model.layers.3.mlp.down_proj"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", "model.embed_tokens"),
    ("base_model.model.lm_head.weight", "lm_head"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head"),
])
def test_module_of(tensor: str, module: str) -> None:
    assert module_of(tensor) == module


def test_tensor_names_from_a_safetensors_header() -> None:
    meta = {"__metadata__": {"format": "pt"}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    raw = json.dumps(meta).encode()
    assert tensor_names(struct.pack("<Q", len(raw)) + raw + b"\0" * 8) == ["a", "b"]
    with pytest.raises(ValueError, match="header says"):
        tensor_names(struct.pack("<Q", 10_000) + raw)


def _spec(**output: Any) -> Any:
    return parse_spec({"model": {"source": "bundled://smollm2-135m-instruct"},
                       "dataset": {"source": "s3://data/train.jsonl"},
                       "output": {"uri": "s3://models/quickstart/", **output}})


def test_kserve_manifest_and_vllm_flags() -> None:
    spec = _spec(serving={"maxLoraRank": 32})
    manifest = kserve_manifest("quickstart", "team-a", spec, "s3://models/quickstart/adapter/")
    model = manifest["spec"]["model"]
    assert model["uri"] == "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model["lora"] == {"adapters": [{"name": "quickstart", "uri": "s3://models/quickstart/adapter"}],
                             "maxRank": 32}
    text = vllm_text("quickstart", spec, "s3://models/quickstart/adapter/")
    assert ("vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 32 "
            "--lora-modules quickstart=/models/adapters/quickstart") in text
    assert "aws s3 cp --recursive s3://models/quickstart/adapter/ /models/adapters/quickstart/" in text
    assert '/v1/load_lora_adapter' in text and '"lora_name": "quickstart"' in text
    status = serving_status("quickstart", "team-a", spec, "s3://models/quickstart/adapter/", [])
    assert status["ready"] is True and yaml.safe_load(status["kserve"]) == manifest
    assert serving_status("quickstart", "team-a", spec, "s3://x/adapter/", None)["ready"] is None
