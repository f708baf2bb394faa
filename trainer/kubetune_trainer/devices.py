"""Where a GPU run and a CPU run of the trainer differ, as pure decisions (no torch import, no CUDA call).

Each decision is table-tested on the CPU (tests/trainer/test_devices.py); the few lines that apply it sit beside
their callers (loop.py, runner.py, memory.py, model.py) and the GPU tests (tests/trainer/test_gpu.py,
`bench/gpu_check.py`) run them where CUDA is.

- `optimizer_for`: which optimizer a run gets. bitsandbytes' AdamW runs on a CPU too (its paging falls back to
  ordinary memory there), so a CPU run takes the GPU's optimizer; FSDP2 hands the optimizer DTensor shards, for
  which bitsandbytes 0.50 registers no sharding strategy (`NotImplementedError` on the first step), so a sharded
  run gets torch's AdamW, whose foreach path is DTensor-aware.
- `rank_rng`: which saved RNG state a rank restores: its own (every rank's is saved), never rank 0's copy of
  another device; a checkpoint of the old format (one state per *visible* GPU, written by rank 0) gives only its
  first GPU state, so a pod that sees fewer GPUs resumes instead of failing with IndexError.
- `gpu_memory_calls`: the CUDA memory setup of a rank, in order: select the rank's GPU first, then reset the
  peak and cap the fraction *of that GPU* (each call names the device).
- `required_device`, `minimum_driver`, `no_cuda_message`: a GPU-planned trainer never trains on the CPU.
- `is_gpu_oom_message`: the messages that mean the GPU ran out of memory (CUDA's and cuBLAS's).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubetune.errors import SpecError

Strategy = Literal["single", "ddp", "fsdp", "split"]

# the spec's optimizer names -> (bitsandbytes class, paged); adamw_torch is torch's own
BNB_OPTIMIZERS = {"paged_adamw_32bit": "PagedAdamW32bit", "paged_adamw_8bit": "PagedAdamW8bit"}


@dataclass(frozen=True)
class OptimizerChoice:
    """`library` 'bitsandbytes' or 'torch', `cls` the class name in `library.optim`; `note` says why, when the
    run does not get the optimizer the spec names."""

    library: Literal["bitsandbytes", "torch"]
    cls: str
    note: str | None = None


def optimizer_for(strategy: Strategy, name: str) -> OptimizerChoice:
    """The optimizer a run of `strategy` gets for the spec's `training.optimizer` `name`, on a GPU or a CPU alike."""
    if name == "adamw_torch":
        return OptimizerChoice("torch", "AdamW")
    if name not in BNB_OPTIMIZERS:
        raise SpecError(f"spec.training.optimizer: {name!r} is not one of adamw_torch, "
                        + ", ".join(sorted(BNB_OPTIMIZERS)))
    if strategy == "fsdp":
        return OptimizerChoice("torch", "AdamW", note=(
            f"{name}: bitsandbytes' optimizers cannot update FSDP2's sharded (DTensor) parameters; each rank runs "
            "torch.optim.AdamW on its shards (fp32 states, already 1/N per rank)"))
    return OptimizerChoice("bitsandbytes", BNB_OPTIMIZERS[name])


def strategy_of(sharded: bool, distributed: bool, gpu_count: int) -> Strategy:
    if sharded:
        return "fsdp"
    if distributed:
        return "ddp"
    return "split" if gpu_count > 1 else "single"


# --- RNG per rank ------------------------------------------------------------------------------------------

