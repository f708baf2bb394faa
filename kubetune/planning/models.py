"""Model architectures: the numbers the VRAM estimator needs, for the families people tune.

Unknown models are read from their `config.json` (a local directory, the Hugging Face cache, or an
S3 prefix through a caller-supplied reader), so any Llama-like causal LM can be planned.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from kubetune.errors import HubUnreachable, SpecError
from kubetune.spec import BUNDLED_MODELS


@dataclass(frozen=True)
class Architecture:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int = 0  # 0 means hidden // heads
    experts: int = 1  # MoE: experts per layer (each holds a full MLP)
    experts_per_token: int = 1
    max_position: int = 131072

    # Derived numbers, computed once per Architecture (the planner's search asks for them thousands of times
    # per plan); cached_property writes the instance's __dict__, which a frozen dataclass allows.
    @cached_property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @cached_property
    def q_dim(self) -> int:
        return self.heads * self.dim_per_head

    @cached_property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim_per_head

    def linear_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Per-layer linear projections: name -> (in_features, out_features, copies per layer)."""
        return dict(self.projections)

    @cached_property
    def projections(self) -> Mapping[str, tuple[int, int, int]]:
        """linear_shapes(), computed once (vram.estimate reads it for every estimate); read-only (a Mapping; a plain
        dict underneath, so an Architecture still pickles and deep-copies)."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim, 1),
            "k_proj": (h, self.kv_dim, 1),
            "v_proj": (h, self.kv_dim, 1),
            "o_proj": (self.q_dim, h, 1),
            "gate_proj": (h, i, self.experts),
            "up_proj": (h, i, self.experts),
            "down_proj": (i, h, self.experts),
        }

    @cached_property
    def largest_projection(self) -> int:
        """Elements of the largest per-layer projection weight (bitsandbytes dequantizes one at a time)."""
        return max(i * o for i, o, _ in self.projections.values())

    @cached_property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers: what NF4 quantizes."""
        per_layer = sum(i * o * n for i, o, n in self.projections.values())
        router = self.hidden * self.experts if self.experts > 1 else 0
        return self.layers * (per_layer + router)

    @cached_property
    def embedding_params(self) -> int:
        """Input embedding plus, unless tied, the output head: kept in 16-bit."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @cached_property
    def norm_params(self) -> int:
        return self.layers * 2 * self.hidden + self.hidden

    @cached_property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


def _arch(name: str, layers: int, hidden: int, intermediate: int, heads: int, kv: int, vocab: int,
          tied: bool, **extra: Any) -> Architecture:
    return Architecture(name, layers, hidden, intermediate, heads, kv, vocab, tied, **extra)


# Numbers from each model's config.json on the Hugging Face hub.
CATALOG: dict[str, Architecture] = {
    a.name.lower(): a
    for a in [
        _arch("meta-llama/Llama-3.2-1B", 16, 2048, 8192, 32, 8, 128256, True),
        _arch("meta-llama/Llama-3.2-3B", 28, 3072, 8192, 24, 8, 128256, True),
        _arch("meta-llama/Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256, False),
        _arch("meta-llama/Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128256, False),
        _arch("meta-llama/Llama-3.1-405B", 126, 16384, 53248, 128, 8, 128256, False),
        _arch("meta-llama/Llama-2-7b-hf", 32, 4096, 11008, 32, 32, 32000, False, max_position=4096),
        _arch("meta-llama/Llama-2-13b-hf", 40, 5120, 13824, 40, 40, 32000, False, max_position=4096),
        _arch("huggyllama/llama-30b", 60, 6656, 17920, 52, 52, 32000, False, max_position=2048),
        _arch("huggyllama/llama-65b", 80, 8192, 22016, 64, 64, 32000, False, max_position=2048),
        _arch("meta-llama/Llama-2-70b-hf", 80, 8192, 28672, 64, 8, 32000, False, max_position=4096),
        _arch("01-ai/Yi-34B", 60, 7168, 20480, 56, 8, 64000, False, max_position=4096),
        _arch("mistralai/Mistral-7B-v0.3", 32, 4096, 14336, 32, 8, 32768, False, max_position=32768),
        _arch("mistralai/Mixtral-8x7B-v0.1", 32, 4096, 14336, 32, 8, 32000, False, experts=8,
              experts_per_token=2, max_position=32768),
        _arch("Qwen/Qwen2.5-0.5B", 24, 896, 4864, 14, 2, 151936, True, max_position=32768),
        _arch("Qwen/Qwen2.5-1.5B", 28, 1536, 8960, 12, 2, 151936, True, max_position=32768),
        _arch("Qwen/Qwen2.5-3B", 36, 2048, 11008, 16, 2, 151936, True, max_position=32768),
        _arch("Qwen/Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, False, max_position=32768),
        _arch("Qwen/Qwen2.5-14B", 48, 5120, 13824, 40, 8, 152064, False, max_position=32768),
        _arch("Qwen/Qwen2.5-32B", 64, 5120, 27648, 40, 8, 152064, False, max_position=32768),
        _arch("Qwen/Qwen2.5-72B", 80, 8192, 29568, 64, 8, 152064, False, max_position=32768),
        _arch("google/gemma-2-2b", 26, 2304, 9216, 8, 4, 256000, True, head_dim=256, max_position=8192),
        _arch("google/gemma-2-9b", 42, 3584, 14336, 16, 8, 256000, True, head_dim=256, max_position=8192),
        _arch("google/gemma-2-27b", 46, 4608, 36864, 32, 16, 256000, True, head_dim=128, max_position=8192),
        _arch("microsoft/Phi-3.5-mini-instruct", 32, 3072, 8192, 32, 32, 32064, False),
        _arch("HuggingFaceTB/SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, True, max_position=8192),
        _arch("HuggingFaceTB/SmolLM2-360M", 32, 960, 2560, 15, 5, 49152, True, max_position=8192),
        _arch("HuggingFaceTB/SmolLM2-1.7B", 24, 2048, 8192, 32, 32, 49152, True, max_position=8192),
    ]
}

# Hub ids people actually write map onto the base architecture: -Instruct/-chat/-it change weights, not shapes.
_ALIASES = {
    "meta-llama/meta-llama-3.1-8b": "meta-llama/llama-3.1-8b",
    "meta-llama/meta-llama-3-8b": "meta-llama/llama-3.1-8b",
    "meta-llama/llama-3.3-70b": "meta-llama/llama-3.1-70b",
    "meta-llama/meta-llama-3.1-70b": "meta-llama/llama-3.1-70b",
    "meta-llama/meta-llama-3.1-405b": "meta-llama/llama-3.1-405b",
    "mistralai/mistral-7b": "mistralai/mistral-7b-v0.3",
    "mistralai/mistral-7b-v0.1": "mistralai/mistral-7b-v0.3",
    "mistralai/mixtral-8x7b": "mistralai/mixtral-8x7b-v0.1",
    "microsoft/phi-3.5-mini": "microsoft/phi-3.5-mini-instruct",
    "llama-2-7b": "meta-llama/llama-2-7b-hf",
    "llama-2-13b": "meta-llama/llama-2-13b-hf",
}


def catalog_lookup(model_id: str) -> Architecture | None:
    """Find a hub id in the catalog, forgiving case and -Instruct/-chat/-it suffixes."""
    key = model_id.strip().lower()
    plain = re.sub(r"-(instruct|chat|it)(?=-|$)", "", key)
    candidates = [key, plain, plain.removesuffix("-hf")]
    for candidate in candidates:
        candidate = _ALIASES.get(candidate, candidate)
        if candidate in CATALOG:
            return CATALOG[candidate]
    return None


def architecture_from_config(config: dict[str, Any], name: str) -> Architecture:
    """Read a Hugging Face config.json (Llama, Mistral, Mixtral, Qwen2, Gemma 2, Phi-3 and alikes)."""
    text = config.get("text_config", config)
    try:
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        return Architecture(
            name=name,
            layers=int(text["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(text["intermediate_size"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            vocab=int(text["vocab_size"]),
            tied_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
            head_dim=int(text.get("head_dim") or hidden // heads),
            experts=int(text.get("num_local_experts") or text.get("num_experts") or 1),
            experts_per_token=int(text.get("num_experts_per_tok") or 1),
            max_position=int(text.get("max_position_embeddings") or 131072),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(
            f"spec.model: config.json of {name!r} lacks a usable {exc} (need hidden_size, num_hidden_layers, "
            "intermediate_size, num_attention_heads, vocab_size)"
        ) from None


def _hf_cache_config(model_id: str) -> Path | None:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{model_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


ConfigReader = Callable[[str], dict[str, Any] | None]
HubConfigReader = Callable[[str, str | None], dict[str, Any]]


def resolve_architecture(name: str | None, source: str | None,
                         read_remote_config: ConfigReader | None = None,
                         read_hub_config: HubConfigReader | None = None, revision: str | None = None) -> Architecture:
    """The architecture of spec.model: the catalog by name, else a config.json next to the weights, in the
    Hugging Face cache, or (a hub id with `read_hub_config`) on the hub the trainer downloads from.

    `read_remote_config(uri)` reads `config.json` under an s3:// prefix; the planner passes one when it
    may do I/O (the CLI and the operator), and tests pass a real S3-backed one.
    """
    if name and (arch := catalog_lookup(name)):
        return arch
    if source and source.startswith("bundled://"):
        bundled = BUNDLED_MODELS.get(source.removeprefix("bundled://"))
        if bundled and (arch := catalog_lookup(bundled)):
            return arch
    label = name or source or "?"
    if source and source.endswith(".gguf"):
        path = Path(source).expanduser()
        arch = architecture_from_gguf(path) if path.is_file() else None
        if arch:
            return replace(arch, name=label)
    elif source and source.startswith("s3://"):
        config = read_remote_config(source) if read_remote_config else None
        if config is not None:
            return architecture_from_config(config, label)
    elif source:
        config_path = Path(source).expanduser() / "config.json"
        if config_path.is_file():
            return architecture_from_config(json.loads(config_path.read_text()), label)
    if name and (cached := _hf_cache_config(name)):
        return architecture_from_config(json.loads(cached.read_text()), label)
    known = ", ".join(sorted(a.name for a in CATALOG.values()))
    instead = (f"use a catalog model ({known}) or point spec.model.source at a directory or s3:// prefix holding "
               "config.json")
    if name and not source and read_hub_config is not None:

        try:
            return architecture_from_config(read_hub_config(name, revision), label)
        except HubUnreachable as exc:  # not the spec's fault: callers retry (the operator keeps the job Pending)
            raise HubUnreachable(f"spec.model: {label!r} is not in the catalog and the hub did not serve its "
                                 f"config.json ({str(exc).removeprefix('spec.model.name: ')}); retry when it "
                                 f"answers, or {instead}") from None
    raise SpecError(
        f"spec.model: unknown model {label!r} and no readable config.json "
        f"(looked in {'the source and ' if source else ''}the Hugging Face cache). {instead[0].upper()}{instead[1:]}."
    )


def architecture_from_gguf(path: Path) -> Architecture | None:
    """Read the architecture from a GGUF header (the `gguf` package ships with the trainer extra)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    reader = GGUFReader(str(path))
    fields = reader.fields
    arch_name = bytes(fields["general.architecture"].parts[-1]).decode()

    def value(key: str, default: int | None = None) -> int:
        field = fields.get(f"{arch_name}.{key}")
        if field is None:
            if default is None:
                raise KeyError(key)
            return default
        return int(field.parts[-1][0])

    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else value("vocab_size")
    heads = value("attention.head_count")
    hidden = value("embedding_length")
    tensor_names = {t.name for t in reader.tensors}
    return Architecture(
        name=str(path),
        layers=value("block_count"),
        hidden=hidden,
        intermediate=value("feed_forward_length"),
        heads=heads,
        kv_heads=value("attention.head_count_kv", heads),
        vocab=vocab,
        tied_embeddings="output.weight" not in tensor_names,
        max_position=value("context_length", 8192),
    )
