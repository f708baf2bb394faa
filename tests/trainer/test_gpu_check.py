"""`bench/gpu_check.py --dry-run`: the GPU check's every row, on the CPU with a tiny config, so it cannot rot before a
GPU runs it (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ROWS = ["1B qlora 128 tokens", "1B lora 128 tokens", "8B qlora 128 tokens", "8B lora 128 tokens",
        "seed recipe (TRL + PEFT) 8B qlora", "bug 1: FSDP2", "bug 2: answer()", "bug 3: GPU plan, CUDA hidden",
        "bug 4: paged r=128", "bug 5: CUDA RNG", "Liger loss on vs off", "bug 6: memory setup"]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_row(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--work",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| row |"):]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    for row in ROWS:
        found = [line for name, line in lines.items() if name.startswith(row)]
        assert found, f"no row {row!r} in\n{table}"
        assert " | ok | " in found[0] or " | skipped | " in found[0], found[0]
    assert "torch.optim.adamw.AdamW" in lines["bug 1: FSDP2, one rank, default optimizer, 3 steps"]
    assert "exit 5" in lines["bug 3: GPU plan, CUDA hidden: exit 5"]
    assert "resumed from step 2" in lines["bug 4: paged r=128 killed after a checkpoint, resumed"]
    assert "needs CUDA" in lines["Liger loss on vs off"]
