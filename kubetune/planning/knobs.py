"""The knobs a job runs with (micro-batch, gradient checkpointing) and the search for the fastest that fit. Pure.

One plan compares the same knobs many times: every GPU class of a shape walks the same (checkpointing,
micro-batch) sequence and stops at the first that fits its memory, and every DDP/FSDP rank count starts from the
same one-GPU estimate. `KnobSearch` makes each of those estimates once per plan (it lives as long as the
`shapes.compare` call that made it) and gives the same answers as estimating afresh each time.
"""

from __future__ import annotations

from kubetune.planning.models import Architecture
from kubetune.planning.ranks import per_rank
from kubetune.planning.vram import Estimate, TrainingShape, estimate
from kubetune.spec import FineTuneJobSpec
from kubetune.wire import Strategy

Knob = tuple[int, bool]  # (micro-batch, gradient checkpointing)


def effective_batch(spec: FineTuneJobSpec) -> int:
    mb = spec.training.micro_batch_size
    return (mb if isinstance(mb, int) else 1) * spec.training.gradient_accumulation_steps


def leanest(spec: FineTuneJobSpec) -> Knob:
    """(micro-batch, checkpointing) at the least memory the spec allows."""
    mb = spec.training.micro_batch_size
    gc = spec.training.gradient_checkpointing
    return (mb if isinstance(mb, int) else 1), (gc if isinstance(gc, bool) else True)


def training_shape(spec: FineTuneJobSpec, micro_batch: int, checkpointing: bool, count: int) -> TrainingShape:
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
        generation_tokens=generation_tokens(spec),
    )


def generation_tokens(spec: FineTuneJobSpec) -> int:
    """The longest sequence spec.evaluation's generation holds: a prompt charged at up to one training row
    (maxSeqLength tokens) plus maxNewTokens; 0 when there are no prompts to answer."""
    evaluation = spec.evaluation
    if evaluation is None or evaluation.prompts == []:
        return 0
    return spec.training.max_seq_length + evaluation.max_new_tokens


def knob_order(spec: FineTuneJobSpec, count: int, strategy: Strategy) -> list[Knob]:
    """The knobs to try, fastest first: checkpointing off before on (recomputing every layer's forward costs
    about a third more compute), then the largest micro-batch that divides the effective batch. DDP and FSDP
    deal a step's micro-batches to the ranks, so there a micro-batch larger than the effective batch / ranks
    would leave ranks idle, and is not tried. A knob the spec pins is the only one tried."""
    mb_spec = spec.training.micro_batch_size
    gc_spec = spec.training.gradient_checkpointing
    batch = effective_batch(spec)
    micro_batches = [mb_spec] if isinstance(mb_spec, int) else [d for d in range(batch, 0, -1) if batch % d == 0]
    if strategy in ("ddp", "fsdp") and count > 1 and not isinstance(mb_spec, int):
        micro_batches = [d for d in micro_batches if batch // d >= count] or [1]
    checkpointing = [gc_spec] if isinstance(gc_spec, bool) else [False, True]
    return [(mb, gc) for gc in checkpointing for mb in micro_batches]


class KnobSearch:
    """The memory estimates of one spec on one architecture, each made once: per (knobs, GPU count, strategy),
    and per knobs on one GPU (what DDP and FSDP ranks start from, and what ranks.step_time moves). Not shared
    between plans: make one per search."""

    def __init__(self, spec: FineTuneJobSpec, arch: Architecture) -> None:
        self.spec, self.arch = spec, arch
        self._shapes: dict[tuple[int, bool, int], TrainingShape] = {}
        self._estimates: dict[tuple[int, bool, int, str], Estimate] = {}
        # per (count, strategy): (total, shape, estimate) of the knobs walked so far, and the knobs in order
        self._walks: dict[tuple[int, str], tuple[list[tuple[int, TrainingShape, Estimate]], list[Knob]]] = {}

    def shape(self, micro_batch: int, checkpointing: bool, count: int) -> TrainingShape:
        key = (micro_batch, checkpointing, count)
        if key not in self._shapes:
            self._shapes[key] = training_shape(self.spec, micro_batch, checkpointing, count)
        return self._shapes[key]

    def one_gpu(self, micro_batch: int, checkpointing: bool) -> Estimate:
        """vram.estimate of the knobs on one GPU."""
        return self.job(micro_batch, checkpointing, 1, "single")

    def job(self, micro_batch: int, checkpointing: bool, count: int, strategy: Strategy) -> Estimate:
        """Memory per GPU of `count` GPUs under `strategy` (ranks.job_estimate of the knobs' shape)."""
        ranks = strategy if strategy in ("ddp", "fsdp") and count > 1 else None
        key = (micro_batch, checkpointing, count, ranks or "layers")
        if key not in self._estimates:
            if ranks == "ddp" or ranks == "fsdp":
                found = per_rank(self.arch, self.shape(micro_batch, checkpointing, 1), ranks, count,
                                 self.one_gpu(micro_batch, checkpointing))
            else:
                found = estimate(self.arch, self.shape(micro_batch, checkpointing, count))
            self._estimates[key] = found
        return self._estimates[key]

    def fastest(self, usable_bytes: int, count: int = 1,
                strategy: Strategy = "single") -> tuple[TrainingShape, Estimate] | None:
        """The first knobs of `knob_order` whose estimate fits `usable_bytes` per GPU, or None. The knobs walked
        for one class are kept for the next: a class with less memory walks on from where the last one stopped."""
        if (count, strategy) not in self._walks:
            self._walks[count, strategy] = ([], knob_order(self.spec, count, strategy))
        walked, order = self._walks[count, strategy]
        for index, (mb, gc) in enumerate(order):
            if index == len(walked):
                found = self.job(mb, gc, count, strategy)
                walked.append((found.total, self.shape(mb, gc, count), found))
            total, shape, found = walked[index]
            if total <= usable_bytes:
                return shape, found
        return None


def fastest_knobs(spec: FineTuneJobSpec, arch: Architecture, usable_bytes: int, count: int = 1,
                  strategy: Strategy = "single") -> tuple[TrainingShape, Estimate] | None:
    """The fastest (checkpointing, micro-batch) that fits in usable_bytes per GPU, or None (see `knob_order`)."""
    return KnobSearch(spec, arch).fastest(usable_bytes, count, strategy)
