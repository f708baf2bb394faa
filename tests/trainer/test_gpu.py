"""GPU-only checks: real NF4 memory against the planner's estimate, and exit code 3 when the GPU runs out of
memory. They skip cleanly without CUDA (the CPU suite covers everything else)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")]

SMOLLM = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "source": "bundled://smollm2-135m-instruct"}
ROOT = Path(__file__).resolve().parents[2]


def test_nf4_weights_and_peak_match_the_estimate(tmp_path: Path, smollm_dir: Path) -> None:
    from kubetune_trainer.model import load_model

    from kubetune.planning.models import catalog_lookup
    from kubetune.planning.vram import TrainingShape, estimate
    from kubetune.spec import parse_spec

    spec = parse_spec({"model": SMOLLM, "dataset": {"source": "x.jsonl"}, "output": {"uri": str(tmp_path)},
                       "lora": {"r": 16}})
    device = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_model(spec, device, torch.bfloat16, gradient_checkpointing=True)
    weights = torch.cuda.memory_allocated() - before
    arch = catalog_lookup("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert arch is not None
    shape = TrainingShape(micro_batch=4, seq_len=512, gradient_checkpointing=True, lora_r=16)
    est = estimate(arch, shape)
    expected = est.parts["base_weights"] + est.parts["quant_constants"] + est.parts["lora_weights"]
    assert 0.7 * expected <= weights <= 1.3 * expected, (weights, expected)
    assert any(p.__class__.__name__ == "Params4bit" for p in loaded.model.parameters())

    model = loaded.model
    model.train()
    ids = torch.randint(0, 49152, (4, 512), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = torch.cuda.max_memory_allocated()
    assert peak <= est.total, f"peak {peak / 2**20:.0f} MiB above the estimate {est.total / 2**20:.0f} MiB"


def test_out_of_gpu_memory_exits_3(tmp_path: Path, write_config: Callable[..., Path], start_trainer: Any) -> None:
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "lorem ipsum dolor sit amet " * 700}) + "\n" for _ in range(32)))
    spec = {"model": SMOLLM, "dataset": {"source": str(data), "format": "text"}, "method": "qlora",
            "training": {"maxSteps": 2, "microBatchSize": 16, "gradientAccumulationSteps": 1,
                         "maxSeqLength": 4096, "gradientCheckpointing": False},
            "output": {"uri": str(tmp_path / "out")}}
    proc = start_trainer(write_config(spec, name="oom", estimate=2 * 2**30),
                         env={"KUBETUNE_GPU_MEMORY_FRACTION": str(round(2 * 2**30 / torch.cuda.mem_get_info()[1], 4))})
    assert proc.wait(timeout=600) == 3, proc.log[-3000:]
    summary = proc.summary()
    assert summary["outcome"] == "OutOfMemory"
    assert "out of GPU memory" in summary["error"] and "planner estimate 2.00 GiB" in summary["error"]
    assert summary["peakMemoryBytes"] > 0


# --- issue 16: the CUDA side of the six bugs (their decisions are table-tested in test_devices.py) -------------

def test_answer_with_the_untied_input_table_in_host_memory(tmp_path: Path, tiny_untied_model_dir: Path) -> None:
    """Bug 2: generate's inputs go where the embedding's output lands, not to the host table's device."""
    from kubetune_trainer.memory import input_device
    from kubetune_trainer.model import answer, load_model

    from kubetune.spec import parse_spec

    spec = parse_spec({"model": {"source": str(tiny_untied_model_dir)}, "dataset": {"source": "x.jsonl"},
                       "output": {"uri": str(tmp_path)}})
    loaded = load_model(spec, torch.device("cuda", 0), torch.bfloat16, gradient_checkpointing=False,
                        model_dir=tiny_untied_model_dir)
    assert loaded.model.get_input_embeddings().weight.device.type == "cpu"
    assert input_device(loaded.model) == torch.device("cuda", 0)
    assert isinstance(answer(loaded.model, loaded.tokenizer, "Hello", max_new_tokens=4, dtype=torch.bfloat16), str)


def test_paged_optimizer_state_resumes_as_paged_memory(tmp_path: Path) -> None:
    """Bug 4: states of >= 1e5 elements are paged; saved, loaded onto the GPU and repaged, the optimizer steps on."""
    import bitsandbytes as bnb
    from kubetune_trainer.loop import repage

    param = torch.nn.Parameter(torch.randn(1024, 256, device="cuda"))
    optimizer = bnb.optim.PagedAdamW32bit([param], lr=1e-3)
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert getattr(optimizer.state[param]["state1"], "is_paged", False)
    torch.save(optimizer.state_dict(), tmp_path / "state.pt")
    resumed = bnb.optim.PagedAdamW32bit([param], lr=1e-3)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", map_location="cuda", weights_only=True))
    assert repage(resumed) == 2
    assert resumed.state[param]["state1"].is_paged and resumed.page_mng.paged_tensors
    resumed.step()
    torch.cuda.synchronize()


def test_cuda_rng_restores_on_a_pod_that_sees_fewer_gpus() -> None:
    """Bug 5: an old checkpoint's one-state-per-visible-GPU list restores (no IndexError) and repeats the stream."""
    from kubetune_trainer.loop import rng_state, set_rng_state

    device = torch.device("cuda", torch.cuda.current_device())
    saved = rng_state(device)
    first = torch.rand(16, device=device)
    set_rng_state({"python": saved["python"], "torch": saved["torch"],
                   "cuda": [saved["cuda"]] * (torch.cuda.device_count() + 3)}, 0, device)
    assert torch.equal(torch.rand(16, device=device), first)
    set_rng_state({"ranks": [saved]}, 0, device)
    assert torch.equal(torch.rand(16, device=device), first)


def test_memory_setup_selects_the_rank_gpu_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug 6: the rank's GPU becomes current before its peak is reset and its share capped."""
    from kubetune_trainer.runner import setup_gpu_memory

    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("KUBETUNE_GPU_MEMORY_FRACTION", "0.95")
    try:
        setup_gpu_memory(torch.device("cuda", last))
        assert torch.cuda.current_device() == last
        assert torch.cuda.max_memory_allocated(last) == torch.cuda.memory_allocated(last)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, last)
        torch.cuda.set_device(0)
