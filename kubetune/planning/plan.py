"""Spec + architecture + GPU catalog -> Plan: which class, how many, which knobs, and why.

Rules, in order:
1. The leanest settings the spec allows (gradient checkpointing on unless forced off, micro-batch 1
   unless pinned) decide whether a class can hold the job at all.
2. One GPU whenever some class holds the job; the cheapest such class wins (price x count). Only when
   no single GPU can, the layers are split over 2, 4 or 8 GPUs of one class (cheapest total wins).
3. On the chosen class, the fastest knobs that still fit: checkpointing off if it fits, then the
   largest micro-batch (a divisor of the effective batch, so accumulation keeps it unchanged).

With a `Supply` (the classes a cluster has nodes of, or can provision), only those classes are candidates,
and the reasons name the cheaper classes skipped and why. When none of them holds the job, the plan falls
back to the whole catalog and says so: the job waits (Pending) for a node of that class.
Without a supply (`kubetune plan` with no cluster) the whole catalog is the candidate set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.errors import PlanError
from kubetune.planning.gpus import GpuCatalog, GpuClass
from kubetune.planning.models import Architecture
from kubetune.planning.placement import Supply
from kubetune.planning.ranks import job_estimate, plan_strategy, step_time
from kubetune.planning.vram import Estimate, GiB, TrainingShape, estimate
from kubetune.spec import FineTuneJobSpec

GPU_COUNTS = (1, 2, 4, 8)
RANK_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # strategy ddp/fsdp: ranks may span nodes


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class Knobs(_Out):
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    max_seq_length: int
    compute_dtype: str = "bfloat16"


class Alternative(_Out):
    gpu_class: str
    gpu_count: int
    hourly_cost: float
    cost_ratio: float
    vram_estimate_bytes: int


class Plan(_Out):
    model: str
    method: str
    gpu_class: str
    gpu_count: int
    gpu_memory_bytes: int
    usable_bytes_per_gpu: int
    hourly_cost: float
    vram_estimate_bytes: int
    breakdown: dict[str, int]
    lora_params: int
    knobs: Knobs
    model_params: int = Field(default=0, description="Base model parameters (sizes the model cache and the "
                              "trainer's graceful stop: kubetune.planning.budget).")
    reasons: list[str]
    alternatives: list[Alternative]
    strategy: Literal["single", "pipeline", "ddp", "fsdp"] = "single"  # how gpu_count GPUs train (scaleout.py)

    def summary(self) -> dict[str, object]:
        """The `-o json` shape of `kubetune plan`."""
        return {
            "gpuClass": self.gpu_class,
            "gpuCount": self.gpu_count,
            "vramEstimateBytes": self.vram_estimate_bytes,
            "breakdown": self.breakdown,
            "knobs": self.knobs.model_dump(by_alias=True),
            "reasons": self.reasons,
            "alternatives": [a.model_dump(by_alias=True) for a in self.alternatives],
        }


@dataclass(frozen=True)
class _Fit:
    gpu: GpuClass
    count: int
    shape: TrainingShape
    estimate: Estimate

    @property
    def cost(self) -> float:
        return self.gpu.hourly_price * self.count


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def effective_batch(spec: FineTuneJobSpec) -> int:
    mb = spec.training.micro_batch_size
    return (mb if isinstance(mb, int) else 1) * spec.training.gradient_accumulation_steps


def _shape(spec: FineTuneJobSpec, micro_batch: int, checkpointing: bool, count: int) -> TrainingShape:
    targets = spec.lora.target_modules
    return TrainingShape(
        method=spec.method,
        micro_batch=micro_batch,
        seq_len=spec.training.max_seq_length,
        gradient_checkpointing=checkpointing,
        lora_r=spec.lora.r,
        target_modules=targets if isinstance(targets, str) else tuple(targets),  # type: ignore[arg-type]
        lora_dropout=spec.lora.dropout,
        optimizer=spec.training.optimizer,
        gpu_count=count,
    )


def _leanest(spec: FineTuneJobSpec) -> tuple[int, bool]:
    mb = spec.training.micro_batch_size
    gc = spec.training.gradient_checkpointing
    return (mb if isinstance(mb, int) else 1), (gc if isinstance(gc, bool) else True)


def fastest_knobs(spec: FineTuneJobSpec, arch: Architecture, usable_bytes: int, count: int = 1
                  ) -> tuple[TrainingShape, Estimate] | None:
    """The fastest (checkpointing, micro-batch) that fits in usable_bytes per GPU, or None.

    Checkpointing off beats any micro-batch with it on (recomputing every layer's forward costs about
    a third more compute); then the largest micro-batch that divides the effective batch.
    """
    mb_spec = spec.training.micro_batch_size
    gc_spec = spec.training.gradient_checkpointing
    batch = effective_batch(spec)
    micro_batches = [mb_spec] if isinstance(mb_spec, int) else [d for d in range(batch, 0, -1) if batch % d == 0]
    checkpointing = [gc_spec] if isinstance(gc_spec, bool) else [False, True]
    for gc in checkpointing:
        for mb in micro_batches:
            shape = _shape(spec, mb, gc, count)
            est = job_estimate(arch, shape, spec.resources.strategy)
            if est.total <= usable_bytes:
                return shape, est
    return None


def local_knobs(spec: FineTuneJobSpec, arch: Architecture, usable_bytes: int) -> tuple[Knobs, int]:
    """`kubetune train` on this machine: the fastest knobs that fit `usable_bytes`, and their estimate (0 when
    even the leanest settings exceed it by the estimate: they are tried anyway, and the run tells)."""
    best = fastest_knobs(spec, arch, usable_bytes)
    lean_mb, lean_gc = _leanest(spec)
    micro_batch, checkpointing, total = (lean_mb, lean_gc, 0) if best is None else \
        (best[0].micro_batch, best[0].gradient_checkpointing, best[1].total)
    knobs = Knobs(micro_batch_size=micro_batch,
                  gradient_accumulation_steps=max(1, effective_batch(spec) // micro_batch),
                  gradient_checkpointing=checkpointing, max_seq_length=spec.training.max_seq_length,
                  compute_dtype="bfloat16")
    return knobs, total


def _candidates(spec: FineTuneJobSpec, catalog: GpuCatalog, above: str | None) -> tuple[list[GpuClass], list[str]]:
    notes: list[str] = []
    resources = spec.resources
    if resources.gpu_class != "auto":
        pinned = catalog.get(resources.gpu_class, "spec.resources.gpuClass")
        floor = catalog.get(above, "status.plan.gpuClass") if above else None
        if floor and pinned.memory_bytes <= floor.memory_bytes:
            raise PlanError(
                f"spec.resources.gpuClass: pinned to {pinned.name}, and a pinned class is never escalated; the job "
                f"ran out of GPU memory on {floor.name}. Set gpuClass: auto (with maxGpuClass as the limit), pin a "
                "larger class, or lower training.microBatchSize / training.maxSeqLength"
            )
        return [pinned], [f"gpuClass pinned to {pinned.name} by the spec"]
    classes = catalog.by_price()
    if resources.max_gpu_class:
        ceiling = catalog.get(resources.max_gpu_class, "spec.resources.maxGpuClass")
        classes = [g for g in classes if g.hourly_price <= ceiling.hourly_price]
        notes.append(f"maxGpuClass {ceiling.name}: classes priced above it are not considered")
    if above:
        floor = catalog.get(above, "status.plan.gpuClass")
        classes = [g for g in classes if g.memory_bytes > floor.memory_bytes]
        notes.append(f"escalated past {floor.name} ({floor.memory_gib:.0f} GiB) after running out of GPU memory there")
    return classes, notes


def _fits(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, classes: list[GpuClass],
          counts: list[int], supply: Supply | None, skipped: dict[str, str]) -> list[_Fit]:
    lean_mb, lean_gc = _leanest(spec)
    fits: list[_Fit] = []
    for count in counts:
        for gpu in classes:
            if count > gpu.max_per_node and spec.resources.strategy == "auto":
                continue  # the layer split stays on one node; DDP/FSDP ranks span nodes
            shape = _shape(spec, lean_mb, lean_gc, count)
            est = job_estimate(arch, shape, spec.resources.strategy)
            if est.total > catalog.usable_bytes(gpu):
                continue
            missing = supply.why_not(gpu, min(count, gpu.max_per_node)) if supply is not None else None
            if missing:
                skipped.setdefault(gpu.name, missing)
                continue
            fits.append(_Fit(gpu, count, shape, est))
        if fits and spec.resources.gpu_count == "auto" and spec.resources.strategy == "auto":
            break  # fewest GPUs first: sharding only when no single GPU (or smaller group) can hold it
    return fits


def make_plan(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, above: str | None = None,
              supply: Supply | None = None) -> Plan:
    """Choose class, count and knobs. `above`: a class the job ran out of memory on (OOM escalation).
    `supply`: the classes the cluster offers (None: the whole catalog)."""
    classes, reasons = _candidates(spec, catalog, above)
    lean_mb, lean_gc = _leanest(spec)
    counts = [spec.resources.gpu_count] if isinstance(spec.resources.gpu_count, int) else \
        list(GPU_COUNTS if spec.resources.strategy == "auto" else RANK_COUNTS)
    cap = spec.resources.max_gpu_count
    if cap is not None:
        if not [c for c in counts if c <= cap]:
            raise PlanError(f"spec.resources.gpuCount: {counts[0]} is above spec.resources.maxGpuCount {cap}")
        counts = [c for c in counts if c <= cap]

    pinned = spec.resources.gpu_class != "auto"
    skipped: dict[str, str] = {}
    fits = _fits(spec, arch, catalog, classes, counts, None if pinned else supply, skipped)
    lacking = ""
    if not fits and skipped:  # the cluster offers no class that holds it: plan on the catalog and wait
        fits = _fits(spec, arch, catalog, classes, counts, None, {})
        lacking = ("no class the cluster has nodes of or can provision holds it (" + "; ".join(skipped.values())
                   + "); planned on the cheapest class that does, and waits for a node of it")
    if not fits:
        raise _no_fit(spec, arch, catalog, classes, counts, lean_mb, lean_gc, above)

    if spec.resources.strategy == "auto":
        fits.sort(key=lambda f: (f.cost, -f.gpu.memory_bytes))
    else:  # ranks: one big GPU against several small ones, by price x estimated step time
        tokens = effective_batch(spec) * spec.training.max_seq_length
        fits.sort(key=lambda f: (f.cost * _step_seconds(arch, f, spec.resources.strategy, tokens), f.count))
    chosen = fits[0]
    if lacking:
        reasons.append(lacking)
    else:
        reasons.extend(why for name, why in skipped.items()
                       if catalog.get(name, "plan").hourly_price < chosen.gpu.hourly_price)
    if supply is not None and not lacking and chosen.gpu.name not in dict(supply.nodes) and not pinned:
        reasons.append(f"{chosen.gpu.name}: no node yet, but provisionable (its node pool scales up from zero)")
    usable = catalog.usable_bytes(chosen.gpu)
    best = fastest_knobs(spec, arch, usable, chosen.count)
    assert best is not None  # the leanest shape fits, so the search finds at least that
    shape, est = best

    lean_total = chosen.estimate.total
    what = f"{arch.name} {spec.method.upper()} (LoRA r={spec.lora.r}, {spec.training.max_seq_length} tokens)"
    reasons.insert(0, f"{what} needs {gib(lean_total)} per GPU at the leanest settings "
                      f"(checkpointing {'on' if lean_gc else 'off'}, micro-batch {lean_mb})")
    where = f"{chosen.count}x {chosen.gpu.name}" if chosen.count > 1 else chosen.gpu.name
    reasons.append(
        f"{where}: cheapest that holds it ({gib(usable)} usable of {chosen.gpu.memory_gib:.1f} GiB per GPU, "
        f"{chosen.cost:.2f}/h)"
    )
    strategy = plan_strategy(spec.resources.strategy, chosen.count)
    if strategy == "pipeline":
        reasons.append(f"no single GPU holds it; layers are split over {chosen.count} GPUs of one node")
    elif strategy == "ddp":
        reasons.append(f"strategy ddp: {chosen.count} ranks, each with a full copy; each optimizer step's "
                       "micro-batches are divided between them")
    elif strategy == "fsdp":
        reasons.append(f"strategy fsdp: weights, gradients and optimizer states sharded over {chosen.count} ranks "
                       f"({gib(est.parts.get('communication', 0))} per GPU for all-gathers and NCCL)")
    if spec.resources.strategy != "auto" and len(fits) > 1:
        tokens = effective_batch(spec) * spec.training.max_seq_length
        mine = chosen.cost * _step_seconds(arch, chosen, spec.resources.strategy, tokens)
        for other in fits[1:3]:
            theirs = other.cost * _step_seconds(arch, other, spec.resources.strategy, tokens)
            label = f"{other.count}x {other.gpu.name}" if other.count > 1 else other.gpu.name
            reasons.append(f"{label} also holds it but costs {theirs / mine:.2f}x as much per run "
                           "(price x estimated step time)")
    reasons.extend(_knob_reasons(spec, arch, shape, est, usable, chosen.count))

    batch = effective_batch(spec)
    knobs = Knobs(
        micro_batch_size=shape.micro_batch,
        gradient_accumulation_steps=max(1, batch // shape.micro_batch),
        gradient_checkpointing=shape.gradient_checkpointing,
        max_seq_length=shape.seq_len,
        compute_dtype="bfloat16" if chosen.gpu.bf16 else "float16",
    )
    alternatives = [
        Alternative(
            gpu_class=f.gpu.name, gpu_count=f.count, hourly_cost=round(f.cost, 2),
            cost_ratio=round(f.cost / chosen.cost, 2), vram_estimate_bytes=f.estimate.total,
        )
        for f in fits[1:]
    ]
    return Plan(
        model=arch.name, method=spec.method, gpu_class=chosen.gpu.name, gpu_count=chosen.count,
        gpu_memory_bytes=chosen.gpu.memory_bytes, usable_bytes_per_gpu=usable, hourly_cost=round(chosen.cost, 2),
        vram_estimate_bytes=est.total, breakdown=est.parts, lora_params=est.lora_params, knobs=knobs,
        reasons=reasons, alternatives=alternatives, strategy=strategy, model_params=arch.total_params,
    )


def _step_seconds(arch: Architecture, fit: _Fit, strategy: str, tokens: int) -> float:
    nodes = -(-fit.count // fit.gpu.max_per_node)
    return step_time(arch, fit.shape, plan_strategy(strategy, fit.count), fit.count, nodes, tokens, fit.gpu.name)


def _knob_reasons(spec: FineTuneJobSpec, arch: Architecture, shape: TrainingShape, est: Estimate,
                  usable: int, count: int) -> list[str]:
    reasons = []
    gc_spec = spec.training.gradient_checkpointing
    if isinstance(gc_spec, bool):
        reasons.append(f"gradient checkpointing {'on' if gc_spec else 'off'}: set by the spec")
    elif shape.gradient_checkpointing:
        without = estimate(arch, _shape(spec, 1, False, count)).total
        reasons.append(f"gradient checkpointing on: off would need {gib(without)} > {gib(usable)} usable")
    else:
        reasons.append("gradient checkpointing off: it fits without recomputing activations (~1/3 less compute)")
    batch = effective_batch(spec)
    if isinstance(spec.training.micro_batch_size, int):
        reasons.append(f"micro-batch {shape.micro_batch}: set by the spec")
    else:
        reasons.append(
            f"micro-batch {shape.micro_batch} x accumulation {batch // shape.micro_batch} keeps the effective "
            f"batch of {batch}; estimate {gib(est.total)} of {gib(usable)} usable"
        )
    return reasons


def _cheapest_anywhere(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, lean_mb: int,
                       lean_gc: bool) -> str | None:
    """The cheapest class (fewest GPUs first) in the whole catalog that would hold the job, ignoring limits."""
    for count in GPU_COUNTS:
        per_gpu = estimate(arch, _shape(spec, lean_mb, lean_gc, count)).total
        gpu = next((g for g in catalog.by_price() if per_gpu <= catalog.usable_bytes(g)), None)
        if gpu:
            return f"{count}x {gpu.name}" if count > 1 else gpu.name
    return None


def _no_fit(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, classes: list[GpuClass],
            counts: list[int], lean_mb: int, lean_gc: bool, above: str | None) -> PlanError:
    lean = estimate(arch, _shape(spec, lean_mb, lean_gc, 1)).total
    need = f"the job needs {gib(lean)} on one GPU at the leanest settings"
    would_text = _cheapest_anywhere(spec, arch, catalog, lean_mb, lean_gc)
    hint = f"; the cheapest that would hold it is {would_text}" if would_text else (
        "; no class in the catalog holds it even 8 to a node: lower training.maxSeqLength or lora.r, "
        "or use method: qlora"
    )
    if spec.resources.gpu_class != "auto":
        gpu = classes[0]
        where = "spec.resources.gpuClass"
        return PlanError(f"{where}: {gpu.name} ({gib(catalog.usable_bytes(gpu))} usable per GPU, "
                         f"{'/'.join(map(str, counts))} GPU(s)) cannot hold this job: {need}{hint}")
    if above:
        return PlanError(f"status.plan.gpuClass: no class above {above} within the limits holds the job: {need}{hint}")
    if spec.resources.max_gpu_class:
        return PlanError(f"spec.resources.maxGpuClass: no class up to {spec.resources.max_gpu_class} holds this job: "
                         f"{need}{hint}")
    if isinstance(spec.resources.gpu_count, int):
        return PlanError(f"spec.resources.gpuCount: {spec.resources.gpu_count} GPU(s) of any class cannot hold "
                         f"this job: {need}{hint}")
    return PlanError(f"spec: {need}{hint}")
