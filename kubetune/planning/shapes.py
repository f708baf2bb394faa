"""The shape a job runs in, and on which GPU class: one GPU, the layer split over one node's GPUs, or DDP/FSDP
ranks over one or several nodes. Pure (no I/O): spec + architecture + classes (+ a cluster's Supply) -> the
candidates, compared.

1. Shapes: the (strategy, GPU count) pairs the spec allows. `strategy: auto` compares one GPU, FSDP and DDP on
   2, 4, ... 64 GPUs and the layer split on 2, 4, 8 GPUs of one node; `ddp`/`fsdp` only that strategy on 2 or
   more GPUs; `gpuCount` pins the count, `maxGpuCount` caps it.
2. Classes: every class that holds the shape at the leanest settings (checkpointing on and micro-batch 1 unless
   the spec pins them) and that the cluster offers (nodes with enough GPUs each, or a provisionable class), but
   none dearer per GPU-hour than the baseline: the cheapest class that holds the job on one GPU. Scaling out
   buys cheaper GPU-hours, never dearer ones: the time estimate's speed ratios between classes are data
   sheets and one published measurement, not measurements of this trainer, so they may not buy a dearer
   class. With no baseline (no single GPU holds the job) every class competes.
3. On each class the fastest knobs that still fit: checkpointing off if it fits, then the largest micro-batch
   that divides the effective batch and, on several ranks, still gives every rank a micro-batch.
4. Between candidates: the estimated cost of the job, price per hour x estimated hours (the step count, or
   1,000 steps when the spec does not say, x `ranks.step_time`); equal costs go to the faster, then to fewer
   GPUs. So a job that fits one GPU stays on it (more GPUs of a class cost more per job: they add
   communication), and a job that fits no small GPU goes to FSDP ranks of a small class when that costs less
   per job than one big GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.planning.evaluation import NO_EVALUATION, EvalCost, eval_cost
from kubetune.planning.gpus import GpuCatalog, GpuClass
from kubetune.planning.knobs import KnobSearch, effective_batch, leanest
from kubetune.planning.models import Architecture
from kubetune.planning.placement import Supply, node_split
from kubetune.planning.ranks import step_time
from kubetune.planning.vram import Estimate, GiB, TrainingShape
from kubetune.spec import FineTuneJobSpec
from kubetune.wire import Strategy

RANK_COUNTS = (2, 4, 8, 16, 32, 64)  # DDP/FSDP ranks, over as many nodes as they need
LAYER_SPLIT_COUNTS = (2, 4, 8)  # the layer split stays on one node
STEPS_WHEN_UNKNOWN = 1000  # the cost of a job whose step count depends on its data is given per 1,000 steps
TIE = 1e-6  # relative: costs closer than this are equal, and the faster shape wins


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def shape_label(count: int, gpu_class: str, strategy: str, nodes: int = 1) -> str:
    """'1x A100-80GB', '4x L4 FSDP', '16x L4 FSDP on 2 nodes', '2x A100-40GB layer split'."""
    text = f"{count}x {gpu_class}"
    if strategy == "pipeline":
        text += " layer split"
    elif strategy != "single":
        text += f" {strategy.upper()}"
    return text + (f" on {nodes} nodes" if nodes > 1 else "")


@dataclass(frozen=True)
class Candidate:
    """One way to run the job: `count` GPUs of `gpu` over `nodes` nodes with a strategy, at its fastest knobs."""

    gpu: GpuClass
    strategy: Strategy
    count: int
    nodes: int
    lean: Estimate  # per GPU at the leanest settings: what decides whether the class holds it
    shape: TrainingShape  # the fastest knobs that fit
    estimate: Estimate  # per GPU at those knobs
    step_seconds: float  # estimated (ranks.step_time)
    unavailable: str = ""  # why the cluster cannot run it now or later (Supply.why_not); "" when it can
    evaluation: EvalCost = NO_EVALUATION  # what spec.evaluation adds once, after the last step

    @property
    def per_node(self) -> int:
        return self.count // self.nodes

    @property
    def hourly(self) -> float:
        return self.gpu.hourly_price * self.count

    def hours(self, steps: int) -> float:
        return (self.step_seconds * steps + self.evaluation.seconds) / 3600

    def cost(self, steps: int) -> float:
        """Price of the whole run: the GPUs' price per hour x the hours it takes."""
        return self.hourly * self.hours(steps)

    def label(self) -> str:
        return shape_label(self.count, self.gpu.name, self.strategy, self.nodes)


@dataclass(frozen=True)
class Miss:
    """A shape no class within the limits holds: what it needs per GPU at the leanest settings."""

    strategy: Strategy
    count: int
    need: int


