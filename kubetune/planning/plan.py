"""Spec + architecture + GPU catalog -> Plan: which class, how many GPUs in which shape, which knobs, and why.

Rules, in order (kubetune.planning.shapes does 2-4, with kubetune.planning.knobs searching the knobs of 3):
1. The leanest settings the spec allows (gradient checkpointing on unless forced off, micro-batch 1
   unless pinned) decide whether a class can hold the job at all, per GPU of each shape.
2. Shapes: one GPU, the layer split over one node's GPUs, DDP or FSDP ranks over one or several nodes
   (`strategy: auto` compares them all; `ddp`/`fsdp` only that one; `gpuCount` pins the count and
   `maxGpuCount` caps it), on every class that holds them and is no dearer per GPU-hour than the cheapest
   class that holds the job on one GPU.
3. On each class, the fastest knobs that still fit: checkpointing off if it fits, then the largest
   micro-batch (a divisor of the effective batch, so accumulation keeps it unchanged).
4. The lowest estimated cost per job wins (price per hour x estimated hours); equal costs go to the faster.
   The reasons name the runner-ups, with their cost and time.

With a `Supply` (the classes a cluster has nodes of, or can provision), a shape's class must be one the
cluster can run it on (enough nodes with enough GPUs each), and the reasons name the cheaper classes skipped
and why. When no shape fits anything the cluster offers, the plan falls back to the whole catalog and says so:
the job waits (Pending) for a node of that class. Without a supply (`kubetune plan` with no cluster) the whole
catalog is the candidate set.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.errors import PlanError
from kubetune.planning.gpus import GpuCatalog, GpuClass
from kubetune.planning.knobs import effective_batch, fastest_knobs, leanest, training_shape
from kubetune.planning.models import Architecture
from kubetune.planning.placement import Supply
from kubetune.planning.ranks import job_estimate
from kubetune.planning.shapes import (
    Candidate,
    Comparison,
    compare,
    explain,
    gib,
    runner_ups,
    shape_label,
)
from kubetune.spec import FineTuneJobSpec, ResourcesSpec
from kubetune.wire import Strategy

__all__ = ["Alternative", "Knobs", "Plan", "effective_batch", "fastest_knobs", "gib", "local_knobs", "make_plan"]


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class Knobs(_Out):
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    max_seq_length: int
    compute_dtype: str = "bfloat16"


class Alternative(_Out):
    """Another shape the planner compared (or the chosen shape on a dearer class)."""

    gpu_class: str
    gpu_count: int
    hourly_cost: float
    cost_ratio: float = Field(description="Its price per hour / the chosen plan's.")
    vram_estimate_bytes: int = Field(description="Per GPU at the leanest settings.")
    strategy: Strategy = "single"
    nodes: int = 1
    step_seconds: float = Field(default=0.0, description="Estimated seconds per optimizer step.")
    job_cost_ratio: float = Field(default=0.0, description="Its estimated cost per job / the chosen plan's.")
    time_ratio: float = Field(default=0.0, description="Its estimated time / the chosen plan's.")
    kind: Literal["candidate", "dearer", "unavailable"] = Field(
        default="candidate", description="candidate: compared and dearer per job; dearer: on a class dearer per "
        "GPU-hour than the cheapest single GPU that holds the job, so not a candidate; unavailable: the cluster "
        "cannot run it (note says why).")
    note: str = ""

    def label(self) -> str:
        return shape_label(self.gpu_count, self.gpu_class, self.strategy, self.nodes)


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
    strategy: Strategy = "single"  # how gpu_count GPUs train (scaleout.py)
    nodes: int = Field(default=1, description="Nodes the GPUs span (the catalog's maxPerNode per node).")
    lean_bytes_per_gpu: int = Field(default=0, description="Per GPU at the leanest settings: what decided that "
                                    "the class holds it (vram_estimate_bytes is at the chosen knobs).")
    step_seconds: float = Field(default=0.0, description="Estimated seconds per optimizer step "
                                "(kubetune.planning.ranks.step_time: rough, for comparing shapes).")
    steps: int = Field(default=0, description="The steps the estimated hours and cost are for: "
                       "training.maxSteps, or 1,000 when the data decides.")
    steps_known: bool = False
    eval_seconds: float = Field(default=0.0, description="Estimated seconds spec.evaluation adds once, after the "
                                "last step (kubetune.planning.evaluation); in the estimated hours.")
    largest_weight_params: int = Field(default=0, description="Elements of the model's largest weight (embedding or "
                                       "MLP projection): sizes the streamed merged export's host memory "
                                       "(kubetune.planning.budget).")

    def label(self) -> str:
        """'1x L4', '4x L4 FSDP', '16x L4 FSDP on 2 nodes', '2x A100-40GB layer split'."""
        return shape_label(self.gpu_count, self.gpu_class, self.strategy, self.nodes)

    def per(self) -> str:
        """What the estimated hours and cost are for."""
        return f"for {self.steps} steps" if self.steps_known else f"per {self.steps:,} steps"

    @property
    def estimated_hours(self) -> float:
        return (self.step_seconds * self.steps + self.eval_seconds) / 3600

    @property
    def estimated_cost(self) -> float:
        return self.hourly_cost * self.estimated_hours

    def summary(self) -> dict[str, object]:
        """The `-o json` shape of `kubetune plan`."""
        return {
            "gpuClass": self.gpu_class,
            "gpuCount": self.gpu_count,
            "strategy": self.strategy,
            "nodes": self.nodes,
            "hourlyCost": self.hourly_cost,
            "stepSeconds": round(self.step_seconds, 3),
            "evalSeconds": round(self.eval_seconds, 1),
            "estimatedHours": round(self.estimated_hours, 3),
            "estimatedCost": round(self.estimated_cost, 2),
            "estimatedFor": f"{self.steps} steps" if self.steps_known else f"{self.steps} steps (maxSteps unset)",
            "vramEstimateBytes": self.vram_estimate_bytes,
            "breakdown": self.breakdown,
            "knobs": self.knobs.model_dump(by_alias=True),
            "reasons": self.reasons,
            "alternatives": [a.model_dump(by_alias=True) for a in self.alternatives],
        }


def local_knobs(spec: FineTuneJobSpec, arch: Architecture, usable_bytes: int) -> tuple[Knobs, int]:
    """`kubetune train` on this machine: the fastest knobs that fit `usable_bytes`, and their estimate (0 when
    even the leanest settings exceed it by the estimate: they are tried anyway, and the run tells)."""
    best = fastest_knobs(spec, arch, usable_bytes)
    lean_mb, lean_gc = leanest(spec)
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


def make_plan(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, above: str | None = None,
              supply: Supply | None = None) -> Plan:
    """Choose class, shape and knobs. `above`: a class the job ran out of memory on (OOM escalation).
    `supply`: the classes the cluster offers (None: the whole catalog)."""
    classes, reasons = _candidates(spec, catalog, above)
    resources = spec.resources
    cap = resources.max_gpu_count
    if cap is not None and isinstance(resources.gpu_count, int) and resources.gpu_count > cap:
        raise PlanError(f"spec.resources.gpuCount: {resources.gpu_count} is above spec.resources.maxGpuCount {cap}")

    comparison, lacking = _compare_in_supply(spec, arch, catalog, classes, supply)
    if not comparison.ranked:
        raise _no_fit(spec, arch, catalog, classes, comparison, above)
    chosen = comparison.chosen
    shape, est = chosen.shape, chosen.estimate
    usable = catalog.usable_bytes(chosen.gpu)

    reasons.insert(0, _lean_reason(spec, arch, chosen))
    if lacking:
        reasons.append(lacking)
    else:
        reasons.extend(_skipped(comparison))
    if supply is not None and not lacking and chosen.gpu.name not in dict(supply.nodes):
        reasons.append(f"{chosen.gpu.name}: no node yet, but provisionable (its node pool scales up from zero)")
    reasons.extend(explain(comparison, catalog))
    reasons.extend(_strategy_reasons(comparison))
    reasons.extend(_knob_reasons(spec, arch, chosen, usable))
    if spec.evaluation is not None:
        reasons.append(chosen.evaluation.describe())

    knobs = Knobs(
        micro_batch_size=shape.micro_batch,
        gradient_accumulation_steps=max(1, effective_batch(spec) // shape.micro_batch),
        gradient_checkpointing=shape.gradient_checkpointing,
        max_seq_length=shape.seq_len,
        compute_dtype="bfloat16" if chosen.gpu.bf16 else "float16",
    )
    return Plan(
        model=arch.name, method=spec.method, gpu_class=chosen.gpu.name, gpu_count=chosen.count,
        gpu_memory_bytes=chosen.gpu.memory_bytes, usable_bytes_per_gpu=usable, hourly_cost=round(chosen.hourly, 2),
        vram_estimate_bytes=est.total, breakdown=est.parts, lora_params=est.lora_params, knobs=knobs,
        reasons=reasons, alternatives=_alternatives(comparison), strategy=chosen.strategy,
        model_params=arch.total_params, nodes=chosen.nodes, lean_bytes_per_gpu=chosen.lean.total,
        step_seconds=chosen.step_seconds, eval_seconds=chosen.evaluation.seconds,
        largest_weight_params=arch.hidden * max(arch.vocab, arch.intermediate),
        steps=comparison.steps, steps_known=comparison.steps_known,
    )


def _compare_in_supply(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, classes: list[GpuClass],
                       supply: Supply | None) -> tuple[Comparison, str]:
    """The classes compared on what the cluster offers (a pinned class too: a shape its nodes can run); when it
    offers nothing that holds the job, compared as if it offered every class, with the reason it will wait."""
    comparison = compare(spec, arch, catalog, classes, supply)
    if comparison.ranked or not comparison.refused:
        return comparison, ""
    refused = "; ".join(comparison.refused)
    lacking = (f"the cluster cannot run it on the pinned class ({refused}); planned as if it could, and waits "
               "for a node of it") if spec.resources.gpu_class != "auto" else \
        (f"no class the cluster has nodes of or can provision holds it ({refused}); planned on the cheapest "
         "class that does, and waits for a node of it")
    return compare(spec, arch, catalog, classes, None), lacking


def _lean_reason(spec: FineTuneJobSpec, arch: Architecture, chosen: Candidate) -> str:
    """The plan's first reason: what the job needs on one GPU at its leanest settings (and per GPU as chosen)."""
    lean_mb, lean_gc = leanest(spec)
    what = f"{arch.name} {spec.method.upper()} (LoRA r={spec.lora.r}, {spec.training.max_seq_length} tokens)"
    one_gpu = job_estimate(arch, training_shape(spec, lean_mb, lean_gc, 1), "single").total
    lean = f"{what} needs {gib(one_gpu)} on one GPU at the leanest settings (checkpointing " \
           f"{'on' if lean_gc else 'off'}, micro-batch {lean_mb})"
    if chosen.count > 1:
        lean += f"; {gib(chosen.lean.total)} per GPU as {chosen.label()}"
    if spec.resources.strategy != "auto" and chosen.count == 1:
        lean += f"; strategy {spec.resources.strategy} has one GPU to run on (maxGpuCount or gpuCount is 1)"
    return lean


