"""Trainer throughput: kubetune's recipe against the plain one, same model, data and optimizer steps, one run.

    .venv/bin/python bench/trainer_throughput.py [--steps 2] [--micro-batch 2] [--accumulation 4] [--repeats 2]
        [--baseline DIR]

--baseline DIR adds the kubetune variants as of another checkout of this repository (for example
`git worktree add --detach /tmp/kt-main main`), run from there with the same venv, interleaved with this
tree's: the trainer before and after a change, side by side in one run.

The plain recipe is the textbook QLoRA setup: BitsAndBytes NF4 + double quantization + bf16 compute,
peft's prepare_model_for_kbit_training (gradient checkpointing on), LoRA on every linear, TRL's SFTTrainer
with SFTConfig defaults (padding to the longest sequence of each batch, no packing), cosine schedule,
max_grad_norm 0.3. Ours is `kubetune_trainer.loop.Recipe` with the knobs the planner picks for this machine.
Both train the bundled SmolLM2-135M-Instruct on the same chat rows of mixed lengths (32 to ~500 tokens),
each variant in its own process (so peak memory is its own), for the same number of optimizer steps.

Reported: tokens/s counts real tokens only (padding excluded), over the training loop (model loading
excluded); peak memory is the process's peak RSS (CPU) or torch.cuda.max_memory_allocated (GPU), plus the
peak RSS growth during training alone (sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "pebblewave-support.jsonl"
SMOLLM = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "source": "bundled://smollm2-135m-instruct"}
MAX_LEN = 512


def mixed_rows(n: int = 96, seed: int = 0) -> list[dict[str, Any]]:
    """Support answers repeated 1-10 times: a long tail of lengths, as real chat data has."""
    base = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(base[i % len(base)]))
        answer = row["messages"][-1]
        answer["content"] = " ".join([answer["content"]] * rng.choice([1, 1, 1, 2, 2, 3, 4, 6, 8, 10]))
        rows.append(row)
    return rows


class PeakRss:
    """Samples RSS in a thread: the peak during one phase, not since process start."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process(os.getpid())
        self.start_rss = self.process.memory_info().rss
        self.peak = self.start_rss
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak - self.start_rss


def process_peak(device: str) -> int:
    import torch
    from kubetune_trainer.metrics import process_peak_rss_bytes

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return process_peak_rss_bytes()


def run_ours(args: argparse.Namespace, rows_file: Path, out: Path) -> dict[str, Any]:
    from kubetune_trainer.local import usable_memory
    from kubetune_trainer.loop import Device, Recipe, RunOptions
    from kubetune_trainer.metrics import Telemetry
    from kubetune_trainer.progress import Log

    from kubetune.planning.models import catalog_lookup
    from kubetune.planning.plan import local_knobs
    from kubetune.spec import parse_spec
    from kubetune.trainer_config import JobRef, TrainerConfig

    spec = parse_spec({
        "model": SMOLLM, "dataset": {"source": str(rows_file), "format": "chat"}, "method": "qlora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "training": {"maxSteps": args.steps, "microBatchSize": args.micro_batch,
                     "gradientAccumulationSteps": args.accumulation, "maxSeqLength": MAX_LEN,
                     "learningRate": 2e-4, "checkpointSteps": 1000000, "logging_steps": 1,
                     **({"gradientCheckpointing": args.ours_checkpointing == "on"}
                        if args.ours_checkpointing != "auto" else {})},
        "output": {"uri": str(out)},
    })
    device: Device = "cuda" if args.device == "cuda" else "cpu"
    arch = catalog_lookup(SMOLLM["name"])
    assert arch is not None
    knobs, estimate = local_knobs(spec, arch, usable_memory(device)[0])
    config = TrainerConfig(job=JobRef(name="bench"), spec=spec, knobs=knobs, vram_estimate_bytes=estimate)
    log = Log(stream=open(os.devnull, "w"), fmt="json")  # noqa: SIM115
    recipe = Recipe(config, RunOptions(device=device), Telemetry("bench", "bench"), log)
    recipe.setup()
    meter = PeakRss()
    started = time.perf_counter()
    recipe.train()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"variant": "kubetune", "steps": recipe.step, "tokens": recipe.tokens_seen, "seconds": seconds,
            "loss": recipe.last_loss, "train_rss_growth": meter.stop(), "peak": process_peak(device),
            "knobs": knobs.model_dump(by_alias=True)}


