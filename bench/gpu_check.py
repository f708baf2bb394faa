"""GPU check: the one command that proves the trainer's CUDA paths (issue 16), one table, nothing downloaded.

    python bench/gpu_check.py                 # on a CUDA machine: under 8 minutes on one H200
    python bench/gpu_check.py --dry-run       # on the CPU, a tiny config: every row's code path (CI runs this)

Rows:
- memory: Llama-3.2-1B and Llama-3.1-8B architectures (random weights built from the catalog's config numbers,
  kubetune/planning/models.py; a word-level tokenizer built here) at 2048 tokens, QLoRA and 16-bit LoRA,
  micro-batch 1 and the planner's other knobs: torch.cuda max_memory_allocated / max_memory_reserved beside the
  planner's estimate, the ratio, tokens/s (the first step is warm-up, not timed);
- seed recipe: TRL SFTTrainer + PEFT (bench/trainer_throughput.plain_recipe) on the 8B QLoRA row's model and data;
- one row per bug of issue 16: FSDP2 on one rank (NCCL) with the spec's default optimizer takes 3 steps; a paged
  run at r=128 SIGKILLed after its step-2 checkpoint resumes and finishes; `answer()` on an untied model whose
  input table is in host memory; a GPU plan with CUDA hidden exits 5 naming the driver; every rank's CUDA RNG
  restored from an old checkpoint of 8 GPUs on a pod that sees fewer; the memory setup selects the rank's GPU first;
  Liger's loss on vs off (peak, tokens/s, loss equal to 1e-3).

The device machine (nvidia-h200, 2026-12) has torch 2.11 (CUDA 13), transformers 5.17, accelerate and peft, no
network, and not bitsandbytes, trl, liger-kernel, datasets, pydantic or fastapi. Carry their wheels (48 MiB with
--no-deps, bitsandbytes 41 MiB of it; the carry limit is 64 MiB), from this machine (Python 3.12 there):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .gpu-wheels \\
        bitsandbytes==0.50.2 trl==1.16.0 liger-kernel==0.8.5 peft==0.21.2 datasets==5.2.0 dill==0.4.1 \\
        multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \\
        typing-inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 uvicorn==0.54.0
    # then on the device (run tool, carry [".gpu-wheels"]):
    pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl && \\
        PYTHONPATH=/tmp/site python3 bench/gpu_check.py

(versions: requirements/trainer.lock; `.gpu-wheels/` is git-ignored.) The script first lists any module it needs
that the machine lacks (and exits 2): carry those wheels the same way. trl also needs `datasets`; without trl (or
datasets) the seed-recipe row says "skipped", without liger-kernel the Liger row does.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "trainer"), str(ROOT / "bench")]
GiB = 2**30
WORDS = 4000  # the word-level tokenizer's vocabulary (ids below every model's vocabulary)


@dataclass
class Row:
    name: str
    status: str = "ok"
    allocated: int | None = None
    reserved: int | None = None
    estimate: int | None = None
    tokens_per_second: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Setup:
    device: str
    seq: int
    steps: int
    archs: dict[str, Any]  # label -> kubetune.planning.models.Architecture
    work: Path


def word_tokenizer(folder: Path) -> Any:
    """A word-level tokenizer ('w0'..'w3999' and 4 specials), built here: nothing to download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(arch: Any, folder: Path, device: str, *, tied: bool | None = None, layers: int | None = None) -> Path:
    """A Llama with `arch`'s numbers and random bf16 weights (made on `device`), saved with the word tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                         num_hidden_layers=layers or arch.layers, num_attention_heads=arch.heads,
                         num_key_value_heads=arch.kv_heads, max_position_embeddings=8192,
                         tie_word_embeddings=arch.tied_embeddings if tied is None else tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    word_tokenizer(folder)
    del model
    release()
    return folder


def text_rows(count: int, seq: int, seed: int = 0) -> list[dict[str, str]]:
    """Texts of seq/3 to seq-4 words (one token each, plus EOS): packing fills rows of `seq` tokens."""
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(seq // 3, seq - 4)))}
            for _ in range(count)]


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks(device: str) -> tuple[int, int]:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
    from kubetune_trainer.metrics import process_peak_rss_bytes

    peak = process_peak_rss_bytes()
    return peak, peak


def spec_for(model_dir: Path, data: Path, out: Path, method: str, seq: int, steps: int, r: int = 16,
             **training: Any) -> dict[str, Any]:
    return {"model": {"source": str(model_dir)}, "dataset": {"source": str(data), "format": "text"},
            "method": method, "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0},
            "training": {"maxSteps": steps, "microBatchSize": 1, "gradientAccumulationSteps": 1,
                         "maxSeqLength": seq, "checkpointSteps": 10**6, "loggingSteps": 1, "warmupRatio": 0.0,
                         **training},
            "output": {"uri": str(out)}}


def trainer_config(raw: dict[str, Any], arch: Any, device: str, name: str) -> Any:
    from kubetune_trainer.local import usable_memory

    from kubetune.planning.plan import local_knobs
    from kubetune.spec import parse_spec
    from kubetune.trainer_config import JobRef, TrainerConfig

    spec = parse_spec(raw)
    knobs, estimate = local_knobs(spec, arch, usable_memory(device)[0])
    return TrainerConfig(job=JobRef(name=name), spec=spec, knobs=knobs, vram_estimate_bytes=estimate,
                         device="cuda" if device == "cuda" else "cpu")


def timed_recipe(config: Any, device: str, steps: int) -> tuple[Any, float, float | None]:
    """Set up the real Recipe and run `steps` optimizer steps; returns it, tokens/s after the first step, the loss."""
    import torch
    from kubetune_trainer.loop import Recipe, RunOptions
    from kubetune_trainer.metrics import Telemetry
    from kubetune_trainer.progress import Log
    from kubetune_trainer.runner import setup_gpu_memory

    options = RunOptions(device="cuda" if device == "cuda" else "cpu")
    recipe = Recipe(config, options, Telemetry("bench", config.job.name),
                    Log(stream=open(os.devnull, "w"), fmt="json"))  # noqa: SIM115
    setup_gpu_memory(recipe.device)
    recipe.setup()
    recipe.model.train()
    loss, _, _ = recipe.train_step(0)  # warm-up: kernels, allocator, first optimizer state
    tokens, started = 0, time.perf_counter()
    for step in range(1, steps):
        loss, count, _ = recipe.train_step(step)
        tokens += count
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return recipe, tokens / seconds if seconds > 0 and tokens else 0.0, loss


def memory_row(setup: Setup, label: str, method: str, model_dir: Path, data: Path) -> Row:
    release()
    arch = setup.archs[label]
    config = trainer_config(spec_for(model_dir, data, setup.work / f"out-{label}-{method}", method, setup.seq,
                                     setup.steps), arch, setup.device, f"{label}-{method}")
    recipe, rate, loss = timed_recipe(config, setup.device, setup.steps)
    allocated, reserved = peaks(setup.device)
    knobs = config.knobs
    del recipe
    release()
    return Row(f"{label} {method} {setup.seq} tokens", allocated=allocated, reserved=reserved,
               estimate=config.vram_estimate_bytes, tokens_per_second=rate,
               note=f"checkpointing {'on' if knobs.gradient_checkpointing else 'off'}, loss {loss:.3f}")


def seed_row(setup: Setup, label: str, model_dir: Path, data: Path) -> Row:
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        return Row(f"seed recipe (TRL + PEFT) {label} qlora", "skipped", note="trl or datasets is not installed")
    from kubetune_trainer.model import load_tokenizer
    from trainer_throughput import plain_recipe

    release()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    result = plain_recipe(model_dir, load_tokenizer(model_dir), rows, setup.work / "out-seed", device=setup.device,
                          steps=setup.steps, micro_batch=1, accumulation=1, max_len=setup.seq)
    allocated, reserved = peaks(setup.device)
    release()
    rate = result["tokens"] / result["seconds"] if result["seconds"] else 0.0
    return Row(f"seed recipe (TRL + PEFT) {label} qlora", allocated=allocated, reserved=reserved,
               tokens_per_second=rate, note=f"{result['steps']} steps incl. the first, {result['padded_tokens']} "
                                            f"padded tokens, loss {result['loss']}")


def checked(name: str, check: Callable[[], str]) -> Row:
    """A bug's row: ok with what it saw, or failed with the error (the table goes on)."""
    try:
        return Row(name, note=check())
    except Exception as exc:  # a failing row is the finding: report it, run the others
        return Row(name, "FAILED", note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        release()


def fsdp_one_rank(setup: Setup, model_dir: Path, data: Path) -> str:
    """Bug 1: FSDP2 over one rank (NCCL on a GPU, gloo on the CPU), the spec's default optimizer, 3 steps."""
    import socket

    import torch
    import torch.distributed as dist
    from kubetune_trainer import fsdp
    from kubetune_trainer.data import IGNORE
    from kubetune_trainer.loop import make_optimizer
    from kubetune_trainer.loss import CausalLMLoss
    from kubetune_trainer.model import compute_dtype, load_model, mixed_precision
    from kubetune_trainer.progress import Log

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    device = torch.device(setup.device, 0) if setup.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        raw = {**spec_for(model_dir, data, setup.work / "out-fsdp", "qlora", setup.seq, 3),
               "resources": {"strategy": "fsdp"}}
        config = trainer_config(raw, setup.archs["1B"], setup.device, "fsdp")
        dtype = compute_dtype(device)
        loaded = load_model(config.spec, torch.device("cpu"), dtype, True, model_dir=model_dir, sharded=True)
        module = CausalLMLoss(loaded.model, IGNORE)
        fsdp.shard(module, fsdp.units(loaded.model.get_base_model()), device, 1)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, config, device, Log(stream=open(os.devnull, "w")))  # noqa: SIM115
        ids = torch.randint(4, WORDS, (1, setup.seq), device=device)
        for _ in range(3):
            with mixed_precision(device.type, dtype):
                loss = module(input_ids=ids, position_ids=torch.arange(setup.seq, device=device)[None], targets=ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return f"3 steps, {type(optimizer).__module__}.{type(optimizer).__name__}, loss {float(loss.detach()):.3f}"
    finally:
        dist.destroy_process_group()


def trainer_process(config: Any, work: Path, name: str, device: str, env: dict[str, str] | None = None
                    ) -> tuple[int, dict[str, Any]]:
    path, summary = work / f"{name}.json", work / f"{name}.summary.json"
    path.write_text(config.model_dump_json(by_alias=True))
    summary.unlink(missing_ok=True)
    paths = [str(ROOT), str(ROOT / "trainer"), *filter(None, [os.environ.get("PYTHONPATH")])]  # carried wheels too
    extra = {"PYTHONPATH": os.pathsep.join(paths), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(path), "--device", device,
                           "--metrics-port", "0", "--termination-log", str(summary)], env={**os.environ, **extra},
                          capture_output=True, text=True, timeout=600, check=False)
    return proc.returncode, json.loads(summary.read_text()) if summary.exists() else {"error": proc.stderr[-300:]}


