"""The loss: summed cross-entropy over the labelled positions, without full-sequence logits anywhere.

The vocabulary projection (lm_head) and the cross-entropy run together, a chunk of labelled positions at a
time. The chunk is sized by the vocabulary (`kubetune.planning.vram.loss_chunk_tokens`): the fp32 logits
of one chunk stay under `LOGITS_BUDGET_BYTES` (256 MiB), whatever the sequence length or the batch. That
size is shared with the estimator, so the plan charges exactly what the trainer holds.

Three paths, one math:
- `liger`: on CUDA with liger-kernel installed (`pip install kubetune[liger]`), its fused linear +
  cross-entropy Triton kernel.
- `fused` (CPU, or CUDA without Liger): `_ChunkedLinearCrossEntropy`, the same idea in PyTorch. Each chunk's
  logits are computed, turned into the loss and, in the same pass, into d(loss)/d(hidden) (softmax minus
  one-hot, times the head), then freed. Nothing of a chunk is kept for backward, which only scales the
  stored hidden-state gradient, so no chunk is recomputed either. With grad off (eval) only the loss.
- `checkpointed`: a head that is trained itself (lm_head in `targetModules`, a LoRA-wrapped head, a bias):
  each chunk runs through the module under activation checkpointing and is recomputed in backward.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from kubetune.planning.vram import LOGITS_BUDGET_BYTES, loss_chunk_tokens

__all__ = ["LOGITS_BUDGET_BYTES", "CausalLMLoss", "linear_cross_entropy_sum", "loss_chunk_tokens", "loss_path"]


def _liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def loss_path(head: torch.nn.Module, device: torch.device) -> str:
    """Which implementation `linear_cross_entropy_sum` takes for this head on this device."""
    plain = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    if not plain:
        return "checkpointed"
    if device.type == "cuda" and _liger_available():  # Triton kernels: GPU only; bench/gpu_check.py's Liger row
        return "liger"
    return "fused"


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run lm_head in: the autocast dtype when on, else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), chunk rows at a time, the hidden gradient made in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype, want_grad: bool) -> torch.Tensor:
        w = weight if weight.dtype == dtype else weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            y = targets[start:start + chunk]
            logits = torch.mm(h, w.t()).float()  # (chunk, V) fp32: the only chunk-sized tensors live
            picked = logits.gather(1, y[:, None]).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            logits.sub_(top).exp_()  # in place: exp(logit - max)
            denominator = logits.sum(dim=1, keepdim=True)
            total += (denominator.log() + top).squeeze(1).sub_(picked).sum()
            if grad is not None:
                logits.div_(denominator)  # softmax
                logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0  # d CE / d logits
                grad[start:start + chunk] = torch.mm(logits.to(dtype), w)
            del logits
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:
            raise RuntimeError("linear_cross_entropy_sum: backward through a loss computed without grad")
        return (grad * grad_output).to(ctx.hidden_dtype), None, None, None, None, None


def _checkpointed(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int) -> torch.Tensor:
    def ce(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    if hidden.shape[0] <= chunk:
        return ce(hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = activation_checkpoint(ce, hidden[start:start + chunk], targets[start:start + chunk],
                                     use_reentrant=False)
        total = total + part
    return total


def _liger(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    dtype = _matmul_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        loss: torch.Tensor = LigerFusedLinearCrossEntropyLoss(reduction="sum")(
            weight.to(dtype), hidden.to(dtype), targets)
    return loss.float()


def linear_cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                             chunk: int | None = None) -> torch.Tensor:
    """Sum of the token cross-entropies of `head(hidden)` against `targets`.

    hidden: (n, h), the labelled positions only; targets: (n,) class ids, none ignored. chunk: rows per
    chunk, by default sized by the vocabulary (`loss_chunk_tokens`). Under autocast the projection runs in
    the autocast dtype, as `head(hidden)` would; the softmax and the loss are fp32."""
    weight = head.weight
    assert isinstance(weight, torch.Tensor)
    chunk = chunk or loss_chunk_tokens(int(weight.shape[0]))
    path = loss_path(head, hidden.device)
    if path == "checkpointed":
        return _checkpointed(hidden, targets, head, chunk)
    if path == "liger":
        return _liger(hidden, targets, weight)
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    dtype = _matmul_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        loss: torch.Tensor = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, dtype, want_grad)
    return loss


class CausalLMLoss(torch.nn.Module):
    """A PEFT causal LM's decoder and `linear_cross_entropy_sum` over its head, as one module: the unit DDP and
    FSDP wrap. FSDP's root hooks run on this forward, so the head's weights are gathered while the loss reads
    them (the loss takes `head.weight` directly, not through the head's forward)."""

    def __init__(self, model: Any, ignore_index: int) -> None:
        super().__init__()
        self.model = model  # a peft PeftModel
        self.ignore_index = ignore_index

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses over the positions whose target is not `ignore_index`."""
        inner = self.model.get_base_model()
        decoder = getattr(inner, inner.base_model_prefix)
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        targets = targets.to(hidden.device, non_blocking=True)  # no-op unless layers span GPUs
        mask = targets != self.ignore_index
        return linear_cross_entropy_sum(hidden[mask], targets[mask], inner.get_output_embeddings())
