"""GPU memory per rank of a data-parallel job (DDP or FSDP), and the shapes a job can run in, compared by cost
and estimated time. Pure functions on top of vram.estimate (one GPU's worth of each part).

- DDP: every rank holds a full copy of the model, the LoRA weights, gradients and optimizer states, plus
  DDP's gradient buckets (a flat copy of the trainable gradients) and the NCCL communicator's buffers.
- FSDP (FSDP2 `fully_shard` per decoder layer, 4-bit weights stored in the compute dtype so they shard):
  base weights, quantization constants, LoRA weights, gradients and optimizer states are divided by the
  rank count; while a layer runs, its full weights are all-gathered, and the next layer's are prefetched
  (two layers' worth), plus the NCCL buffers.
- Activations and logits are per rank and do not shrink: each rank runs whole micro-batches through every
  layer (the step's micro-batches are divided between ranks, not the sequence).

Time: a step's compute divides over the ranks; FSDP adds the all-gather of every layer's weights each forward
and backward, DDP the all-reduce of the LoRA gradients, both over the link between GPUs (NVLink or PCIe in a
node, the network between nodes). The figures are relative (only ratios between shapes matter), as prices are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from kubetune.planning.models import Architecture
from kubetune.planning.vram import (
    ADAPTER_BYTES,
    ALLOCATOR_FRAGMENTATION,
    CUDA_CONTEXT_BYTES,
    Estimate,
    GiB,
    TrainingShape,
    estimate,
)

Strategy = Literal["ddp", "fsdp"]
NCCL_BYTES = int(0.25 * GiB)  # communicator buffers per rank (NCCL's default channel buffers, a few hundred MB)
PREFETCHED_LAYERS = 2  # FSDP2: the running layer's all-gathered weights and the next one's
# For the time estimate (only ratios between shapes matter): dense bf16 tensor throughput per class (vendor
# data sheets), the link between GPUs of one node (NVLink on the SXM classes, PCIe 4.0 x16 otherwise), and
# 100 Gb/s between nodes. A class not listed counts as an A10G.
BF16_FLOPS = {"L4": 121e12, "A10G": 70e12, "A100-40GB": 312e12, "A100-80GB": 312e12, "H100-80GB": 989e12,
              "H200-141GB": 989e12}
NODE_LINK_BYTES_PER_S = {"A100-40GB": 300e9, "A100-80GB": 300e9, "H100-80GB": 450e9, "H200-141GB": 450e9}
PCIE_BYTES_PER_S = 25e9
NETWORK_BYTES_PER_S = 12.5e9
MFU = 0.4  # the fraction of peak a QLoRA step reaches (dequantization and small LoRA matmuls)


def per_rank(arch: Architecture, shape: TrainingShape, strategy: Strategy, ranks: int) -> Estimate:
    """Peak memory of one rank, by part (vram.PARTS plus 'communication')."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    one = estimate(arch, replace(shape, gpu_count=1))
    parts = {k: float(v) for k, v in one.parts.items()}
    overhead = parts.pop("cuda_overhead")
    live = sum(parts.values())
    # vram.estimate: overhead = context + workspace + (live + workspace) * fragmentation
    workspace = (overhead - CUDA_CONTEXT_BYTES - live * ALLOCATOR_FRAGMENTATION) / (1 + ALLOCATOR_FRAGMENTATION)
    if strategy == "ddp":
        parts["communication"] = one.lora_params * ADAPTER_BYTES + NCCL_BYTES * (ranks > 1)
    else:
        weights = parts["base_weights"] + parts["quant_constants"]
        for name in ("base_weights", "quant_constants", "lora_weights", "lora_gradients", "optimizer_states"):
            parts[name] /= ranks
        gathered = min(PREFETCHED_LAYERS, arch.layers) * weights / arch.layers if ranks > 1 else 0.0
        parts["communication"] = gathered + NCCL_BYTES * (ranks > 1)
    live = sum(parts.values()) + workspace
    parts["cuda_overhead"] = CUDA_CONTEXT_BYTES + workspace + live * ALLOCATOR_FRAGMENTATION
    return Estimate(parts={k: int(v) for k, v in parts.items()}, lora_params=one.lora_params)


@dataclass(frozen=True)
class ShapeOption:
    """One way to run the job: `nodes` x `gpus_per_node` GPUs of a class, with a strategy."""

    gpu_class: str
    strategy: Literal["single", "ddp", "fsdp"]
    nodes: int
    gpus_per_node: int
    per_rank_bytes: int
    fits: bool
    hourly_cost: float
    relative_time: float  # estimated seconds of one optimizer step (rough: for comparing shapes)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def relative_cost(self) -> float:
        """Price of the whole run: GPUs' hourly price x the time the run takes."""
        return self.hourly_cost * self.relative_time

    def label(self) -> str:
        where = f"{self.gpus}x {self.gpu_class}" if self.gpus > 1 else f"1x {self.gpu_class}"
        return where + (f" on {self.nodes} nodes" if self.nodes > 1 else "") + \
            (f" ({self.strategy.upper()})" if self.strategy != "single" else "")