def paged_resume(setup: Setup, model_dir: Path, data: Path) -> str:
    """Bug 4: a paged QLoRA run at r=128 (lora_B of the MLP >= 1e5 elements: paged states) is SIGKILLed after its
    step-2 checkpoint; the next run resumes from it and finishes."""
    raw = spec_for(model_dir, data, setup.work / "out-paged", "qlora", setup.seq, 4, r=128, checkpointSteps=2)
    config = trainer_config(raw, setup.archs["1B"], setup.device, "paged")
    killed, _ = trainer_process(config, setup.work, "paged-1", setup.device, {"KUBETUNE_FAULT_KILL_AT_STEP": "3"})
    if killed != -9:
        raise RuntimeError(f"the first run exited {killed}, expected SIGKILL at step 3")
    code, summary = trainer_process(config, setup.work, "paged-2", setup.device)
    if code != 0 or summary.get("resumedFromStep") != 2:
        raise RuntimeError(f"resume exited {code}: {summary.get('error')}")
    return f"killed at step 3, resumed from step 2, {summary['steps']} steps, loss {summary['finalLoss']:.3f}"


def answer_untied(setup: Setup, model_dir: Path) -> str:
    """Bug 2: `answer()` on an untied model whose input table stays in host memory (on a GPU)."""
    from kubetune_trainer.memory import input_device
    from kubetune_trainer.model import answer, compute_dtype, load_model, pick_device

    from kubetune.spec import parse_spec

    device = pick_device(setup.device)
    dtype = compute_dtype(device)
    spec = parse_spec(spec_for(model_dir, model_dir / "none.jsonl", setup.work / "out-answer", "qlora", 64, 1))
    loaded = load_model(spec, device, dtype, False, model_dir=model_dir)
    table = loaded.model.get_input_embeddings().weight.device
    text = answer(loaded.model, loaded.tokenizer, "w1 w2 w3", input_device(loaded.model), max_new_tokens=8,
                  dtype=dtype)
    return f"table on {table}, inputs to {input_device(loaded.model)}: {len(text.split())} words generated"


