"""The trainer's loss (kubetune_trainer.loss) equals the plain cross-entropy over the labelled positions, in value
and in gradient, on every path; it never holds more than one chunk of logits, in training or in eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer import loss as loss_mod
from torch.utils._python_dispatch import TorchDispatchMode

from kubetune.planning.vram import LOGITS_BUDGET_BYTES, loss_chunk_tokens


def reference(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def loss_and_grads(fn: Any, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    value = fn(hidden, targets, head)
    (value * scale).backward()
    weight_grad = head.weight.grad.clone() if head.weight.grad is not None else None
    return value.detach(), hidden.grad.clone(), weight_grad  # type: ignore[union-attr]


@pytest.mark.parametrize("chunk", [None, 7, 1])
def test_fused_loss_matches_full_cross_entropy_fp32(chunk: int | None) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(30, 16), torch.randint(0, 50, (30,))
    assert loss_mod.loss_path(head, hidden.device) == "fused"
    got = loss_and_grads(lambda h, y, m: loss_mod.linear_cross_entropy_sum(h, y, m, chunk), hidden, targets, head,
                         scale=1 / 30)
    want = loss_and_grads(reference, hidden, targets, head, scale=1 / 30)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_fused_loss_under_bf16_autocast_matches_autocast_head() -> None:
    """The trainer's setting: bf16 hidden states and head under autocast; fp32 softmax and loss."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden, targets = torch.randn(40, 64).to(torch.bfloat16), torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(lambda h, y, m: loss_mod.linear_cross_entropy_sum(h, y, m, 16), hidden, targets, head)
        want = loss_and_grads(reference, hidden, targets, head)
    assert got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=2e-3)


def test_eval_loss_without_grad_is_the_same_value() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(30, 16), torch.randint(0, 50, (30,))
    with torch.no_grad():
        got = loss_mod.linear_cross_entropy_sum(hidden, targets, head, 8)
    torch.testing.assert_close(got, reference(hidden, targets, head))


@pytest.mark.parametrize("chunk", [4096, 7])
def test_a_trained_head_takes_the_checkpointed_path_with_its_weight_gradient(chunk: int) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden, targets = torch.randn(30, 16), torch.randint(0, 50, (30,))
    assert loss_mod.loss_path(head, hidden.device) == "checkpointed"
    got = loss_and_grads(lambda h, y, m: loss_mod.linear_cross_entropy_sum(h, y, m, chunk), hidden, targets, head)
    want = loss_and_grads(reference, hidden, targets, head)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_chunk_is_sized_by_the_vocabulary() -> None:
    for vocab in (32_000, 49_152, 128_256, 151_936, 256_000):
        rows = loss_chunk_tokens(vocab)
        assert rows * vocab * 4 <= LOGITS_BUDGET_BYTES  # one chunk's fp32 logits within the budget
        assert (rows + 64) * vocab * 4 > LOGITS_BUDGET_BYTES  # and not needlessly small
    assert loss_chunk_tokens(128_256) == 512
    assert loss_chunk_tokens(10**9) == 1


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_trainer_never_holds_more_than_one_chunk_of_logits(tmp_path: Path, tiny_model_dir: Path,
                                                               spec_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Recipe on a tiny Llama with SmolLM2's 49k vocabulary: one training micro-batch (forward and
    backward) and one eval pass; the largest tensor any op makes is one chunk's logits, never all of them."""
    from kubetune_trainer import data as data_mod
    from kubetune_trainer.loop import Recipe, RunOptions
    from kubetune_trainer.metrics import Telemetry
    from kubetune_trainer.progress import Log

    from kubetune.planning.plan import Knobs
    from kubetune.spec import parse_spec
    from kubetune.trainer_config import JobRef, TrainerConfig

    rows_file = tmp_path / "long.jsonl"
    rows_file.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell me about item {i}."},
        {"role": "assistant", "content": " ".join(f"Item {i} has part {k} in copper and zinc." for k in range(12))},
    ]}) + "\n" for i in range(16)))
    spec = parse_spec(spec_for(tiny_model_dir, rows_file, str(tmp_path / "out"), maxSeqLength=512,
                               microBatchSize=4))
    knobs = Knobs(micro_batch_size=4, gradient_accumulation_steps=1, gradient_checkpointing=True,
                  max_seq_length=512)
    config = TrainerConfig(job=JobRef(name="probe"), spec=spec, knobs=knobs, vram_estimate_bytes=1)
    recipe = Recipe(config, RunOptions(device="cpu"), Telemetry("probe", "probe"),
                    Log(stream=(tmp_path / "log").open("w"), fmt="json"))
    recipe.setup()
    vocab = recipe.model.get_output_embeddings().weight.shape[0]
    chunk = 100  # several chunks for this batch; one chunk's logits outsize the head's weight (vocab x 64)
    rows = recipe.train_data.rows[:4]
    batch = data_mod.collate(rows, recipe.pad_id)
    labelled = int((batch["targets"] != data_mod.IGNORE).sum())
    assert labelled > 3 * chunk
    monkeypatch.setattr(loss_mod, "loss_chunk_tokens", lambda vocab, budget=0: chunk)
    with LargestTensor() as train_probe:
        recipe.loss_sum(batch).backward()
    recipe.model.eval()
    with LargestTensor() as eval_probe, torch.no_grad():
        recipe.loss_sum(batch)
    for probe in (train_probe, eval_probe):
        assert probe.largest <= chunk * vocab, (probe.largest, chunk * vocab, labelled * vocab)
    assert any(p.grad is not None for p in recipe.params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton: CUDA only")
def test_liger_path_on_cuda_matches_the_fused_path() -> None:
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 32_000, bias=False).to("cuda", torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 32_000, (1024,), device="cuda")
    assert loss_mod.loss_path(head, hidden.device) == "liger"
    got = loss_and_grads(loss_mod.linear_cross_entropy_sum, hidden, targets, head)
    want = loss_and_grads(reference, hidden, targets, head)
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=1e-1)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=3e-2, atol=3e-3)
