"""Trainer memory by part: the plain recipe, TRL with packing, and kubetune, on the CPU, at 512/2048/4096 tokens.

    .venv/bin/python bench/trainer_memory.py [--seq 512 2048 4096] [--layers 4] [--hidden 512]

The model is a random-weight Llama with Llama-3's 128,256-entry vocabulary (untied embeddings, as Llama-3.1-8B)
and a few small layers, saved once and loaded in 4-bit NF4 with double quantization by each variant, LoRA r=16
(alpha 32, dropout 0.05) on every linear, gradient checkpointing on, one sequence of exactly `seq` tokens, all
of them labelled, one optimizer step (AdamW), bf16 compute where the CPU has it:

- **plain**: peft's `prepare_model_for_kbit_training` + `get_peft_model`, `model(input_ids, labels=...)`,
  `loss.backward()`, `optimizer.step()`: the textbook loop.
- **trl**: TRL's `SFTTrainer` with `packing=True` (`packing_strategy="bfd"`, padding-free), `max_length=seq`,
  batch 1, one step, on text rows packed to `seq` tokens (what `SFTConfig` does with the same model).
- **kubetune**: `kubetune_trainer.loop.Recipe` (setup, then `train()` for one step), packing, micro-batch 1.

Each variant x length runs in a fresh process, twice for plain and kubetune: once as is and once with the
vocabulary projection + loss swapped for a trivial loss on the hidden states (`decoder only`), so that
`loss = full - decoder only` is the memory of lm_head + cross-entropy, and `decoder only` is what the
decoder's activations (checkpointed layers, one recomputed layer) and LoRA gradients take.

Memory is the process's resident set (CPU): `weights` is the growth from loading the model (with its
LoRA adapters); `step peak` is the high-water mark of one training step above the resident set just before it
(VmHWM, reset through /proc/self/clear_refs). Every large allocation is mmapped (MALLOC_MMAP_THRESHOLD_) so
resident memory follows live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128_256
MiB = 2**20


def rss() -> int:
    return _status("VmRSS")


def hwm() -> int:
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_model(folder: Path, layers: int, hidden: int) -> None:
    import torch
    from kubetune_trainer.model import bundled_gguf, convert_gguf, load_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(convert_gguf(bundled_gguf("smollm2-135m-instruct")))  # its ids < VOCAB
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), max_position_embeddings=8192,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def text_rows(folder: Path, seq: int) -> list[dict[str, str]]:
    """Two rows of plain text, each just under half of `seq` tokens (with BOS/EOS): packed, one row of ~`seq`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    words = ["the", "quick", "brown", "fox", "checks", "copper", "kettle", "while", "zinc", "clock", "ticks"]
    text: list[str] = []
    while len(tokenizer(" ".join([*text, words[len(text) % len(words)]]), add_special_tokens=False)["input_ids"]) \
            + 2 <= seq // 2:
        text.append(words[len(text) % len(words)])
    return [{"text": " ".join(text)}, {"text": " ".join(text)}]


def dtype() -> Any:
    import torch
    from kubetune_trainer.model import compute_dtype

    return compute_dtype(torch.device("cpu"))


