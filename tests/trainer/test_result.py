"""The trainer's result and its termination summary: one typed path both ways (runner writes, launcher reads)."""

from __future__ import annotations

from dataclasses import fields

from kubetune_trainer.loop import Result

from kubetune.contracts import ExitCode, Outcome, ServingFinding, TerminationSummary


def test_every_summary_field_comes_from_the_result() -> None:
    """A field added to the summary and not to Result would be silently left out of every summary."""
    names = {f.name for f in fields(Result)}
    assert set(TerminationSummary.model_fields) - names == {"exit_code"}


def test_a_result_survives_the_summary_round_trip() -> None:
    result = Result(outcome=Outcome.OUT_OF_MEMORY, steps=7, total_steps=20, final_loss=1.25, eval_loss=1.5,
                    peak_memory_bytes=3 * 2**30, adapter_uri=None, error="out of GPU memory at step 7",
                    model_commit="a" * 40, resumed_from_step=5, first_loss=2.0, tokens=999,
                    serving=[ServingFinding(rule="RankAboveMax", severity="Warning", message="r 512 > 256")])
    summary = TerminationSummary.from_result(result, ExitCode.OOM)
    assert summary.exit_code == ExitCode.OOM and summary.outcome is Outcome.OUT_OF_MEMORY
    told = Result.from_summary(TerminationSummary.parse(summary.message()) or TerminationSummary())
    shared = [f.name for f in fields(Result) if f.name in TerminationSummary.model_fields]
    assert {n: getattr(told, n) for n in shared} == {n: getattr(result, n) for n in shared}
    assert told.outcome is Outcome.OUT_OF_MEMORY  # the enum, not its string
    assert told.serving is not None and isinstance(told.serving[0], ServingFinding)  # the model, not a dict
    assert (told.first_loss, told.tokens, told.samples) == (None, 0, {})  # not in a summary: the defaults
