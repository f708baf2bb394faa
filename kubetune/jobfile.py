"""FineTuneJob YAML files (one or several documents, or stdin): what `kubetune plan` and `kubetune train` read."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from kubetune.errors import SpecError
from kubetune.spec import FineTuneJob, parse_job


def read_documents(path: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document in a file (or stdin for '-')."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}:{where}: not valid YAML: {problem}") from None
    if not docs:
        raise SpecError(f"{path}: no FineTuneJob found (the file is empty)")
    return docs


def load_jobs(path: str) -> list[FineTuneJob]:
    jobs: list[FineTuneJob] = []
    problems: list[str] = []
    docs = read_documents(path)
    for index, doc in enumerate(docs):
        try:
            jobs.append(parse_job(doc))
        except SpecError as exc:
            label = f"document {index + 1}: " if len(docs) > 1 else ""
            problems.extend(label + line for line in exc.problems)
    if problems:
        raise SpecError(problems)
    return jobs
