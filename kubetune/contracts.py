"""The contracts between kubetune's processes, declared once and imported by every side.

- `Phase`, `ConditionType`, `Reason`: what the operator writes into a FineTuneJob's status (and its Events),
  what the CRD schema allows, what the operator's metrics count, what Argo CD / Flux health checks read.
- `ExitCode`: how the trainer ends; the operator reads it from the pod and the Job's podFailurePolicy acts on it.
- `TrainerStatus`: the trainer's `GET /status` document, served by the trainer and parsed by the operator.
- `TerminationSummary`: the JSON the trainer writes to its termination-message path, read by the operator.

Written in the style of Kueue's `workload_types.go`: every condition type and reason is a documented constant,
and each reason says which condition (and which Event) carries it. This module is the core: it imports
nothing from the trainer, the operator or the front ends.
"""

from __future__ import annotations

import json
from enum import IntEnum, StrEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel


class Phase(StrEnum):
    """`status.phase`: one word for humans and printer columns; machines read the conditions."""

    PENDING = "Pending"
    """No trainer Job yet: no node of the planned class has room, and the class is not provisionable."""
    QUEUED = "Queued"
    """The trainer Job exists and waits for the scheduler, for Kueue admission, or for a replacement pod."""
    RUNNING = "Running"
    """A trainer pod is running."""
    SUCCEEDED = "Succeeded"
    """The adapter is written (`status.adapterUri`). Terminal."""
    FAILED = "Failed"
    """Nothing will change without a human: invalid spec, no class fits, training failed for good. Terminal."""
    SUSPENDED = "Suspended"
    """`spec.suspend` is true; the Job is suspended and checkpoints are kept."""

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class ConditionType(StrEnum):
    """`status.conditions[].type`, following kstatus (what Argo CD, Flux and `kubectl wait` read)."""

    READY = "Ready"
    """True only when the fine-tune succeeded. While False, its reason says what the job waits for."""
    RECONCILING = "Reconciling"
    """True while the operator or the trainer is still working towards Ready."""
    STALLED = "Stalled"
    """True when nothing will change without a human (the job Failed)."""
    SERVING_READY = "ServingReady"
    """Set once the adapter is written: True when it passes every serving rule (kubetune.serving), False with
    the broken rules in its message (and a Warning Event). Not a kstatus condition: the job still succeeded."""


