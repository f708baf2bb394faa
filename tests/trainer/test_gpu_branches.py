"""The GPU's branches of the trainer, taken on the CPU wherever the library runs there (issue 16).

- bug 1: FSDP2 over gloo on one rank with the optimizer a GPU run gets: bitsandbytes' AdamW has no sharding
  strategy for DTensors (NotImplementedError on the first step), so a sharded run must get torch's AdamW;
- bug 2: with the input table in host memory, transformers' `generate` places every input on `model.device`
  (the first parameter): that must not be the host table;
- bug 3: a GPU-planned trainer without usable CUDA exits 5 at once, naming CUDA and the driver;
- bug 4: a resumed bitsandbytes optimizer whose saved states carry the `is_paged` flag of a GPU run;
- a CPU run takes the GPU's optimizer (bitsandbytes' AdamW runs on the CPU), and cuBLAS's allocation failure
  is out of memory (exit 3).
Bugs 5 and 6 are pure decisions: tests/trainer/test_devices.py; the CUDA side of all six: tests/trainer/test_gpu.py
and `bench/gpu_check.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.planning.plan import Knobs
from kubetune.spec import parse_spec

from .conftest import free_port, run_one_rank


def trainer_config(spec: dict[str, Any], **extra: Any) -> Any:
    from kubetune.trainer_config import JobRef, TrainerConfig

    parsed = parse_spec(spec)
    t = parsed.training
    knobs = Knobs(micro_batch_size=t.micro_batch_size if isinstance(t.micro_batch_size, int) else 1,
                  gradient_accumulation_steps=t.gradient_accumulation_steps,
                  gradient_checkpointing=t.gradient_checkpointing is True, max_seq_length=t.max_seq_length)
    return TrainerConfig(job=JobRef(name="gpu-branch"), spec=parsed, knobs=knobs, **extra)


@pytest.fixture
def one_rank_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A real one-rank gloo process group in this process (what torchrun gives a rank)."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- bug 1: FSDP2 + the default optimizer --------------------------------------------------------------------

@pytest.mark.parametrize("planned", ["cuda"])  # the decision no longer depends on the device
def test_fsdp_takes_optimizer_steps_with_the_optimizer_its_device_gets(
        planned: str, one_rank_group: None, tiny_model_dir: Path, chat_file: Path, tmp_path: Path,
        spec_for: Callable[..., dict[str, Any]]) -> None:
    """`make_optimizer` as the recipe calls it for a GPU plan ('cuda': bitsandbytes' paged AdamW before the fix)
    and a CPU one, over FSDP2's DTensor shards (fully_shard on a gloo mesh), then three real optimizer steps."""
    from kubetune_trainer import fsdp
    from kubetune_trainer.data import IGNORE
    from kubetune_trainer.loop import make_optimizer
    from kubetune_trainer.loss import CausalLMLoss
    from kubetune_trainer.model import load_model, mixed_precision
    from kubetune_trainer.progress import Log
    from torch.distributed.tensor import DTensor

    config = trainer_config({**spec_for(tiny_model_dir, chat_file, str(tmp_path)), "resources": {"strategy": "fsdp"}})
    cpu, dtype = torch.device("cpu"), torch.float32
    loaded = load_model(config.spec, cpu, dtype, False, model_dir=tiny_model_dir, sharded=True)
    module = CausalLMLoss(loaded.model, IGNORE)
    fsdp.shard(module, fsdp.units(loaded.model.get_base_model()), cpu, 1)
    params = [p for p in module.parameters() if p.requires_grad]
    assert params and all(isinstance(p, DTensor) for p in params)
    optimizer = make_optimizer(params, config, torch.device(planned, 0) if planned == "cuda" else cpu, Log())
    before = [p.full_tensor().clone() for p in params]
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, 24))
    for _ in range(3):
        with mixed_precision("cpu", dtype):
            loss = module(input_ids=ids, position_ids=torch.arange(24)[None], targets=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p.full_tensor()) for b, p in zip(before, params, strict=True))


def test_a_cpu_run_gets_the_optimizer_a_gpu_run_gets(tiny_model_dir: Path, chat_file: Path, tmp_path: Path,
                                                     spec_for: Callable[..., dict[str, Any]]) -> None:
    """bitsandbytes' AdamW runs on the CPU (paging falls back to ordinary memory), so a CPU run takes it too."""
    import bitsandbytes as bnb
    from kubetune_trainer.loop import make_optimizer
    from kubetune_trainer.progress import Log

    param = torch.nn.Parameter(torch.zeros(4))
    for name, cls in (("paged_adamw_32bit", bnb.optim.PagedAdamW32bit), ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit)):
        spec = spec_for(tiny_model_dir, chat_file, str(tmp_path))
        spec["training"]["optimizer"] = name
        optimizer = make_optimizer([param], trainer_config(spec), torch.device("cpu"), Log())
        assert type(optimizer) is cls, name


# --- bug 4: a resumed paged optimizer state ------------------------------------------------------------------

