"""Trainer scaling: tokens/s of the same job on 1 rank and on N ranks (DDP and FSDP), side by side, one run.

    .venv/bin/python bench/trainer_scaling.py [--ranks 2] [--steps 4] [--micro-batch 2] [--accumulation 4]
                                              [--repeats 2] [--device cpu|cuda] [--strategies ddp,fsdp]

The job: the bundled SmolLM2-135M-Instruct, QLoRA (NF4, double quantization, bf16 compute), LoRA r=16 on
every linear, the 96 mixed-length chat rows of bench/trainer_throughput.py, maxSeqLength 512, the same
optimizer steps (micro-batch x accumulation rows each) for every variant. N ranks run under torchrun
(kubetune_trainer.launch, gloo on the CPU, NCCL on GPUs) and divide each step's micro-batches between them;
under FSDP they also shard the model (kubetune_trainer.fsdp) and all-gather each layer's weights as it runs.

On the CPU the ranks share the machine's cores: 1 rank uses all of them, N ranks use cores/N threads each,
so the ratio shows what data parallelism costs or gains at equal hardware (on GPUs each rank adds a GPU).
Tokens/s counts real tokens over the training loop (rank 0's clock, loading excluded), read from the
adapter manifest. Variants run interleaved, `--repeats` times; the fastest run of each counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from trainer_throughput import SMOLLM, mixed_rows  # noqa: E402


def job_config(folder: Path, rows_file: Path, args: argparse.Namespace, name: str, strategy: str) -> Path:
    from kubetune.planning.plan import Knobs
    from kubetune.spec import parse_spec
    from kubetune.trainer_config import JobRef, TrainerConfig

    spec = parse_spec({
        "model": SMOLLM, "dataset": {"source": str(rows_file), "format": "chat", "evalFraction": 0},
        "method": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": {"maxSteps": args.steps, "microBatchSize": args.micro_batch,
                     "gradientAccumulationSteps": args.accumulation, "maxSeqLength": 512,
                     "checkpointSteps": 10_000, "loggingSteps": 1, "warmupRatio": 0.0},
        "resources": {"strategy": strategy},
        "output": {"uri": str(folder / name)},
    })
    knobs = Knobs(micro_batch_size=args.micro_batch, gradient_accumulation_steps=args.accumulation,
                  gradient_checkpointing=False, max_seq_length=512)
    path = folder / f"{name}.json"
    path.write_text(TrainerConfig(job=JobRef(name=name), spec=spec, knobs=knobs).model_dump_json(by_alias=True))
    return path


def run(folder: Path, rows_file: Path, args: argparse.Namespace, ranks: int, strategy: str,
        repeat: int) -> dict[str, Any]:
    name = f"r{ranks}-{strategy}-{repeat}"
    config = job_config(folder, rows_file, args, name, strategy)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "trainer")]),
           "KUBETUNE_LOG_FORMAT": "json", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    trainer = ["-m", "kubetune_trainer", "--config", str(config), "--device", args.device, "--metrics-port", "0",
               "--termination-log", str(folder / f"{name}.summary.json")]
    if ranks == 1:
        command = [sys.executable, *trainer]
    else:
        command = [sys.executable, "-m", "kubetune_trainer.launch", "--standalone", "--nproc-per-node", str(ranks),
                   *trainer]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((folder / name / "adapter" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    return {"ranks": ranks, "tokens": metrics["tokens"], "seconds": metrics["trainSeconds"],
            "tokens_per_second": metrics["tokens"] / max(metrics["trainSeconds"], 1e-9),
            "final_loss": metrics["finalLoss"], "wall": wall}


def label(ranks: int, strategy: str) -> str:
    return "1 rank" if ranks == 1 else f"{ranks} {strategy}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks compared with 1")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved; fastest counts")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--strategies", default="ddp,fsdp", help="how the N ranks train, comma-separated")
    args = parser.parse_args()
    variants = [(1, "auto"), *((args.ranks, s) for s in args.strategies.split(","))]

    with tempfile.TemporaryDirectory(prefix="kubetune-scaling-") as tmp:
        folder = Path(tmp)
        rows_file = folder / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(row) + "\n" for row in mixed_rows()))
        runs: dict[tuple[int, str], list[dict[str, Any]]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            for ranks, strategy in runs:
                result = run(folder, rows_file, args, ranks, strategy, repeat)
                runs[ranks, strategy].append(result)
                print(f"  run {repeat + 1}: {label(ranks, strategy)}: {result['tokens_per_second']:,.0f} tok/s "
                      f"({result['tokens']} tokens in {result['seconds']:.1f}s, loss {result['final_loss']:.4f})",
                      file=sys.stderr)
    best = {v: max(results, key=lambda r: r["tokens_per_second"]) for v, results in runs.items()}
    one = best[1, "auto"]
    cores = os.cpu_count()
    print(f"device {args.device}, {cores} CPU cores, load average {os.getloadavg()[0]:.2f} at the end; "
          f"{args.steps} steps of {args.accumulation} x {args.micro_batch} rows")
    print(f"{'variant':>8}  {'tokens/s':>9}  {'train s':>7}  {'final loss':>10}  {'speedup':>7}  {'efficiency':>10}")
    for ranks, strategy in runs:
        r = best[ranks, strategy]
        speedup = r["tokens_per_second"] / one["tokens_per_second"]
        # throughput per unit of hardware: on GPUs each rank adds a GPU; on the CPU the ranks split the same
        # cores, so there the efficiency is the speedup itself
        efficiency = speedup if args.device == "cpu" else speedup / ranks
        print(f"{label(ranks, strategy):>8}  {r['tokens_per_second']:>9,.0f}  {r['seconds']:>7.1f}  "
              f"{r['final_loss']:>10.4f}  {speedup:>6.2f}x  {efficiency:>10.0%}")
    if args.device == "cpu":
        print(f"(CPU: the {args.ranks} ranks share the same {cores} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