class Reason(StrEnum):
    """`status.conditions[].reason` and Event reasons (CamelCase, one meaning each).

    A transition's reason goes on the condition that carries the news: Ready (while False, why not yet; when
    True, Succeeded), Reconciling while True, Stalled while True. A condition that is False and has nothing
    to say carries its own idle reason (`NotReconciling`, `NotStalled`), so no reason stands for two things.
    """

    # --- Pending (Ready=False, Reconciling=True) -----------------------------------------------------
    NO_MATCHING_NODES = "NoMatchingNodes"
    """No node of the planned class has the GPUs, and the class is not provisionable; re-planned when the
    cluster's inventory changes."""
    MODEL_CONFIG_UNREACHABLE = "ModelConfigUnreachable"
    """The model is not in the catalog and the hub did not answer for its config.json (a hub or network
    outage, not the spec's fault); planned again every poll interval."""
    QUOTA_EXCEEDED = "QuotaExceeded"
    """The namespace's quota (kubetune.quota: concurrent jobs, GPUs, GPU classes, estimated cost) does not admit the
    plan; the message names the limit. Decided again every poll interval."""
    # --- Queued (Ready=False, Reconciling=True) -------------------------------------------------------
    JOB_CREATED = "JobCreated"
    """The ConfigMap and trainer Job of an attempt were created (or adopted)."""
    WAITING_FOR_KUEUE = "WaitingForKueue"
    """The Job was created suspended for a Kueue LocalQueue; Kueue admits it by unsuspending it."""
    RESUMED = "Resumed"
    """`spec.suspend` went back to false; the Job resumes from its last checkpoint."""
    PREEMPTED = "Preempted"
    """The Job was suspended by its queue while running; it resumes when admitted again."""
    RESCHEDULING = "Rescheduling"
    """The running pod went away (a disruption); the Job controller starts a replacement."""
    OUT_OF_MEMORY_ESCALATED = "OutOfMemoryEscalated"
    """An attempt ran out of GPU memory; the next attempt runs one GPU class up, from the last checkpoint."""
    RANK_FAILED = "RankFailed"
    """A rank of a multi-node attempt failed, which fails the attempt (a lone replacement pod cannot rejoin the
    group); the next attempt restarts every rank from the last checkpoint (at most the Job backoff limit times)."""
    # --- Running (Ready=False, Reconciling=True) ------------------------------------------------------
    TRAINING = "Training"
    """A trainer pod is running; `status.progress` follows its /status."""
    # --- Suspended (Ready=False, Reconciling=False) ---------------------------------------------------
    SUSPENDED = "Suspended"
    """`spec.suspend` is true."""
    # --- Succeeded (Ready=True, Reconciling=False) ----------------------------------------------------
    SUCCEEDED = "Succeeded"
    """The trainer exited 0 and wrote the adapter."""
    EVALUATED = "Evaluated"
    """Event only: spec.evaluation's result (held-out loss base -> adapter, the first answers); in status.result."""
    # --- Failed (Ready=False, Reconciling=False, Stalled=True) ----------------------------------------
    INVALID_SPEC = "InvalidSpec"
    """The spec does not validate; the message names the field and the allowed values."""
    UNPLANNABLE = "Unplannable"
    """The spec is valid but no GPU class satisfies it (pinned class too small, maxGpuClass too low...)."""
    NO_LARGER_GPU_CLASS = "NoLargerGpuClass"
    """An attempt ran out of memory and no larger class is allowed or known."""
    TRAINING_FAILED = "TrainingFailed"
    """The trainer failed for good (bad input, storage, retries exhausted)."""
    GPU_UNAVAILABLE = "GpuUnavailable"
    """The plan runs the job on a GPU and the trainer found no usable CUDA on its node (exit code 5): no GPU
    visible to the pod, or an NVIDIA driver older than the trainer image needs. The message names both."""
    CHILD_NAME_TAKEN = "ChildNameTaken"
    """A ConfigMap or Job with the child's name exists and is not owned by this FineTuneJob."""
    # --- ServingReady (set when the adapter is written) ------------------------------------------------
    SERVING_RULES_MET = "ServingRulesMet"
    """ServingReady=True: the adapter passes every serving rule (vLLM / KServe, kubetune.serving)."""
    SERVING_RULES_BROKEN = "ServingRulesBroken"
    """ServingReady=False and a Warning Event: the adapter breaks a serving rule; the message says which."""
    # --- idle reasons of conditions that are False ---------------------------------------------------
    NOT_RECONCILING = "NotReconciling"
    """Reconciling=False: the job is finished or suspended; the operator has nothing in progress."""
    NOT_STALLED = "NotStalled"
    """Stalled=False: the job can still make progress (or has succeeded)."""
    # --- Events only (no phase change) ----------------------------------------------------------------
    SPEC_CHANGE_IGNORED = "SpecChangeIgnored"
    """Event: the spec changed after the job succeeded; apply a new FineTuneJob to train again."""
    SPEC_CHANGE_DEFERRED = "SpecChangeDeferred"
    """Event: the spec changed while an attempt exists; the change applies to the next attempt."""


# Which reasons each condition may carry (a test holds the operator to it).
CONDITION_REASONS: dict[ConditionType, frozenset[Reason]] = {
    ConditionType.READY: frozenset(r for r in Reason if r not in (
        Reason.NOT_RECONCILING, Reason.NOT_STALLED, Reason.SPEC_CHANGE_IGNORED, Reason.SPEC_CHANGE_DEFERRED,
        Reason.SERVING_RULES_MET, Reason.SERVING_RULES_BROKEN)),
    ConditionType.RECONCILING: frozenset({
        Reason.NO_MATCHING_NODES, Reason.MODEL_CONFIG_UNREACHABLE, Reason.QUOTA_EXCEEDED, Reason.JOB_CREATED,
        Reason.WAITING_FOR_KUEUE, Reason.RESUMED, Reason.PREEMPTED,
        Reason.RESCHEDULING, Reason.OUT_OF_MEMORY_ESCALATED, Reason.RANK_FAILED, Reason.TRAINING,
        Reason.NOT_RECONCILING}),
    ConditionType.STALLED: frozenset({
        Reason.INVALID_SPEC, Reason.UNPLANNABLE, Reason.NO_LARGER_GPU_CLASS, Reason.TRAINING_FAILED,
        Reason.GPU_UNAVAILABLE, Reason.CHILD_NAME_TAKEN, Reason.NOT_STALLED}),
    ConditionType.SERVING_READY: frozenset({Reason.SERVING_RULES_MET, Reason.SERVING_RULES_BROKEN}),
}


