"""A checkpoint's optimizer state in the format of the optimizer that resumes it.

One rank (and DDP) runs bitsandbytes' AdamW, FSDP2 runs torch's AdamW on its shards (devices.optimizer_for), and a
checkpoint resumes at any rank count and either strategy. The two hold the same AdamW moments under other names:
bitsandbytes' 32-bit `state1`/`state2` (wrapped in `__bnb_optimizer_quant_state__` by its state_dict) and an int
`step`; torch's `exp_avg`/`exp_avg_sq` and a tensor `step`. Same update rule (decoupled weight decay, bias
correction by step), so the conversion is exact. An 8-bit state (quantized moments) is refused with a message.
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune.errors import SpecError

BNB_WRAPPED = "__bnb_optimizer_quant_state__"


def saved_kind(saved: dict[str, Any]) -> str | None:
    """'bitsandbytes' or 'torch' by the moments a state dict holds; None when it holds none yet."""
    for entry in (saved.get("state") or {}).values():
        if BNB_WRAPPED in entry or "state1" in entry:
            return "bitsandbytes"
        if "exp_avg" in entry:
            return "torch"
    return None


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    return "bitsandbytes" if type(optimizer).__module__.startswith("bitsandbytes") else "torch"


def _groups(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The resuming optimizer's own group settings, with the saved learning rate and parameter numbers."""
    out = []
    for was, now in zip(saved, current, strict=True):
        group = {**now, "params": was["params"], "lr": was["lr"]}
        if "initial_lr" in was:
            group["initial_lr"] = was["initial_lr"]
        out.append(group)
    return out


def as_torch(saved: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state = {}
    for key, entry in saved["state"].items():
        inner = {**entry.get(BNB_WRAPPED, {}), **{k: v for k, v in entry.items() if k != BNB_WRAPPED}}
        if "absmax1" in inner or inner["state1"].dtype == torch.uint8:
            raise SpecError("spec.training.optimizer: a checkpoint of paged_adamw_8bit (quantized moments) cannot "
                            "resume under FSDP; use paged_adamw_32bit or adamw_torch with resources.strategy fsdp")
        state[key] = {"step": torch.tensor(float(inner["step"])), "exp_avg": inner["state1"],
                      "exp_avg_sq": inner["state2"]}
    return {"state": state, "param_groups": _groups(saved["param_groups"], groups)}


def as_bitsandbytes(saved: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state = {key: {"step": int(entry["step"]),
                   BNB_WRAPPED: {"state1": entry["exp_avg"], "state2": entry["exp_avg_sq"]}}
             for key, entry in saved["state"].items()}
    return {"state": state, "param_groups": _groups(saved["param_groups"], groups)}


def adapted(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`saved` (a one-rank `Optimizer.state_dict()`) in the format `optimizer` loads."""
    have, want = saved_kind(saved), optimizer_kind(optimizer)
    if have is None or have == want:
        return saved
    groups = optimizer.state_dict()["param_groups"]
    return as_torch(saved, groups) if want == "torch" else as_bitsandbytes(saved, groups)
