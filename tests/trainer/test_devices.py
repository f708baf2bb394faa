"""The trainer's GPU-vs-CPU decisions (kubetune_trainer/devices.py), table-tested; the CUDA calls that apply them run
in tests/trainer/test_gpu.py and bench/gpu_check.py where a GPU is."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from kubetune_trainer.devices import (
    driver_version,
    gpu_memory_calls,
    is_gpu_oom_message,
    memory_fraction,
    minimum_driver,
    no_cuda_message,
    optimizer_for,
    rank_rng,
    required_device,
    strategy_of,
)

from kubetune.errors import SpecError

# --- bug 1: which optimizer a run gets ------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "name", "library", "cls", "noted"), [
    ("single", "paged_adamw_32bit", "bitsandbytes", "PagedAdamW32bit", False),
    ("ddp", "paged_adamw_32bit", "bitsandbytes", "PagedAdamW32bit", False),
    ("split", "paged_adamw_8bit", "bitsandbytes", "PagedAdamW8bit", False),
    ("fsdp", "paged_adamw_32bit", "torch", "AdamW", True),  # DTensor shards: bnb has no sharding strategy
    ("fsdp", "paged_adamw_8bit", "torch", "AdamW", True),
    ("fsdp", "adamw_torch", "torch", "AdamW", False),
    ("single", "adamw_torch", "torch", "AdamW", False),
])
def test_optimizer_for(strategy: Any, name: str, library: str, cls: str, noted: bool) -> None:
    choice = optimizer_for(strategy, name)
    assert (choice.library, choice.cls, choice.note is not None) == (library, cls, noted)
    if noted:
        assert name in (choice.note or "") and "DTensor" in (choice.note or "")


def test_optimizer_for_unknown_name_is_named() -> None:
    with pytest.raises(SpecError, match=r"spec.training.optimizer: 'sgd' is not one of adamw_torch, paged_adamw_32bit"):
        optimizer_for("single", "sgd")


@pytest.mark.parametrize(("sharded", "distributed", "gpus", "expected"), [
    (True, True, 1, "fsdp"), (False, True, 1, "ddp"), (False, False, 2, "split"), (False, False, 1, "single")])
def test_strategy_of(sharded: bool, distributed: bool, gpus: int, expected: str) -> None:
    assert strategy_of(sharded, distributed, gpus) == expected


# --- bug 5: which RNG state a rank restores ---------------------------------------------------------------------

def state(tag: int, cuda: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"python": (3, (tag,), None), "torch": torch.tensor([tag], dtype=torch.uint8)}
    if cuda:
        out["cuda"] = torch.tensor([100 + tag], dtype=torch.uint8)
    return out


def tags(picked: dict[str, Any]) -> tuple[int, int | None]:
    return int(picked["torch"][0]), int(picked["cuda"][0]) if "cuda" in picked else None


@pytest.mark.parametrize(("saved", "rank", "expected"), [
    # every rank's own state (the current format), whatever the number of GPUs the pod sees
    ({"ranks": [state(0), state(1)]}, 0, (0, 100)),
    ({"ranks": [state(0), state(1)]}, 1, (1, 101)),  # before: rank 1 restored rank 0's copy of device 1
    ({"ranks": [state(0), state(1)]}, 3, (0, 100)),  # more ranks now: rank 0's streams
    ({"ranks": [state(0, cuda=False)]}, 0, (0, None)),  # a CPU run's checkpoint
    # the old format: rank 0's state, `cuda` one per GPU visible to rank 0 (it drew only from the first)
    ({**state(0, cuda=False), "cuda": [torch.tensor([100], dtype=torch.uint8),
                                       torch.tensor([101], dtype=torch.uint8)]}, 0, (0, 100)),
    ({**state(0, cuda=False), "cuda": [torch.tensor([100], dtype=torch.uint8)] * 8}, 1, (0, 100)),
    ({**state(0, cuda=False), "cuda": []}, 0, (0, None)),
    (state(0, cuda=False), 0, (0, None)),
])
def test_rank_rng(saved: dict[str, Any], rank: int, expected: tuple[int, int | None]) -> None:
    assert tags(rank_rng(saved, rank)) == expected


def test_rank_rng_state_is_one_tensor_not_one_per_visible_gpu() -> None:
    """What a rank restores on its GPU is one state (torch.cuda.set_rng_state), never a list indexed by the GPUs
    the saving pod saw (set_rng_state_all: IndexError on a pod that sees fewer)."""
    old = {**state(0, cuda=False), "cuda": [torch.tensor([100 + i], dtype=torch.uint8) for i in range(4)]}
    assert isinstance(rank_rng(old, 0)["cuda"], torch.Tensor)


# --- bug 6: the CUDA memory setup of a rank, in order ----------------------------------------------------------

@pytest.mark.parametrize(("index", "fraction", "expected"), [
    (0, None, [("set_device", (0,)), ("reset_peak_memory_stats", (0,))]),
    (3, None, [("set_device", (3,)), ("reset_peak_memory_stats", (3,))]),
    (1, 0.25, [("set_device", (1,)), ("reset_peak_memory_stats", (1,)),
               ("set_per_process_memory_fraction", (0.25, 1))]),
])
def test_gpu_memory_calls_select_the_rank_gpu_first_and_name_it(index: int, fraction: float | None,
                                                               expected: list[tuple[str, tuple[Any, ...]]]) -> None:
    calls = gpu_memory_calls(index, fraction)
    assert calls == expected
    assert calls[0][0] == "set_device"
    assert all(index in args for _, args in calls)  # every call names the rank's GPU, never the current one
    assert all(hasattr(torch.cuda, name) for name, _ in calls)  # real torch.cuda functions


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("", None), ("0.5", 0.5), ("1", 1.0)])
def test_memory_fraction(raw: str | None, expected: float | None) -> None:
    assert memory_fraction(raw) == expected


@pytest.mark.parametrize("raw", ["0", "1.5", "-1", "half"])
def test_bad_memory_fraction_is_named(raw: str) -> None:
    with pytest.raises(SpecError, match=r"KUBETUNE_GPU_MEMORY_FRACTION=.*must be a number in \(0, 1\]"):
        memory_fraction(raw)


# --- bug 3: a GPU plan never trains on the CPU ------------------------------------------------------------------

@pytest.mark.parametrize(("planned", "requested", "expected"), [
    ("cuda", "auto", "cuda"), (None, "auto", "auto"), ("cuda", "cpu", "cpu"), ("cpu", "auto", "cpu"),
    (None, "cuda", "cuda")])
def test_required_device(planned: str | None, requested: str, expected: str) -> None:
    assert required_device(planned, requested) == expected


@pytest.mark.parametrize(("cuda", "expected"), [
    ("13.0", "580.65.06"), ("13.2", "580.65.06"), ("12.8", "570.26"), ("12.4", "550.54.14"), (None, None),
    ("9.0", None)])
def test_minimum_driver(cuda: str | None, expected: str | None) -> None:
    assert minimum_driver(cuda) == expected


PROC = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
PROC_OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder@U16)\n"


@pytest.mark.parametrize(("proc", "smi", "expected"), [
    (PROC, None, "535.104.05"), (PROC_OPEN, None, "580.95.05"), (None, "570.86.15\n", "570.86.15"),
    (None, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", None),
    (None, None, None), ("", "", None)])
def test_driver_version(proc: str | None, smi: str | None, expected: str | None) -> None:
    assert driver_version(proc, smi) == expected


def test_no_cuda_message_names_cuda_the_driver_found_and_the_one_needed() -> None:
    text = no_cuda_message("A100-80GB", "2.13.0", "13.0", "535.104.05", 1, "The NVIDIA driver on your system is "
                           "too old (found version 12020)")
    assert "on A100-80GB" in text and "CUDA 13.0" in text and ">= 580.65.06" in text
    assert "found driver 535.104.05" in text and "too old" in text and "Update the node's NVIDIA driver" in text
    none = no_cuda_message(None, "2.13.0", "13.0", None, 0)
    assert "driver: none" in none and "no GPU visible" in none and "nvidia.com/gpu" in none
    cpu_build = no_cuda_message("L4", "2.13.0", None, None, 0)
    assert "CPU build" in cpu_build


@pytest.mark.parametrize(("message", "oom"), [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`", False),
    ("host out of memory", False),
])
def test_is_gpu_oom_message(message: str, oom: bool) -> None:
    assert is_gpu_oom_message(message) is oom
