"""Errors a user can act on. Each carries the lines to show; none should surface as a traceback."""

from __future__ import annotations

from kubetune.contracts import ExitCode


class KubetuneError(Exception):
    """Base class: str(error) is the message to show the user."""

    exit_code: int = ExitCode.ERROR


class SpecError(KubetuneError):
    """The FineTuneJob (or a file it points at) is invalid. One line per problem, each naming the field."""

    exit_code: int = ExitCode.BAD_INPUT

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class PlanError(SpecError):
    """The spec is valid but no GPU class satisfies it (a pinned class too small, maxGpuClass too low…)."""


class HubUnreachable(KubetuneError):
    """The hub did not answer in time or at all: planning can be retried, the spec is not at fault."""

    exit_code = ExitCode.ERROR


class GpuUnavailable(KubetuneError):
    """The plan runs the job on a GPU and CUDA is not usable here (no GPU visible, or too old a driver)."""

    exit_code: int = ExitCode.NO_GPU
