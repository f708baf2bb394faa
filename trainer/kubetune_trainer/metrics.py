"""What the trainer reports: Prometheus metrics (kubetune_ prefix, base units, labels namespace and job only)
and the /status snapshot, updated in one place (`Telemetry.update`)."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kubetune.contracts import TrainerPhase, TrainerStatus

LABELS = ("namespace", "job")


def process_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        return 0


def process_peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark. On Linux VmHWM, not ru_maxrss: a process started
    with vfork (Python's subprocess) inherits its parent's ru_maxrss as a floor."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_bytes(device_type: str) -> tuple[int, int, int]:
    """(allocated, reserved, peak): torch.cuda's allocator on a GPU, the process RSS on a CPU."""
    if device_type == "cuda":  # the caching allocator's counters; a CPU has none (test_gpu.py, bench/gpu_check.py)
        import torch

        return (int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved()),
                int(torch.cuda.max_memory_allocated()))
    rss = process_rss_bytes()
    return rss, rss, max(rss, process_peak_rss_bytes())


class Telemetry:
    def __init__(self, namespace: str, job: str, vram_estimate_bytes: int = 0, device_type: str = "cpu") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.device_type = device_type
        self.labels = {"namespace": namespace, "job": job}
        self.status = TrainerStatus(vram_estimate_bytes=vram_estimate_bytes)
        self.lock = threading.Lock()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry)

        self.train_loss = gauge("kubetune_train_loss", "Mean token cross-entropy of the last optimizer step")
        self.eval_loss = gauge("kubetune_eval_loss", "Mean token cross-entropy on the eval split")
        self.step = gauge("kubetune_train_step", "Optimizer steps done")
        self.total_steps = gauge("kubetune_train_total_steps", "Optimizer steps planned")
        self.learning_rate = gauge("kubetune_learning_rate", "Learning rate of the last step")
        self.grad_norm = gauge("kubetune_grad_norm", "Gradient L2 norm before clipping")
        self.tokens = Counter("kubetune_tokens_processed", "Tokens trained on (forward+backward), padding excluded",
                              LABELS, registry=self.registry)
        self.tokens_per_second = gauge("kubetune_tokens_per_second", "Training throughput over the last log window")
        self.allocated = gauge("kubetune_gpu_memory_allocated_bytes",
                               "torch.cuda.memory_allocated (process RSS on a CPU run)")
        self.reserved = gauge("kubetune_gpu_memory_reserved_bytes",
                              "torch.cuda.memory_reserved (process RSS on a CPU run)")
        self.peak = gauge("kubetune_gpu_memory_peak_bytes",
                          "torch.cuda.max_memory_allocated (peak process RSS on a CPU run)")
        self.estimate = gauge("kubetune_vram_estimate_bytes", "The planner's VRAM estimate for this job")
        self.checkpoint_seconds = Histogram(
            "kubetune_checkpoint_duration_seconds", "Time to write and upload one checkpoint", LABELS,
            registry=self.registry, buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        self.uploaded = Counter("kubetune_uploaded_bytes", "Bytes written to the output location", LABELS,
                                registry=self.registry)
        self.rank_peak = Gauge("kubetune_rank_memory_peak_bytes",
                               "Peak memory of each rank of a distributed run, as kubetune_gpu_memory_peak_bytes "
                               "(bounded: one series per rank, at most the GPU count)", (*LABELS, "rank"),
                               registry=self.registry)
        self.estimate.labels(**self.labels).set(vram_estimate_bytes)
        for metric in (self.tokens, self.uploaded):
            metric.labels(**self.labels)

    def phase(self, phase: TrainerPhase | str, message: str | None = None) -> None:
        with self.lock:
            self.status.phase = TrainerPhase(phase)
            if message is not None:
                self.status.message = message

    def memory(self) -> int:
        allocated, reserved, peak = memory_bytes(self.device_type)
        self.allocated.labels(**self.labels).set(allocated)
        self.reserved.labels(**self.labels).set(reserved)
        self.peak.labels(**self.labels).set(peak)
        self.status.peak_memory_bytes = max(self.status.peak_memory_bytes, peak)
        return self.status.peak_memory_bytes

    def update(self, *, step: int, total: int, loss: float, lr: float, grad_norm: float, tokens: int,
               tokens_per_second: float, eta_seconds: float | None) -> None:
        labels = self.labels
        self.train_loss.labels(**labels).set(loss)
        self.step.labels(**labels).set(step)
        self.total_steps.labels(**labels).set(total)
        self.learning_rate.labels(**labels).set(lr)
        self.grad_norm.labels(**labels).set(grad_norm)
        self.tokens.labels(**labels).inc(tokens)
        self.tokens_per_second.labels(**labels).set(tokens_per_second)
        self.memory()
        with self.lock:
            s = self.status
            s.step, s.total_steps, s.loss, s.learning_rate = step, total, loss, lr
            s.tokens_per_second, s.eta_seconds = tokens_per_second, eta_seconds

    def record_rank_peaks(self, peaks: list[int]) -> None:
        """Every rank's peak memory (index = rank), gathered by rank 0; a one-rank run exports none."""
        if len(peaks) < 2:
            return
        for rank, peak in enumerate(peaks):
            self.rank_peak.labels(**self.labels, rank=str(rank)).set(peak)

    def resumed_from(self, step: int) -> None:
        with self.lock:
            self.status.resumed_from_step = step

    def set_total(self, step: int, total: int) -> None:
        self.step.labels(**self.labels).set(step)
        self.total_steps.labels(**self.labels).set(total)
        with self.lock:
            self.status.step, self.status.total_steps = step, total

    def record_eval(self, loss: float) -> None:
        self.eval_loss.labels(**self.labels).set(loss)
        self.status.eval_loss = loss

    def record_upload(self, nbytes: int) -> None:
        self.uploaded.labels(**self.labels).inc(nbytes)

    def record_checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds.labels(**self.labels).observe(seconds)

    def snapshot(self) -> TrainerStatus:
        with self.lock:
            return self.status.model_copy()


class Stopwatch:
    """Tokens per second over the last logging window, and the ETA from the run's average step time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.window_start = self.started
        self.window_tokens = 0
        self.steps = 0

    def add(self, tokens: int) -> None:
        self.window_tokens += tokens
        self.steps += 1

    def flush(self, remaining_steps: int) -> tuple[float, float | None, int]:
        now = time.perf_counter()
        rate = self.window_tokens / max(now - self.window_start, 1e-9)
        tokens = self.window_tokens
        self.window_start, self.window_tokens = now, 0
        eta = (now - self.started) / self.steps * remaining_steps if self.steps else None
        return rate, eta, tokens
