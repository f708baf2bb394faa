"""`kubetune train -f job.yaml`: plan in-process, then train on this machine (a local GPU, else the CPU)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.errors import SpecError
from kubetune.planning.models import model_architecture
from kubetune.planning.plan import local_knobs
from kubetune.spec import FineTuneJobSpec, parse_spec
from kubetune.trainer_config import JobRef, TrainerConfig

SAMPLE_PROMPT_ANNOTATION = "kubetune.io/sample-prompt"


def with_overrides(spec: FineTuneJobSpec, output: str | None, max_steps: int | None) -> FineTuneJobSpec:
    raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    if output:
        raw["output"]["uri"] = output
    if max_steps is not None:
        raw["training"]["maxSteps"] = max_steps
    try:
        return parse_spec(raw)
    except SpecError as exc:
        raise SpecError([line.replace("spec.output.uri", "--output").replace("spec.training.maxSteps", "--max-steps")
                         for line in exc.problems]) from None


def usable_memory(device_type: str, ranks: int = 1) -> tuple[int, str | None]:
    """What this machine offers each rank: 92% of the GPU's memory (and its name), or (CPU) half the free RAM
    shared by `ranks` processes that each hold a full copy (DDP)."""
    import torch

    if device_type == "cuda":  # the GPU's memory; a CPU's share of free RAM (tests: test_train.py, the CPU path)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory * 0.92), props.name
    import psutil

    return int(psutil.virtual_memory().available * 0.5) // max(1, ranks), None


def run_local(args: argparse.Namespace) -> int:
    from kubetune.jobfile import load_jobs
    from kubetune_trainer.loop import RunOptions
    from kubetune_trainer.model import pick_device
    from kubetune_trainer.progress import Log
    from kubetune_trainer.runner import run_job

    jobs = load_jobs(args.file)
    if len(jobs) != 1:
        raise SpecError(f"{args.file}: kubetune train runs one FineTuneJob; this file has {len(jobs)}")
    job = jobs[0]
    spec = with_overrides(job.spec, getattr(args, "output", None), getattr(args, "max_steps", None))
    device = pick_device(getattr(args, "device", "auto") or "auto")
    log = Log()
    started = time.perf_counter()
    arch = model_architecture(spec.model.name, spec.model.source, spec.model.revision)
    nproc = getattr(args, "nproc_per_node", None)
    nproc = 1 if nproc is None else nproc
    if nproc < 1:
        raise SpecError(f"--nproc-per-node: must be >= 1, got {nproc}")
    if device.type == "cuda" and nproc > torch_cuda_count():
        raise SpecError(f"--nproc-per-node: {nproc} ranks need {nproc} GPUs, this machine has {torch_cuda_count()}")
    usable, gpu = usable_memory(device.type, nproc)
    knobs, estimate = local_knobs(spec, arch, usable)
    log.event("plan", f"{job.metadata.namespace}/{job.metadata.name}: {arch.name} {spec.method} on "
              f"{gpu or 'the CPU'}: micro-batch {knobs.micro_batch_size} x accumulation "
              f"{knobs.gradient_accumulation_steps}, checkpointing {'on' if knobs.gradient_checkpointing else 'off'}, "
              f"{knobs.max_seq_length} tokens"
              + (f"; {nproc} ranks (torchrun, {'nccl' if device.type == 'cuda' else 'gloo'})" if nproc > 1 else ""))
    config = TrainerConfig(job=JobRef(name=job.metadata.name, namespace=job.metadata.namespace), spec=spec,
                           knobs=knobs, gpu_class=gpu, vram_estimate_bytes=estimate)
    prompt = getattr(args, "prompt", None) or job.metadata.annotations.get(SAMPLE_PROMPT_ANNOTATION)
    options = RunOptions(device=device.type, metrics_port=getattr(args, "metrics_port", 0) or 0,
                         termination_log=getattr(args, "termination_log", None), prompt=prompt,
                         download_progress=sys.stderr.isatty())  # a hub id's download: a byte bar at a terminal
    if nproc > 1:
        code, result = run_ranks(config, options, nproc)
    else:
        code, result = run_job(config, options, log)
    if code == 0:
        report(result, prompt, time.perf_counter() - started)
    return code


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_ranks(config: TrainerConfig, options: Any, nproc: int) -> tuple[int, Any]:
    """The trainer as `nproc` local ranks under torchrun (launch.py), as a pod with several GPUs runs it; the
    result is read back from rank 0's JSON summary."""
    import json
    import tempfile
    from types import SimpleNamespace

    from kubetune_trainer.launch import launch

    with tempfile.TemporaryDirectory(prefix="kubetune-train-") as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(config.model_dump_json(by_alias=True))
        summary = Path(options.termination_log or Path(tmp) / "summary.json")
        if options.prompt:
            print("kubetune: --prompt samples are shown on single-rank runs only", file=sys.stderr)
        code = launch(["--standalone", "--nproc-per-node", str(nproc), "-m", "kubetune_trainer",
                       "--config", str(path), "--device", options.device, "--metrics-port", str(options.metrics_port),
                       "--termination-log", str(summary)])
        fields = json.loads(summary.read_text()) if summary.exists() else {}
    result = SimpleNamespace(steps=fields.get("steps", 0), final_loss=fields.get("finalLoss"), first_loss=None,
                             adapter_uri=fields.get("adapterUri"), samples={})
    return code, result


def report(result: Any, prompt: str | None, seconds: float) -> None:
    out = sys.stdout
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "?"
    first = f"{result.first_loss:.4f} -> " if result.first_loss is not None else ""
    print(f"\nTrained {result.steps} steps in {seconds:.0f}s (train loss {first}{loss}).", file=out)
    print(f"Adapter: {shown(result.adapter_uri)}", file=out)
    if prompt and result.samples:
        print(f"\nPrompt: {prompt}", file=out)
        print(f"  before: {result.samples.get('before', '')}", file=out)
        print(f"  after:  {result.samples.get('after', '')}", file=out)


def shown(uri: str | None) -> str:
    """A local path below the working directory as ./relative (what the user typed), anything else as is."""
    if not uri or uri.startswith("s3://"):
        return str(uri)
    try:
        return "./" + Path(uri).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return uri
