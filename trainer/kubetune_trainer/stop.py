"""SIGTERM, the graceful stop: installed first thing in the process, before anything slow.

Kubernetes sends SIGTERM, waits `terminationGracePeriodSeconds` (sized by the plan: finish a step, write
and upload a checkpoint, with margin; kubetune.planning.budget), then SIGKILLs. What the trainer does:
- while it starts, imports torch, downloads or loads the model (nothing new to save): stop at once
  (`Preempted` is raised from the handler) and exit 143; a resumed attempt's checkpoint is still there;
- while it trains: finish the optimizer step, write a checkpoint, exit 143 (the loop checks the flag);
- while it writes the final adapter: finish it (exit 0).

No torch import here: `python -m kubetune_trainer` installs this before importing the training stack.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from kubetune import wire  # the standard library only

LAUNCHER_PID_ENV = "KUBETUNE_LAUNCHER_PID"  # set by launch.py for the ranks it starts
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

if TYPE_CHECKING:  # imported when used: installing the handler must not wait for pydantic
    from kubetune.contracts import TerminationSummary



class Preempted(Exception):
    """SIGTERM arrived; whatever there was to save is saved. The pod's replacement resumes."""


def stop_now(what: str) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler that interrupts what the process is doing (`what`, for the message)."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Preempted(f"stopped by {signal.Signals(signum).name} while {what} (nothing new to save)")

    return handler


_early: list[int] = []  # signals noted while starting


def _note(signum: int, _frame: FrameType | None) -> None:
    _early.append(signum)


def install_early() -> None:
    """The first handler, while the process imports the training stack and reads its config: it only notes
    the signal (an exception raised inside torch's import machinery can surface as an unrelated error);
    `main` checks it as soon as the imports are done, and the runner before it starts."""
    signal.signal(signal.SIGTERM, _note)


def stopped_while_starting() -> Preempted | None:
    if not _early:
        return None
    return Preempted(f"stopped by {signal.Signals(_early[0]).name} while starting (nothing new to save)")


def termination_path(path: str | None) -> str | None:
    """--termination-log, else $KUBETUNE_TERMINATION_LOG, else /dev/termination-log when it is writable."""
    target = path or os.environ.get(wire.ENV_TERMINATION_LOG)
    if target is None and Path(wire.TERMINATION_LOG).exists() and os.access(wire.TERMINATION_LOG, os.W_OK):
        target = wire.TERMINATION_LOG
    return target or None


def write_summary(path: str | None, summary: TerminationSummary) -> None:
    target = termination_path(path)
    if not target:
        return
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(summary.message())
    except OSError:
        pass


def preempted_while_starting(path: str | None, exc: Preempted) -> int:
    """SIGTERM before the trainer got going: the summary, a log line, and exit 143."""
    from kubetune.contracts import ExitCode, Outcome, TerminationSummary

    write_summary(path, TerminationSummary(outcome=Outcome.PREEMPTED, exit_code=int(ExitCode.PREEMPTED),
                                           error=str(exc)))
    print(json.dumps({"event": "done", "message": str(exc), "outcome": Outcome.PREEMPTED.value,
                      "exitCode": int(ExitCode.PREEMPTED)}), flush=True)
    return int(ExitCode.PREEMPTED)


def die_with_launcher(env: Mapping[str, str] = os.environ) -> bool:
    """A rank started by launch.py asks Linux to SIGKILL it when its launcher dies. torchrun starts the ranks in
    sessions of their own, so a launcher killed outright (kill -9, the OOM killer, a test killing its process
    group) would leave them training on, writing checkpoints and holding their GPU. In a pod the container's end
    kills them anyway; on one machine (`kubetune train --nproc-per-node`) nothing else would. True when armed."""
    launcher = env.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != int(launcher):  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGKILL)
    return True