def step_time(arch: Architecture, shape: TrainingShape, strategy: str, gpus: int, nodes: int,
              tokens_per_step: int, gpu_class: str = "A10G") -> float:
    """Seconds of one optimizer step, roughly: compute (6 x params x tokens, 8 with recompute) at MFU of the
    class's bf16 peak, divided over the GPUs, plus what the strategy moves between them (not overlapped)."""
    flops = (8 if shape.gradient_checkpointing else 6) * arch.total_params * tokens_per_step
    compute = flops / (BF16_FLOPS.get(gpu_class, BF16_FLOPS["A10G"]) * MFU)
    if gpus <= 1 or strategy == "single":
        return compute
    link = NETWORK_BYTES_PER_S if nodes > 1 else NODE_LINK_BYTES_PER_S.get(gpu_class, PCIE_BYTES_PER_S)
    ring = 2 * (gpus - 1) / gpus
    if strategy == "fsdp":
        weights = estimate(arch, replace(shape, gpu_count=1)).parts
        micro_batches = max(1, tokens_per_step // max(1, shape.micro_batch * shape.seq_len))
        per_rank_micro = math.ceil(micro_batches / gpus)
        # each micro-batch all-gathers every layer's weights for forward and again for backward
        moved = (weights["base_weights"] + weights["quant_constants"]) * per_rank_micro * ring
    else:
        moved = estimate(arch, replace(shape, gpu_count=1)).lora_params * ADAPTER_BYTES * ring
    return compute / gpus + moved / link


def options(arch: Architecture, shape: TrainingShape, tokens_per_step: int,
            classes: list[tuple[str, int, float, int]], max_gpus: int = 64,
            strategies: tuple[Strategy, ...] = ("ddp", "fsdp")) -> list[ShapeOption]:
    """Every shape over `classes` ((name, usable bytes per GPU, hourly price per GPU, GPUs per node)) with up to
    `max_gpus` GPUs: one GPU, and 2, 4, 8, ... ranks of each strategy; cheapest (price x time) first."""
    found: list[ShapeOption] = []
    for name, usable, price, per_node in classes:
        single = estimate(arch, replace(shape, gpu_count=1)).total
        found.append(ShapeOption(name, "single", 1, 1, single, single <= usable, price,
                                 step_time(arch, shape, "single", 1, 1, tokens_per_step, name)))
        gpus = 2
        while gpus <= max_gpus:
            nodes = math.ceil(gpus / per_node)
            if gpus % nodes == 0:
                for strategy in strategies:
                    need = per_rank(arch, shape, strategy, gpus).total
                    found.append(ShapeOption(name, strategy, nodes, gpus // nodes, need, need <= usable,
                                             price * gpus,
                                             step_time(arch, shape, strategy, gpus, nodes, tokens_per_step,
                                                       name)))
            gpus *= 2
    return sorted(found, key=lambda o: (not o.fits, o.relative_cost, o.relative_time, o.gpus))


def choose(found: list[ShapeOption]) -> tuple[ShapeOption | None, list[str]]:
    """The cheapest shape that fits, and the reasons: what it beat and why."""
    fitting = [o for o in found if o.fits]
    if not fitting:
        return None, ["no shape fits: " + ", ".join(f"{o.label()} needs {o.per_rank_bytes / GiB:.1f} GiB per GPU"
                                                     for o in found[:3])]
    best = fitting[0]
    reasons = [f"{best.label()}: {best.per_rank_bytes / GiB:.1f} GiB per GPU; the cheapest shape that fits "
               f"(price x time {best.relative_cost:.3g}, about {best.relative_time:.3g} s per step)"]
    single = next((o for o in fitting if o.strategy == "single"), None)
    if single is not None and single is not best:
        reasons.append(f"{single.label()} also fits but costs {single.relative_cost / best.relative_cost:.2f}x "
                       f"and takes {single.relative_time / best.relative_time:.2f}x as long")
    tight = [o for o in found if not o.fits and o.hourly_cost < best.hourly_cost]
    if tight:
        o = min(tight, key=lambda x: x.hourly_cost)
        reasons.append(f"{o.label()} is cheaper per hour but needs {o.per_rank_bytes / GiB:.1f} GiB per GPU")
    return best, reasons


def job_estimate(arch: Architecture, shape: TrainingShape, strategy: str) -> Estimate:
    """Memory per GPU of `shape.gpu_count` GPUs under the spec's strategy: DDP/FSDP ranks, or (auto) the
    layer split of vram.estimate."""
    if strategy in ("ddp", "fsdp") and shape.gpu_count > 1:
        return per_rank(arch, replace(shape, gpu_count=1), strategy, shape.gpu_count)  # type: ignore[arg-type]
    return estimate(arch, shape)


def plan_strategy(spec_strategy: str, gpu_count: int) -> Literal["single", "pipeline", "ddp", "fsdp"]:
    """What the plan runs: one GPU, the layer split (auto over several GPUs of a node), or DDP/FSDP ranks."""
    if gpu_count == 1:
        return "single"
    return "pipeline" if spec_strategy == "auto" else spec_strategy  # type: ignore[return-value]
