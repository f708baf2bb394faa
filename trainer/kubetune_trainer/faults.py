"""Faults a test can inject into a real trainer process through its environment (the test kubelet adds the
variable to one pod), so the code under test takes its real failure path.

- `KUBETUNE_FAULT_OOM_AT_STEP=k`: optimizer step k (1-based) raises `torch.cuda.OutOfMemoryError` where a
  real allocation would fail, inside the step's forward pass, after steps 1..k-1 have trained and been
  checkpointed as usual. From there everything is the production path: the runner recognises the OOM,
  writes the termination summary and exits 3, and the operator escalates one GPU class up.
"""

from __future__ import annotations

import os

OOM_AT_STEP = "KUBETUNE_FAULT_OOM_AT_STEP"


def oom_step() -> int | None:
    value = os.environ.get(OOM_AT_STEP, "").strip()
    if not value:
        return None
    try:
        step = int(value)
    except ValueError:
        raise ValueError(f"{OOM_AT_STEP}={value!r}: expected a step number >= 1") from None
    if step < 1:
        raise ValueError(f"{OOM_AT_STEP}={value!r}: expected a step number >= 1")
    return step


def before_forward(step: int) -> None:
    """Called before each micro-batch's forward pass of optimizer step `step` (1-based)."""
    if oom_step() == step:
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {OOM_AT_STEP}={step})")