def flag_paged(value: Any) -> int:
    """Mark every floating state tensor as bitsandbytes marks its paged buffers on a GPU (get_paged)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dim() >= 1:
            value.is_paged = True  # type: ignore[attr-defined]
            value.page_deviceid = 0  # type: ignore[attr-defined]
            return 1
        return 0
    if isinstance(value, dict):
        return sum(flag_paged(v) for v in value.values())
    return 0


def flagged(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(getattr(value, "is_paged", False))
    return sum(flagged(v) for v in value.values()) if isinstance(value, dict) else 0


def test_resume_of_paged_optimizer_states_steps_on(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                   spec_for: Callable[..., dict[str, Any]],
                                                   write_config: Callable[..., Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stops after its step-2 checkpoint; the checkpoint's optimizer states get the `is_paged` flags a GPU
    run's paged buffers carry (torch.save keeps them); the resumed run must not prefetch them as paged memory
    (on a CPU bitsandbytes raises 'cprefetch not available', on a GPU cudaMemPrefetchAsync aborts)."""
    out = tmp_path / "out"
    config = write_config(spec_for(tiny_model_dir, chat_file, str(out), maxSteps=4, checkpointSteps=2,
                                   microBatchSize=1, gradientAccumulationSteps=1))
    monkeypatch.setenv("KUBETUNE_FAULT_OOM_AT_STEP", "3")
    assert run_one_rank(config, tmp_path / "first.json") == 3
    monkeypatch.delenv("KUBETUNE_FAULT_OOM_AT_STEP")
    path = out / "checkpoints" / "step-00000002" / "trainer_state.pt"
    saved = torch.load(path, weights_only=True)
    assert flag_paged(saved["optimizer"]["state"]) >= 2
    torch.save(saved, path)
    assert flagged(torch.load(path, weights_only=True)["optimizer"]["state"]) >= 2  # torch.save/load keep the flag
    termination = tmp_path / "resumed.json"
    code = run_one_rank(config, termination)
    summary = json.loads(termination.read_text())
    assert code == 0, summary["error"]
    assert summary["steps"] == 4 and summary["resumedFromStep"] == 2


# --- bug 2: generate's device with the input table in host memory --------------------------------------------

def test_host_input_table_is_not_the_parameter_generate_places_inputs_by(tiny_untied_model_dir: Path) -> None:
    """transformers' generate moves every input to `model.device`, the first parameter. With the untied input table
    kept in host memory for a GPU run (memory.host_input_embeddings, decided and applied without a CUDA call),
    that parameter must be one that lives on the GPU, not the table."""
    from kubetune_trainer.memory import host_input_embeddings, input_device
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_untied_model_dir), dtype=torch.bfloat16)
    gpu = torch.device("cuda", 0)
    assert host_input_embeddings(model, gpu)
    table = model.get_input_embeddings().weight
    assert table.device.type == "cpu"
    assert next(model.parameters()) is not table, "generate would place its inputs on the host table's device"
    assert all(p is not table for p in model.parameters())
    assert input_device(model) == gpu
    assert "model.embed_tokens.weight" in model.state_dict()


# --- bug 3: a GPU plan never trains on the CPU ---------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without usable CUDA")
def test_gpu_planned_trainer_without_cuda_exits_5_naming_cuda_and_the_driver(
        tmp_path: Path, tiny_model_dir: Path, chat_file: Path, spec_for: Callable[..., dict[str, Any]],
        capfd: pytest.CaptureFixture[str]) -> None:
    from kubetune.contracts import ExitCode

    config = trainer_config(spec_for(tiny_model_dir, chat_file, str(tmp_path / "out")), gpu_class="L4",
                            device="cuda")
    path = tmp_path / "job.json"
    path.write_text(config.model_dump_json(by_alias=True))
    termination = tmp_path / "summary.json"
    started = time.monotonic()
    assert run_one_rank(path, termination, device="auto") == ExitCode.NO_GPU == 5
    assert time.monotonic() - started < 30  # at once: no model loaded, no data read
    summary = json.loads(termination.read_text())
    assert summary["outcome"] == "GpuUnavailable" and summary["steps"] == 0
    error = summary["error"]
    assert "on L4" in error and "CUDA" in error and "driver" in error, error
    assert "driver: none" in error or "found driver " in error, error
    assert not (tmp_path / "out").exists()
    assert '"event": "model"' not in capfd.readouterr().err


# --- out of memory: cuBLAS's allocation failure ---------------------------------------------------------------

@pytest.mark.parametrize(("message", "oom"), [
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("CUDA error: out of memory", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("CUDA error: an illegal memory access was encountered", False),
    ("out of memory while reading the dataset", False),
])
def test_is_oom_knows_the_cuda_libraries_allocation_failures(message: str, oom: bool) -> None:
    from kubetune_trainer.runner import is_oom

    assert is_oom(RuntimeError(message)) is oom


def test_kubetune_device_sets_the_default_device_and_a_bad_value_is_named(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """KUBETUNE_DEVICE=cpu runs a GPU-planned config on the CPU on purpose (the e2e tests' 'image' does)."""
    from kubetune_trainer.__main__ import build_parser, main

    monkeypatch.setenv("KUBETUNE_DEVICE", "cpu")
    assert build_parser().parse_args([]).device == "cpu"
    monkeypatch.setenv("KUBETUNE_DEVICE", "tpu")
    assert main(["--config", str(tmp_path / "job.json"), "--termination-log", str(tmp_path / "t.json")]) == 2
    assert "KUBETUNE_DEVICE='tpu': must be one of auto, cpu, cuda" in capsys.readouterr().err
