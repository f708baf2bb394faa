"""Layers only point down: the core (kubetune/, but for its front ends cli.py and api) imports neither the
trainer nor the operator; the operator and the trainer do not import each other (what they share, the wire
contracts, lives in the core); nothing anywhere imports kopf's private modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRONT_ENDS = {"cli.py", "api"}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_front_ends_named_here_exist() -> None:
    assert {name for name in FRONT_ENDS if not (ROOT / "kubetune" / name).exists()} == set()


def test_the_core_imports_no_trainer_and_no_operator() -> None:
    offenders = {}
    for path in (ROOT / "kubetune").rglob("*.py"):
        if path.relative_to(ROOT / "kubetune").parts[0] in FRONT_ENDS:
            continue
        bad = {m for m in imports(path) if m.split(".")[0] in ("kubetune_trainer", "kubetune_operator")}
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def _offenders(folder: str, forbidden: str) -> dict[str, set[str]]:
    offenders = {}
    for path in (ROOT / folder).rglob("*.py"):
        bad = {m for m in imports(path) if m.split(".")[0] == forbidden}
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    return offenders


def test_the_operator_does_not_import_the_trainer() -> None:
    assert _offenders("operator", "kubetune_trainer") == {}


def test_the_trainer_does_not_import_the_operator() -> None:
    assert _offenders("trainer", "kubetune_operator") == {}


def test_no_private_kopf_imports_anywhere() -> None:
    offenders = {}
    for folder in ("kubetune", "operator", "trainer", "tests", "bench", "charts"):
        for path in (ROOT / folder).rglob("*.py"):
            bad = {m for m in imports(path) if m.startswith("kopf._")}
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}
