"""The estimator's activation and logits terms, measured on real transformers + PEFT layers on the CPU.

Activations: autograd's saved tensors (saved_tensors_hooks, deduplicated by storage, parameters
excluded) for a 4-layer minus a 2-layer model give the bytes one decoder layer keeps per token.
Logits: the growth of the resident-memory high-water mark (VmHWM) over one forward+backward whose
memory is dominated by the vocabulary projection and the loss, in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).parent))
from kt_autograd import saved_bytes as saved_bytes_of  # noqa: E402

from kubetune.planning.models import Architecture  # noqa: E402
from kubetune.planning.vram import (  # noqa: E402
    KT_LOGITS_BYTES,
    LOGITS_BYTES,
    TrainingShape,
    activation_bytes_per_token_layer,
)

TOKENS = 2 * 64


def lora_model(layers: int, h: int, i: int, heads: int, kv_heads: int, dropout: float, recipe: str) -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_key_value_heads=kv_heads,
        num_hidden_layers=layers, vocab_size=512, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    if recipe == "hf":
        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                          target_modules="all-linear")), nullcontext()
    trainer = pytest.importorskip("kubetune_trainer.model")
    from kubetune.spec import parse_spec

    spec = parse_spec({"model": {"name": "probe"}, "dataset": {"source": "d.jsonl"}, "output": {"uri": "out/"},
                       "lora": {"r": 8, "alpha": 16, "dropout": dropout}})
    trainer.prepare_for_kbit(model, False)
    trainer._norm_dtype_hook(model, torch.bfloat16)
    return trainer.apply_lora(model, spec, torch.bfloat16), trainer.mixed_precision("cpu", torch.bfloat16)


def saved_bytes(layers: int, h: int, i: int, heads: int, kv_heads: int, dropout: float, recipe: str) -> int:
    model, precision = lora_model(layers, h, i, heads, kv_heads, dropout, recipe)
    model.train()
    ids = torch.randint(0, 512, (2, TOKENS // 2))

    def forward() -> None:
        with precision:
            model(input_ids=ids, labels=ids)

    return saved_bytes_of(model, forward)


@pytest.mark.parametrize(("h", "i", "heads", "kv_heads"), [(256, 688, 8, 4), (384, 2048, 6, 6)])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("recipe", ["kubetune", "hf"])
def test_activation_formula_matches_saved_tensors(h: int, i: int, heads: int, kv_heads: int, dropout: float,
                                                  recipe: str) -> None:
    """recipe 'kubetune': the trainer's own LoRA setup under its autocast; 'hf': plain PEFT."""
    layers = [saved_bytes(n, h, i, heads, kv_heads, dropout, recipe) for n in (4, 2)]
    per_token_layer = (layers[0] - layers[1]) / 2 / TOKENS
    arch = Architecture("probe", 4, h, i, heads, kv_heads, 512, False)
    estimated = activation_bytes_per_token_layer(arch, TrainingShape(lora_dropout=dropout, recipe=recipe))
    assert estimated / per_token_layer == pytest.approx(1.0, abs=0.10), (estimated, per_token_layer)


LOGITS_PROBE = textwrap.dedent(
    """
    import torch, transformers, peft
    def peak():  # this process's own high-water mark (ru_maxrss would include a big parent's, via vfork)
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    torch.set_num_threads(1)
    V, T = 32000, 2048
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=2, num_hidden_layers=1, vocab_size=V, attn_implementation="sdpa",
        tie_word_embeddings=False)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config).to(torch.bfloat16),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ids = torch.randint(0, V, (1, T))
    model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()
    model.zero_grad(set_to_none=True)
    before = peak()
    out = model(input_ids=ids, labels=ids)  # kept through backward, as training loops keep it
    out.loss.backward()
    after = peak()
    print((after - before) * 1024 / (T * V))
    """
)


def test_logits_term_covers_peak_memory_of_the_loss() -> None:
    # every large allocation mmapped, so resident memory follows live tensors exactly (repeatable)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", LOGITS_PROBE], capture_output=True, text=True, timeout=300,
                         check=True, env=env)
    bytes_per_token_vocab = float(run.stdout.strip().splitlines()[-1])
    # measured: 14.17 B per token per vocabulary entry (2,048 and 4,096 tokens alike), ~0.17 of it the rest of
    # this small model
    assert LOGITS_BYTES * 0.95 <= bytes_per_token_vocab <= LOGITS_BYTES * 1.03


CHUNKED_PROBE = textwrap.dedent(
    """
    import sys, torch
    from kubetune_trainer.loss import linear_cross_entropy_sum
    from kubetune.planning.vram import loss_chunk_tokens
    torch.set_num_threads(1)
    V = int(sys.argv[1])
    chunk = loss_chunk_tokens(V)
    T = 4 * chunk
    head = torch.nn.Linear(64, V, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(T, 64, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (T,))
    def peak():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs it
        linear_cross_entropy_sum(hidden[:8], targets[:8], head).backward()
        before = peak()
        linear_cross_entropy_sum(hidden, targets, head).backward()
    after = peak()
    print((after - before) * 1024 / (chunk * V))
    """
)


@pytest.mark.parametrize("vocab", [32_000, 128_256])
def test_trainer_loss_keeps_one_chunk_of_logits(vocab: int) -> None:
    """The kubetune trainer's loss over 4 chunks peaks at one chunk's 6 B per position per vocabulary entry,
    what vram.py charges (KT_LOGITS_BYTES), not the 14 B of a loss over logits kept for backward."""
    pytest.importorskip("kubetune_trainer.loss")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", CHUNKED_PROBE, str(vocab)], capture_output=True, text=True,
                         timeout=300, check=True, env=env)
    per_chunk_token_vocab = float(run.stdout.strip().splitlines()[-1])
    # measured: 6.05 (32k) and 5.74 (128k) B
    assert KT_LOGITS_BYTES * 0.90 <= per_chunk_token_vocab <= KT_LOGITS_BYTES * 1.05