@dataclass(frozen=True)
class Comparison:
    ranked: tuple[Candidate, ...]  # what the cluster can run, cheapest per job first: ranked[0] is chosen
    dearer: tuple[Candidate, ...]  # shapes on classes dearer per GPU-hour than `baseline`: not candidates
    unavailable: tuple[Candidate, ...]  # shapes whose cheapest class the cluster cannot run (cheaper ones first)
    misses: tuple[Miss, ...]  # shapes no class holds
    steps: int
    steps_known: bool
    baseline: GpuClass | None  # the cheapest class that holds the job on one GPU (and the cluster offers)
    refused: tuple[str, ...] = ()  # why the cluster cannot run a class that holds some shape, one per class

    @property
    def chosen(self) -> Candidate:
        return self.ranked[0]

    def per(self) -> str:
        return f"for {self.steps} steps" if self.steps_known else f"per {self.steps:,} steps"


def shapes(spec: FineTuneJobSpec) -> list[tuple[Strategy, int]]:
    """The (strategy, GPU count) pairs the spec allows, fewest GPUs first."""
    resources = spec.resources
    cap = resources.max_gpu_count
    if isinstance(resources.gpu_count, int):
        counts = [resources.gpu_count]  # above the cap: make_plan refuses it, naming both fields
    else:
        counts = [1, *RANK_COUNTS] if resources.strategy == "auto" else list(RANK_COUNTS)
        if cap is not None:
            counts = [c for c in counts if c <= cap] or [1]
    found: list[tuple[Strategy, int]] = []
    for count in counts:
        if count == 1:
            found.append(("single", 1))
        elif resources.strategy == "auto":
            found += [("fsdp", count), ("ddp", count)]
            if count in LAYER_SPLIT_COUNTS:
                found.append(("pipeline", count))
        else:
            found.append((resources.strategy, count))
    return found


def _layout(gpu: GpuClass, strategy: Strategy, count: int) -> tuple[int, int] | None:
    """(nodes, GPUs per node) for the shape on the class, or None when the class cannot form it."""
    split = node_split(count, gpu.max_per_node)
    if split is None or (strategy in ("single", "pipeline") and split[0] > 1):
        return None  # one GPU and the layer split stay on one node; DDP/FSDP ranks span nodes
    return split


def _refusal(supply: Supply | None, gpu: GpuClass, layout: tuple[int, int] | None) -> str:
    """Why the cluster cannot run the shape (`_layout`) on the class ("" when it can, or when no cluster is
    known)."""
    if supply is None or layout is None:
        return ""
    return supply.why_not(gpu, layout[1], layout[0]) or ""


def compare(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, classes: list[GpuClass],
            supply: Supply | None) -> Comparison:
    """Every shape the spec allows on every class that holds it, no dearer per GPU-hour than the cheapest one GPU
    that holds the job, compared by estimated cost per job. `classes`: the candidates by price (the spec's limits
    applied); `supply`: what the cluster offers (None: all). `ranked` is empty when no shape fits anything the
    cluster offers."""
    lean_mb, lean_gc = leanest(spec)
    tokens = effective_batch(spec) * spec.training.max_seq_length
    steps = spec.training.max_steps or STEPS_WHEN_UNKNOWN
    search = KnobSearch(spec, arch)  # each estimate once: 6 classes, 5 sizes and 2 strategies share them
    usable = [catalog.usable_bytes(g) for g in classes]

    def build(at: int, strategy: Strategy, count: int, nodes: int, lean: Estimate, why: str = "") -> Candidate:
        gpu = classes[at]
        best = search.fastest(usable[at], count, strategy)
        assert best is not None  # the leanest knobs fit, so the search finds at least those
        shape, est = best
        one_gpu = search.one_gpu(shape.micro_batch, shape.gradient_checkpointing)  # what step_time moves
        seconds = step_time(arch, shape, strategy, count, nodes, tokens, gpu.name, one_gpu)
        judged = eval_cost(spec, arch, gpu.name, count, steps, tokens, one_gpu.parts["base_weights"])
        return Candidate(gpu, strategy, count, nodes, lean, shape, est, seconds, why, judged)

    one = search.job(lean_mb, lean_gc, 1, "single")
    baseline = next((g for g, room in zip(classes, usable, strict=True) if one.total <= room
                     and (layout := _layout(g, "single", 1)) and not _refusal(supply, g, layout)), None)
    runnable: list[Candidate] = []
    unavailable: list[Candidate] = []
    dearer: list[Candidate] = []
    misses: list[Miss] = []
    refused: dict[str, str] = {}  # class -> why the cluster cannot run it (for the first shape it held)
    for strategy, count in shapes(spec):
        lean = search.job(lean_mb, lean_gc, count, strategy)
        # (index in classes, layout, why the cluster cannot run it) of each class that holds the shape
        holding = [(at, layout, _refusal(supply, g, layout)) for at, g in enumerate(classes)
                   if lean.total <= usable[at] and (layout := _layout(g, strategy, count)) is not None]
        if not holding:
            misses.append(Miss(strategy, count, lean.total))
            continue
        for at, _, refusal in holding:
            if refusal:
                refused.setdefault(classes[at].name, refusal)
        at, (nodes, _), refusal = holding[0]
        if refusal and (baseline is None or classes[at].hourly_price <= baseline.hourly_price):
            unavailable.append(build(at, strategy, count, nodes, lean, refusal))  # say what it gave up
        for at, (nodes, _), refusal in holding:
            if refusal:
                continue
            if baseline is not None and classes[at].hourly_price > baseline.hourly_price:
                dearer.append(build(at, strategy, count, nodes, lean))
            else:
                runnable.append(build(at, strategy, count, nodes, lean))
    if not runnable:  # nothing under the baseline's price runs the strategy asked for (DDP's copy is larger)
        runnable, dearer = dearer, []
    return Comparison(tuple(rank(runnable, steps)), tuple(sorted(dearer, key=lambda c: c.cost(steps))),
                      tuple(sorted(unavailable, key=lambda c: c.cost(steps))), tuple(misses), steps,
                      spec.training.max_steps is not None, baseline, tuple(refused.values()))