def no_cuda_exit(setup: Setup, model_dir: Path, data: Path) -> str:
    """Bug 3: a GPU plan with CUDA hidden from the process exits 5 at once, naming the driver."""
    raw = spec_for(model_dir, data, setup.work / "out-nocuda", "qlora", setup.seq, 1)
    config = trainer_config(raw, setup.archs["1B"], setup.device, "nocuda").model_copy(
        update={"gpu_class": "H200", "device": "cuda"})
    started = time.perf_counter()
    code, summary = trainer_process(config, setup.work, "nocuda", "auto", {"CUDA_VISIBLE_DEVICES": ""})
    if code != 5 or "driver" not in (summary.get("error") or ""):
        raise RuntimeError(f"exit {code}: {summary.get('error')}")
    return f"exit 5 in {time.perf_counter() - started:.1f}s: {summary['error'][:90]}…"


def rng_rows(setup: Setup) -> str:
    """Bug 5: an old checkpoint's 8 per-GPU CUDA states restore on a pod that sees fewer, and a restored state
    repeats the same dropout mask."""
    import torch
    from kubetune_trainer.loop import rng_state, set_rng_state

    if setup.device != "cuda":
        return "skipped on the CPU (no CUDA generator); the decision is tests/trainer/test_devices.py::test_rank_rng"
    device = torch.device("cuda", torch.cuda.current_device())
    saved = rng_state(device)
    first = torch.nn.functional.dropout(torch.ones(4096, device=device), 0.5)
    old = {"python": saved["python"], "torch": saved["torch"], "cuda": [saved["cuda"]] * 8}
    set_rng_state(old, 0, device)
    again = torch.nn.functional.dropout(torch.ones(4096, device=device), 0.5)
    set_rng_state({"ranks": [saved]}, 0, device)
    third = torch.nn.functional.dropout(torch.ones(4096, device=device), 0.5)
    if not (torch.equal(first, again) and torch.equal(first, third)):
        raise RuntimeError("a restored CUDA RNG state did not repeat the dropout mask")
    return f"8 saved GPU states on {torch.cuda.device_count()} visible: restored, dropout mask repeated"


