"""The merged export in bounded memory: the 16-bit base + the LoRA adapter, one tensor at a time.

`merge_and_unload()` needs the whole base in host memory (16 GB for an 8B model, 140 GB for 70B), which a pod
sized for QLoRA does not have. Here the base's safetensors files are read tensor by tensor with plain file
reads (no mmap, so nothing of a shard stays resident), each LoRA-targeted weight gets `W + scale * B @ A`
computed in row blocks, and the merged tensors are written into output shards of at most `shard_bytes`, each
handed to `emit` (upload, then delete) as soon as it is complete. Host memory stays within about one tensor,
disk within one output shard, whatever the model's size.

The arithmetic is PEFT's (peft/tuners/lora/layer.py `get_delta_weight` and `merge`): scaling = alpha / r, or
alpha / sqrt(r) with `use_rslora`, per-module `rank_pattern` / `alpha_pattern`; the delta is computed in fp32
and transposed for `fan_in_fan_out` (and for embeddings); the sum is taken in fp32 and rounded once to the
weight's dtype; `modules_to_save` weights replace the base's. A QLoRA adapter merges into the 16-bit base on
disk, never into the NF4 copy it trained on.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch

from kubetune.errors import SpecError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 1 << 30  # output shards of at most 1 GiB (a tensor larger than that gets a shard of its own)
ROWS = 4096  # rows of a weight merged at once
COPIED = ("config.json", "generation_config.json")
PEFT_PREFIX = "base_model.model."
Emit = Callable[[Path, str], None]  # (a finished local file, its name in the output folder)


class MergeError(SpecError):
    """The base or the adapter cannot be merged (not safetensors, DoRA, a LoRA weight with no base weight)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, as its header describes it."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    length: int


def read_header(path: Path) -> list[Entry]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(size))
    entries = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries.append(Entry(path, name, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin,
                             end - begin))
    return sorted(entries, key=lambda e: e.start)


def read_tensor(f: BufferedReader, entry: Entry) -> torch.Tensor:
    f.seek(entry.start)
    buffer = bytearray(entry.length)
    f.readinto(buffer)
    if not entry.length:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)


def base_files(model_dir: Path) -> list[Path]:
    """The base's weight files: those the index names, or the one model.safetensors."""
    index = model_dir / INDEX
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in model_dir.iterdir() if p.is_file())) or "nothing"
        raise MergeError(f"spec.output.mergedModel: the base model in {model_dir} has no safetensors weights "
                         f"(found: {found}); the streamed merge reads safetensors only")
    return files


# --- the adapter ---------------------------------------------------------------------------------------------

def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class Delta:
    a: torch.Tensor  # (r, in) for Linear; (r, num_embeddings) for an embedding
    b: torch.Tensor  # (out, r); (dim, r)
    scale: float
    transpose: bool  # fan_in_fan_out (Conv1D-style weights) and embeddings: the delta is (B @ A).T


@dataclass(frozen=True)
class Adapter:
    deltas: dict[str, Delta]  # base weight name -> its LoRA delta
    replaced: dict[str, torch.Tensor]  # base weight name -> a modules_to_save weight


def load_adapter(folder: Path) -> Adapter:
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise MergeError("spec.output.mergedModel: DoRA adapters are not merged by the streamed export")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    deltas, replaced = {}, {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        found = re.match(r"^(.*)\.(lora_A|lora_embedding_A)(\.weight)?$", name)
        if found:
            module, kind = found.group(1), found.group(2)
            b_key = key.replace(f".{kind}", ".lora_B" if kind == "lora_A" else ".lora_embedding_B")
            rank = int(_pattern(config.get("rank_pattern") or {}, module, r))
            scale_alpha = float(_pattern(config.get("alpha_pattern") or {}, module, alpha))
            scale = scale_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            embedding = kind == "lora_embedding_A"
            deltas[f"{module}.weight"] = Delta(value, tensors[b_key], scale,
                                               embedding or bool(config.get("fan_in_fan_out")))
        elif not re.search(r"\.(lora_B|lora_embedding_B)(\.weight)?$", name):
            replaced[name] = value  # a full weight (modules_to_save)
    return Adapter(deltas, replaced)


def merged_tensor(weight: torch.Tensor, delta: Delta) -> torch.Tensor:
    """W + scale * B @ A (transposed when asked), summed in fp32 and rounded once, ROWS rows at a time."""
    a, b = delta.a.float(), delta.b.float()
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], ROWS):
        rows = slice(start, start + ROWS)
        part = (a.T[rows] @ b.T) if delta.transpose else (b[rows] @ a)
        out[rows] = (weight[rows].float() + part * delta.scale).to(weight.dtype)
    return out


# --- writing ---------------------------------------------------------------------------------------------------

def plan_shards(entries: list[Entry], dtype_of: Callable[[Entry], torch.dtype],
                shard_bytes: int) -> list[list[Entry]]:
    """Group the tensors, in order, into output shards of at most shard_bytes (in their output dtype)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry.shape) * dtype_of(entry).itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return [s for s in shards if s]


def write_shard(path: Path, entries: list[Entry], dtype_of: Callable[[Entry], torch.dtype],
                tensors: Iterator[torch.Tensor]) -> int:
    """A safetensors file written tensor by tensor (the header first: offsets follow from shapes and dtypes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        nbytes = math.prod(entry.shape) * dtype_of(entry).itemsize
        header[entry.name] = {"dtype": NAMES[dtype_of(entry)], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, tensor in zip(entries, tensors, strict=True):
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def stream_merge(model_dir: Path, adapter_dir: Path, out: Path, emit: Emit, dtype: torch.dtype | None = None,
                 shard_bytes: int = SHARD_BYTES) -> dict[str, int]:
    """Merge the adapter into the base's safetensors, writing shards under `out` and emitting each when written
    (emit uploads it and may delete it). `dtype`: cast floating tensors to it (None: keep the base's). Returns
    {output file: bytes}. Raises MergeError naming a LoRA weight that has no tensor in the base."""
    adapter = load_adapter(adapter_dir)
    entries = [e for path in base_files(model_dir) for e in read_header(path)]
    missing = sorted(set(adapter.deltas) - {e.name for e in entries})
    if missing:
        raise MergeError(f"spec.output.mergedModel: the adapter has LoRA weights for {', '.join(missing[:4])} "
                         f"that are not in the base model's safetensors in {model_dir}")

    def dtype_of(entry: Entry) -> torch.dtype:
        return dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype

    def produce(shard: list[Entry]) -> Iterator[torch.Tensor]:
        for entry in shard:
            with entry.file.open("rb") as f:
                tensor = read_tensor(f, entry).to(dtype_of(entry))
            if entry.name in adapter.replaced:
                tensor = adapter.replaced[entry.name].to(tensor.dtype)
            elif entry.name in adapter.deltas:
                tensor = merged_tensor(tensor, adapter.deltas[entry.name])
            yield tensor

    shards = plan_shards(entries, dtype_of, shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        written[name] = write_shard(out / name, shard, dtype_of, produce(shard))
        weight_map.update({e.name: name for e in shard})
        emit(out / name, name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(written.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2))
        emit(out / INDEX, INDEX)
    for copied in COPIED:
        if (model_dir / copied).is_file():
            target = out / copied
            shutil.copyfile(model_dir / copied, target)
            if copied == "config.json" and dtype is not None:
                config = json.loads(target.read_text())
                config.update({k: str(dtype).removeprefix("torch.") for k in ("dtype", "torch_dtype") if k in config})
                target.write_text(json.dumps(config, indent=2))
            emit(target, copied)
    return written
