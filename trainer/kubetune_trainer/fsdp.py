"""`resources.strategy: fsdp` on several ranks: FSDP2 (`torch.distributed.fsdp.fully_shard`).

Units: every decoder layer (the model's `_no_split_modules`: LoRA adapters and their frozen base weights in
one unit; FSDP2 shards per parameter, so trainable and frozen parameters mix), an untied input embedding
table (`units`), then the root, which holds what is left (final norm, lm_head, a tied table) and runs the
head's loss, so those weights are gathered when the loss reads them. A layer's weights are all-gathered for
its forward and again for its backward and freed in between (kubetune/planning/ranks.py charges the running
layer and the prefetched next one); the root's stay gathered from forward to the end of backward.

QLoRA: the 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`, model.quantization_config)
as the planner assumes, so every base weight gathers in the dtype it computes in. Each Linear4bit keeps its
quantization state (absmax, code; small) whole on every rank: bitsandbytes hands it back to the gathered
weight in forward (`fix_4bit_weight_quant_state_from_module`).

Mixed precision: no parameter cast. Frozen weights already are in the compute dtype (norms fp32, as on one
GPU), LoRA weights are fp32 masters that autocast runs in the compute dtype (model.mixed_precision), and
gradients are reduce-scattered in fp32. That is the single-rank and DDP arithmetic, so the runs agree.

Gradients: reduce-scatter averages over ranks like DDP's all-reduce (the loop scales the loss by the world
size), once per optimizer step (`set_requires_gradient_sync(False)` on the other micro-batches). Checkpoints
and the adapter are written in the single-rank format: the trainable weights and the optimizer state are
gathered whole (collectives: every rank calls) and rank 0 writes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kubetune.errors import SpecError


def decoder_layers(model: Any) -> list[nn.Module]:
    """The repeated blocks of a transformers model: the classes it lists as `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SpecError(f"spec.resources.strategy: fsdp needs the model's decoder layers; "
                        f"{type(model).__name__} names none (_no_split_modules)")
    return layers


def units(model: Any) -> list[nn.Module]:
    """What gets a unit of its own below the root: every decoder layer, and an input embedding table that is not
    tied to lm_head. In the root it would stay gathered through the whole step (the root is not resharded after
    forward); in a unit of its own it is gathered for the lookup and freed (1 GiB of a 70B model's 2 GiB root
    table; kubetune/planning/ranks.py charges it so)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    own = head is None or embedding.weight.data_ptr() != head.weight.data_ptr()
    return [*decoder_layers(model), *([embedding] if own else [])]


def shard(root: nn.Module, layers: list[nn.Module], device: torch.device, world: int) -> None:
    """fully_shard every layer, then the root, over a 1-D mesh of `world` ranks on `device`'s type (gloo on
    the CPU, NCCL on GPUs). Parameters still on the host move to `device` one unit at a time, so a rank never
    holds more than its shards and one whole unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    place_quant_states(root, device)


def place_quant_states(model: nn.Module, device: torch.device) -> None:
    """A Linear4bit's quantization state lives beside its weight, not in a parameter: FSDP moves the weight
    only. QuantState.to moves in place."""
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            state.to(device)


def describe(root: nn.Module) -> str:
    """What this rank holds, for the log: units, and its share of the parameters."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = sum(isinstance(m, FSDPModule) for m in root.modules())
    params = list(root.parameters())
    mine = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    return (f"{units - 1} units (decoder layers, an untied input embedding) and the root sharded; this rank "
            f"holds {mine:,} of {total:,} parameter elements ({mine / max(total, 1):.0%}), its gradient and "
            "optimizer shards likewise")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce-scatter the gradients in this backward (the step's last micro-batch) or accumulate them."""
    from torch.distributed.fsdp import FSDPModule

    assert isinstance(module, FSDPModule)
    module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (an all-gather: every rank calls), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def trainable_state(model: nn.Module, main: bool) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters by name, whole, on the host of rank 0 (empty elsewhere). Gathered by
    hand: `get_model_state_dict(ignore_frozen_params=True)` still gathers a tied frozen weight under its second
    name (lm_head.weight, the whole embedding table)."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = full(param.detach())
            if main:
                state[name] = whole.cpu()
    return state


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order `Optimizer.state_dict` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` as one rank would write it (states whole, parameters numbered), on rank 0
    (empty elsewhere): checkpoints resume at any rank count and strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name: dict[str, Any] = dict(get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    if not by_name.get("state"):
        return {}
    return _renamed(by_name, {name: i for i, name in enumerate(_param_names(model, optimizer))})


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The inverse of `optimizer_state`: every rank passes the whole state and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = _renamed(saved, dict(enumerate(_param_names(model, optimizer))))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name,
                             options=StateDictOptions(full_state_dict=True))


def _renamed(state_dict: dict[str, Any], key: dict[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with its parameters' keys mapped through `key` (names <-> numbers)."""
    return {"state": {key[k]: value for k, value in state_dict["state"].items()},
            "param_groups": [{**group, "params": [key[k] for k in group["params"]]}
                             for group in state_dict["param_groups"]]}
