"""The serving check in the pod: read an adapter folder and the base architecture, judge with kubetune.serving.

Thin I/O around the pure rules: the adapter's adapter_config.json, file names and safetensors header; the base
architecture's module names from its config.json, built on the meta device (no weights are read). An adapter
that targets nothing a serving engine applies LoRA to fails the job with exit code 2 (`ServingError`), before
anything is uploaded; the other findings go to the log, the manifest, and the termination summary, from which
the operator sets the ServingReady condition and a Warning Event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kubetune.contracts import ServingFinding
from kubetune.errors import SpecError
from kubetune.serving import ADAPTER_WEIGHTS, Adapter, check_adapter, fatal, tensor_names
from kubetune.spec import FineTuneJobSpec


class ServingError(SpecError):
    """The adapter targets nothing a serving engine would apply (exit code 2, the summary's error says why)."""


def base_modules(model_dir: Path, peft_model: Any = None) -> dict[str, str]:
    """Module name -> class name of the base architecture, built on the meta device from config.json; when
    transformers cannot build it so (remote code, an unusual config), read off the loaded PEFT model, whose LoRA
    wrappers keep the base's module names and a Linear / Linear4bit / Embedding class name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        if peft_model is None:
            raise
        prefix = "base_model.model."
        return {name.removeprefix(prefix): type(module).__name__ for name, module in peft_model.named_modules()
                if name.startswith(prefix)}
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def read_adapter(folder: Path) -> Adapter:
    """What the check needs from a saved adapter folder (reads the safetensors header, not the tensors)."""
    config: Mapping[str, Any] = json.loads((folder / "adapter_config.json").read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    tensors: list[str] = []
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        with weights.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            tensors = tensor_names(length.to_bytes(8, "little") + f.read(length))
    return Adapter(config=config, files=files, tensors=tensors)


def in_memory_adapter(peft_model: Any) -> Adapter:
    """The adapter the model would save, without saving it: for a check before training starts."""
    from peft import get_peft_model_state_dict

    config = peft_model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config.get("target_modules") or [])
    config["modules_to_save"] = sorted(config.get("modules_to_save") or []) or None
    keys = list(get_peft_model_state_dict(peft_model))
    return Adapter(config=config, files=("adapter_config.json", ADAPTER_WEIGHTS), tensors=keys)


def judge(adapter: Adapter, modules: Mapping[str, str], spec: FineTuneJobSpec) -> list[ServingFinding]:
    """The findings; a Fatal one raises ServingError naming the rule and what to change."""
    findings = check_adapter(adapter, modules, max_lora_rank=spec.output.serving.max_lora_rank,
                             modules_to_save=spec.lora.modules_to_save)
    stop = fatal(findings)
    if stop:
        raise ServingError([f"spec.lora.targetModules: {f.rule}: {f.message}" for f in stop])
    return findings


def describe(findings: Sequence[ServingFinding]) -> str:
    if not findings:
        return "ready to serve: the adapter meets every serving rule (vLLM, KServe)"
    return "; ".join(f"{f.severity} {f.rule}: {f.message}" for f in findings)