def run_plain(args: argparse.Namespace, rows_file: Path, out: Path) -> dict[str, Any]:
    from kubetune_trainer.model import bundled_gguf, convert_gguf, load_tokenizer

    model_dir = convert_gguf(bundled_gguf("smollm2-135m-instruct"))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    return plain_recipe(model_dir, load_tokenizer(model_dir), rows, out, device=args.device, steps=args.steps,
                        micro_batch=args.micro_batch, accumulation=args.accumulation, max_len=MAX_LEN)


def plain_recipe(model_dir: Path, tokenizer: Any, rows: list[dict[str, Any]], out: Path, *, device: str, steps: int,
                 micro_batch: int, accumulation: int, max_len: int, lora_r: int = 16) -> dict[str, Any]:
    """The seed recipe (TRL SFTTrainer + PEFT, as described above) on `model_dir` and `rows` (chat or text)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb,
                                                 device_map={"": 0 if device == "cuda" else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    config = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=2e-4,
        optim="paged_adamw_32bit" if device == "cuda" else "adamw_torch",  # the seed recipe's CPU fallback
        bf16=True, max_grad_norm=0.3, warmup_steps=0.03, lr_scheduler_type="cosine", logging_steps=1,
        max_length=max_len, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", report_to=[], seed=42, use_cpu=device == "cpu", dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    counted = count_tokens(trainer)
    losses = last_loss(trainer)
    meter = PeakRss()
    started = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"variant": "plain", "steps": trainer.state.global_step, "tokens": counted["tokens"],
            "padded_tokens": counted["padded"], "seconds": seconds, "loss": losses["last"],
            "train_rss_growth": meter.stop(), "peak": process_peak(device)}


def count_tokens(trainer: Any) -> dict[str, int]:
    """Real (attention-mask) and padded tokens of every batch the trainer collates, counted as it trains."""
    counted = {"tokens": 0, "padded": 0}
    collate = trainer.data_collator

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        counted["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else \
            int(batch["input_ids"].numel())
        counted["padded"] += int(batch["input_ids"].numel())
        return dict(batch)

    trainer.data_collator = counting_collator
    return counted


def last_loss(trainer: Any) -> dict[str, float | None]:
    from transformers import TrainerCallback

    seen: dict[str, float | None] = {"last": None}

    class Losses(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logs = kwargs.get("logs")
            if logs and "loss" in logs:
                seen["last"] = float(logs["loss"])

    trainer.add_callback(Losses())
    return seen


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    rows_file, out = Path(args.rows), Path(args.out)
    result = run_ours(args, rows_file, out) if args.variant == "ours" else run_plain(args, rows_file, out)
    Path(args.result).write_text(json.dumps(result))


Variant = tuple[str, str, str, Path | None]  # (label, variant, checkpointing, the checkout it runs from)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved; the fastest counts")
    parser.add_argument("--ours-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="auto: what the planner picks for this machine's memory")
    parser.add_argument("--baseline", type=Path, help="another checkout whose kubetune variants run side by side")
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the plain recipe (with --baseline: ratios are then to the baseline's kubetune)")
    parser.add_argument("--variant", choices=["ours", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return 0

    variants = _variants(args, parser)
    load_before = os.getloadavg()
    results = _run(args, variants)
    _report(args, results, load_before)
    return 0


def _variants(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Variant]:
    """The variants the options ask for: plain and ours (as given, or with and without the planner's
    checkpointing), ours again from the --baseline checkout."""
    variants: list[Variant] = [
        ("plain", "plain", "on", None), ("kubetune", "ours", "on", None), ("kubetune (planner)", "ours", "auto", None)]
    if args.ours_checkpointing != "auto":
        variants = [("plain", "plain", "on", None), ("kubetune", "ours", args.ours_checkpointing, None)]
    if args.baseline:
        variants += [(f"{label} @base", variant, checkpointing, args.baseline.resolve())
                     for label, variant, checkpointing, _ in variants if variant == "ours"]
    if args.no_plain:
        if not args.baseline:
            parser.error("--no-plain needs --baseline (something to compare with)")
        variants = [v for v in variants if v[1] != "plain"]
    return variants


def _run(args: argparse.Namespace, variants: list[Variant]) -> dict[str, dict[str, Any]]:
    """Every variant, each in its own process: the fastest run of each, with the highest peak memory seen."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "mixed.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in mixed_rows()))
        # variants interleaved, each `repeats` times; the fastest run of each counts (a shared machine's noise
        # only ever slows a run down), and its peak memory is the highest seen
        for repeat in range(args.repeats):
            for label, variant, checkpointing, tree in variants:
                result_file = Path(tmp) / f"{label}-{repeat}.json".replace(" ", "_")
                script = tree / "bench" / "trainer_throughput.py" if tree else Path(__file__)
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("", "trainer", "operator"))
                       } if tree else None
                cmd = [sys.executable, str(script), "--variant", variant, "--rows", str(rows_file),
                       "--out", str(Path(tmp) / f"out-{repeat}-{variant}-{checkpointing}"),
                       "--result", str(result_file), "--steps", str(args.steps),
                       "--micro-batch", str(args.micro_batch), "--accumulation", str(args.accumulation),
                       "--device", args.device, "--ours-checkpointing", checkpointing]
                print(f"running {label} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree, env=env)
                run = json.loads(result_file.read_text())
                run["tokens_per_second"] = run["tokens"] / run["seconds"]
                best = results.get(label)
                if best is None or run["tokens_per_second"] > best["tokens_per_second"]:
                    run["peak"] = max(run["peak"], best["peak"] if best else 0)
                    results[label] = run
                else:
                    best["peak"] = max(best["peak"], run["peak"])
    return results


def _report(args: argparse.Namespace, results: dict[str, dict[str, Any]],
            load_before: tuple[float, float, float]) -> None:
    """The table, ratios to plain (or, with --no-plain, to the baseline's kubetune) side by side."""
    reference = "plain" if "plain" in results else next(label for label in results if label.endswith("@base"))
    plain = results[reference]
    load_after = os.getloadavg()
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} CPUs")
    print(f"SmolLM2-135M-Instruct QLoRA on {args.device}, {args.steps} optimizer steps, micro-batch "
          f"{args.micro_batch} x accumulation {args.accumulation}, rows of 32-~500 tokens (maxSeqLength {MAX_LEN})")
    print(f"{'':26} {'steps':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'peak MiB':>9} {'train +MiB':>10}"
          f" {'tok/s ratio':>11} {'peak ratio':>10}  notes (ratios to {reference})")
    for label, r in results.items():
        if label == "plain":
            notes = f"padding {r['padded_tokens'] - r['tokens']} of {r['padded_tokens']} tokens, checkpointing on"
        else:
            notes = (f"packed, checkpointing {'on' if r['knobs']['gradientCheckpointing'] else 'off'}, "
                     f"micro-batch {r['knobs']['microBatchSize']}")
        print(f"{label:26} {r['steps']:>5} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_second']:>9.1f} "
              f"{r['peak'] / 2**20:>9.0f} {r['train_rss_growth'] / 2**20:>10.0f} "
              f"{r['tokens_per_second'] / plain['tokens_per_second']:>10.2f}x "
              f"{r['peak'] / plain['peak']:>9.2f}x  {notes}")


if __name__ == "__main__":
    sys.exit(main())