def plain_qlora_model(folder: Path) -> Any:
    """The plain recipe's model: NF4 + double quantization, PEFT's k-bit preparation, LoRA on all linears."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype())
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=bnb, device_map={"": "cpu"},
                                                      dtype=dtype())
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def run_plain(folder: Path, seq: int, decoder_only: bool) -> dict[str, Any]:
    import torch

    before = rss()
    model = plain_qlora_model(folder)
    model.train()
    weights = rss() - before
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (1, seq))
    reset_peak()
    start = rss()
    with torch.autocast("cpu", dtype=dtype(), enabled=dtype() != torch.float32):
        if decoder_only:
            loss = model.get_base_model().model(input_ids=ids).last_hidden_state.float().pow(2).mean()
        else:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return {"weights": weights, "step_peak": hwm() - start}


def run_trl(folder: Path, seq: int, decoder_only: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    assert not decoder_only
    before = rss()
    model = plain_qlora_model(folder)
    weights = rss() - before
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=1,
            learning_rate=1e-4, bf16=dtype() == torch.bfloat16, max_length=seq, packing=True,
            packing_strategy="bfd", gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, logging_steps=1, optim="adamw_torch", dataset_text_field="text",
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(text_rows(folder, seq)),
                             processing_class=AutoTokenizer.from_pretrained(str(folder)))
        reset_peak()
        start = rss()
        trainer.train()
        return {"weights": weights, "step_peak": hwm() - start}


def run_kubetune(folder: Path, seq: int, decoder_only: bool) -> dict[str, Any]:
    from kubetune_trainer import loss
    from kubetune_trainer.loop import Recipe, RunOptions
    from kubetune_trainer.metrics import Telemetry
    from kubetune_trainer.progress import Log

    from kubetune.planning.plan import Knobs
    from kubetune.spec import parse_spec
    from kubetune.trainer_config import JobRef, TrainerConfig

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in text_rows(folder, seq)))
        spec = parse_spec({
            "model": {"source": str(folder)}, "dataset": {"source": str(data), "format": "text"}, "method": "qlora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "training": {"maxSteps": 1, "microBatchSize": 1, "gradientAccumulationSteps": 1, "maxSeqLength": seq,
                         "gradientCheckpointing": True, "checkpointSteps": 1000, "optimizer": "adamw_torch",
                         "packing": True},
            "output": {"uri": str(Path(tmp) / "out")},
        })
        knobs = Knobs(micro_batch_size=1, gradient_accumulation_steps=1, gradient_checkpointing=True,
                      max_seq_length=seq)
        config = TrainerConfig(job=JobRef(name="bench"), spec=spec, knobs=knobs, vram_estimate_bytes=1)
        if decoder_only:
            def trivial(hidden: Any, _targets: Any, _head: Any, chunk: int | None = None) -> Any:
                return hidden.float().pow(2).sum()
            loss.linear_cross_entropy_sum = trivial  # type: ignore[assignment]
        before = rss()
        recipe = Recipe(config, RunOptions(device="cpu"), Telemetry("bench", "bench"),
                        Log(stream=open(os.devnull, "w"), fmt="json"))  # noqa: SIM115
        recipe.setup()
        weights = rss() - before
        tokens = sum(len(e) for e in recipe.train_data.rows[0])
        assert len(recipe.train_data.rows) == 1 and tokens > 0.95 * seq, (len(recipe.train_data.rows), tokens)
        reset_peak()
        start = rss()
        recipe.train()
        return {"weights": weights, "step_peak": hwm() - start}


RUNNERS = {"plain": run_plain, "trl": run_trl, "kubetune": run_kubetune}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    result = RUNNERS[args.variant](Path(args.model), args.one_seq, args.decoder_only)
    Path(args.result).write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--variant", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--one-seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--decoder-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return 0

    load = os.getloadavg()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    rows: list[tuple[int, str, dict[str, Any], dict[str, Any] | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(folder, args.layers, args.hidden)
        for seq in args.seq:
            for variant in ("plain", "trl", "kubetune"):
                results: list[dict[str, Any]] = []
                for decoder_only in ([False, True] if variant != "trl" else [False]):
                    out = Path(tmp) / f"{variant}-{seq}-{decoder_only}.json"
                    cmd = [sys.executable, __file__, "--variant", variant, "--model", str(folder),
                           "--one-seq", str(seq), "--result", str(out)] + (["--decoder-only"] * decoder_only)
                    print(f"running {variant} at {seq} tokens{' (decoder only)' if decoder_only else ''} ...",
                          file=sys.stderr, flush=True)
                    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if run.returncode != 0:
                        print(run.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"{variant} at {seq} tokens failed")
                    results.append(json.loads(out.read_text()))
                rows.append((seq, variant, results[0], results[1] if len(results) > 1 else None))

    print(f"Random Llama, vocabulary {VOCAB:,} (untied), {args.layers} layers x hidden {args.hidden}, QLoRA NF4 r=16 "
          f"all-linear, checkpointing on, one sequence, one step, CPU (load average before "
          f"{'/'.join(f'{x:.1f}' for x in load)}, after {'/'.join(f'{x:.1f}' for x in os.getloadavg())})")
    print(f"{'tokens':>6} {'variant':9} {'weights MiB':>11} {'step peak MiB':>13} {'loss MiB':>9} "
          f"{'decoder MiB':>11} {'step peak vs plain':>18}")
    plain_peak = {seq: full["step_peak"] for seq, variant, full, _ in rows if variant == "plain"}
    for seq, variant, full, dec in rows:
        loss = f"{(full['step_peak'] - dec['step_peak']) / MiB:9.0f}" if dec else f"{'-':>9}"
        decoder = f"{dec['step_peak'] / MiB:11.0f}" if dec else f"{'-':>11}"
        print(f"{seq:>6} {variant:9} {full['weights'] / MiB:>11.0f} {full['step_peak'] / MiB:>13.0f} {loss} {decoder} "
              f"{full['step_peak'] / plain_peak[seq]:>17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