def rank_rng(saved: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """The RNG state rank `rank` restores from a checkpoint's `rng` entry: {'python', 'torch', 'cuda'?}.

    Current format {'ranks': [state of rank 0, rank 1, ...]}: rank r takes its own; a rank the saving run did not
    have (more ranks now) takes rank 0's. Old format (rank 0's python/torch state and `cuda`, one state per GPU
    visible to rank 0): rank 0 only ever drew from the first visible GPU, so that one state is the one to restore,
    whatever the number of GPUs this pod sees."""
    if "ranks" in saved:
        states = list(saved["ranks"])
        if not states:
            raise ValueError("a checkpoint's rng has an empty 'ranks' list")
        return dict(states[rank] if rank < len(states) else states[0])
    state = {"python": saved["python"], "torch": saved["torch"]}
    cuda = saved.get("cuda")
    if cuda is not None and len(cuda) > 0:
        state["cuda"] = cuda[0]
    return state


# --- the CUDA memory setup of a rank ---------------------------------------------------------------------------

FRACTION_ENV = "KUBETUNE_GPU_MEMORY_FRACTION"


def memory_fraction(raw: str | None) -> float | None:
    """KUBETUNE_GPU_MEMORY_FRACTION: behave like a smaller card on a big one (tests, dry runs); None when unset."""
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise SpecError(f"environment {FRACTION_ENV}={raw!r}: must be a number in (0, 1], the share of the GPU's "
                        "memory this process may use")
    return value


def gpu_memory_calls(device_index: int, fraction: float | None) -> list[tuple[str, tuple[Any, ...]]]:
    """The `torch.cuda` calls that set up a rank's memory accounting, in order, each naming the rank's GPU:
    ranks >= 1 must cap and measure their own GPU, not cuda:0 (the current device until set_device)."""
    calls: list[tuple[str, tuple[Any, ...]]] = [("set_device", (device_index,)),
                                                ("reset_peak_memory_stats", (device_index,))]
    if fraction is not None:
        calls.append(("set_per_process_memory_fraction", (fraction, device_index)))
    return calls


# --- a GPU-planned trainer never trains on the CPU -----------------------------------------------------------

def required_device(planned: str | None, requested: str) -> str:
    """The device to ask `pick_device` for: an explicit --device cpu/cuda wins; 'auto' takes the plan's device
    (the operator writes 'cuda' for a GPU plan, so no usable CUDA is an error, not a silent CPU run)."""
    if requested != "auto":
        return requested
    return planned or "auto"


# the minimum Linux driver of each CUDA major.minor (NVIDIA's CUDA Toolkit release notes, table 3)
MINIMUM_DRIVER = {"13.0": "580.65.06", "12.9": "575.51.03", "12.8": "570.26", "12.6": "560.28.03",
                  "12.4": "550.54.14", "12.1": "530.30.02", "11.8": "520.61.05"}


def minimum_driver(cuda: str | None) -> str | None:
    """The minimum NVIDIA Linux driver for torch's CUDA build `cuda` ('13.0'); None for a CPU build or unknown."""
    if not cuda:
        return None
    match = re.match(r"(\d+)\.(\d+)", cuda)
    if not match:
        return None
    key = f"{match.group(1)}.{match.group(2)}"
    if key in MINIMUM_DRIVER:
        return MINIMUM_DRIVER[key]
    major = [v for k, v in MINIMUM_DRIVER.items() if k.split(".")[0] == match.group(1)]  # minor-version compatible
    return min(major, key=lambda v: tuple(int(x) for x in v.split("."))) if major else None


def driver_version(proc_version: str | None, smi_output: str | None) -> str | None:
    """The NVIDIA driver version from /proc/driver/nvidia/version or `nvidia-smi --query-gpu=driver_version`."""
    if proc_version:
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc_version)
        if match:
            return match.group(1)
    if smi_output:
        line = smi_output.strip().splitlines()[0].strip() if smi_output.strip() else ""
        if re.fullmatch(r"\d+\.\d+(?:\.\d+)?", line):
            return line
    return None


def no_cuda_message(gpu_class: str | None, torch_version: str, torch_cuda: str | None, driver: str | None,
                    devices: int, error: str | None = None) -> str:
    """Why a GPU-planned trainer stops: what torch needs, what the node has, what to do."""
    planned = f"on {gpu_class}" if gpu_class else "on a GPU"
    if not torch_cuda:
        need = f"torch {torch_version} is a CPU build (no CUDA): use the kubetune trainer image"
    else:
        floor = minimum_driver(torch_cuda)
        need = (f"torch {torch_version} is built for CUDA {torch_cuda}, which needs an NVIDIA driver >= "
                f"{floor or '?'}")
    found = f"driver {driver}" if driver else "driver: none (no /proc/driver/nvidia/version, no nvidia-smi)"
    seen = f"{devices} GPU(s) visible" if devices else "no GPU visible to the container"
    detail = f" ({error})" if error else ""
    return (f"the plan runs this job {planned}, but CUDA is not usable here{detail}: {need}; found {found}, "
            f"{seen}. Update the node's NVIDIA driver (or run on nodes whose driver is new enough), and check that "
            "the NVIDIA device plugin gives the pod its GPU (resources.limits nvidia.com/gpu)")


# --- out of memory --------------------------------------------------------------------------------------------

OOM_MARKERS = ("cublas_status_alloc_failed", "cudnn_status_alloc_failed", "cusolver_status_alloc_failed",
               "cusparse_status_alloc_failed", "cufft_alloc_failed")


def is_gpu_oom_message(message: str) -> bool:
    """Whether an exception's text says a GPU allocation failed: the caching allocator's OutOfMemoryError text,
    a raw CUDA error, or a library's allocation failure (cuBLAS creating its workspace or handle)."""
    text = message.lower()
    return ("out of memory" in text and "cuda" in text) or any(marker in text for marker in OOM_MARKERS)