ALTERNATIVES = 12  # at most, in the plan (and in `kubetune plan`'s table)


def _alternatives(comparison: Comparison) -> list[Alternative]:
    """What the chosen shape was compared with, cheapest per job first: the runner-ups the reasons name, the
    cheapest count of every other class and strategy (and the next count of the chosen one), the best shape of
    each class dearer per GPU-hour than the baseline, and cheaper shapes the cluster cannot run."""
    chosen, steps = comparison.chosen, comparison.steps
    rows: dict[int, tuple[Candidate, str]] = {id(c): (c, "") for c in runner_ups(comparison)}  # id: unhashable
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in comparison.ranked[1:]:
        groups.setdefault((c.gpu.name, c.strategy), []).append(c)
    for (name, strategy), found in groups.items():
        mine = (name, strategy) == (chosen.gpu.name, chosen.strategy)
        for c in [c for c in found if c.count > chosen.count][:1] if mine else found[:1]:
            rows.setdefault(id(c), (c, ""))
    if comparison.baseline is not None:
        dearer = f"not a candidate: dearer per GPU-hour than {comparison.baseline.name}"
        for c in {c.gpu.name: c for c in reversed(comparison.dearer)}.values():
            rows.setdefault(id(c), (c, dearer))
    for c in comparison.unavailable:
        if c.cost(steps) < chosen.cost(steps):
            rows.setdefault(id(c), (c, c.unavailable))
    ordered = sorted(rows.values(), key=lambda row: (row[0].cost(steps), row[0].step_seconds))
    return [
        Alternative(
            gpu_class=c.gpu.name, gpu_count=c.count, hourly_cost=round(c.hourly, 2),
            cost_ratio=round(c.hourly / chosen.hourly, 2), vram_estimate_bytes=c.lean.total, strategy=c.strategy,
            nodes=c.nodes, step_seconds=round(c.step_seconds, 3),
            job_cost_ratio=round(c.cost(steps) / chosen.cost(steps), 3),
            time_ratio=round(c.step_seconds / chosen.step_seconds, 3), note=note,
            kind="unavailable" if c.unavailable else "dearer" if note else "candidate",
        )
        for c, note in ordered[:ALTERNATIVES]
    ]


