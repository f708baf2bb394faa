"""spec.evaluation in the plan: its time is in the estimated hours, and its generation's memory is covered."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.planning.evaluation import eval_cost, held_out_tokens
from kubetune.planning.gpus import load_catalog
from kubetune.planning.knobs import training_shape
from kubetune.planning.models import Architecture
from kubetune.planning.plan import make_plan
from kubetune.planning.vram import estimate, generation_bytes, kv_cache_bytes
from kubetune.sources import model_architecture
from kubetune.spec import FineTuneJobSpec, parse_spec

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def spec(evaluation: dict[str, Any] | None = None, **training: Any) -> FineTuneJobSpec:
    raw: dict[str, Any] = {"model": {"name": LLAMA_8B}, "dataset": {"source": "s3://data/train.jsonl",
                                                                   "evalFraction": 0.1},
                           "training": {"maxSteps": 500, **training}, "output": {"uri": "s3://out/x/"}}
    if evaluation is not None:
        raw["evaluation"] = evaluation
    return parse_spec(raw)


def test_the_estimated_hours_include_the_evaluation() -> None:
    arch, catalog = model_architecture(LLAMA_8B, None), load_catalog(provisionable=())
    plain = make_plan(spec(), arch, catalog)
    judged = make_plan(spec({"prompts": ["a", "b", "c", "d"], "maxNewTokens": 256}), arch, catalog)
    assert plain.eval_seconds == 0 and judged.eval_seconds > 0
    assert judged.gpu_class == plain.gpu_class and judged.step_seconds == plain.step_seconds
    assert judged.estimated_hours == pytest.approx(plain.estimated_hours + judged.eval_seconds / 3600)
    assert judged.summary()["evalSeconds"] == round(judged.eval_seconds, 1)
    [reason] = [r for r in judged.reasons if r.startswith("evaluation (spec.evaluation)")]
    assert "2 forward passes over" in reason and "2,048 generated tokens" in reason  # 4 prompts x 256 x 2 models


def test_compare_base_doubles_the_work_and_more_prompts_cost_more() -> None:
    arch = model_architecture(LLAMA_8B, None)
    weights = estimate(arch, training_shape(spec(), 1, True, 1)).parts["base_weights"]

    def cost(evaluation: dict[str, Any]) -> Any:
        return eval_cost(spec(evaluation), arch, "L4", 1, 500, 16 * 2048, weights)

    both, adapter_only = cost({"prompts": ["a"] * 4}), cost({"prompts": ["a"] * 4, "compareBase": False})
    assert both.forward_passes == 2 and adapter_only.forward_passes == 1
    assert both.seconds == pytest.approx(2 * adapter_only.seconds)
    assert cost({"prompts": ["a"] * 8}).seconds > both.seconds
    assert cost({"prompts": "s3://data/prompts.jsonl", "maxAnswers": 8}).generated_tokens == 8 * 64 * 2
    # held out: evalFraction f of the data is f / (1 - f) of what training reads in an epoch
    assert held_out_tokens(spec(), 500, 1000) == int(500 * 1000 * 0.1 / 0.9)


def test_generation_memory_is_charged_when_the_training_activations_do_not_cover_it() -> None:
    arch = model_architecture(LLAMA_8B, None)
    long_rows = spec({"prompts": ["a"], "maxNewTokens": 1024})  # training rows of 2,048 tokens
    covered = estimate(arch, training_shape(long_rows, 1, True, 1))
    assert covered.parts["generation"] == 0  # the KV cache of 3,072 tokens fits in what a training step frees
    short_rows = spec({"prompts": ["a"], "maxNewTokens": 1024}, maxSeqLength=64)
    shape = training_shape(short_rows, 1, True, 1)
    charged = estimate(arch, shape)
    need = generation_bytes(arch, 64 + 1024)
    assert charged.parts["generation"] > 0
    assert charged.parts["generation"] + charged.parts["activations"] + charged.parts["logits"] == \
        pytest.approx(need, abs=2)
    without = estimate(arch, training_shape(spec(None, maxSeqLength=64), 1, True, 1))
    assert "generation" not in without.parts and charged.total > without.total
    assert kv_cache_bytes(arch, 1088) == 1088 * 128 * 1024  # Llama-3.1-8B: 128 KiB of keys and values a token


def test_the_kv_cache_term_is_what_transformers_allocates() -> None:
    """The cache term of generation_bytes against the KV cache a real greedy generate() builds (tiny Llama)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 512, (1, 20))
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                         min_new_tokens=12, do_sample=False, return_dict_in_generate=True, use_cache=True)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    arch = Architecture(name="tiny", layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512,
                        tied_embeddings=True)
    tokens = out.sequences.shape[1] - 1  # the last token is sampled, never fed back
    assert held == kv_cache_bytes(arch, tokens) and generation_bytes(arch, tokens) > held
