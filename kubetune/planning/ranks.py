"""GPU memory per rank of a data-parallel job (DDP or FSDP), and the estimated time of an optimizer step in each
shape (kubetune.planning.shapes compares shapes with it). Pure functions on top of vram.estimate (one GPU's worth
of each part).

- DDP: every rank holds a full copy of the model, the LoRA weights, gradients and optimizer states, plus
  DDP's gradient buckets (a flat copy of the trainable gradients) and the NCCL communicator's buffers.
- FSDP (FSDP2 `fully_shard` per decoder layer, then the root; 4-bit weights stored in the compute dtype so
  they shard): base weights, LoRA weights, gradients and optimizer states are divided by the rank count; the
  4-bit quantization constants are not parameters and stay whole on every rank; while a layer runs, its full
  weights are all-gathered and the next layer's prefetched (two layers' worth; an untied input table is gathered
  for its lookup, a unit of its own), the root's (lm_head and the final norm, or a tied table) stay gathered
  through the step, plus the NCCL buffers.
- With several ranks the trainer keeps an untied input embedding table on each rank's GPU (not in host memory
  as on one GPU: kubetune_trainer.memory), under both strategies.
- Activations and logits are per rank and do not shrink: each rank runs whole micro-batches through every
  layer (the step's micro-batches are divided between ranks, not the sequence).

Time (step_time): a step's micro-batches are dealt to the ranks; FSDP adds the all-gather of every layer's
weights each forward and backward, DDP the all-reduce of the LoRA gradients, both over the link between GPUs
(NVLink or PCIe in a node, the network between nodes). Rough: it compares shapes; docs/vram.md holds it to
published times.
"""

from __future__ import annotations

from dataclasses import replace

from kubetune.planning.models import Architecture
from kubetune.planning.vram import (
    ADAPTER_BYTES,
    ALLOCATOR_FRAGMENTATION,
    CUDA_CONTEXT_BYTES,
    Estimate,
    GiB,
    TrainingShape,
    estimate,
    hosts_input_embeddings,
)
from kubetune.wire import RankStrategy, Strategy

NCCL_BYTES = int(0.25 * GiB)  # communicator buffers per rank (NCCL's default channel buffers, a few hundred MB)
PREFETCHED_LAYERS = 2  # FSDP2: the running layer's all-gathered weights and the next one's
# For the time estimate: dense bf16 tensor throughput per class (vendor data sheets), the link between GPUs
# of one node (NVLink on the SXM classes, PCIe 4.0 x16 otherwise), and 100 Gb/s between nodes.
# A class not listed counts as an A10G.
BF16_FLOPS = {"L4": 121e12, "A10G": 70e12, "A100-40GB": 312e12, "A100-80GB": 312e12, "H100-80GB": 989e12,
              "H200-141GB": 989e12}
NODE_LINK_BYTES_PER_S = {"A100-40GB": 300e9, "A100-80GB": 300e9, "H100-80GB": 450e9, "H200-141GB": 450e9}
PCIE_BYTES_PER_S = 25e9
NETWORK_BYTES_PER_S = 12.5e9
MFU = 0.4  # the fraction of peak a QLoRA step reaches (dequantization and small LoRA matmuls)
# Where a published measurement of this kind of job says otherwise. Answer.AI's QLoRA+FSDP benchmarks (Llama-2 70B,
# 2048 tokens, 4 GPUs each; docs/vram.md) ran 1.90x as fast on H100s as on A100s, not the 3.2x of the data
# sheets: the H100 classes get the efficiency that keeps the measured ratio (their Hopper peak goes unused by
# bitsandbytes' 4-bit kernels and small LoRA matmuls). No measurement moves the others off MFU.
MFU_BY_CLASS = {"H100-80GB": 0.24, "H200-141GB": 0.24}