def _skipped(comparison: Comparison) -> list[str]:
    """Why the cluster could not take a shape that would otherwise have been chosen, or a class cheaper per hour
    than the chosen one (each reason once)."""
    chosen, steps = comparison.chosen, comparison.steps
    return list(dict.fromkeys(
        c.unavailable for c in comparison.unavailable
        if c.gpu.hourly_price < chosen.gpu.hourly_price or c.cost(steps) < chosen.cost(steps)
    ))


def _strategy_reasons(comparison: Comparison) -> list[str]:
    chosen = comparison.chosen
    spread = f" on {chosen.nodes} nodes of {chosen.per_node}" if chosen.nodes > 1 else ""
    if chosen.strategy == "pipeline":
        data_parallel = any(c.strategy in ("ddp", "fsdp") for c in comparison.ranked)
        return [f"layer split: the layers are divided over {chosen.count} GPUs of one node, one GPU working at a "
                "time (" + ("every DDP or FSDP shape costs more per job" if data_parallel else
                            "no DDP or FSDP shape within the limits holds it: each rank keeps a whole micro-batch's "
                            "activations") + ")"]
    if chosen.strategy == "ddp":
        return [f"strategy ddp: {chosen.count} ranks{spread}, each with a full copy; each optimizer step's "
                "micro-batches are divided between them"]
    if chosen.strategy == "fsdp":
        return [f"strategy fsdp: weights, gradients and optimizer states sharded over {chosen.count} ranks{spread} "
                f"({gib(chosen.estimate.parts.get('communication', 0))} per GPU for all-gathers and NCCL)"]
    return []


