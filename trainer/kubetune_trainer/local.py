"""`kubetune train -f job.yaml`: plan in-process, then train on this machine (a local GPU, else the CPU)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.errors import SpecError
from kubetune.planning.models import Architecture, model_architecture
from kubetune.planning.plan import Knobs, effective_batch, fastest_knobs
from kubetune.spec import FineTuneJobSpec, parse_spec
from kubetune_trainer.config import JobRef, TrainerConfig

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


def local_knobs(spec: FineTuneJobSpec, arch: Architecture, device_type: str) -> tuple[Knobs, int, str | None]:
    """The planner's fastest knobs for the memory this machine has: the GPU's, or (CPU) half the free RAM."""
    import torch

    if device_type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        usable, gpu = int(props.total_memory * 0.92), props.name
    else:
        import psutil

        usable, gpu = int(psutil.virtual_memory().available * 0.5), None
    best = fastest_knobs(spec, arch, usable)
    mb = spec.training.micro_batch_size
    gc = spec.training.gradient_checkpointing
    if best is None:  # too big by the estimate: try the leanest settings anyway, the run will tell
        shape_mb, shape_gc, estimate = (mb if isinstance(mb, int) else 1), (gc if isinstance(gc, bool) else True), 0
    else:
        shape, est = best
        shape_mb, shape_gc, estimate = shape.micro_batch, shape.gradient_checkpointing, est.total
    batch = effective_batch(spec)
    knobs = Knobs(micro_batch_size=shape_mb, gradient_accumulation_steps=max(1, batch // shape_mb),
                  gradient_checkpointing=shape_gc, max_seq_length=spec.training.max_seq_length,
                  compute_dtype="bfloat16")
    return knobs, estimate, gpu


def run_local(args: argparse.Namespace) -> int:
    from kubetune.cli import load_jobs
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
    arch = model_architecture(spec.model.name, spec.model.source)
    knobs, estimate, gpu = local_knobs(spec, arch, device.type)
    log.event("plan", f"{job.metadata.namespace}/{job.metadata.name}: {arch.name} {spec.method} on "
              f"{gpu or 'the CPU'}: micro-batch {knobs.micro_batch_size} x accumulation "
              f"{knobs.gradient_accumulation_steps}, checkpointing {'on' if knobs.gradient_checkpointing else 'off'}, "
              f"{knobs.max_seq_length} tokens")
    config = TrainerConfig(job=JobRef(name=job.metadata.name, namespace=job.metadata.namespace), spec=spec,
                           knobs=knobs, gpu_class=gpu, vram_estimate_bytes=estimate)
    prompt = getattr(args, "prompt", None) or job.metadata.annotations.get(SAMPLE_PROMPT_ANNOTATION)
    options = RunOptions(device=device.type, metrics_port=getattr(args, "metrics_port", 0) or 0,
                         termination_log=getattr(args, "termination_log", None), prompt=prompt)
    code, result = run_job(config, options, log)
    if code == 0:
        report(result, prompt, time.perf_counter() - started)
    return code


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
