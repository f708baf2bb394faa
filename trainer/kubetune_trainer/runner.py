"""One run of the recipe under the exit contract the operator relies on.

Exit codes: 0 success, 2 bad input (spec, dataset, model source), 3 out of GPU memory, 4 storage error,
143 stopped by SIGTERM after writing a checkpoint (the restarted pod resumes), 1 anything else.
A JSON summary goes to the termination-message path (/dev/termination-log in a pod): outcome, steps,
final loss, peak memory, adapter URI, error. Kubernetes keeps the first 4096 bytes.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable
from typing import Any

from kubetune.contracts import OUTCOME_OF_EXIT, ExitCode, Outcome, TerminationSummary, TrainerPhase
from kubetune.errors import KubetuneError
from kubetune.trainer_config import TrainerConfig
from kubetune_trainer import devices, distributed
from kubetune_trainer.loop import Recipe, Result, RunOptions
from kubetune_trainer.metrics import Telemetry
from kubetune_trainer.progress import Log
from kubetune_trainer.quiet import quiet_libraries
from kubetune_trainer.server import MetricsServer
from kubetune_trainer.stop import Preempted, stop_now, stopped_while_starting, write_summary


def is_oom(exc: BaseException) -> bool:
    """Out of GPU memory: the caching allocator's OutOfMemoryError, or a CUDA library's allocation failure
    (`CUBLAS_STATUS_ALLOC_FAILED` when cuBLAS cannot make its workspace: a RuntimeError) -> exit 3, not 1."""
    try:
        import torch
    except ImportError:
        return False
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and devices.is_gpu_oom_message(str(exc))


def setup_gpu_memory(device: Any) -> None:
    """Select the rank's GPU, then reset its peak and cap its share (devices.gpu_memory_calls). A CPU run has no
    caching allocator to cap or measure (metrics report the RSS); tests/trainer/test_gpu.py covers this path."""
    fraction = devices.memory_fraction(os.environ.get(devices.FRACTION_ENV))  # a bad value: exit 2, named
    if device.type != "cuda":
        return
    import torch

    for name, args in devices.gpu_memory_calls(device.index or 0, fraction):
        getattr(torch.cuda, name)(*args)


def write_termination(path: str | None, result: Result, exit_code: int) -> None:
    write_summary(path, TerminationSummary(
        outcome=Outcome(result.outcome), exit_code=exit_code, steps=result.steps, total_steps=result.total_steps,
        final_loss=result.final_loss, eval_loss=result.eval_loss, peak_memory_bytes=result.peak_memory_bytes,
        adapter_uri=result.adapter_uri, model_commit=result.model_commit, error=result.error,
        resumed_from_step=result.resumed_from_step, serving=result.serving,
    ))


STOP_AT_ONCE = (TrainerPhase.STARTING, TrainerPhase.PREPARING, TrainerPhase.LOADING)


def sigterm_handler(telemetry: Telemetry, recipe: Callable[[], Recipe | None]) -> Callable[[int, Any], None]:
    """Before training (starting, downloading, loading: nothing new to save) stop at once; from the first
    step on, let the loop finish its step and checkpoint (it checks `stop_requested`)."""
    def handler(signum: int, frame: Any) -> None:
        current, phase = recipe(), telemetry.status.phase
        if current is None or phase in STOP_AT_ONCE:
            stop_now(f"{TrainerPhase(phase).value.lower()}")(signum, frame)
        else:
            current.request_stop(signum, frame)

    return handler


def run_job(config: TrainerConfig, options: RunOptions, log: Log | None = None) -> tuple[int, Result]:
    ranks = distributed.ranks_from_env()  # torchrun's; rank 0 serves metrics, writes checkpoints and the adapter
    log = (log or Log()) if ranks.main else distributed.RankLog(ranks.rank)
    quiet_libraries(progress_bars=not getattr(log, "json", True))
    telemetry = Telemetry(config.job.namespace, config.job.name, config.vram_estimate_bytes)
    server: MetricsServer | None = None
    recipe: Recipe | None = None
    result = Result()
    code: int = ExitCode.ERROR
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, sigterm_handler(telemetry, lambda: recipe))
    try:
        if early := stopped_while_starting():
            raise early
        if options.metrics_port and ranks.local_rank == 0:  # every pod answers its probes; rank 0 tells the story
            server = MetricsServer(telemetry, options.metrics_port)
            server.start()
            log.event("server", f"metrics and status on :{options.metrics_port} (/metrics /healthz /readyz /status)")
        recipe = Recipe(config, options, telemetry, log)
        telemetry.device_type = recipe.device.type
        setup_gpu_memory(recipe.device)  # the rank's own GPU, before anything is measured or allocated on it
        distributed.init(ranks, recipe.device.type)
        recipe.setup()
        before = recipe_answer(recipe, options.prompt) if options.prompt and ranks.main else None
        result = recipe.train()
        if before is not None:
            result.samples["before"] = before
        result.adapter_uri = recipe.save()  # rank 0 writes; under FSDP every rank helps gather the adapter
        if options.prompt and ranks.main:
            result.samples["after"] = recipe_answer(recipe, options.prompt)
        result.outcome, code = Outcome.SUCCEEDED, ExitCode.OK
        telemetry.phase(TrainerPhase.SUCCEEDED, f"adapter at {result.adapter_uri}")
    except Preempted as exc:
        result.outcome, result.error, code = Outcome.PREEMPTED, str(exc), ExitCode.PREEMPTED
    except KubetuneError as exc:
        code = exc.exit_code
        result.outcome, result.error = OUTCOME_OF_EXIT.get(code, Outcome.FAILED), str(exc)
    except Exception as exc:
        if is_oom(exc):
            peak = telemetry.memory()
            result.outcome, code = Outcome.OUT_OF_MEMORY, ExitCode.OOM
            result.error = (f"out of GPU memory at step {recipe.step if recipe else 0}: peak "
                            f"{peak / 2**30:.2f} GiB allocated, planner estimate "
                            f"{config.vram_estimate_bytes / 2**30:.2f} GiB ({str(exc).splitlines()[0]})")
        else:
            result.outcome, code = Outcome.FAILED, ExitCode.ERROR
            result.error = f"{exc.__class__.__name__}: {exc}"
            log.event("traceback", traceback.format_exc())
    finally:
        signal.signal(signal.SIGTERM, previous)
        if recipe is not None:
            result.steps, result.total_steps = recipe.step, recipe.total_steps
            result.final_loss, result.tokens = recipe.last_loss, recipe.tokens_seen
            result.model_commit = recipe.model_commit
            result.serving = recipe.result.serving
            result.eval_loss = result.eval_loss if result.eval_loss is not None else recipe.result.eval_loss
        result.peak_memory_bytes = telemetry.memory()
        result.resumed_from_step = telemetry.status.resumed_from_step
        if code != ExitCode.OK:
            telemetry.phase(TrainerPhase.PREEMPTED if code == ExitCode.PREEMPTED else TrainerPhase.FAILED, result.error)
            log.event("error", f"{result.outcome}: {result.error}", outcome=result.outcome, exitCode=code)
        if ranks.main:
            write_termination(options.termination_log, result, code)
        elif (rank_summary := distributed.rank_summary_path(ranks)) is not None:
            write_termination(rank_summary, result, code)
        distributed.shutdown()
        log.event("done", f"{result.outcome}: {result.steps}/{result.total_steps} steps", outcome=result.outcome,
                  exitCode=code, steps=result.steps, finalLoss=result.final_loss, adapterUri=result.adapter_uri,
                  peakMemoryBytes=result.peak_memory_bytes)
        if server is not None:
            linger = float(os.environ.get("KUBETUNE_METRICS_LINGER_SECONDS", "0"))
            if linger > 0:  # let Prometheus scrape the final values before the pod goes away
                import time

                time.sleep(linger)
            server.stop()
    return code, result


def recipe_answer(recipe: Recipe, prompt: str) -> str:
    from kubetune_trainer.model import answer

    return answer(recipe.model, recipe.loaded.tokenizer, prompt, recipe.input_device, dtype=recipe.dtype)
