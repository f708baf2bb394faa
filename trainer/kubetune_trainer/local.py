"""`kubetune train -f job.yaml`: plan in-process, then train on this machine (a local GPU, else the CPU)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.errors import SpecError
from kubetune.planning.plan import local_knobs
from kubetune.sources import model_architecture
from kubetune.spec import FineTuneJob, FineTuneJobSpec, parse_spec
from kubetune.trainer_config import JobRef, TrainerConfig
from kubetune.wire import CONFIG_FILE

if TYPE_CHECKING:
    from kubetune.contracts import EvalSummary
    from kubetune_trainer.loop import Device, Result, RunOptions
    from kubetune_trainer.progress import Log

SAMPLE_PROMPT_ANNOTATION = "kubetune.io/sample-prompt"


@dataclass(frozen=True)
class LocalOptions:
    """`kubetune train`'s options (the CLI's flags, typed)."""

    file: str
    output: str | None = None  # overrides spec.output.uri
    max_steps: int | None = None  # overrides spec.training.maxSteps
    metrics_port: int = 0  # 0: no server
    device: Device = "auto"
    prompt: str | None = None  # else the job's kubetune.io/sample-prompt annotation
    termination_log: str | None = None
    nproc_per_node: int = 1


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


def run_local(args: LocalOptions) -> int:
    from kubetune_trainer.loop import RunOptions
    from kubetune_trainer.model import pick_device
    from kubetune_trainer.progress import Log
    from kubetune_trainer.runner import run_job

    job, spec = load_job(args)
    device = pick_device(args.device)
    started = time.perf_counter()
    nproc = args.nproc_per_node
    if nproc < 1:
        raise SpecError(f"--nproc-per-node: must be >= 1, got {nproc}")
    if device.type == "cuda" and nproc > torch_cuda_count():
        raise SpecError(f"--nproc-per-node: {nproc} ranks need {nproc} GPUs, this machine has {torch_cuda_count()}")
    log = Log()
    config = local_config(job.metadata.name, job.metadata.namespace, spec, device.type, nproc, log)
    prompt = args.prompt or job.metadata.annotations.get(SAMPLE_PROMPT_ANNOTATION)
    options = RunOptions(device="cuda" if device.type == "cuda" else "cpu", metrics_port=args.metrics_port,
                         termination_log=args.termination_log, prompt=prompt,
                         download_progress=sys.stderr.isatty())  # a hub download: a byte bar at a TTY
    if nproc > 1:
        code, result = run_ranks(config, options, nproc)
    else:
        code, result = run_job(config, options, log)
    if code == 0:
        report(result, prompt, time.perf_counter() - started)
    return code


def load_job(args: LocalOptions) -> tuple[FineTuneJob, FineTuneJobSpec]:
    """The one FineTuneJob of `args.file`, and its spec with the command line's overrides."""
    from kubetune.jobfile import load_jobs

    jobs = load_jobs(args.file)
    if len(jobs) != 1:
        raise SpecError(f"{args.file}: kubetune train runs one FineTuneJob; this file has {len(jobs)}")
    return jobs[0], with_overrides(jobs[0].spec, args.output, args.max_steps)


def local_config(name: str, namespace: str, spec: FineTuneJobSpec, device_type: str, nproc: int,
                 log: Log) -> TrainerConfig:
    """The plan for this machine (its GPU, else its CPU), logged, as the trainer's config."""
    arch = model_architecture(spec.model.name, spec.model.source, spec.model.revision)
    usable, gpu = usable_memory(device_type, nproc)
    knobs, estimate = local_knobs(spec, arch, usable)
    log.event("plan", f"{namespace}/{name}: {arch.name} {spec.method} on "
              f"{gpu or 'the CPU'}: micro-batch {knobs.micro_batch_size} x accumulation "
              f"{knobs.gradient_accumulation_steps}, checkpointing {'on' if knobs.gradient_checkpointing else 'off'}, "
              f"{knobs.max_seq_length} tokens"
              + (f"; {nproc} ranks (torchrun, {'nccl' if device_type == 'cuda' else 'gloo'})" if nproc > 1 else ""))
    return TrainerConfig(job=JobRef(name=name, namespace=namespace), spec=spec, knobs=knobs, gpu_class=gpu,
                         vram_estimate_bytes=estimate)


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_ranks(config: TrainerConfig, options: RunOptions, nproc: int) -> tuple[int, Result]:
    """The trainer as `nproc` local ranks under torchrun (launch.py), as a pod with several GPUs runs it; the
    result is read back from rank 0's summary."""
    import tempfile

    from kubetune.contracts import TerminationSummary
    from kubetune_trainer.launch import launch
    from kubetune_trainer.loop import Result

    with tempfile.TemporaryDirectory(prefix="kubetune-train-") as tmp:
        path = Path(tmp) / CONFIG_FILE
        path.write_text(config.model_dump_json(by_alias=True))
        summary = Path(options.termination_log or Path(tmp) / "summary.json")
        if options.prompt:
            print("kubetune: --prompt samples are shown on single-rank runs only", file=sys.stderr)
        code = launch(["--standalone", "--nproc-per-node", str(nproc), "-m", "kubetune_trainer",
                       "--config", str(path), "--device", options.device, "--metrics-port", str(options.metrics_port),
                       "--termination-log", str(summary)])
        told = TerminationSummary.parse(summary.read_text() if summary.exists() else None)
    return code, Result.from_summary(told or TerminationSummary())


def report(result: Result, prompt: str | None, seconds: float) -> None:
    out = sys.stdout
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "?"
    first = f"{result.first_loss:.4f} -> " if result.first_loss is not None else ""
    print(f"\nTrained {result.steps} steps in {seconds:.0f}s (train loss {first}{loss}).", file=out)
    print(f"Adapter: {shown(result.adapter_uri)}", file=out)
    if result.serving is not None:  # the serving check (docs/serving.md)
        from kubetune_trainer.serving_check import describe

        print(f"Serving: {describe(result.serving)}", file=out)
    if prompt and result.samples:
        print(f"\nPrompt: {prompt}", file=out)
        print(f"  before: {result.samples.get('before', '')}", file=out)
        print(f"  after:  {result.samples.get('after', '')}", file=out)
    if result.evaluation is not None:
        print_evaluation(result.evaluation)


def print_evaluation(summary: EvalSummary) -> None:
    """spec.evaluation's result (kubetune.contracts.EvalSummary): losses, then each kept answer, base vs adapter."""
    print(f"\nEvaluation: {summary.loss_line()}", file=sys.stdout)
    for item in summary.answers:
        print(f"\nPrompt: {item.prompt}", file=sys.stdout)
        if item.base is not None:
            print(f"  base:    {item.base}", file=sys.stdout)
        print(f"  adapter: {item.adapter}", file=sys.stdout)
    more = summary.prompts - len(summary.answers)
    print(("\n" if summary.answers else "") + f"All answers{f' ({more} more)' if more > 0 else ''}: "
          f"{shown(summary.uri)}", file=sys.stdout)


def shown(uri: str | None) -> str:
    """A local path below the working directory as ./relative (what the user typed), anything else as is."""
    if not uri or uri.startswith("s3://"):
        return str(uri)
    try:
        return "./" + Path(uri).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return uri
