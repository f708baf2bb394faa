"""What autograd keeps for backward, measured on its own saved tensors (not estimated)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_bytes(model: Any, forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves during `forward()`, the model's own parameters excluded
    (they live anyway). A storage saved by several ops counts once, at its largest size."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())
