"""GPU memory levers of the trainer that change where tensors live, not what is computed.

- `host_input_embeddings`: the frozen input embedding table of a model whose input and output embeddings are
  not tied stays in host memory. A lookup of T rows is a gather: it runs on the CPU and only its (T, h)
  result crosses to the GPU (16 MiB for 2048 tokens of an 8B model), while the table itself would take
  vocab x hidden x 2 bytes of GPU memory for the whole run (0.98 GiB for Llama-3.1-8B, 1.96 GiB for 70B).
  Tied tables serve lm_head too, so they stay on the GPU. `kubetune/planning/vram.py` charges the GPU for
  the output embedding only when this applies (`hosts_input_embeddings`).
- `configure_allocator`: PyTorch's expandable segments, set before the first CUDA allocation, so the
  caching allocator grows segments instead of leaving gaps between fixed-size blocks. The estimator keeps its
  fragmentation term until a GPU measurement shows what this saves.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kubetune.planning.vram import hosts_input_embeddings

HOST = torch.device("cpu")


def tied(model: Any) -> bool:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs is not None and inputs.weight.data_ptr() == outputs.weight.data_ptr()


def host_input_embeddings(model: Any, device: torch.device, gpu_count: int = 1) -> bool:
    """Move the input embedding table to host memory when `device` is a GPU and the table is not tied to lm_head.
    Its input ids go to the host and its output comes back to `device`, so callers see no difference. Returns
    whether it moved."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun: DDP/FSDP want every parameter on the rank's GPU
    # a GPU-memory lever, decided and applied without a CUDA call (test_gpu_branches.py takes it on the CPU;
    # test_gpu.py and bench/gpu_check.py run a forward and generate with it on a GPU)
    if not hosts_input_embeddings(device.type == "cuda", tied(model), gpu_count * world):
        return False
    embedding = model.get_input_embeddings()
    embedding.to(HOST)
    as_buffer(embedding)

    def ids_to_host(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.to(HOST) if isinstance(a, torch.Tensor) else a for a in args)

    def rows_to_device(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        # detached: the table is frozen, so no gradient needs to travel back to the host; requires_grad is kept
        # for the checkpointed layers that need a grad-requiring input (enable_input_require_grads)
        moved = output.detach().to(device, non_blocking=True)
        return moved.requires_grad_(output.requires_grad)

    embedding.register_forward_pre_hook(ids_to_host)
    embedding.register_forward_hook(rows_to_device)
    embedding.kubetune_output_device = device
    return True


def as_buffer(embedding: torch.nn.Module) -> None:
    """The host table as a (persistent) buffer, not a parameter: transformers' `model.device` is the first
    parameter, and `generate` moves every input there (position ids, cache positions); were the host table that
    parameter, they would land on the CPU while the rotary frequencies are on the GPU. Frozen, it needs no
    parameter slot; its state_dict key is unchanged."""
    weight = embedding.weight
    assert isinstance(weight, torch.Tensor)
    del embedding._parameters["weight"]
    embedding.register_buffer("weight", weight.detach(), persistent=True)


def input_device(model: Any) -> torch.device:
    """Where a batch should go: the device the input embedding's output lands on."""
    embedding = model.get_input_embeddings()
    device: torch.device = getattr(embedding, "kubetune_output_device", embedding.weight.device)
    return device


def configure_allocator() -> None:
    """Expandable segments for PyTorch's CUDA caching allocator, unless the environment already chose."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
