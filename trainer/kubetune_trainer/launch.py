"""`python -m kubetune_trainer.launch [torchrun options] -m kubetune_trainer --config job.json`: torchrun with the
trainer's exit contract.

torchrun (`torch.distributed.run`, part of torch) starts the ranks, runs the c10d rendezvous and forwards
SIGTERM to every rank; its own exit status is 1 for any failed rank. The operator's podFailurePolicy acts on
the trainer's exit codes (2 bad input, 3 out of GPU memory, 4 storage, 143 SIGTERM with a checkpoint), so this
wrapper runs torchrun's own `run(args)` (same flags, same parser) and exits with the code of the rank that
failed first for a reason, copying that rank's JSON summary into the pod's termination log.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from unittest import mock

from kubetune.contracts import ExitCode
from kubetune_trainer.distributed import RANK_SUMMARIES_ENV
from kubetune_trainer.stop import LAUNCHER_PID_ENV

# exit codes that name a cause the operator acts on: bad input, out of GPU memory, storage, no usable CUDA
CAUSES = (ExitCode.BAD_INPUT, ExitCode.OOM, ExitCode.STORAGE, ExitCode.NO_GPU)
PREEMPTED = int(ExitCode.PREEMPTED)


def exit_code(failures: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(rank, exit code) for the attempt from the failed ranks, (rank, exitcode) in the order they failed
    (a negative exitcode is a signal). A named cause wins (another rank then fails only because its peer
    went away); else, if every failed rank stopped on SIGTERM, 143 (preempted, checkpoint written); else the
    first failure, a signal as 128 + its number (137 for SIGKILL)."""
    if not failures:
        raise ValueError("no failed rank")
    for rank, code in failures:
        if code in CAUSES:
            return rank, code
    if all(code in (PREEMPTED, -signal.SIGTERM) for _, code in failures):
        return failures[0][0], PREEMPTED
    rank, code = failures[0]
    return rank, 128 - code if code < 0 else code


def threads_per_rank(nproc_per_node: int, cpus: int | None) -> int:
    """Each rank's share of this machine's cores (torchrun's own default is 1)."""
    return max(1, (cpus or 1) // max(1, nproc_per_node))


def trainer_termination_log(script_args: Sequence[str]) -> str | None:
    from kubetune_trainer.__main__ import build_parser
    from kubetune_trainer.stop import termination_path

    known, _ = build_parser().parse_known_args(list(script_args))
    return termination_path(known.termination_log)


def ranks_environment(values: dict[str, str]) -> ContextManager[dict[str, str]]:
    """`values` in the environment the ranks inherit, while they run (torchrun copies os.environ when it starts
    them); restored after, for a caller that runs more than one launch in its process (the tests)."""
    return mock.patch.dict(os.environ, values)


def launch(argv: Sequence[str]) -> int:
    """Run torchrun with `argv` (its flags, then `-m kubetune_trainer …`) and return the attempt's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(argv))
    if "OMP_NUM_THREADS" not in os.environ and str(args.nproc_per_node).isdigit():
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(int(args.nproc_per_node), os.cpu_count()))
    with tempfile.TemporaryDirectory(prefix="kubetune-ranks-") as summaries, \
            ranks_environment({RANK_SUMMARIES_ENV: summaries, LAUNCHER_PID_ENV: str(os.getpid())}):
        try:
            run(args)
            return 0
        except ChildFailedError as exc:
            ordered = sorted(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
            rank, code = exit_code([(r, failure.exitcode) for r, failure in ordered])
            summary = Path(summaries) / f"rank-{rank}.json"
            target = trainer_termination_log(args.training_script_args)
            if rank != 0 and summary.exists() and target:
                shutil.copyfile(summary, target)
            print(f"kubetune launch: rank {rank} failed first (exit {code}); the attempt exits {code}",
                  file=sys.stderr)
            return code
        except SignalException as exc:
            return 128 + int(exc.sigval)


def main(argv: Sequence[str] | None = None) -> int:
    return launch(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
