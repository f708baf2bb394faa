"""One run of the recipe under the exit contract the operator relies on.

Exit codes: 0 success, 2 bad input (spec, dataset, model source), 3 out of GPU memory, 4 storage error,
143 stopped by SIGTERM after writing a checkpoint (the restarted pod resumes), 1 anything else.
A JSON summary goes to the termination-message path (/dev/termination-log in a pod): outcome, steps,
final loss, peak memory, adapter URI, error. Kubernetes keeps the first 4096 bytes.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.loop import Preempted, Recipe, Result, RunOptions
from kubetune_trainer.metrics import Telemetry
from kubetune_trainer.progress import Log
from kubetune_trainer.server import MetricsServer

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_OOM, EXIT_STORAGE, EXIT_PREEMPTED = 0, 1, 2, 3, 4, 143
TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 4096


def is_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:
        return False
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "cuda" in str(exc).lower()


def write_termination(path: str | None, result: Result, exit_code: int) -> None:
    target = path or os.environ.get("KUBETUNE_TERMINATION_LOG")
    if target is None:
        target = TERMINATION_LOG if Path(TERMINATION_LOG).exists() and os.access(TERMINATION_LOG, os.W_OK) else None
    if not target:
        return
    summary: dict[str, Any] = {
        "outcome": result.outcome, "exitCode": exit_code, "steps": result.steps, "totalSteps": result.total_steps,
        "finalLoss": result.final_loss, "evalLoss": result.eval_loss, "peakMemoryBytes": result.peak_memory_bytes,
        "adapterUri": result.adapter_uri, "error": result.error,
    }
    text = json.dumps(summary)
    if len(text.encode()) > MESSAGE_LIMIT and result.error:
        summary["error"] = result.error[: max(200, MESSAGE_LIMIT - len(text.encode()) + len(result.error) - 64)] + "…"
        text = json.dumps(summary)
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)
    except OSError:
        pass


def run_job(config: TrainerConfig, options: RunOptions, log: Log | None = None) -> tuple[int, Result]:
    log = log or Log()
    telemetry = Telemetry(config.job.namespace, config.job.name, config.vram_estimate_bytes)
    server: MetricsServer | None = None
    recipe: Recipe | None = None
    result = Result()
    code = EXIT_ERROR
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if options.metrics_port:
            server = MetricsServer(telemetry, options.metrics_port)
            server.start()
            log.event("server", f"metrics and status on :{options.metrics_port} (/metrics /healthz /readyz /status)")
        recipe = Recipe(config, options, telemetry, log)
        telemetry.device_type = recipe.device.type
        if recipe.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            fraction = os.environ.get("KUBETUNE_GPU_MEMORY_FRACTION")
            if fraction:  # behave like a smaller card (a cheaper class) on a big one: tests, dry runs
                torch.cuda.set_per_process_memory_fraction(float(fraction))
        signal.signal(signal.SIGTERM, recipe.request_stop)
        recipe.setup()
        before = recipe_answer(recipe, options.prompt) if options.prompt else None
        result = recipe.train()
        if before is not None:
            result.samples["before"] = before
        result.adapter_uri = recipe.save()
        if options.prompt:
            result.samples["after"] = recipe_answer(recipe, options.prompt)
        result.outcome, code = "Succeeded", EXIT_OK
        telemetry.phase("Succeeded", f"adapter at {result.adapter_uri}")
    except Preempted as exc:
        result.outcome, result.error, code = "Preempted", str(exc), EXIT_PREEMPTED
    except KubetuneError as exc:
        result.outcome = {2: "InvalidInput", 4: "StorageError"}.get(exc.exit_code, "Failed")
        result.error, code = str(exc), exc.exit_code
    except Exception as exc:
        if is_oom(exc):
            peak = telemetry.memory()
            result.outcome, code = "OutOfMemory", EXIT_OOM
            result.error = (f"out of GPU memory at step {recipe.step if recipe else 0}: peak "
                            f"{peak / 2**30:.2f} GiB allocated, planner estimate "
                            f"{config.vram_estimate_bytes / 2**30:.2f} GiB ({str(exc).splitlines()[0]})")
        else:
            result.outcome, code = "Failed", EXIT_ERROR
            result.error = f"{exc.__class__.__name__}: {exc}"
            log.event("traceback", traceback.format_exc())
    finally:
        signal.signal(signal.SIGTERM, previous)
        if recipe is not None:
            result.steps, result.total_steps = recipe.step, recipe.total_steps
            result.final_loss, result.tokens = recipe.last_loss, recipe.tokens_seen
            result.eval_loss = result.eval_loss if result.eval_loss is not None else recipe.result.eval_loss
        result.peak_memory_bytes = telemetry.memory()
        if code != EXIT_OK:
            telemetry.phase("Failed" if code != EXIT_PREEMPTED else "Preempted", result.error)
            log.event("error", f"{result.outcome}: {result.error}", outcome=result.outcome, exitCode=code)
        write_termination(options.termination_log, result, code)
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
