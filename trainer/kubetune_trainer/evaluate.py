"""The judgment at the end of training (spec.evaluation): is the adapter better than the base model?

- Held-out loss and perplexity of the adapter and of the base model on the SAME rows (the eval split:
  dataset.evalSource, or the evalFraction held out of dataset.source). The base is the same loaded model
  with the adapter switched off (peft's `disable_adapter()`): no second copy of the weights.
- Greedy answers of both to each prompt (at most maxAnswers prompts, maxNewTokens each; KV cache on,
  through `model.answer`).
- Written to `<output>/eval.json` (listed with its sha256 in adapter/manifest.json); a short summary
  (kubetune.contracts.EvalSummary) travels in the termination message to the operator's status.result.

Several ranks: the losses run on every rank, each its share of the batches, summed across ranks (as the
eval loss always is). Answers: under DDP every rank holds the whole model, so rank 0 generates alone;
under FSDP every forward all-gathers weights from all ranks, so every rank generates the same greedy
answers in lockstep (same weights, same prompt, greedy: the same tokens and so the same number of
forwards) and rank 0 keeps them. Only rank 0 writes eval.json.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.contracts import SUMMARY_ANSWERS, EvalAnswer, EvalSummary, TrainerPhase, clip
from kubetune.spec import EVAL_PROMPT_FIELD, EVAL_PROMPT_MAX_CHARS, FineTuneJobSpec
from kubetune_trainer.data import DataError, read_rows
from kubetune_trainer.progress import Log
from kubetune_trainer.storage import fetch_input, sha256_file

if TYPE_CHECKING:
    from kubetune_trainer.loop import Recipe

EVAL_FILE = "eval.json"
PERPLEXITY_CAP = 700.0  # exp() of a larger loss overflows a float; such a model is no better than chance anyway


def perplexity(loss: float) -> float:
    return math.exp(min(loss, PERPLEXITY_CAP))


def prompts_from_rows(rows: list[tuple[str, dict[str, Any]]], label: str, most: int) -> list[str]:
    """The `prompt` field of each row, the first `most` of them; a row without one names its line."""
    prompts = []
    for where, row in rows[:most]:
        value = row.get(EVAL_PROMPT_FIELD)
        if not isinstance(value, str) or not value.strip() or len(value) > EVAL_PROMPT_MAX_CHARS:
            raise DataError(f"{label} {where}: needs a '{EVAL_PROMPT_FIELD}' field holding a non-empty string of at "
                            f"most {EVAL_PROMPT_MAX_CHARS} characters, got {str(value)[:80]!r}")
        prompts.append(value)
    return prompts


def read_prompts(spec: FineTuneJobSpec, cache: Path, log: Log) -> list[str]:
    """spec.evaluation.prompts as a list: the list itself, or the file's first maxAnswers prompts."""
    evaluation = spec.evaluation
    if evaluation is None:
        return []
    if isinstance(evaluation.prompts, list):
        return list(evaluation.prompts)
    label = f"spec.evaluation.prompts {Path(evaluation.prompts).name}"
    rows = read_rows(fetch_input(evaluation.prompts, cache, spec.output.endpoint_url), label)
    prompts = prompts_from_rows(rows, label, evaluation.max_answers)
    if len(rows) > evaluation.max_answers:
        log.event("evaluation", f"{label}: {len(rows)} prompts, answering the first {evaluation.max_answers} "
                  "(spec.evaluation.maxAnswers)")
    return prompts


@contextmanager
def base_model(model: Any) -> Iterator[None]:
    """The base model: the same weights with every LoRA layer switched off (peft's disable_adapter)."""
    with model.disable_adapter():
        yield


def held_out(recipe: Recipe, compare_base: bool) -> dict[str, Any] | None:
    """{rows, tokens, adapter: {loss, perplexity}, base: …} on the eval split, or None without one. The
    adapter's loss is the final evaluate()'s when it ran at this step (no second pass)."""
    if recipe.eval_data is None:
        return None
    if recipe.held_out is not None and recipe.held_out[0] == recipe.step:
        _, loss, tokens = recipe.held_out
    else:
        loss, tokens = recipe.held_out_loss()
    result: dict[str, Any] = {"rows": len(recipe.eval_data.rows), "tokens": tokens,
                              "adapter": {"loss": loss, "perplexity": perplexity(loss)}, "base": None}
    if compare_base:
        with base_model(recipe.model):
            base, base_tokens = recipe.held_out_loss()
        assert base_tokens == tokens, "base and adapter scored on different rows"
        result["base"] = {"loss": base, "perplexity": perplexity(base)}
    return result


