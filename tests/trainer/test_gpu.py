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