def _knob_reasons(spec: FineTuneJobSpec, arch: Architecture, chosen: Candidate, usable: int) -> list[str]:
    reasons = []
    shape, est = chosen.shape, chosen.estimate
    gc_spec = spec.training.gradient_checkpointing
    if isinstance(gc_spec, bool):
        reasons.append(f"gradient checkpointing {'on' if gc_spec else 'off'}: set by the spec")
    elif shape.gradient_checkpointing:
        without = job_estimate(arch, training_shape(spec, 1, False, chosen.count), chosen.strategy).total
        reasons.append(f"gradient checkpointing on: off would need {gib(without)} > {gib(usable)} usable")
    else:
        reasons.append("gradient checkpointing off: it fits without recomputing activations (~1/3 less compute)")
    batch = effective_batch(spec)
    if isinstance(spec.training.micro_batch_size, int):
        reasons.append(f"micro-batch {shape.micro_batch}: set by the spec")
    else:
        steps = batch // shape.micro_batch
        per_rank = f" ({-(-steps // chosen.count)} a step on each of {chosen.count} ranks)" \
            if chosen.strategy in ("ddp", "fsdp") else ""
        reasons.append(
            f"micro-batch {shape.micro_batch} x accumulation {steps}{per_rank} keeps the effective batch of "
            f"{batch}; estimate {gib(est.total)} of {gib(usable)} usable"
        )
    return reasons


def _cheapest_anywhere(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog) -> str | None:
    """The cheapest shape in the whole catalog that would hold the job, ignoring the spec's limits."""
    free = spec.model_copy(update={"resources": ResourcesSpec()})
    found = compare(free, arch, catalog, catalog.by_price(), None)
    return found.chosen.label() if found.ranked else None


def _no_fit(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, classes: list[GpuClass],
            comparison: Comparison, above: str | None) -> PlanError:
    lean_mb, lean_gc = leanest(spec)
    lean = job_estimate(arch, training_shape(spec, lean_mb, lean_gc, 1), "single").total
    need = f"the job needs {gib(lean)} on one GPU at the leanest settings"
    tried = [m for m in comparison.misses if m.count > 1]
    if tried:
        fewest = min(tried, key=lambda m: m.need)
        how = f"a layer split over {fewest.count} GPUs" if fewest.strategy == "pipeline" else \
            f"{fewest.count} {fewest.strategy.upper()} ranks"
        need += f" ({gib(fewest.need)} per GPU at best, as {how})"
    would_text = _cheapest_anywhere(spec, arch, catalog)
    hint = f"; the cheapest that would hold it is {would_text}" if would_text else (
        "; no class in the catalog holds it, even as 64 FSDP ranks: lower training.maxSeqLength or lora.r, "
        "or use method: qlora"
    )
    counts = sorted({m.count for m in comparison.misses})
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
    if spec.resources.max_gpu_count is not None:
        return PlanError(f"spec.resources.maxGpuCount: no class holds this job on up to "
                         f"{spec.resources.max_gpu_count} GPU(s): {need}{hint}")
    return PlanError(f"spec: {need}{hint}")