class ExitCode(IntEnum):
    """How the trainer process ends. The Job's podFailurePolicy fails the Job at once on BAD_INPUT and OOM
    (retrying on the same class cannot help) and does not count PREEMPTED against the backoff limit."""

    OK = 0
    """The adapter is written."""
    ERROR = 1
    """Anything unexpected; the Job retries (backoffLimit)."""
    BAD_INPUT = 2
    """The spec, the dataset or the model source is invalid; the summary's error names the field or line."""
    OOM = 3
    """Out of GPU memory; the operator re-plans one class up."""
    STORAGE = 4
    """Could not read or write storage (S3, local paths)."""
    NO_GPU = 5
    """The plan runs the job on a GPU and CUDA is not usable in the pod (no GPU visible, or a driver older than
    the trainer's torch needs); the summary's error names the driver found and the one needed. Retrying on the
    same nodes cannot help: the Job fails at once."""
    PREEMPTED = 143
    """Stopped by SIGTERM after writing a checkpoint; the replacement pod resumes from it."""


class _Contract(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown keys are ignored (a newer peer may add some)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class TrainerPhase(StrEnum):
    """`TrainerStatus.phase`: where the trainer process is."""

    STARTING = "Starting"
    PREPARING = "Preparing"
    LOADING = "Loading"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    CHECKPOINTING = "Checkpointing"
    UPLOADING = "Uploading"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    PREEMPTED = "Preempted"


class TrainerStatus(_Contract):
    """The trainer's `GET /status` document (rank 0). The operator copies it into `status.progress`."""

    phase: TrainerPhase = TrainerPhase.STARTING
    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps planned (0 until known).")
    loss: float | None = Field(default=None, description="Mean token cross-entropy of the last optimizer step.")
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    peak_memory_bytes: int = Field(default=0, ge=0, description="GPU allocator peak (process RSS peak on a CPU).")
    vram_estimate_bytes: int = Field(default=0, ge=0, description="The planner's estimate this attempt runs with.")
    resumed_from_step: int | None = Field(default=None, ge=0, description="The checkpoint step this attempt "
                                          "resumed from (0: from the beginning; None: not known yet).")
    adapter_uri: str | None = None
    model_commit: str | None = Field(default=None, description="The hub commit of the base model (a hub id), "
                                     "once resolved.")
    message: str | None = None

    def document(self) -> dict[str, object]:
        """The JSON body the trainer serves."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def parse(cls, data: object) -> TrainerStatus | None:
        """The operator's side: a /status body, or None when it is not a valid document."""
        try:
            return cls.model_validate(data)
        except ValidationError:
            return None


class Outcome(StrEnum):
    """`TerminationSummary.outcome`: how one trainer run ended (pairs with its exit code)."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INVALID_INPUT = "InvalidInput"
    STORAGE_ERROR = "StorageError"
    OUT_OF_MEMORY = "OutOfMemory"
    PREEMPTED = "Preempted"
    GPU_UNAVAILABLE = "GpuUnavailable"


OUTCOME_OF_EXIT: dict[int, Outcome] = {
    ExitCode.OK: Outcome.SUCCEEDED, ExitCode.ERROR: Outcome.FAILED, ExitCode.BAD_INPUT: Outcome.INVALID_INPUT,
    ExitCode.OOM: Outcome.OUT_OF_MEMORY, ExitCode.STORAGE: Outcome.STORAGE_ERROR, ExitCode.PREEMPTED: Outcome.PREEMPTED,
    ExitCode.NO_GPU: Outcome.GPU_UNAVAILABLE,
}

SUMMARY_ANSWERS = 3  # answers the summary (termination message, status.result) carries; eval.json has them all
SUMMARY_ANSWER_CHARS = 160  # each prompt and answer in the summary is cut to this many characters


def clip(text: str | None, most: int = SUMMARY_ANSWER_CHARS) -> str | None:
    """`text` on one line, cut to `most` characters with an ellipsis."""
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= most else flat[: most - 1].rstrip() + "…"


class EvalAnswer(_Contract):
    """One prompt of spec.evaluation and the greedy answers (clipped in a summary, whole in eval.json)."""

    prompt: str
    base: str | None = Field(default=None, description="The base model's answer (the adapter switched off); "
                             "None without compareBase.")
    adapter: str


class EvalSummary(_Contract):
    """What the trainer's evaluation (spec.evaluation) found, short enough for the termination message:
    held-out loss and perplexity of base and adapter on the same rows, and the first answers clipped.
    The whole record is `uri` (<output>/eval.json)."""

    rows: int = Field(default=0, ge=0, description="Held-out rows (packed) both models were scored on.")
    tokens: int = Field(default=0, ge=0, description="Held-out tokens carrying a loss, the same for both.")
    base_loss: float | None = None
    adapter_loss: float | None = None
    base_perplexity: float | None = None
    adapter_perplexity: float | None = None
    answers: list[EvalAnswer] = Field(default_factory=list, description="The first answers, clipped.")
    prompts: int = Field(default=0, ge=0, description="Prompts answered (eval.json has every answer).")
    uri: str | None = Field(default=None, description="Where eval.json is.")

    def loss_line(self) -> str:
        """'held-out loss 2.413 -> 1.052 (perplexity 11.2 -> 2.86) on 6 rows, 1,204 tokens', or what there is."""
        if self.adapter_loss is None:
            return "no held-out split (set spec.dataset.evalFraction or evalSource)"
        ppl = f"{self.adapter_perplexity:.3g}"
        if self.base_loss is not None and self.base_perplexity is not None:
            loss, ppl = f"{self.base_loss:.3f} -> {self.adapter_loss:.3f}", f"{self.base_perplexity:.3g} -> {ppl}"
        else:
            loss = f"{self.adapter_loss:.3f}"
        return f"held-out loss {loss} (perplexity {ppl}) on {self.rows} rows, {self.tokens:,} tokens"


TERMINATION_MESSAGE_LIMIT = 4096  # Kubernetes keeps the first 4096 bytes of a termination message


class ServingFinding(_Contract):
    """One serving rule an adapter breaks (kubetune.serving.check_adapter): trainer -> summary -> status."""

    rule: str = Field(description="CamelCase rule name, e.g. RankAboveMax (kubetune.serving.Rule).")
    severity: str = Field(description="Warning (vLLM/KServe would refuse or misserve it), Fatal (nothing "
                          "servable: the job fails) or Info (asked for by the spec, still worth knowing).")
    message: str


class TerminationSummary(_Contract):
    """The JSON the trainer writes to its termination-message path; the operator reads it from the pod's
    `state.terminated.message` (a message that is not this JSON, such as a log tail, becomes `error`)."""

    outcome: Outcome = Outcome.FAILED
    exit_code: int | None = None
    steps: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    peak_memory_bytes: int | None = None
    adapter_uri: str | None = None
    resumed_from_step: int | None = None
    model_commit: str | None = None  # the hub commit of the base model (a hub id)
    evaluation: EvalSummary | None = None  # spec.evaluation's result (kubetune_trainer.evaluate)
    serving: list[ServingFinding] | None = None  # the serving check's findings (None: not checked; []: all rules met)
    error: str | None = None

    @classmethod
    def from_result(cls, result: object, exit_code: int) -> TerminationSummary:
        """The trainer's side: the summary of a run's result (kubetune_trainer.loop.Result, read by attribute:
        every field of this summary the result has) and the process's exit code."""
        told = {name: getattr(result, name) for name in cls.model_fields if hasattr(result, name)}
        return cls.model_validate({**told, "exit_code": exit_code})

    def message(self) -> str:
        """The JSON text, with `error` shortened so the whole fits Kubernetes' 4096-byte limit."""
        text = self.model_dump_json(by_alias=True)
        excess = len(text.encode()) - TERMINATION_MESSAGE_LIMIT
        if excess > 0 and self.error:
            keep = max(0, len(self.error.encode()) - excess - 8)
            short = self.error.encode()[:keep].decode(errors="ignore") + "…"
            text = self.model_copy(update={"error": short}).model_dump_json(by_alias=True)
        evaluation = self.evaluation
        while len(text.encode()) > TERMINATION_MESSAGE_LIMIT and evaluation is not None and evaluation.answers:
            evaluation = evaluation.model_copy(update={"answers": evaluation.answers[:-1]})  # eval.json has them
            text = self.model_copy(update={"evaluation": evaluation}).model_dump_json(by_alias=True)
        return text

    @classmethod
    def parse(cls, message: str | None) -> TerminationSummary | None:
        """The operator's side: None for no message; a summary with `error` for text that is not the JSON."""
        if not message or not message.strip():
            return None
        try:
            data = json.loads(message)
        except ValueError:
            return cls(error=message.strip()[-500:])
        if not isinstance(data, dict):
            return cls(error=str(data)[-500:])
        try:
            return cls.model_validate(data)
        except ValidationError:
            return cls(error=str(data.get("error") or message.strip())[-500:])
