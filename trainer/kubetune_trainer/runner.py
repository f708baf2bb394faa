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
from dataclasses import dataclass
from typing import Any

from kubetune.contracts import OUTCOME_OF_EXIT, ExitCode, Outcome, TerminationSummary, TrainerPhase
from kubetune.errors import KubetuneError
from kubetune.trainer_config import TrainerConfig
from kubetune_trainer import devices, distributed, evaluate
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
    write_summary(path, TerminationSummary.from_result(result, exit_code))


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


@dataclass
class Run:
    """One trainer process's run: what `run_job` starts (the metrics server, the recipe) and takes down."""

    config: TrainerConfig
    options: RunOptions
    ranks: distributed.Ranks
    log: Log
    telemetry: Telemetry
    server: MetricsServer | None = None
    recipe: Recipe | None = None

    def train(self) -> None:
        """Serve, set up, train, save: returns when the adapter is written; raises on anything else."""
        if early := stopped_while_starting():
            raise early
        port = self.options.metrics_port
        if port and self.ranks.local_rank == 0:  # every pod answers its probes; rank 0 tells the story
            self.server = MetricsServer(self.telemetry, port)
            self.server.start()
            self.log.event("server", f"metrics and status on :{port} (/metrics /healthz /readyz /status)")
        self.recipe = recipe = Recipe(self.config, self.options, self.telemetry, self.log)
        self.telemetry.device_type = recipe.device.type
        setup_gpu_memory(recipe.device)  # the rank's own GPU, before anything is measured or allocated on it
        distributed.init(self.ranks, recipe.device.type)
        recipe.setup()
        prompt = self.options.prompt if self.ranks.main else None
        before = recipe_answer(recipe, prompt) if prompt else None
        result = recipe.train()
        result.evaluation = evaluate.run(recipe)  # spec.evaluation: every rank scores, rank 0 writes eval.json
        if before is not None:
            result.samples["before"] = before
        result.adapter_uri = recipe.save()  # rank 0 writes; under FSDP every rank helps gather the adapter
        if prompt:
            result.samples["after"] = recipe_answer(recipe, prompt)
        self.telemetry.phase(TrainerPhase.SUCCEEDED, f"adapter at {result.adapter_uri}")

    def failure(self, exc: Exception) -> tuple[Outcome, int, str]:
        """What an exception out of `train` means: the outcome, the exit code, the error for the summary."""
        if isinstance(exc, Preempted):
            return Outcome.PREEMPTED, ExitCode.PREEMPTED, str(exc)
        if isinstance(exc, KubetuneError):
            return OUTCOME_OF_EXIT.get(exc.exit_code, Outcome.FAILED), exc.exit_code, str(exc)
        if is_oom(exc):
            peak, estimate = self.telemetry.memory(), self.config.vram_estimate_bytes
            return Outcome.OUT_OF_MEMORY, ExitCode.OOM, (
                f"out of GPU memory at step {self.recipe.step if self.recipe else 0}: peak {peak / 2**30:.2f} GiB "
                f"allocated, planner estimate {estimate / 2**30:.2f} GiB ({str(exc).splitlines()[0]})")
        self.log.event("traceback", traceback.format_exc())
        return Outcome.FAILED, ExitCode.ERROR, f"{exc.__class__.__name__}: {exc}"

    def finish(self, outcome: Outcome, code: int, error: str | None) -> Result:
        """However the run ended: the result, the summary (rank 0's to the termination log, the others' beside
        it), the process group down, the metrics server stopped."""
        result = self.recipe.result if self.recipe is not None else Result()
        result.outcome, result.error = outcome, error
        result.peak_memory_bytes = self.telemetry.memory()
        result.resumed_from_step = self.telemetry.status.resumed_from_step
        if code != ExitCode.OK:
            self.telemetry.phase(TrainerPhase.PREEMPTED if code == ExitCode.PREEMPTED else TrainerPhase.FAILED, error)
            self.log.event("error", f"{outcome}: {error}", outcome=outcome, exitCode=code)
        target = self.options.termination_log if self.ranks.main else distributed.rank_summary_path(self.ranks)
        if self.ranks.main or target is not None:
            write_termination(target, result, code)
        if self.recipe is not None:
            self.recipe.cleanup()
        self.log.event("done", f"{outcome}: {result.steps}/{result.total_steps} steps", outcome=outcome,
                       exitCode=code, steps=result.steps, finalLoss=result.final_loss, adapterUri=result.adapter_uri,
                       peakMemoryBytes=result.peak_memory_bytes)
        if self.server is not None:
            linger = float(os.environ.get("KUBETUNE_METRICS_LINGER_SECONDS", "0"))
            if linger > 0:  # let Prometheus scrape the final values before the pod goes away
                import time

                time.sleep(linger)
            self.server.stop()
        return result


def run_job(config: TrainerConfig, options: RunOptions, log: Log | None = None) -> tuple[int, Result]:
    ranks = distributed.ranks_from_env()  # torchrun's; rank 0 serves metrics, writes checkpoints and the adapter
    log = (log or Log()) if ranks.main else distributed.RankLog(ranks.rank)
    quiet_libraries(progress_bars=not getattr(log, "json", True))
    run = Run(config, options, ranks, log, Telemetry(config.job.namespace, config.job.name,
                                                     config.vram_estimate_bytes))
    outcome, code, error = Outcome.FAILED, int(ExitCode.ERROR), None
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, sigterm_handler(run.telemetry, lambda: run.recipe))
    try:
        run.train()
        outcome, code = Outcome.SUCCEEDED, ExitCode.OK
    except Exception as exc:
        outcome, code, error = run.failure(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
        result = run.finish(outcome, code, error)
    return code, result


def recipe_answer(recipe: Recipe, prompt: str) -> str:
    from kubetune_trainer.model import answer

    return answer(recipe.model, recipe.loaded.tokenizer, prompt, recipe.input_device, dtype=recipe.dtype)
