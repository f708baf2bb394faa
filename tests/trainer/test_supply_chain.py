"""Issue 11 finding 11: the images are built from pinned parts only, checked statically (no container
engine here): base images by digest (with the tag named), Python packages only from lock files in which
every package is pinned with its sha256 hashes, and the locks still satisfy pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile.trainer", "Dockerfile.operator"]
PINNED = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._/-]*):(?P<tag>[A-Za-z0-9._-]+)@sha256:[0-9a-f]{64}$")
# which lock serves which extras, and for which Python (the image's)
LOCKS = {"operator.lock": (("operator", "api"), "3.11"), "trainer.lock": (("trainer",), "3.12")}


def instructions(name: str) -> list[tuple[str, str]]:
    text = (ROOT / name).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def parse_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """{package: (version, [sha256 hashes])}; fails on anything that is not `name==version` with hashes."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements" / name).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match, f"{name}: not a hash-pinned requirement: {line[:120]}"
        hashes = re.findall(r"sha256:([0-9a-f]{64})", match.group(3))
        entries[str(canonicalize_name(match.group(1)))] = (match.group(2), hashes)
    assert entries, name
    return entries


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_images_are_pinned_by_digest_with_the_tag_named(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    args = {k: v for i, r in steps if i == "ARG" and "=" in r for k, v in [r.split("=", 1)]}
    stages = {r.split()[-1] for i, r in steps if i == "FROM" and " AS " in r.upper()}
    text = (ROOT / dockerfile).read_text()
    for instruction, rest in steps:
        if instruction != "FROM":
            continue
        image = rest.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in stages:
            continue
        match = PINNED.match(image)
        assert match, f"{dockerfile}: FROM {image} is not pinned by digest (name:tag@sha256:...)"
        assert f"# tag: {match.group('name')}:{match.group('tag')}" in text, f"{dockerfile}: name the tag in a comment"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_python_packages_come_only_from_hashed_locks(dockerfile: str) -> None:
    installs = [cmd.strip() for i, r in instructions(dockerfile) if i == "RUN" for cmd in r.split("&&")
                if "pip install" in cmd]
    assert installs
    locks = set()
    for cmd in installs:
        if cmd.endswith("pip install --no-deps --no-build-isolation ."):
            continue  # kubetune itself, from the build context, after its dependencies came from the lock
        match = re.search(r"pip install --require-hashes (?:--no-deps )?--only-binary=:all: "
                          r"-r requirements/(\S+\.lock)$", cmd)
        assert match, f"{dockerfile}: an install that is not from a hashed lock: {cmd}"
        locks.add(match.group(1))
        assert (ROOT / "requirements" / match.group(1)).is_file()
    copied = " ".join(r for i, r in instructions(dockerfile) if i == "COPY")
    for lock in locks:
        assert f"requirements/{lock}" in copied, f"{dockerfile}: {lock} is installed but not copied in"
    assert "upgrade" not in " ".join(installs)


@pytest.mark.parametrize("lock", ["operator.lock", "trainer.lock", "smollm2.lock", "build.lock"])
def test_every_locked_package_is_pinned_with_hashes(lock: str) -> None:
    for name, (version, hashes) in parse_lock(lock).items():
        assert hashes and len(set(hashes)) == len(hashes), name
        Version(version)  # an exact release, not a URL or a range


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_locks_satisfy_pyproject(lock: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, python = LOCKS[lock]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += [r for r in project["optional-dependencies"][extra] if not r.startswith("kubetune[")]
    locked = parse_lock(lock)
    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = str(canonicalize_name(requirement.name))
        assert name in locked, f"{lock}: {name} (pyproject.toml) is not locked: run scripts/lock.sh"
        assert requirement.specifier.contains(locked[name][0], prereleases=True), \
            f"{lock}: {name}=={locked[name][0]} does not satisfy {requirement}: run scripts/lock.sh"


def test_the_trainer_lock_holds_torch_and_no_cpu_only_build() -> None:
    locked = parse_lock("trainer.lock")
    assert locked["torch"][0] == (ROOT / "requirements" / "trainer-constraints.txt").read_text().split("==")[1].strip()
    assert "+cpu" not in locked["torch"][0]
    assert any(name.startswith("nvidia-") for name in locked)  # the CUDA libraries torch runs on, hash-pinned too
