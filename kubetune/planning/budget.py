"""What a trainer pod needs besides GPUs, from the plan: local disk and time to stop gracefully. Pure.

Disk (the pod's `ephemeral-storage` request): the base model as the hub stores it (16-bit safetensors,
2 bytes per parameter) when the model cache is the pod's own emptyDir, plus room to write one checkpoint
(the adapter and its Adam states in fp32, staged on disk before the upload) and the final adapter, plus
fixed scratch for the dataset and temporary files. With a shared model-cache PVC the weights live there.

Host memory (the pod's `memory` request and limit, at least the operator's `memoryPerGpu` x GPUs): each rank is
a process with Python, torch, the CUDA runtime, the tokenizer and the dataset. Under FSDP each rank also loads
and quantizes the whole model into host memory before `fully_shard` moves its shards to the GPU
(kubetune_trainer.fsdp): a 4-bit copy per rank under QLoRA (0.5 bytes a weight, plus the quantization constants
and the 16-bit embeddings), a 16-bit one under LoRA. One GPU, DDP and the layer split load straight onto the GPU.

Merged export (`spec.output.mergedModel`, kubetune_trainer.merge): streamed tensor by tensor, so host memory
grows by about two 16-bit copies of the largest weight (the one read, the one written) plus the fp32 row blocks
of the LoRA delta (fixed scratch), and disk by one output shard (1 GiB) at a time, uploaded and deleted before
the next. It never holds the whole model.

Grace (`terminationGracePeriodSeconds`): on SIGTERM the trainer finishes its optimizer step, then writes
and uploads a checkpoint. The step is sized pessimistically (6 x parameters x tokens per step at a low
sustained throughput, x4/3 with activation checkpointing), the upload at a modest bandwidth, then doubled
with a floor, so a slow node still stops with its checkpoint written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BYTES_PER_PARAM_ON_DISK = 2  # bf16 / fp16 safetensors as hub repos ship them
CHECKPOINT_BYTES_PER_LORA_PARAM = 4 + 8  # fp32 adapter + AdamW's two fp32 states
SCRATCH_BYTES = 2 * 2**30  # dataset cache, tokenizer, temporary files
SLOW_FLOPS = 20e12  # sustained training FLOP/s assumed for the slowest class (an L4 running NF4 matmuls)
UPLOAD_BYTES_PER_SECOND = 20e6  # to S3 from a pod, pessimistic
PROCESS_BYTES = 3 * 2**30  # one trainer rank's host memory besides a model copy
HOST_BYTES_PER_PARAM = {"qlora": 0.55, "lora": 2.0}  # a whole model copy in host memory (FSDP loading)
MERGE_SHARD_BYTES = 2**30  # the merged export's output shard on disk before its upload (kubetune_trainer.merge)
MERGE_SCRATCH_BYTES = 2**30  # the merge's fp32 row blocks (4096 rows of the LoRA delta) and allocator slack
MIN_GRACE_SECONDS = 60
MAX_GRACE_SECONDS = 3600


@dataclass(frozen=True)
class PodBudget:
    ephemeral_storage_bytes: int
    model_cache_bytes: int  # what the model cache volume holds (a sizeLimit for an emptyDir)
    grace_period_seconds: int
    host_memory_bytes: int  # what the pod's ranks hold in host memory at their peak (model loading)


def pod_budget(model_params: int, lora_params: int, tokens_per_step: int, gradient_checkpointing: bool,
               gpu_count: int = 1, cache_on_volume: bool = False, method: str = "qlora",
               sharded: bool = False, merged: bool = False, largest_weight_params: int = 0) -> PodBudget:
    """`gpu_count`: the pod's GPUs (one rank each under DDP and FSDP); `sharded`: the ranks run FSDP; `merged`:
    the merged model is exported (its largest weight has `largest_weight_params` elements)."""
    model_bytes = model_params * BYTES_PER_PARAM_ON_DISK
    checkpoint = lora_params * CHECKPOINT_BYTES_PER_LORA_PARAM
    cache = int(model_bytes * 1.05) + 64 * 2**20  # tokenizer, config, and filesystem slack
    disk = SCRATCH_BYTES + 2 * checkpoint + (0 if cache_on_volume else cache) + (MERGE_SHARD_BYTES if merged else 0)
    flops = 6 * model_params * tokens_per_step * (4 / 3 if gradient_checkpointing else 1)
    step_seconds = flops / (SLOW_FLOPS * max(1, gpu_count))
    upload_seconds = checkpoint / UPLOAD_BYTES_PER_SECOND
    grace = math.ceil(2 * (step_seconds + upload_seconds) + 30)
    copy = model_params * HOST_BYTES_PER_PARAM.get(method, 2.0) if sharded else 0
    host = max(1, gpu_count if sharded else 1) * (PROCESS_BYTES + copy)
    if merged:  # rank 0 merges after training: two 16-bit copies of the largest weight, and scratch
        host += 2 * BYTES_PER_PARAM_ON_DISK * largest_weight_params + MERGE_SCRATCH_BYTES
    return PodBudget(ephemeral_storage_bytes=_round_up(disk), model_cache_bytes=_round_up(cache),
                     grace_period_seconds=max(MIN_GRACE_SECONDS, min(MAX_GRACE_SECONDS, grace)),
                     host_memory_bytes=_round_up(int(host)))


def _round_up(n: int, unit: int = 2**30) -> int:
    return -(-n // unit) * unit


def quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity in whole Gi (the budget is rounded up to a GiB)."""
    return f"{-(-n // 2**30)}Gi"


UNITS = {"": 1, "m": 10**-3, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def split_quantity(text: str) -> tuple[float, str]:
    """'12Gi' -> (12.0, 'Gi'), '500m' -> (500.0, 'm'): a quantity with a suffix Kubernetes writes (no exponents)."""
    digits = "".join(ch for ch in text if ch.isdigit() or ch == ".")
    unit = text[len(digits):]
    if not digits or not text.startswith(digits) or unit not in UNITS:
        raise ValueError(f"not a memory quantity: {text!r} (use e.g. 12Gi)")
    return float(digits), unit


def quantity_bytes(text: str) -> float:
    """'12Gi' -> bytes."""
    value, unit = split_quantity(text)
    return value * UNITS[unit]