def per_rank(arch: Architecture, shape: TrainingShape, strategy: RankStrategy, ranks: int,
             one_gpu: Estimate | None = None) -> Estimate:
    """Peak memory of one rank, by part (vram.PARTS plus 'communication'). `one_gpu`: vram.estimate of the shape
    on one GPU, when the caller has it (what every rank count starts from)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    one = one_gpu or estimate(arch, replace(shape, gpu_count=1))
    parts = {k: float(v) for k, v in one.parts.items()}
    overhead = parts.pop("cuda_overhead")
    live = sum(parts.values())
    # vram.estimate: overhead = context + workspace + (live + workspace) * fragmentation
    workspace = (overhead - CUDA_CONTEXT_BYTES - live * ALLOCATOR_FRAGMENTATION) / (1 + ALLOCATOR_FRAGMENTATION)
    if ranks > 1 and shape.recipe == "kubetune" and hosts_input_embeddings(True, arch.tied_embeddings, 1):
        parts["base_weights"] += arch.vocab * arch.hidden * 2  # ranks keep the input table on their GPU
    if strategy == "ddp":
        parts["communication"] = one.lora_params * ADAPTER_BYTES + NCCL_BYTES * (ranks > 1)
    else:
        # kubetune_trainer.fsdp.units: the root (lm_head and the final norm, or the one tied table; 16-bit)
        # stays gathered from forward to the end of backward; each layer's weights are gathered while it runs
        # and the next one's prefetched; an untied input table is a unit of its own, gathered for its lookup.
        # The 4-bit quantization state is not a parameter: whole on every rank.
        table = arch.vocab * arch.hidden * 2
        embeddings = arch.embedding_params * 2
        root = (embeddings - (0 if arch.tied_embeddings else table)) + arch.hidden * 2
        layer = (parts["base_weights"] - embeddings) / arch.layers
        # The input table is gathered at the start of forward (and, for PEFT's input gradients, at the end of
        # backward), when no activations are alive: it raises the peak only past what they take.
        lookup = 0.0 if arch.tied_embeddings else table - parts["activations"] - parts["logits"]
        transient = max(min(PREFETCHED_LAYERS, arch.layers) * layer, lookup)
        for name in ("base_weights", "lora_weights", "lora_gradients", "optimizer_states"):
            parts[name] /= ranks
        gathered = transient + root if ranks > 1 else 0.0
        parts["communication"] = gathered + NCCL_BYTES * (ranks > 1)
    live = sum(parts.values()) + workspace
    parts["cuda_overhead"] = CUDA_CONTEXT_BYTES + workspace + live * ALLOCATOR_FRAGMENTATION
    return Estimate(parts={k: int(v) for k, v in parts.items()}, lora_params=one.lora_params)


def step_time(arch: Architecture, shape: TrainingShape, strategy: str, gpus: int, nodes: int,
              tokens_per_step: int, gpu_class: str = "A10G", one_gpu: Estimate | None = None) -> float:
    """Seconds of one optimizer step, roughly (for comparing shapes: kubetune.planning.shapes).

    Compute: each frozen base weight costs 2 FLOPs per token forward and 2 backward (the gradient of its input;
    a frozen weight gets no gradient of its own), 2 more when checkpointing recomputes the forward, at `MFU` of
    the class's bf16 peak (MFU_BY_CLASS where measured). A step is `tokens_per_step / (micro_batch x seq_len)`
    micro-batches:
    - one GPU runs them all; so does the layer split (one GPU works at a time), plus each micro-batch's hidden
      states crossing from GPU to GPU forward and their gradients back;
    - DDP and FSDP deal them to the ranks, so a rank runs ceil(micro-batches / ranks) (a rank without one
      idles), plus what the strategy moves, not overlapped with compute: FSDP all-gathers every layer's
      weights for each micro-batch's forward and again for its backward, DDP all-reduces the LoRA gradients
      once a step; over NVLink or PCIe within a node, the network between nodes.

    `one_gpu`: vram.estimate of the shape on one GPU, when the caller has it (what is moved comes from it).
    """
    micro_tokens = shape.micro_batch * shape.seq_len
    micro_batches = max(1, tokens_per_step // max(1, micro_tokens))
    per_token = (6 if shape.gradient_checkpointing else 4) * active_params(arch)
    flops = BF16_FLOPS.get(gpu_class, BF16_FLOPS["A10G"]) * MFU_BY_CLASS.get(gpu_class, MFU)
    one = per_token * micro_tokens / flops
    link = NETWORK_BYTES_PER_S if nodes > 1 else NODE_LINK_BYTES_PER_S.get(gpu_class, PCIE_BYTES_PER_S)
    if gpus <= 1 or strategy == "single":
        return micro_batches * one
    if strategy == "pipeline":
        hops = (gpus - 1) * 2 * micro_tokens * arch.hidden * 2  # bf16 hidden states forward, gradients back
        return micro_batches * (one + hops / link)
    mine = -(-micro_batches // gpus)
    ring = 2 * (gpus - 1) / gpus
    single = one_gpu or estimate(arch, replace(shape, gpu_count=1))
    if strategy == "fsdp":  # an all-gather brings (n-1)/n of the weights to each rank: forward, then backward
        moved = (single.parts["base_weights"] + single.parts["quant_constants"]) * mine * ring
    else:  # a ring all-reduce of the LoRA gradients
        moved = single.lora_params * ADAPTER_BYTES * ring
    return mine * one + moved / link


def active_params(arch: Architecture) -> int:
    """Parameters a token passes through: all of them, but in a mixture of experts only the routed experts'
    MLPs (every expert is stored, and FSDP gathers them all)."""
    idle = (arch.experts - arch.experts_per_token) * 3 * arch.hidden * arch.intermediate * arch.layers
    return arch.total_params - max(0, idle)


def job_estimate(arch: Architecture, shape: TrainingShape, strategy: str) -> Estimate:
    """Memory per GPU of `shape.gpu_count` GPUs under a plan's strategy: DDP/FSDP ranks, or one GPU and the
    layer split of vram.estimate ("single", "pipeline")."""
    if strategy in ("ddp", "fsdp") and shape.gpu_count > 1:
        return per_rank(arch, replace(shape, gpu_count=1), strategy, shape.gpu_count)  # type: ignore[arg-type]
    return estimate(arch, shape)


def plan_strategy(spec_strategy: str, gpu_count: int) -> Strategy:
    """What a spec's strategy means on `gpu_count` GPUs when nothing else is known: one GPU, DDP/FSDP ranks, or for
    `auto` the layer split. The planner chooses `auto`'s shape itself (kubetune.planning.shapes); tests use this to
    make a plan of a given count."""
    if gpu_count == 1:
        return "single"
    return "pipeline" if spec_strategy == "auto" else spec_strategy  # type: ignore[return-value]