def memory_setup(setup: Setup) -> str:
    """Bug 6: the rank's GPU is selected before its peak is reset and its memory capped."""
    import torch
    from kubetune_trainer.runner import setup_gpu_memory

    if setup.device != "cuda":
        return "skipped on the CPU (no caching allocator); tests/trainer/test_devices.py covers the order"
    last = torch.cuda.device_count() - 1
    os.environ["KUBETUNE_GPU_MEMORY_FRACTION"] = "0.9"
    try:
        setup_gpu_memory(torch.device("cuda", last))
    finally:
        del os.environ["KUBETUNE_GPU_MEMORY_FRACTION"]
    current = torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(1.0, last)
    torch.cuda.set_device(0)
    if current != last:
        raise RuntimeError(f"current device {current}, expected {last}")
    return f"cuda:{last} selected, reset and capped at 0.9 (of {last + 1} GPUs)"


def liger_rows(setup: Setup, model_dir: Path, data: Path) -> list[Row]:
    """Liger's fused linear + cross-entropy against the trainer's own chunked loss, same run: peak, tokens/s, loss."""
    from kubetune_trainer import loss as loss_mod

    if setup.device != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        why = "needs CUDA (Triton)" if setup.device != "cuda" else "liger-kernel is not installed (carry it)"
        return [Row("Liger loss on vs off", "skipped", note=why)]
    rows, losses = [], []
    available = loss_mod._liger_available
    try:
        for on in (False, True):
            loss_mod._liger_available = (lambda: True) if on else (lambda: False)
            release()
            raw = spec_for(model_dir, data, setup.work / f"out-liger-{on}", "qlora", setup.seq, setup.steps)
            config = trainer_config(raw, setup.archs["1B"], setup.device, f"liger-{on}")
            recipe, rate, loss = timed_recipe(config, setup.device, setup.steps)
            allocated, reserved = peaks(setup.device)
            del recipe
            losses.append(loss or 0.0)
            rows.append(Row(f"1B qlora, Liger {'on' if on else 'off'}", allocated=allocated, reserved=reserved,
                            estimate=config.vram_estimate_bytes, tokens_per_second=rate, note=f"loss {loss:.4f}"))
    finally:
        loss_mod._liger_available = available
    if abs(losses[0] - losses[1]) > 1e-3:
        rows[-1].status = "FAILED"
        rows[-1].note += f" (off: {losses[0]:.4f}; differ by more than 1e-3)"
    return rows


