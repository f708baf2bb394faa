"""What spec.evaluation adds to a job's time (pure): the planner puts it in the estimated hours and cost.

The trainer's evaluation (kubetune_trainer.evaluate) runs once, after the last step:
- forward passes over the held-out rows: the adapter's (the final eval loss) and, with compareBase, the
  base model's; the ranks share the rows as in training. Each token costs 2 FLOPs per active weight at the
  class's training MFU (kubetune.planning.ranks).
- greedy generation, batch 1, KV cache on: for each prompt (the list's length, or maxAnswers for a file), a
  prefill of the prompt (charged at maxSeqLength tokens, as the memory estimate does) and maxNewTokens decode
  steps, for the adapter and, with compareBase, the base. A decode step at batch 1 reads every weight once:
  the 4-bit/16-bit weight bytes over the class's memory bandwidth (data sheets), but no faster than a fixed
  per-layer cost (kernel launches of an eager decode step), whichever is longer.

The held-out rows are not known before the data is read: with evalFraction f they are f / (1 - f) of an
epoch's tokens (the steps x tokens per step over the epochs); a separate evalSource is charged as
EVAL_SOURCE_EPOCH_FRACTION of an epoch. Rough, like the step time: for the estimate, not for a deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.planning.models import Architecture
from kubetune.planning.ranks import BF16_FLOPS, MFU, MFU_BY_CLASS, active_params
from kubetune.spec import FineTuneJobSpec

# Memory bandwidth per GPU class, bytes/s (NVIDIA data sheets: L4 300 GB/s, A10G 600 GB/s, A100 40GB HBM2
# 1,555 GB/s, A100 80GB HBM2e 2,039 GB/s, H100 SXM 3.35 TB/s, H200 4.8 TB/s).
MEMORY_BYTES_PER_S = {"L4": 300e9, "A10G": 600e9, "A100-40GB": 1555e9, "A100-80GB": 2039e9, "H100-80GB": 3350e9,
                      "H200-141GB": 4800e9}
DECODE_SECONDS_PER_LAYER = 0.0004  # an eager decode step's kernel launches per decoder layer, at least
EVAL_SOURCE_EPOCH_FRACTION = 0.1  # a separate evalSource's size, as a fraction of an epoch (not known in advance)


@dataclass(frozen=True)
class EvalCost:
    seconds: float
    held_out_tokens: int
    forward_passes: int  # over the held-out rows: 1 (adapter) or 2 (and the base)
    generated_tokens: int

    def describe(self) -> str:
        return (f"evaluation (spec.evaluation): ~{self.seconds:.0f}s, in the estimated hours: {self.forward_passes} "
                f"forward pass{'es' if self.forward_passes > 1 else ''} over ~{self.held_out_tokens:,} held-out "
                f"tokens and {self.generated_tokens:,} generated tokens")


NO_EVALUATION = EvalCost(0.0, 0, 0, 0)


def held_out_tokens(spec: FineTuneJobSpec, steps: int, tokens_per_step: int) -> int:
    # the steps cover `epochs` passes; with maxSteps set they may stop sooner, so at least one pass is assumed
    passes = spec.training.epochs if spec.training.max_steps is None else max(spec.training.epochs, 1.0)
    epoch = steps * tokens_per_step / passes
    if spec.dataset.eval_source:
        return int(epoch * EVAL_SOURCE_EPOCH_FRACTION)
    fraction = spec.dataset.eval_fraction
    return int(epoch * fraction / (1 - fraction)) if fraction else 0


def answered(spec: FineTuneJobSpec) -> int:
    evaluation = spec.evaluation
    if evaluation is None:
        return 0
    return len(evaluation.prompts) if isinstance(evaluation.prompts, list) else evaluation.max_answers


def eval_cost(spec: FineTuneJobSpec, arch: Architecture, gpu_class: str, gpus: int, steps: int,
              tokens_per_step: int, weight_bytes: int) -> EvalCost:
    """Seconds spec.evaluation adds on `gpus` GPUs of `gpu_class`; `weight_bytes`: the base weights one GPU
    holds whole (vram.estimate's base_weights on one GPU), what a decode step reads."""
    evaluation = spec.evaluation
    if evaluation is None:
        return NO_EVALUATION
    models = 2 if evaluation.compare_base else 1
    flops = BF16_FLOPS.get(gpu_class, BF16_FLOPS["A10G"]) * MFU_BY_CLASS.get(gpu_class, MFU)
    per_token = 2 * active_params(arch) / flops
    held = held_out_tokens(spec, steps, tokens_per_step)
    scoring = models * held * per_token / max(1, gpus)
    prompts = answered(spec) * models
    decode = max(weight_bytes / MEMORY_BYTES_PER_S.get(gpu_class, MEMORY_BYTES_PER_S["A10G"]),
                 arch.layers * DECODE_SECONDS_PER_LAYER)
    generated = prompts * evaluation.max_new_tokens
    generation = prompts * spec.training.max_seq_length * per_token + generated * decode
    return EvalCost(scoring + generation, held, models, generated)
