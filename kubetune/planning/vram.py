"""GPU memory a QLoRA/LoRA fine-tune needs, part by part. A pure function; docs/vram.md derives each term.

Everything is in bytes, per GPU. The model is the path the kubetune trainer takes (Hugging Face
transformers + PEFT + bitsandbytes, SDPA attention, bf16 compute), so the estimate can be checked
against a real run: the trainer exports `kubetune_vram_estimate_bytes` beside the measured peak.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from kubetune.planning.models import Architecture

GiB = 1024**3

NF4_BYTES_PER_PARAM = 0.5
QUANT_BLOCK = 64  # NF4 block size: one absmax constant per 64 weights
DOUBLE_QUANT_BLOCK = 256  # second-level block over the 8-bit constants
ADAPTER_BYTES = 4  # PEFT keeps LoRA weights (and so their gradients) in fp32 on a 16-bit base
ACT_BYTES = 2  # bf16 / fp16 activations
# bf16 logits + the fp32 log-softmax kept for backward (6 B), then the fp32 gradient in and out at the start
# of backward (8 B). Measured on the CPU with the model output kept through backward, as training loops
# keep it: 14.0 B (tests/core/test_vram_activations.py).
LOGITS_BYTES = 14
# The kubetune trainer's loss (kubetune_trainer.loss) holds one chunk at a time: its fp32 logits (4 B), turned
# in place into the softmax and then the logits' gradient, and the 16-bit copy of that gradient for the
# matmul back to the hidden states (2 B) (or, at the start, the 16-bit logits being upcast). Measured on the
# CPU: 6.05 B per position of one chunk per vocabulary entry (tests/core/test_vram_activations.py).
KT_LOGITS_BYTES = 6
# ... plus, for every labelled position of the micro-batch, the 16-bit copy of its hidden state that the loss
# takes and the fp32 gradient of that hidden state the loss keeps for backward.
KT_LOSS_HIDDEN_BYTES = 2 + 4
# The kubetune trainer's lm_head + cross-entropy (kubetune_trainer.loss) runs a chunk of labelled positions at a
# time, the chunk sized so its fp32 logits stay under this budget.
LOGITS_BUDGET_BYTES = 256 * 2**20
HF_LORA_INPUT_BYTES = 4  # plain PEFT: the fp32 copy of each wrapped projection's input that lora_A keeps
HF_LORA_DROPOUT_BYTES = 4  # plain PEFT dropout on that copy: fp32 output kept for lora_A plus the mask
KT_LORA_DROPOUT_BYTES = 3  # kubetune trainer (autocast): bf16 dropout output plus the mask
# bitsandbytes' 4-bit matmul dequantizes one projection's weight to the compute dtype (with its fp32 absmax)
# for each matmul, forward and backward, and frees it after: one copy alive at a time. Measured on the CPU
# (the same dequantize + F.linear path CUDA takes for long inputs): 1.03-1.10 copies over runs, page-granular
# (tests/core/test_vram_parts.py); charged with margin over the highest.
DEQUANT_COPIES = 1.15
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, outside torch's allocator
ALLOCATOR_FRAGMENTATION = 0.08  # caching-allocator slack on top of live tensors at the peak

OPTIMIZER_BYTES_PER_PARAM = {"paged_adamw_32bit": 8.0, "adamw_torch": 8.0, "paged_adamw_8bit": 2.0}

PARTS = (
    "base_weights",
    "quant_constants",
    "lora_weights",
    "lora_gradients",
    "optimizer_states",
    "activations",
    "logits",
    "cuda_overhead",
)


@dataclass(frozen=True)
class TrainingShape:
    """The knobs that change memory. The planner fills in what the spec left as 'auto'."""

    method: Literal["qlora", "lora"] = "qlora"
    micro_batch: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    lora_r: int = 16
    target_modules: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    lora_dropout: float = 0.05
    optimizer: str = "paged_adamw_32bit"
    double_quant: bool = True
    gpu_count: int = 1
    # "kubetune": the kubetune trainer (autocast, no per-projection input copies, chunked loss);
    # "hf": the plain transformers + PEFT recipe most published figures were measured with.
    recipe: Literal["kubetune", "hf"] = "kubetune"
    # spec.evaluation: the longest sequence its greedy generation holds in the KV cache (prompt + new tokens);
    # 0: no evaluation, and no "generation" part
    generation_tokens: int = 0


@dataclass(frozen=True)
class Estimate:
    parts: dict[str, int] = field(default_factory=dict)
    lora_params: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_gib(self) -> dict[str, float]:
        return {k: round(v / GiB, 2) for k, v in self.parts.items()}


def targeted(arch: Architecture,
             targets: tuple[str, ...] | Literal["all-linear"]) -> Mapping[str, tuple[int, int, int]]:
    """The per-layer linear projections LoRA wraps. 'all-linear' is every decoder projection (not lm_head)."""
    shapes = arch.projections
    if targets == "all-linear":
        return shapes
    return {name: shape for name, shape in shapes.items() if name in targets}


def lora_param_count(arch: Architecture, shape: TrainingShape) -> int:
    per_layer = sum(n * shape.lora_r * (i + o) for i, o, n in targeted(arch, shape.target_modules).values())
    return arch.layers * per_layer


def activation_bytes_per_token_layer(arch: Architecture, shape: TrainingShape) -> float:
    """Bytes autograd keeps for one token through one decoder layer, without checkpointing.

    Measured on real Llama layers (tests/core/test_vram_activations.py records autograd's saved tensors):
    - base layer: 8h (RMSNorm fp32 inputs), 4q + 4kv (q, k, v and the attention output kept by SDPA),
      4 x heads (fp32 log-sum-exp), 6I per routed expert (gate and up outputs and SiLU(gate), bf16);
    - LoRA, kubetune recipe (autocast, PEFT's input casting off): each distinct projection input is kept
      once in bf16 for lora_A, shared by q/k/v and by gate/up (3h each, measured with the norm output),
      2.4I for down_proj; dropout > 0 adds a bf16 output and a mask per wrapped projection (3 B/element);
    - LoRA, plain recipe: PEFT casts every wrapped projection's input to the fp32 adapter dtype and lora_A
      keeps that copy (4 B/element per projection); dropout keeps its fp32 output and mask (4 B more).
    """
    h, q, kv, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    k = arch.experts_per_token
    base = 8 * h + 4 * q + 4 * kv + 4 * arch.heads + 6 * i * k
    wrapped = targeted(arch, shape.target_modules)
    inputs_per_projection = sum(n_in * (k if n > 1 else 1) for n_in, _out, n in wrapped.values())
    dropout = shape.lora_dropout > 0
    if shape.recipe == "hf":
        return base + (HF_LORA_INPUT_BYTES + HF_LORA_DROPOUT_BYTES * dropout) * inputs_per_projection
    shared = (
        3 * h * any(p in wrapped for p in ("q_proj", "k_proj", "v_proj"))
        + 3 * h * any(p in wrapped for p in ("gate_proj", "up_proj"))
        + 2.4 * i * k * ("down_proj" in wrapped)
    )
    return base + shared + KT_LORA_DROPOUT_BYTES * dropout * inputs_per_projection


def hosts_input_embeddings(on_gpu: bool, tied: bool, gpu_count: int) -> bool:
    """The kubetune trainer keeps an untied input embedding table in host memory on a single-GPU run
    (kubetune_trainer.memory): a lookup is a gather, only its (tokens, hidden) rows go to the GPU."""
    return on_gpu and not tied and gpu_count == 1


def loss_chunk_tokens(vocab: int, budget: int = LOGITS_BUDGET_BYTES) -> int:
    """Labelled positions per lm_head + cross-entropy chunk in the kubetune trainer: the fp32 logits of one
    chunk (4 B x vocab per position) fit `budget`; a multiple of 64 rows when that is at least 64."""
    rows = max(1, budget // (4 * max(1, vocab)))
    return rows - rows % 64 if rows >= 64 else rows


def logits_tokens(shape: TrainingShape, vocab: int) -> int:
    """Tokens whose logits are alive at once: all of them in the plain recipe; the kubetune trainer runs
    lm_head + cross-entropy over one chunk of `loss_chunk_tokens(vocab)` labelled positions at a time."""
    tokens = shape.micro_batch * shape.seq_len
    return tokens if shape.recipe == "hf" else min(tokens, loss_chunk_tokens(vocab))


def kv_cache_bytes(arch: Architecture, tokens: int) -> int:
    """Keys and values of every decoder layer for `tokens` positions, 16-bit (transformers' DynamicCache)."""
    return 2 * arch.layers * arch.kv_dim * ACT_BYTES * tokens


def generation_bytes(arch: Architecture, tokens: int) -> float:
    """GPU memory greedy generation adds (spec.evaluation; batch 1, KV cache on) at `tokens` = prompt + new tokens,
    on top of the weights, adapter and optimizer states that stay alive: the cache (keys and values of every
    layer, 16-bit), one layer's tensors over the whole prompt at prefill (no autograd: q, k, v, the attention
    output, the MLP's gate, up and activation outputs), and the last position's logits in fp32 (twice: the
    logits and the processed scores). The kernels transformers runs on a GPU (SDPA flash / memory-efficient)
    never hold the attention matrix."""
    cache = kv_cache_bytes(arch, tokens)
    prefill = tokens * (2 * arch.q_dim + 2 * arch.kv_dim + 3 * arch.intermediate * arch.experts_per_token) * ACT_BYTES
    return float(cache + prefill + 2 * 4 * arch.vocab)


def estimate(arch: Architecture, shape: TrainingShape) -> Estimate:
    """Peak GPU memory per GPU, by part. With several GPUs the layers are split evenly (pipeline)."""
    n = max(1, shape.gpu_count)
    tokens = shape.micro_batch * shape.seq_len

    # 16-bit embeddings on the GPU: both tables, or only lm_head when the trainer hosts the input table
    on_gpu_embeddings = arch.embedding_params
    if shape.recipe == "kubetune" and hosts_input_embeddings(True, arch.tied_embeddings, shape.gpu_count):
        on_gpu_embeddings -= arch.vocab * arch.hidden
    if shape.method == "qlora":
        base = arch.linear_params * NF4_BYTES_PER_PARAM + (on_gpu_embeddings + arch.norm_params) * 2
        per_weight = 1 / QUANT_BLOCK + 4 / (QUANT_BLOCK * DOUBLE_QUANT_BLOCK) if shape.double_quant else 4 / QUANT_BLOCK
        constants = arch.linear_params * per_weight
        # bitsandbytes dequantizes one projection at a time to bf16 for the matmul (forward and backward)
        dequant_workspace = DEQUANT_COPIES * arch.largest_projection * 2
    else:
        base = (arch.linear_params + on_gpu_embeddings + arch.norm_params) * 2
        constants = 0.0
        dequant_workspace = 0

    lora = lora_param_count(arch, shape)
    per_layer_token = activation_bytes_per_token_layer(arch, shape)
    layers_here = -(-arch.layers // n)
    if shape.gradient_checkpointing:
        # each layer keeps only its input; backward recomputes one layer at a time
        activations = tokens * (layers_here * ACT_BYTES * arch.hidden + per_layer_token)
    else:
        activations = tokens * layers_here * per_layer_token
    if shape.recipe == "hf":
        logits = logits_tokens(shape, arch.vocab) * arch.vocab * LOGITS_BYTES
    else:
        logits = (logits_tokens(shape, arch.vocab) * arch.vocab * KT_LOGITS_BYTES
                  + tokens * arch.hidden * KT_LOSS_HIDDEN_BYTES)

    optimizer_bytes = OPTIMIZER_BYTES_PER_PARAM.get(shape.optimizer, 8.0)
    parts = {
        "base_weights": base / n,
        "quant_constants": constants / n,
        "lora_weights": lora * ADAPTER_BYTES / n,
        "lora_gradients": lora * ADAPTER_BYTES / n,
        "optimizer_states": lora * optimizer_bytes / n,
        "activations": float(activations),
        "logits": float(logits),
    }
    if shape.generation_tokens:
        # the evaluation runs after training, when the step's activations and logits are gone: only what its
        # generation needs beyond them raises the peak
        parts["generation"] = max(0.0, generation_bytes(arch, shape.generation_tokens) - activations - logits)
    live = sum(parts.values()) + dequant_workspace
    parts["cuda_overhead"] = CUDA_CONTEXT_BYTES + dequant_workspace + live * ALLOCATOR_FRAGMENTATION
    return Estimate(parts={k: int(v) for k, v in parts.items()}, lora_params=lora)
