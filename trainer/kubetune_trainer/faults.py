"""Faults a test can inject into a real trainer process through its environment (the test kubelet adds the
variable to one pod), so the code under test takes its real failure path.

- `KUBETUNE_FAULT_OOM_AT_STEP=k`: optimizer step k (1-based) raises `torch.cuda.OutOfMemoryError` where a
  real allocation would fail, inside the step's forward pass, after steps 1..k-1 have trained and been
  checkpointed as usual. From there everything is the production path: the runner recognises the OOM,
  writes the termination summary and exits 3, and the operator escalates one GPU class up.
- `KUBETUNE_FAULT_KILL_AT_STEP=k`: the process SIGKILLs itself before optimizer step k's forward pass: a rank
  that dies without a word (a lost node, a segfault), after steps 1..k-1 and their checkpoints. Under torchrun
  its peers then fail at their next collective and the attempt fails.
"""

from __future__ import annotations

import os
import signal

OOM_AT_STEP = "KUBETUNE_FAULT_OOM_AT_STEP"
KILL_AT_STEP = "KUBETUNE_FAULT_KILL_AT_STEP"


def fault_step(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        step = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a step number >= 1") from None
    if step < 1:
        raise ValueError(f"{name}={value!r}: expected a step number >= 1")
    return step


def oom_step() -> int | None:
    return fault_step(OOM_AT_STEP)


def before_forward(step: int) -> None:
    """Called before each micro-batch's forward pass of optimizer step `step` (1-based)."""
    if fault_step(KILL_AT_STEP) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if oom_step() == step:
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {OOM_AT_STEP}={step})")
