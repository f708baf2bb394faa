"""FineTuneJob YAML files (one or several documents, or stdin): what `kubetune plan` and `kubetune train` read."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kubetune.errors import SpecError
from kubetune.spec import FineTuneJob, parse_job
from kubetune.yamlsafe import load_all


def read_documents(path: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document in a file (or stdin for '-')."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    docs = load_all(text, path)  # safe, and refuses alias bombs (kubetune.yamlsafe)
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
