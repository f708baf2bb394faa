"""The training recipe: one explicit loop, torchtune-style (setup / train / checkpoint / resume / save).

Why not TRL's SFTTrainer: the trainer's contract is mostly what happens around the loop: resume that
reproduces the uninterrupted run step for step (data position = step, RNG restored), a checkpoint on
SIGTERM between two optimizer steps, metrics and /status updated from inside the step, loss computed only
on the positions that carry labels, and exit codes the operator acts on. Doing those through Trainer
callbacks and overrides is more code than the ~40 lines of the loop itself, and harder to read.

One optimizer step = `gradient_accumulation_steps` micro-batches of `micro_batch_size` packed rows. The loss
is the mean over all loss-carrying tokens of the step (not a mean of per-micro-batch means), so packing and
accumulation do not change what is optimized.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import torch

from kubetune.contracts import EvalSummary, Outcome, ServingFinding, TerminationSummary, TrainerPhase
from kubetune.trainer_config import TrainerConfig
from kubetune_trainer import data as data_mod
from kubetune_trainer import devices, distributed, faults, fsdp, optimizer_state, serving_check
from kubetune_trainer.loss import CausalLMLoss
from kubetune_trainer.memory import input_device
from kubetune_trainer.metrics import Stopwatch, Telemetry
from kubetune_trainer.model import (
    LoadedModel,
    compute_dtype,
    load_model,
    mixed_precision,
    pick_device,
    resolve_model,
)
from kubetune_trainer.progress import Log
from kubetune_trainer.stop import Preempted
from kubetune_trainer.storage import Storage, fetch_input, open_storage, sha256_file

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MERGED = "merged"
COMPLETE = "COMPLETE"
KEEP_CHECKPOINTS = 2




Device = Literal["auto", "cpu", "cuda"]


@dataclass
class RunOptions:
    device: Device = "auto"
    metrics_port: int = 0
    termination_log: str | None = None
    prompt: str | None = None  # print the model's answer before and after training (the quickstart)
    threads: int | None = None
    download_progress: bool = False  # a byte progress bar while a hub model downloads (local runs at a TTY)


@dataclass
class Result:
    outcome: Outcome = Outcome.FAILED
    steps: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    first_loss: float | None = None
    eval_loss: float | None = None
    peak_memory_bytes: int = 0
    adapter_uri: str | None = None
    error: str | None = None
    tokens: int = 0
    seconds: float = 0.0
    samples: dict[str, str] = field(default_factory=dict)
    model_commit: str | None = None  # the hub commit the base model came from
    resumed_from_step: int | None = None  # the checkpoint step this run resumed from (0: the beginning)
    evaluation: EvalSummary | None = None  # spec.evaluation's summary (kubetune_trainer.evaluate)
    serving: list[ServingFinding] | None = None  # the serving check of the adapter (kubetune.serving)

    @classmethod
    def from_summary(cls, summary: TerminationSummary) -> Result:
        """A run's result as its summary tells it (rank 0 of a torchrun launch, read back by the launcher): the
        fields the two share (TerminationSummary.from_result is the other way)."""
        told = {f.name: getattr(summary, f.name, None) for f in fields(cls)}
        return cls(**{name: value for name, value in told.items() if value is not None})


def make_optimizer(params: list[torch.nn.Parameter], config: TrainerConfig, device: torch.device,
                   log: Log, strategy: devices.Strategy | None = None) -> torch.optim.Optimizer:
    """The spec's optimizer (devices.optimizer_for), the same on a GPU and a CPU: bitsandbytes' AdamW runs on the
    CPU too (its paging falls back to ordinary memory there, see quiet.py). `strategy` None: FSDP when the
    parameters are DTensor shards, else one rank."""
    from torch.distributed.tensor import DTensor

    t = config.spec.training
    if strategy is None:
        strategy = "fsdp" if any(isinstance(p, DTensor) for p in params) else "single"
    choice = devices.optimizer_for(strategy, t.optimizer)
    if choice.note:
        log.event("optimizer", f"{choice.note} (on {device.type})")
    if choice.library == "bitsandbytes":
        import bitsandbytes as bnb

        optimizer: torch.optim.Optimizer = getattr(bnb.optim, choice.cls)(
            params, lr=t.learning_rate, weight_decay=t.weight_decay)
        return optimizer
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_ratio: float, total: int) -> Any:
    from transformers import get_scheduler

    warmup = math.ceil(warmup_ratio * total)
    kind = {"constant": "constant_with_warmup"}.get(name, name)
    return get_scheduler(kind, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)


def fingerprint(config: TrainerConfig, model_commit: str | None = None) -> str:
    """The resume key: what changes the training trajectory, and nothing else. A checkpoint written under
    another key is never resumed.

    In: the model (and the hub commit it resolved to), the data, the method and LoRA config, the schedule
    (epochs, max steps, learning rate, warmup, scheduler, optimizer, clipping, weight decay), the effective
    batch (micro-batch x accumulation), the sequence length, packing and the seed.
    Out: how the effective batch is split into micro-batches (an OOM escalation re-plans it; every optimizer
    step still sees the same rows, kubetune_trainer.data.Schedule), gradient checkpointing, the compute
    dtype, the GPU class and count, the checkpoint and logging cadence, and the token Secret."""
    spec, knobs = config.spec, config.knobs
    model = spec.model.model_dump(mode="json", exclude={"token_secret"})
    if model_commit:
        model["revision"] = model_commit
    training = spec.training.model_dump(mode="json", exclude={
        "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "checkpoint_steps",
        "logging_steps", "max_seq_length"})
    training["effective_batch"] = knobs.micro_batch_size * knobs.gradient_accumulation_steps
    training["max_seq_length"] = knobs.max_seq_length
    relevant = {"model": model, "dataset": spec.dataset.model_dump(mode="json"), "method": spec.method,
                "lora": spec.lora.model_dump(mode="json"), "training": training}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """A complete checkpoint of this run, fetched: its name, state.json, adapter tensors and trainer state."""

    name: str
    state: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's RNG state: Python's, torch's CPU generator and, on a GPU, the generator of this rank's own GPU
    (the current device: runner selects it). The checkpoint keeps every rank's (devices.rank_rng)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # a CPU run has no CUDA generator; tests/trainer/test_gpu.py covers this path
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(saved: dict[str, Any], rank: int, device: torch.device) -> None:
    """Restore what rank `rank` saved (devices.rank_rng picks it out of a checkpoint of either format)."""
    state = devices.rank_rng(saved, rank)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())  # RNG states are CPU byte tensors; a GPU run loads checkpoints there
    if "cuda" in state and device.type == "cuda":  # a CPU run has none to restore; covered by test_gpu.py
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def repage(optimizer: torch.optim.Optimizer) -> int:
    """bitsandbytes flags its paged state buffers (`is_paged`), and the flag survives torch.save, torch.load and
    bnb's own load_state_dict (a deepcopy). After a resume such a state is ordinary memory, and the optimizer's
    prefetch (cudaMemPrefetchAsync) of it would abort the process. Every flagged state goes into a buffer the
    optimizer allocates itself (paged on a GPU for >= 1e5 elements, ordinary memory on a CPU) and the copy is
    used. Returns how many were replaced."""
    buffer = getattr(optimizer, "get_state_buffer", None)
    replaced = 0
    for param, state in optimizer.state.items():
        for key, value in list(state.items()):
            if not (isinstance(value, torch.Tensor) and getattr(value, "is_paged", False)):
                continue
            fresh = buffer(param, dtype=value.dtype) if buffer and value.shape == param.shape else None
            if fresh is None:
                fresh = torch.empty_like(value)
            fresh.copy_(value)
            state[key] = fresh
            replaced += 1
    return replaced


class Recipe:
    def __init__(self, config: TrainerConfig, options: RunOptions, telemetry: Telemetry, log: Log) -> None:
        self.config = config
        self.spec = config.spec
        self.options = options
        self.telemetry = telemetry
        self.log = log
        self._result = Result()
        self.stop_requested = False
        self.step = 0
        self.total_steps = 0
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.model_commit: str | None = None
        self.ranks = distributed.ranks_from_env()  # torchrun's RANK / WORLD_SIZE; 0 / 1 for a plain run
        planned = devices.required_device(config.device, options.device)  # a GPU plan never trains on the CPU
        self.device = distributed.device_of(self.ranks, pick_device(planned, config.gpu_class))
        self.sharded = self.ranks.distributed and self.spec.resources.strategy == "fsdp"  # FSDP2, fsdp.py
        # FSDP moves each unit to the GPU as it shards it: a rank never holds the whole model in GPU memory
        self.load_device = torch.device("cpu") if self.sharded else self.device
        self.dtype = compute_dtype(self.device, config.knobs.compute_dtype)
        self.storage: Storage = open_storage(self.spec.output.uri, self.spec.output.endpoint_url)
        self.fingerprint = fingerprint(config)
        self.held_out: tuple[int, float, int] | None = None  # (step, loss, tokens) of the last evaluate()
        self.prompts: list[str] = []  # spec.evaluation's prompts, read in setup (a bad file fails before training)
        self.evaluation_files: dict[str, dict[str, Any]] = {}  # eval.json's sha256 and size, for the manifest

    @property
    def result(self) -> Result:
        """This run's result so far: its counters as they stand, and what train, evaluate and save set."""
        result = self._result
        result.steps, result.total_steps, result.tokens = self.step, self.total_steps, self.tokens_seen
        result.final_loss, result.model_commit = self.last_loss, self.model_commit
        return result

    def cleanup(self) -> None:
        """The run is over, however it ended (after its summary is written): the process group goes down."""
        distributed.shutdown()

    # --- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything that can fail on bad input happens here, before the model loads: output writable,
        dataset readable, every row valid."""
        spec = self.spec
        torch.manual_seed(spec.training.seed)
        random.seed(spec.training.seed)
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        self.telemetry.phase(TrainerPhase.PREPARING, "checking output and dataset")
        if self.ranks.main:  # rank 0 alone writes; two ranks probing one folder would race on the probe file
            self.storage.check()
        self.telemetry.phase(TrainerPhase.PREPARING, "fetching the base model")
        files = resolve_model(spec, spec.output.endpoint_url, say=lambda m: self.log.event("download", m),
                              progress=self.options.download_progress)
        model_dir, self.model_commit = files.path, files.commit
        self.fingerprint = fingerprint(self.config, files.commit)  # a moved branch is another run
        self.telemetry.status.model_commit = files.commit
        self.prepare_data(model_dir)
        checkpoint = self.build_model(model_dir)
        strategy = devices.strategy_of(self.sharded, self.ranks.distributed, self.config.gpu_count)
        self.optimizer = make_optimizer(self.params, self.config, self.device, self.log, strategy)
        self.scheduler = make_scheduler(self.optimizer, spec.training.lr_scheduler, spec.training.warmup_ratio,
                                        self.total_steps)
        self.telemetry.set_total(0, self.total_steps)
        if checkpoint is not None:
            self.restore(checkpoint)
        self.telemetry.resumed_from(self.step)  # 0: from the beginning

    def prepare_data(self, model_dir: Path) -> None:
        """The tokenized, packed dataset (every row checked), the evaluation prompts, and the step schedule."""
        spec, knobs = self.spec, self.config.knobs
        from kubetune_trainer.model import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        self.train_data, self.eval_data = self.load_data(tokenizer)
        if spec.evaluation is not None:
            from kubetune_trainer.evaluate import read_prompts

            self.prompts = read_prompts(spec, Path(tempfile.gettempdir()) / "kubetune-data", self.log)
        self.schedule = data_mod.Schedule(len(self.train_data.rows), knobs.micro_batch_size,
                                          knobs.gradient_accumulation_steps, spec.training.seed)
        self.total_steps = self.schedule.total_steps(spec.training.epochs, spec.training.max_steps)
        self.log.event("data", f"{self.train_data.examples} examples, {self.train_data.tokens} tokens "
                       f"({self.train_data.loss_tokens} with loss) packed into {len(self.train_data.rows)} rows of "
                       f"<= {knobs.max_seq_length}; {self.total_steps} steps of {knobs.gradient_accumulation_steps}"
                       f" x {knobs.micro_batch_size} rows"
                       + (f"; {self.train_data.dropped_too_long} rows longer than maxSeqLength skipped"
                          if self.train_data.dropped_too_long else ""))

    def build_model(self, model_dir: Path) -> Checkpoint | None:
        """The base model loaded, servable, wrapped for this run's strategy, with its adapter resumed from the
        latest checkpoint (returned, None: from the beginning) before DDP broadcasts it or FSDP shards it."""
        spec, knobs = self.spec, self.config.knobs
        self.telemetry.phase(TrainerPhase.LOADING, "loading the base model")
        started = time.perf_counter()
        self.loaded: LoadedModel = load_model(spec, self.load_device, self.dtype, knobs.gradient_checkpointing,
                                              spec.output.endpoint_url, seed=spec.training.seed,
                                              gpu_count=1 if self.ranks.distributed else self.config.gpu_count,
                                              model_dir=model_dir, sharded=self.sharded)
        self.model = self.loaded.model
        self.check_servable()
        checkpoint = self.latest_checkpoint()
        if checkpoint is not None:  # into the plain model, before DDP broadcasts it or FSDP shards it
            self.load_adapter(checkpoint)
        self.wrap()
        self.input_device = input_device(self.model)  # where the embedding's output lands (memory.py)
        self.pad_id = int(self.loaded.tokenizer.pad_token_id)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.log.event("model", f"{spec.method} {self.loaded.model_dir.name}: "
                       f"{sum(p.numel() for p in self.params):,} trainable LoRA parameters, compute "
                       f"{str(self.dtype).removeprefix('torch.')} on {self.device.type}, checkpointing "
                       f"{'on' if knobs.gradient_checkpointing else 'off'} "
                       f"(loaded in {time.perf_counter() - started:.1f}s)")
        return checkpoint

    def wrap(self) -> None:
        """The loss module, alone (one rank), under DDP, or sharded by FSDP2 (strategy fsdp)."""
        inner = self.model.get_base_model()
        strategy = "fsdp" if self.sharded else "ddp"
        layers = fsdp.units(inner) if self.sharded else None
        self.loss_model = distributed.wrap(CausalLMLoss(self.model, data_mod.IGNORE), self.ranks, self.device,
                                           strategy, layers)
        if self.sharded:
            self.log.event("ranks", f"{self.ranks.world} ranks, FSDP2: {fsdp.describe(self.loss_model)}")
        elif self.ranks.distributed:
            self.log.event("ranks", f"{self.ranks.world} ranks, DDP over the LoRA parameters")

    def load_data(self, tokenizer: Any) -> tuple[data_mod.Dataset, data_mod.Dataset | None]:
        spec = self.spec
        cache = Path(tempfile.gettempdir()) / "kubetune-data"
        source = spec.dataset.source
        rows = data_mod.read_rows(fetch_input(source, cache, spec.output.endpoint_url), "spec.dataset.source "
                                  + Path(source).name)
        eval_rows: list[tuple[str, dict[str, Any]]] = []
        eval_label = "spec.dataset.evalSource"
        if spec.dataset.eval_source:
            eval_rows = data_mod.read_rows(fetch_input(spec.dataset.eval_source, cache, spec.output.endpoint_url),
                                           eval_label + " " + Path(spec.dataset.eval_source).name)
            eval_label += " " + Path(spec.dataset.eval_source).name
        else:
            rows, eval_rows = data_mod.split_eval(rows, spec.dataset.eval_fraction, spec.training.seed)
            eval_label = "spec.dataset.source (eval split)"
        tokenize = data_mod.Tokenizing(tokenizer, spec.dataset.format)
        max_len, packing, seed = self.config.knobs.max_seq_length, spec.training.packing, spec.training.seed
        train = data_mod.build(rows, tokenize, "spec.dataset.source " + Path(source).name, max_len, packing, seed)
        evaluation = data_mod.build(eval_rows, tokenize, eval_label, max_len, packing, seed) if eval_rows else None
        return train, evaluation

    # --- the loop ---------------------------------------------------------------------------------

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of token losses of one micro-batch. Runs under autocast in the compute dtype, so the fp32 LoRA
        weights are used in 16-bit for the matmuls (their gradients and Adam states stay fp32)."""
        with mixed_precision(self.input_device.type, self.dtype):
            loss: torch.Tensor = self.loss_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                                 targets=batch["targets"])
            return loss

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One pinned host-to-device copy per tensor, asynchronous; nothing on a CPU run."""
        if self.input_device.type == "cpu":  # pinned memory needs CUDA; a GPU run copies asynchronously (test_gpu.py)
            return batch
        return {k: v.pin_memory().to(self.input_device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, step: int) -> tuple[float, int, float]:
        rows = self.train_data.rows
        batches = [data_mod.collate([rows[i] for i in idx], self.pad_id) for idx in self.schedule.step_rows(step)]
        loss_tokens = sum(int((b["targets"] != data_mod.IGNORE).sum()) for b in batches)
        tokens = sum(sum(len(e) for i in idx for e in rows[i]) for idx in self.schedule.step_rows(step))
        total = 0.0
        # this rank's share of the step's micro-batches; the loss is normalized by the step's GLOBAL count of
        # labelled tokens (and scaled by the world size, which DDP's / FSDP's gradient averaging divides out)
        mine = distributed.micro_batches_of(len(batches), self.ranks)
        for n, (i, weight) in enumerate(mine):
            faults.before_forward(step + 1)  # a no-op unless a test set KUBETUNE_FAULT_*_AT_STEP
            with distributed.sync_context(self.loss_model, last=n == len(mine) - 1):
                loss = self.loss_sum(self.to_device(batches[i]))
                (loss * (weight * self.ranks.world / max(loss_tokens, 1))).backward()
            total += weight * float(loss.detach())
        if self.ranks.distributed:  # one small all-reduce: the step's loss, and whether any rank got SIGTERM
            total, stop = distributed.sum_across([total, float(self.stop_requested)], self.ranks)
            self.stop_requested = stop > 0
        # under FSDP the gradients are shards (DTensors): the norm is the whole gradient's, reduced over ranks
        grad_norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(self.params, self.spec.training.max_grad_norm)))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / max(loss_tokens, 1), tokens, grad_norm

    def train(self) -> Result:
        spec = self.spec
        self.model.train()
        self.telemetry.phase(TrainerPhase.TRAINING, None)
        watch = Stopwatch()
        self.started = time.perf_counter()
        if self.ranks.distributed:
            self.stop_requested = distributed.sum_across([float(self.stop_requested)], self.ranks)[0] > 0
        if self.stop_requested:  # SIGTERM while loading: nothing new to save, the restart starts over here
            raise Preempted(f"stopped by SIGTERM before training resumed at step {self.step}")
        while self.step < self.total_steps:
            loss, tokens, grad_norm = self.train_step(self.step)
            self.step += 1
            self.tokens_seen += tokens
            self.last_loss = loss
            if self.result.first_loss is None:
                self.result.first_loss = loss
            watch.add(tokens)
            if self.step % spec.training.logging_steps == 0 or self.step == self.total_steps:
                peaks = distributed.gather_int(self.telemetry.memory(), self.ranks)
                if self.ranks.main:
                    self.telemetry.record_rank_peaks(peaks)
                rate, eta, window_tokens = watch.flush(self.total_steps - self.step)
                lr = float(self.scheduler.get_last_lr()[0])
                self.telemetry.update(step=self.step, total=self.total_steps, loss=loss, lr=lr, grad_norm=grad_norm,
                                      tokens=window_tokens, tokens_per_second=rate, eta_seconds=eta)
                self.log.step(step=self.step, total=self.total_steps, loss=loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_second=rate, eta_seconds=eta, memory_bytes=self.telemetry.memory())
            if self.stop_requested:
                self.checkpoint()
                raise Preempted(f"stopped by SIGTERM after step {self.step}/{self.total_steps}; checkpoint written")
            if self.step % spec.training.checkpoint_steps == 0 and self.step < self.total_steps:
                self.checkpoint()
                if self.eval_data:
                    self.evaluate()
        self.result.seconds = time.perf_counter() - self.started
        if self.eval_data:
            self.evaluate()
        return self.result

    @torch.no_grad()
    def held_out_loss(self) -> tuple[float, int]:
        """Mean token loss over the eval split and the tokens it counted, reduced over every rank (each runs its
        share of the batches, as in training: the same number of forwards everywhere; FSDP gathers in each)."""
        assert self.eval_data is not None
        self.model.eval()
        total, count = 0.0, 0
        batches = list(data_mod.iter_batches(self.eval_data.rows, self.config.knobs.micro_batch_size))
        for i, weight in distributed.micro_batches_of(len(batches), self.ranks) if batches else []:
            batch = data_mod.collate(batches[i], self.pad_id)
            total += weight * float(self.loss_sum(self.to_device(batch)))
            count += int(weight) * int((batch["targets"] != data_mod.IGNORE).sum())
        total, counted = distributed.sum_across([total, float(count)], self.ranks)
        self.model.train()
        return total / max(counted, 1), int(counted)

    def evaluate(self) -> float:
        self.telemetry.phase(TrainerPhase.EVALUATING)
        loss, tokens = self.held_out_loss()
        self.held_out = (self.step, loss, tokens)  # the adapter's, at this step (kubetune_trainer.evaluate reuses it)
        self.telemetry.record_eval(loss)
        self.result.eval_loss = loss
        self.log.event("eval", f"eval loss {loss:.4f} at step {self.step}", evalLoss=loss, step=self.step)
        self.telemetry.phase(TrainerPhase.TRAINING)
        return loss

    # --- checkpoints ------------------------------------------------------------------------------

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.log.event("signal", f"received {signal.Signals(signum).name}: checkpointing after this step")
        self.stop_requested = True

    def checkpoint(self) -> None:
        """adapter + optimizer + scheduler + RNG + data position under checkpoints/step-NNNNNNNN/; the COMPLETE
        marker goes last, so a checkpoint without it (killed mid-upload) is never resumed. Rank 0 writes (under
        DDP every rank holds the same adapter and optimizer state; under FSDP every rank first helps gather
        them); the others wait for it."""
        adapter, optimizer = self.gathered_state()
        rngs = distributed.gather_objects(rng_state(self.device), self.ranks)  # every rank's own streams
        if not self.ranks.main:
            distributed.barrier(self.ranks)
            return
        from safetensors.torch import save_file

        self.telemetry.phase(TrainerPhase.CHECKPOINTING)
        started = time.perf_counter()
        name = f"{CHECKPOINTS}/step-{self.step:08d}"
        state = {"step": self.step, "epoch": self.schedule.epoch_of(self.step), "totalSteps": self.total_steps,
                 "fingerprint": self.fingerprint, "loss": self.last_loss, "tokens": self.tokens_seen}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            save_file(adapter, str(folder / "adapter_model.safetensors"))
            torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "rng": {"ranks": rngs}},
                       folder / "trainer_state.pt")
            (folder / "state.json").write_text(json.dumps(state, indent=2))
            written = self.storage.put_dir(folder, name)
            written += self.storage.put_bytes(json.dumps(state).encode(), f"{name}/{COMPLETE}")
        self.telemetry.record_upload(written)
        for old in self.complete_checkpoints()[:-KEEP_CHECKPOINTS]:
            self.storage.delete_prefix(f"{CHECKPOINTS}/step-{old:08d}")
        seconds = time.perf_counter() - started
        self.telemetry.record_checkpoint(seconds)
        self.log.event("checkpoint", f"checkpoint at step {self.step} -> {self.storage.join(name)} "
                       f"({written / 1e6:.1f} MB, {seconds:.1f}s)", step=self.step, seconds=round(seconds, 2))
        self.telemetry.phase(TrainerPhase.TRAINING)
        distributed.barrier(self.ranks)

    def gathered_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The adapter (PEFT's keys, on the host) and the optimizer state as one rank holds them, on rank 0
        (empty elsewhere). Under FSDP they are gathered from the shards: every rank calls."""
        from peft import get_peft_model_state_dict

        if self.sharded:
            weights = fsdp.trainable_state(self.model, self.ranks.main)
            optimizer = fsdp.optimizer_state(self.model, self.optimizer)
            adapter = get_peft_model_state_dict(self.model, state_dict=weights) if self.ranks.main else {}
        elif self.ranks.main:
            adapter, optimizer = get_peft_model_state_dict(self.model), self.optimizer.state_dict()
        else:
            return {}, {}
        return {k: v.detach().contiguous().cpu() for k, v in adapter.items()}, optimizer

    def complete_checkpoints(self) -> list[int]:
        steps = []
        for key in self.storage.list(f"{CHECKPOINTS}/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == COMPLETE and parts[1].startswith("step-"):
                steps.append(int(parts[1].removeprefix("step-")))
        return sorted(steps)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The latest complete checkpoint of this same run (same fingerprint), fetched; None to start over."""
        from safetensors.torch import load_file

        for step in reversed(self.complete_checkpoints()):
            name = f"{CHECKPOINTS}/step-{step:08d}"
            state = json.loads(self.storage.get_bytes(f"{name}/{COMPLETE}"))
            if state.get("fingerprint") != self.fingerprint:
                self.log.event("resume", f"ignoring {name}: written by a different spec")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                self.storage.get_dir(name, folder)
                try:  # tensors and plain containers only: a planted pickle cannot run code here
                    saved = torch.load(folder / "trainer_state.pt", map_location=self.device, weights_only=True)
                except pickle.UnpicklingError as exc:
                    self.log.event("resume", f"ignoring {name}: trainer_state.pt holds more than tensors "
                                   f"({str(exc).splitlines()[0]})")
                    continue
                adapter = load_file(str(folder / "adapter_model.safetensors"), device=str(self.load_device))
            return Checkpoint(name, state, adapter, saved)
        return None

    def load_adapter(self, checkpoint: Checkpoint) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, checkpoint.adapter)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Optimizer, scheduler, RNG and data position of `checkpoint` (its adapter is already loaded)."""
        saved, state = checkpoint.trainer_state, checkpoint.state
        moments = optimizer_state.adapted(saved["optimizer"], self.optimizer)  # bitsandbytes' <-> torch's AdamW
        if self.sharded:
            fsdp.load_optimizer_state(self.model, self.optimizer, moments)
        else:
            self.optimizer.load_state_dict(moments)
            repage(self.optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], self.ranks.rank, self.device)
        self.step, self.tokens_seen, self.last_loss = state["step"], state["tokens"], state["loss"]
        self.telemetry.set_total(self.step, self.total_steps)
        self.log.event("resume", f"resumed from {self.storage.join(checkpoint.name)} at step "
                       f"{self.step}/{self.total_steps}", step=self.step)

    # --- the result -------------------------------------------------------------------------------

    def save(self) -> str | None:
        """adapter files + tokenizer to <output>/adapter/, (optionally the merged model to <output>/merged/),
        then manifest.json with every file's sha256: written last, so its presence means complete. Rank 0
        writes and returns the adapter's URI; under FSDP every rank calls, to gather the adapter."""
        weights = fsdp.trainable_state(self.model, self.ranks.main) if self.sharded else None
        if not self.ranks.main:
            return None
        self.telemetry.phase(TrainerPhase.UPLOADING, "writing the adapter")
        # A re-run to the same output: the old manifest goes first, so no reader takes the files below,
        # half-written, for a complete adapter described by the previous run's manifest.
        self.storage.delete_key(f"{ADAPTER}/manifest.json")
        files: dict[str, dict[str, Any]] = {}
        written = 0
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / ADAPTER
            self.model.save_pretrained(str(folder), state_dict=weights)  # None: PEFT reads the model
            self.loaded.tokenizer.save_pretrained(str(folder))
            (folder / "README.md").unlink(missing_ok=True)
            findings = self.check_serving(folder)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                rel = path.relative_to(folder).as_posix()
                written += self.storage.put_file(path, f"{ADAPTER}/{rel}")
                files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            merged: dict[str, dict[str, Any]] = {}
            if self.spec.output.merged_model:
                merged, nbytes = self.save_merged(folder, Path(tmp) / MERGED)
                written += nbytes
            metrics = {"steps": self.step, "finalLoss": self.last_loss, "evalLoss": self.result.eval_loss,
                       "tokens": self.tokens_seen, "peakMemoryBytes": self.telemetry.memory(),
                       "trainSeconds": round(getattr(self.result, "seconds", 0.0), 2)}
            manifest = {
                "kind": "kubetune.io/adapter-manifest", "version": 1,
                "job": self.config.job.model_dump(),
                "baseModel": {**self.spec.model.model_dump(mode="json", by_alias=True),
                              "commit": self.model_commit},
                "method": self.spec.method,
                "spec": self.spec.model_dump(mode="json", by_alias=True),
                "knobs": self.config.knobs.model_dump(by_alias=True),
                "files": files,
                "merged": {"uri": self.storage.join(MERGED), "files": merged} if merged else None,
                "evaluation": {"uri": self.storage.uri, "files": self.evaluation_files} if self.evaluation_files
                else None,  # eval.json beside adapter/ (kubetune_trainer.evaluate)
                "serving": [f.model_dump(by_alias=True) for f in findings],
                "metrics": metrics,
                "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            written += self.storage.put_bytes(json.dumps(manifest, indent=2).encode(), f"{ADAPTER}/manifest.json")
        self.telemetry.record_upload(written)
        self.storage.delete_prefix(CHECKPOINTS)  # the adapter is the result; checkpoints only served resume
        uri = self.storage.join(ADAPTER)
        self.telemetry.status.adapter_uri = uri
        return uri

    def check_servable(self) -> None:
        """Before training: an adapter of this spec that no serving engine would apply fails now, not after the
        run (kubetune_trainer.serving_check; exit code 2)."""
        self.base_modules = serving_check.base_modules(self.loaded.model_dir, self.model)
        serving_check.judge(serving_check.in_memory_adapter(self.model), self.base_modules, self.spec)

    def check_serving(self, folder: Path) -> list[ServingFinding]:
        """The saved adapter against the serving rules, before upload: the findings go to the log, the manifest
        and the termination summary (the operator's ServingReady condition and Warning Event)."""
        findings = serving_check.judge(serving_check.read_adapter(folder), self.base_modules, self.spec)
        self.result.serving = findings
        self.log.event("serving", serving_check.describe(findings), rules=[f.rule for f in findings])
        return findings

    def save_merged(self, adapter_dir: Path, out: Path) -> tuple[dict[str, dict[str, Any]], int]:
        """The base in 16-bit (not the NF4 copy we trained on) + the adapter, merged tensor by tensor and uploaded
        shard by shard (kubetune_trainer.merge): host memory within about one tensor, disk within one shard."""
        from kubetune_trainer.merge import stream_merge

        self.log.event("merge", "merging the adapter into the 16-bit base model, shard by shard")
        files: dict[str, dict[str, Any]] = {}
        written = 0

        def emit(path: Path, name: str) -> None:
            nonlocal written
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            written += self.storage.put_file(path, f"{MERGED}/{name}")
            path.unlink()  # uploaded: the next shard reuses the disk

        stream_merge(self.loaded.model_dir, adapter_dir, out, emit, dtype=torch.bfloat16)
        self.loaded.tokenizer.save_pretrained(str(out))
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            emit(path, path.relative_to(out).as_posix())
        return dict(sorted(files.items())), written