def gib(value: int | None) -> str:
    return f"{value / GiB:.2f}" if value else "-"


def table(rows: list[Row], device: str) -> str:
    kind = "GiB" if device == "cuda" else "GiB RSS"
    lines = [f"| row | status | peak allocated {kind} | peak reserved {kind} | estimate GiB | allocated / estimate "
             "| tokens/s | note |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = f"{r.allocated / r.estimate:.2f}" if r.allocated and r.estimate else "-"
        rate = f"{r.tokens_per_second:.0f}" if r.tokens_per_second else "-"
        lines.append(f"| {r.name} | {r.status} | {gib(r.allocated)} | {gib(r.reserved)} | {gib(r.estimate)} | "
                     f"{ratio} | {rate} | {r.note} |")
    return "\n".join(lines)


def architectures(dry_run: bool) -> dict[str, Any]:
    from kubetune.planning.models import Architecture, catalog_lookup

    if dry_run:  # the tiny Llama of the tests, with the word tokenizer's vocabulary rounded up
        return {"1B": Architecture("tiny-tied", 2, 64, 128, 4, 2, 4096, True),
                "8B": Architecture("tiny-untied", 2, 64, 128, 4, 2, 4096, False)}
    found = {"1B": catalog_lookup("meta-llama/Llama-3.2-1B"), "8B": catalog_lookup("meta-llama/Llama-3.1-8B")}
    assert all(found.values()), "the catalog lost Llama-3.2-1B or Llama-3.1-8B"
    return found


def run(setup: Setup) -> list[Row]:
    data = setup.work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_rows(8 * setup.steps, setup.seq)))
    models = {label: build_model(arch, setup.work / f"model-{label}", setup.device)
              for label, arch in setup.archs.items()}
    untied = build_model(setup.archs["8B"], setup.work / "model-untied-2", setup.device, tied=False, layers=2)
    rows = [memory_row(setup, label, method, models[label], data)
            for label in setup.archs for method in ("qlora", "lora")]
    rows.append(seed_row(setup, "8B", models["8B"], data))
    rows.append(checked("bug 1: FSDP2, one rank, default optimizer, 3 steps",
                        lambda: fsdp_one_rank(setup, models["1B"], data)))
    rows.append(checked("bug 2: answer(), untied, input table in host memory", lambda: answer_untied(setup, untied)))
    rows.append(checked("bug 3: GPU plan, CUDA hidden: exit 5", lambda: no_cuda_exit(setup, models["1B"], data)))
    rows.append(checked("bug 4: paged r=128 killed after a checkpoint, resumed",
                        lambda: paged_resume(setup, models["1B"], data)))
    rows.append(checked("bug 5: CUDA RNG per rank, any GPU count", lambda: rng_rows(setup)))
    rows += liger_rows(setup, models["1B"], data)
    rows.append(checked("bug 6: memory setup on the rank's GPU", lambda: memory_setup(setup)))
    return rows


NEEDED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers", "pydantic",
          "yaml", "prometheus_client", "fastapi", "psutil")


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU, a tiny config: every row's code path")
    parser.add_argument("--work", type=Path, help="where models and runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if missing := missing_modules():
        print(f"gpu_check: missing {', '.join(missing)}: carry their wheels (see this file's docstring)",
              file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible: run on a GPU machine, or --dry-run on the CPU")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from kubetune_trainer.quiet import quiet_libraries

    quiet_libraries(progress_bars=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        device = "cpu" if args.dry_run else "cuda"
        setup = Setup(device, 128 if args.dry_run else 2048, 2 if args.dry_run else 4, architectures(args.dry_run),
                      work)
        rows = run(setup)
    name = "dry run on the CPU (tiny config)" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"\nkubetune GPU check: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{setup.seq} tokens, micro-batch 1, {time.perf_counter() - started:.0f}s\n")
    print(table(rows, device))
    return 1 if any(r.status == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
