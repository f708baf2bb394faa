"""`python -m kubetune_trainer --config <kubetune.wire.CONFIG_PATH>`: what the trainer Job's pod runs.

The config is the TrainerConfig JSON the operator put in the job's ConfigMap (spec + resolved plan).
Exit codes: 0 success, 2 bad input, 3 out of GPU memory, 4 storage error, 143 SIGTERM (checkpoint
written), 1 anything else; the JSON summary goes to the termination log (kubetune_trainer.stop).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune import wire  # the standard library only, like stop
from kubetune_trainer import stop  # no torch, no pydantic: cheap to import before the handler is in place

if TYPE_CHECKING:
    from kubetune.trainer_config import TrainerConfig

DEVICES = ("auto", "cpu", "cuda")


def load_config(path: str) -> TrainerConfig:
    from pydantic import ValidationError

    from kubetune.errors import SpecError
    from kubetune.spec import format_errors
    from kubetune.trainer_config import TrainerConfig

    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SpecError(f"--config {path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise SpecError(f"--config {path}: not valid JSON ({exc})") from None
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_errors(exc, TrainerConfig, prefix="config")) from None


def default_port() -> int:
    """The trainer's port from its environment: the operator sets ENV_TRAINER_PORT; older operators and images
    set ENV_TRAINER_PORT_LEGACY."""
    for name in (wire.ENV_TRAINER_PORT, wire.ENV_TRAINER_PORT_LEGACY):
        if value := os.environ.get(name):
            return int(value)
    return wire.TRAINER_PORT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get(wire.ENV_CONFIG, wire.CONFIG_PATH),
                        help=f"TrainerConfig JSON (default ${wire.ENV_CONFIG} or {wire.CONFIG_PATH})")
    parser.add_argument("--metrics-port", type=int, default=default_port(),
                        help=f"/metrics /healthz /readyz /status port (default ${wire.ENV_TRAINER_PORT}, else "
                             f"${wire.ENV_TRAINER_PORT_LEGACY}, else {wire.TRAINER_PORT}; 0: off)")
    parser.add_argument("--termination-log", default=None,
                        help=f"where the JSON summary goes (default ${wire.ENV_TERMINATION_LOG} or "
                             f"{wire.TERMINATION_LOG})")
    parser.add_argument("--device", choices=DEVICES, default=os.environ.get("KUBETUNE_DEVICE", "auto"),
                        help="cuda, cpu, or auto (default $KUBETUNE_DEVICE or auto): the plan's device when it names "
                             "one (the operator's GPU plans do), else CUDA when usable, else the CPU")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device not in DEVICES:  # argparse checks choices on the command line only, not on a default
        print(f"error: KUBETUNE_DEVICE={args.device!r}: must be one of {', '.join(DEVICES)}", file=sys.stderr)
        return 2
    try:
        from kubetune.contracts import Outcome
        from kubetune.errors import KubetuneError
        from kubetune_trainer.loop import Result, RunOptions
        from kubetune_trainer.runner import run_job, write_termination

        try:
            config = load_config(args.config)
        except KubetuneError as exc:
            print(f"error: {exc}".replace("\n", "\nerror: "), file=sys.stderr)
            write_termination(args.termination_log, Result(outcome=Outcome.INVALID_INPUT, error=str(exc)),
                              exc.exit_code)
            return exc.exit_code
    except stop.Preempted as exc:  # SIGTERM while importing the training stack or reading the config
        return stop.preempted_while_starting(args.termination_log, exc)
    if early := stop.stopped_while_starting():  # SIGTERM while importing the training stack
        return stop.preempted_while_starting(args.termination_log, early)
    options = RunOptions(device=args.device, metrics_port=args.metrics_port, termination_log=args.termination_log)
    code, _ = run_job(config, options)  # installs its own SIGTERM handler (kubetune_trainer.runner)
    return code


if __name__ == "__main__":
    stop.install_early()  # before the training stack is imported: a SIGTERM from here on exits 143 with a summary
    stop.die_with_launcher()
    exit_code = main()
    from kubetune.contracts import ExitCode  # imported by main already

    if exit_code == ExitCode.PREEMPTED:
        # Stopped by SIGTERM: a download interrupted mid-file leaves huggingface_hub's worker threads
        # running, and a normal exit would wait for them until the grace period ends in SIGKILL.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