def answers(recipe: Recipe, prompts: list[str], max_new_tokens: int, compare_base: bool) -> list[dict[str, Any]]:
    """Greedy answers of the adapter (and the base) to each prompt; [] on ranks that do not keep them."""
    generate = recipe.ranks.main or recipe.sharded  # FSDP: every rank takes part in every forward
    if not generate:
        return []
    from kubetune_trainer.model import answer

    def say(prompt: str) -> str:
        return answer(recipe.model, recipe.loaded.tokenizer, prompt, recipe.input_device,
                      max_new_tokens=max_new_tokens, dtype=recipe.dtype)

    out: list[dict[str, Any]] = []
    for prompt in prompts:
        if recipe.stop_requested and not recipe.sharded:  # SIGTERM: the adapter's upload comes first; FSDP ranks
            recipe.log.event("evaluation", f"SIGTERM: stopped answering after {len(out)} of {len(prompts)} "
                             "prompts, to upload the adapter within the grace period")  # keep their lockstep
            break
        entry: dict[str, Any] = {"prompt": prompt, "adapter": say(prompt), "base": None}
        if compare_base:
            with base_model(recipe.model):
                entry["base"] = say(prompt)
        out.append(entry)
    return out if recipe.ranks.main else []


def summary(document: dict[str, Any], uri: str | None) -> EvalSummary:
    """The short form for the termination message and status.result: losses, and the first answers clipped."""
    held = document.get("heldOut") or {}
    adapter, base = held.get("adapter") or {}, held.get("base") or {}
    return EvalSummary(
        rows=held.get("rows", 0), tokens=held.get("tokens", 0), base_loss=base.get("loss"),
        adapter_loss=adapter.get("loss"), base_perplexity=base.get("perplexity"),
        adapter_perplexity=adapter.get("perplexity"), prompts=len(document["answers"]), uri=uri,
        answers=[EvalAnswer(prompt=clip(a["prompt"]) or "", base=clip(a["base"]), adapter=clip(a["adapter"]) or "")
                 for a in document["answers"][:SUMMARY_ANSWERS]])


def run(recipe: Recipe, now: Callable[[], float] = time.perf_counter) -> EvalSummary | None:
    """Evaluate, write eval.json (rank 0) and return its summary (rank 0; None elsewhere). Every rank calls."""
    evaluation = recipe.spec.evaluation
    if evaluation is None:
        return None
    recipe.telemetry.phase(TrainerPhase.EVALUATING, "scoring the held-out split and answering the evaluation prompts")
    started = now()
    held = held_out(recipe, evaluation.compare_base)
    said = answers(recipe, recipe.prompts, evaluation.max_new_tokens, evaluation.compare_base)
    if not recipe.ranks.main:
        return None
    document = {
        "kind": "kubetune.io/evaluation", "version": 1,
        "job": recipe.config.job.model_dump(),
        "baseModel": {**recipe.spec.model.model_dump(mode="json", by_alias=True), "commit": recipe.model_commit},
        "step": recipe.step,
        "heldOut": held,
        "note": None if held else "no held-out split: set spec.dataset.evalFraction or spec.dataset.evalSource",
        "generation": {"greedy": True, "maxNewTokens": evaluation.max_new_tokens, "compareBase":
                       evaluation.compare_base, "prompts": len(recipe.prompts)},  # answers: fewer after a SIGTERM
        "answers": said,
        "seconds": round(now() - started, 2),
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result = summary(document, write(recipe, document))
    recipe.log.event("evaluation", result.loss_line() + f"; {len(said)} prompts answered -> {result.uri}",
                     baseLoss=result.base_loss, adapterLoss=result.adapter_loss)
    return result


def write(recipe: Recipe, document: dict[str, Any]) -> str:
    """<output>/eval.json; its sha256 and size go to recipe.evaluation_files for the manifest."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / EVAL_FILE
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        recipe.telemetry.record_upload(recipe.storage.put_file(path, EVAL_FILE))
        recipe.evaluation_files = {EVAL_FILE: {"sha256": sha256_file(path), "bytes": path.stat().st_size}}
    return recipe.storage.join(EVAL_FILE)