def rank(found: list[Candidate], steps: int) -> list[Candidate]:
    """Cheapest per job first; costs within TIE of the cheapest go to the faster shape, then fewer GPUs."""
    if not found:
        return []
    order = sorted(found, key=lambda c: (c.cost(steps), c.step_seconds, c.count))
    floor = order[0].cost(steps)
    tied = [c for c in order if c.cost(steps) <= floor * (1 + TIE)]
    best = min(tied, key=lambda c: (c.step_seconds, c.count))
    return [best, *(c for c in order if c is not best)]


def _versus(other: Candidate, chosen: Candidate, steps: int) -> str:
    cost, time = other.cost(steps) / chosen.cost(steps), other.step_seconds / chosen.step_seconds
    return (f"{other.label()}: {other.hourly:.2f}/h x {other.hours(steps):.1f} h = {other.cost(steps):.2f} "
            f"({cost:.2f}x the cost, {time:.2f}x the time)")


def _how_to_pin(c: Candidate) -> str:
    """The resources that ask for exactly this shape, when the spec can say it."""
    if c.strategy == "single":
        return f" (to ask for it: gpuClass {c.gpu.name})"
    if c.strategy in ("ddp", "fsdp") and c.count <= 8:
        return f" (to ask for it: gpuClass {c.gpu.name}, gpuCount {c.count}, strategy {c.strategy})"
    return ""


def runner_ups(comparison: Comparison) -> list[Candidate]:
    """The candidates the reasons compare the chosen one with: one GPU (the bigger class, when the chosen shape
    has several smaller ones), the next cheapest, and the fastest."""
    chosen, rest = comparison.chosen, comparison.ranked[1:]
    shown: list[Candidate] = []
    one = next((c for c in rest if c.strategy == "single"), None)
    if one is not None:
        shown.append(one)
    runner_up = next((c for c in rest if c not in shown), None)
    if runner_up is not None:
        shown.append(runner_up)
    faster = min(rest, key=lambda c: c.step_seconds, default=None)
    if faster is not None and faster.step_seconds < chosen.step_seconds and faster not in shown:
        shown.append(faster)
    return shown


def explain(comparison: Comparison, catalog: GpuCatalog) -> list[str]:
    """Why the chosen shape: its cost and time, what it beat and by how much, and why fewer GPUs would not do."""
    chosen, steps = comparison.chosen, comparison.steps
    usable, cost = catalog.usable_bytes(chosen.gpu), chosen.cost(steps)
    reasons = [
        f"{chosen.label()}: the cheapest shape per job that holds it ({gib(usable)} usable of "
        f"{chosen.gpu.memory_gib:.1f} GiB per GPU; {chosen.hourly:.2f}/h x {chosen.hours(steps):.1f} h = "
        f"{cost:.2f} {comparison.per()}, estimated)"
    ]
    for other in runner_ups(comparison):
        line = "vs " + _versus(other, chosen, steps)
        if other.step_seconds < chosen.step_seconds:
            line += "; faster but dearer" + _how_to_pin(other)
        reasons.append(line)
    cheaper = [c for c in comparison.dearer if c.cost(steps) < cost]
    if cheaper and comparison.baseline is not None:
        reasons.append(
            f"not considered: classes dearer per GPU-hour than {comparison.baseline.name} (the cheapest single GPU "
            f"that holds it); the best of them by the estimate, {_versus(cheaper[0], chosen, steps)}, rests on "
            f"data-sheet speeds, not on measurements of this trainer{_how_to_pin(cheaper[0])}")
    if chosen.count > 1:
        fewer = [m for m in comparison.misses if m.count < chosen.count and m.strategy in ("single", chosen.strategy)]
        fewer += [Miss(c.strategy, c.count, c.lean.total) for c in (*comparison.ranked, *comparison.unavailable)
                  if c.count < chosen.count and c.strategy in ("single", chosen.strategy)
                  and c.lean.total > usable]
        needs = sorted({(m.count, m.need) for m in fewer}, reverse=True)[:2]
        if needs:
            reasons.append(f"fewer {chosen.gpu.name}s do not hold it: " + "; ".join(
                f"{count} would need {gib(need)} per GPU" for count, need in needs) + f" ({gib(usable)} usable)")
    return reasons
