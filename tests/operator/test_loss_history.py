"""status.lossHistory: the loss curve the page draws, kept by the operator where it writes progress."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

from kubetune_operator.reconcile import reconcile
from kubetune_operator.status import LOSS_POINTS, loss_history
from test_reconcile import DONE, RUNNING, after, body, pod, snapshot, trainer_job

from kubetune.contracts import TrainerPhase, TrainerStatus
from kubetune.spec import FineTuneJobStatus


def test_points_are_added_replaced_and_cut_back_on_a_resume() -> None:
    history = loss_history([], 10, 2.5)
    history = loss_history(history, 20, 2.25)
    assert history == [{"step": 10, "loss": 2.5}, {"step": 20, "loss": 2.25}]
    assert loss_history(history, 20, 2.0) == [{"step": 10, "loss": 2.5}, {"step": 20, "loss": 2.0}]
    assert loss_history(history, 15, 2.4) == [{"step": 10, "loss": 2.5}, {"step": 15, "loss": 2.4}]  # resumed
    assert loss_history(history, None, None) == history
    assert loss_history([{"step": "x", "loss": 1}, {"step": 3}], 4, 1.0) == [{"step": 4, "loss": 1.0}]


def test_a_long_run_stays_bounded_and_evenly_sampled() -> None:
    history: list[dict[str, object]] = []
    for step in range(1, 100_001, 7):
        history = loss_history(history, step, 10_000 / step)
    steps = [int(str(p["step"])) for p in history]
    assert LOSS_POINTS // 2 <= len(history) <= LOSS_POINTS
    assert steps[0] == 1 and steps == sorted(steps)
    gaps = [b - a for a, b in pairwise(steps)]
    assert max(gaps) <= 3 * (sum(gaps) / len(gaps))  # no stretch of the curve much sparser than the rest
    final = loss_history(history, 100_000, 0.1, force=True)
    assert final[-1] == {"step": 100_000, "loss": 0.1}
    FineTuneJobStatus.model_validate({"lossHistory": final})  # what the CRD's schema admits


def test_the_operator_adds_each_progress_update_and_the_final_loss() -> None:
    polls = [TrainerStatus(phase=TrainerPhase.TRAINING, step=s, total_steps=500, loss=3.0 - s / 250)
             for s in (50, 120, 250)]
    status = dict(RUNNING)
    for polled in polls:
        snap = snapshot(body(), status, job=trainer_job(), pods=(pod(),), trainer_status=polled)
        status = after(snap, reconcile(snap))
    assert status["lossHistory"] == [{"step": 50, "loss": 2.8}, {"step": 120, "loss": 2.52},
                                     {"step": 250, "loss": 2.0}]
    done = snapshot(body(), status, job=trainer_job(), pods=(pod(0, message=DONE),))
    status = after(done, reconcile(replace(done, now="2026-12-02T09:00:00Z")))
    assert status["phase"] == "Succeeded"
    assert status["lossHistory"][-1] == {"step": 500, "loss": 0.81}
