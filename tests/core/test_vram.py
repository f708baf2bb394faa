"""The estimator against published figures (docs/vram_published.yaml) and against its own invariants."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kubetune.planning.models import CATALOG, catalog_lookup
from kubetune.planning.vram import LOGITS_BUDGET_BYTES, PARTS, GiB, TrainingShape, estimate, lora_param_count

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("vram_table", ROOT / "bench" / "vram_table.py")
assert _spec and _spec.loader
vram_table = importlib.util.module_from_spec(_spec)
sys.modules["vram_table"] = vram_table
_spec.loader.exec_module(vram_table)
ROWS = vram_table.load_rows()


def test_there_are_at_least_eight_published_rows() -> None:
    assert len(ROWS) >= 8
    assert all(row.source for row in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.model}-{r.method}-{r.figure_gib:g}" for r in ROWS])
def test_estimate_within_15_percent_and_never_5_percent_under(row) -> None:
    if not row.band:
        pytest.skip("a different recipe or setup than the estimator models; shown for comparison only")
    ratio = row.estimate_gib() / row.figure_gib
    assert ratio >= 0.95, f"under-estimate: {row.estimate_gib():.2f} GiB vs published {row.figure_gib} ({row.source})"
    assert ratio <= 1.15, f"over-estimate: {row.estimate_gib():.2f} GiB vs published {row.figure_gib} ({row.source})"


def test_docs_table_is_the_rendered_table() -> None:
    assert vram_table.markdown(ROWS) in (ROOT / "docs" / "vram.md").read_text(), \
        "docs/vram.md is stale: paste the output of `python bench/vram_table.py`"


LLAMA8 = catalog_lookup("meta-llama/Llama-3.1-8B")


def test_breakdown_has_every_part() -> None:
    est = estimate(LLAMA8, TrainingShape())
    assert tuple(est.parts) == PARTS
    assert all(v >= 0 for v in est.parts.values())
    assert est.total == sum(est.parts.values())


def test_nf4_base_is_about_a_quarter_of_16_bit() -> None:
    q = estimate(LLAMA8, TrainingShape(method="qlora")).parts["base_weights"]
    f = estimate(LLAMA8, TrainingShape(method="lora")).parts["base_weights"]
    # embeddings and lm_head stay 16-bit, so a bit more than a quarter
    assert 0.25 < q / f < 0.40


def test_double_quantization_saves_about_0_37_bits_per_parameter() -> None:
    with_dq = estimate(LLAMA8, TrainingShape(double_quant=True)).parts["quant_constants"]
    without = estimate(LLAMA8, TrainingShape(double_quant=False)).parts["quant_constants"]
    saved_bits = (without - with_dq) * 8 / LLAMA8.linear_params
    assert saved_bits == pytest.approx(0.373, abs=0.01)


def test_lora_param_count_matches_peft_for_llama_8b_r64() -> None:
    # peft's print_trainable_parameters() for Llama-3.1-8B, r=64 on all seven projections: 167,772,160
    assert lora_param_count(LLAMA8, TrainingShape(lora_r=64)) == 167_772_160


def test_checkpointing_cuts_activations_and_batch_scales_them() -> None:
    on = estimate(LLAMA8, TrainingShape(gradient_checkpointing=True)).parts["activations"]
    off = estimate(LLAMA8, TrainingShape(gradient_checkpointing=False)).parts["activations"]
    assert off > 8 * on
    one = estimate(LLAMA8, TrainingShape(micro_batch=1)).parts["activations"]
    four = estimate(LLAMA8, TrainingShape(micro_batch=4)).parts["activations"]
    assert four == pytest.approx(4 * one, rel=0.01)


def test_plain_recipe_logits_grow_with_vocabulary() -> None:
    gemma = estimate(CATALOG["google/gemma-2-2b"], TrainingShape(recipe="hf")).parts["logits"]
    smol = estimate(CATALOG["huggingfacetb/smollm2-135m"], TrainingShape(recipe="hf")).parts["logits"]
    assert gemma / smol == pytest.approx(256000 / 49152, rel=0.01)


@pytest.mark.parametrize("name", ["google/gemma-2-2b", "meta-llama/llama-3.1-8b", "huggingfacetb/smollm2-135m"])
@pytest.mark.parametrize("seq", [2048, 32768])
def test_trainer_logits_are_one_chunk_whatever_the_vocabulary_and_length(name: str, seq: int) -> None:
    """The trainer's loss chunk keeps its fp32 logits under 256 MiB: 6 B per entry is 1.5x that, plus 6 B per
    labelled position per hidden unit (its hidden state and gradient)."""
    arch = CATALOG[name]
    logits = estimate(arch, TrainingShape(seq_len=seq)).parts["logits"]
    assert logits <= 1.5 * LOGITS_BUDGET_BYTES + 6 * seq * arch.hidden
    assert logits < estimate(arch, TrainingShape(seq_len=seq, recipe="hf")).parts["logits"] / 3


def test_sharding_divides_weights_not_logits() -> None:
    arch = CATALOG["meta-llama/llama-3.1-405b"]
    # the plain recipe: one GPU keeps the input embeddings there too, as several do
    one = estimate(arch, TrainingShape(gpu_count=1, recipe="hf")).parts
    four = estimate(arch, TrainingShape(gpu_count=4, recipe="hf")).parts
    assert four["base_weights"] == pytest.approx(one["base_weights"] / 4, rel=0.01)
    assert four["logits"] == one["logits"]


def test_8bit_optimizer_uses_a_quarter_of_32bit() -> None:
    a = estimate(LLAMA8, TrainingShape(optimizer="paged_adamw_32bit")).parts["optimizer_states"]
    b = estimate(LLAMA8, TrainingShape(optimizer="paged_adamw_8bit")).parts["optimizer_states"]
    assert b == pytest.approx(a / 4, rel=0.01)


def test_catalog_parameter_counts_match_model_cards() -> None:
    expected_billions = {
        "meta-llama/llama-3.2-1b": 1.24, "meta-llama/llama-3.2-3b": 3.21, "meta-llama/llama-3.1-8b": 8.03,
        "meta-llama/llama-3.1-70b": 70.6, "meta-llama/llama-3.1-405b": 405.9, "mistralai/mistral-7b-v0.3": 7.25,
        "mistralai/mixtral-8x7b-v0.1": 46.7, "qwen/qwen2.5-0.5b": 0.49, "qwen/qwen2.5-7b": 7.6,
        "qwen/qwen2.5-72b": 72.7, "google/gemma-2-2b": 2.61, "google/gemma-2-9b": 9.24, "google/gemma-2-27b": 27.2,
        "microsoft/phi-3.5-mini-instruct": 3.82, "huggingfacetb/smollm2-135m": 0.135,
        "huggingfacetb/smollm2-1.7b": 1.71,
    }
    for name, billions in expected_billions.items():
        # biases (Qwen's qkv) are not counted, so allow 2%
        assert CATALOG[name].total_params / 1e9 == pytest.approx(billions, rel=0.02), name


def test_estimates_are_sensible_in_gib() -> None:
    # 12.3 GiB before the trainer's loss chunk was sized by the vocabulary and the input embeddings moved to host
    assert estimate(LLAMA8, TrainingShape()).total / GiB == pytest.approx(7.9, abs=0.3)


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_trainer_hosts_the_input_embeddings_of_untied_models_on_one_gpu(method: str) -> None:
    untied, tied = LLAMA8, CATALOG["meta-llama/llama-3.2-1b"]
    assert not untied.tied_embeddings and tied.tied_embeddings
    table = untied.vocab * untied.hidden * 2  # bf16
    ours = estimate(untied, TrainingShape(method=method)).parts["base_weights"]
    plain = estimate(untied, TrainingShape(method=method, recipe="hf")).parts["base_weights"]
    assert plain - ours == pytest.approx(table, abs=2)
    # a tied table is lm_head's weight too, so it stays; with several GPUs it stays (layers are split)
    for arch, count in ((tied, 1), (untied, 2)):
        shape = TrainingShape(method=method, gpu_count=count)
        assert estimate(arch, shape).parts["base_weights"] == \
            estimate(arch, TrainingShape(method=method, gpu_count=count, recipe="hf")).parts["base_weights"]
