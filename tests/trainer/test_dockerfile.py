"""Dockerfile.trainer, checked statically (no container engine here): a CUDA runtime base, multi-stage,
no build tools or pip in the final stage, non-root, the trainer module as entry point."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stages() -> list[list[tuple[str, str]]]:
    text = (ROOT / "Dockerfile.trainer").read_text().replace("\\\n", " ")
    out: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction.upper(), rest.strip()))
    return out


def test_multi_stage_on_a_cuda_base() -> None:
    """CUDA's `-base` image: torch's wheels bring cuBLAS and cuDNN, a cudnn-runtime base would duplicate them."""
    text = (ROOT / "Dockerfile.trainer").read_text()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", text)
    assert base and base.group(1).startswith("nvidia/cuda:") and "-base-" in base.group(1)
    build, final = stages()
    assert build[0] == ("FROM", "${CUDA_IMAGE} AS build") and final[0] == ("FROM", "${CUDA_IMAGE}")
    assert any(i == "RUN" and "-r requirements/trainer.lock" in r for i, r in build)  # ".[trainer]", torch included
    assert any(i == "RUN" and "pip install --no-deps --no-build-isolation ." in r for i, r in build)


def test_final_stage_has_no_build_tools_and_runs_as_non_root() -> None:
    final = stages()[-1]
    runs = " ".join(r for i, r in final if i == "RUN")
    for tool in ("build-essential", "gcc", "g++", "make", "python3-dev", "python3-pip", "pip install", "-devel"):
        assert tool not in runs, tool
    assert any(i == "COPY" and r.startswith("--from=build /opt/kubetune") for i, r in final)
    users = [r for i, r in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert int(users[-1].split(":")[0]) >= 1000


def test_entrypoint_is_the_trainer_module() -> None:
    final = dict(stages()[-1])
    assert json.loads(final["ENTRYPOINT"]) == ["python", "-m", "kubetune_trainer"]
    assert json.loads(final["CMD"]) == ["--config", "/etc/kubetune/job.json"]


def test_the_base_image_cuda_is_the_locked_torch_cuda() -> None:
    """The image's CUDA and the CUDA the locked torch is built for (its nvidia-cuda-runtime wheel) agree, and the
    README names the driver that CUDA needs (issue 16: a CUDA 12.8 base under a CUDA 13 torch)."""
    from kubetune_trainer.devices import minimum_driver

    text = (ROOT / "Dockerfile.trainer").read_text()
    image = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-", text)
    runtime = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)\.", (ROOT / "requirements" / "trainer.lock")
                        .read_text(), re.MULTILINE)
    assert image and runtime
    assert image.groups() == runtime.groups(), (image.groups(), runtime.groups())
    driver = minimum_driver(".".join(runtime.groups()))
    assert driver and f"driver >= {driver}" in (ROOT / "README.md").read_text()


def test_the_image_ships_the_liger_kernel_the_trainer_takes_on_cuda() -> None:
    """loss.loss_path takes Liger's kernel on CUDA when it is installed: the image has it, pinned with hashes."""
    lock = (ROOT / "requirements" / "trainer.lock").read_text()
    assert re.search(r"^liger-kernel==\S+ \\\n\s+--hash=sha256:", lock, re.MULTILINE)
    assert re.search(r"^triton==", lock, re.MULTILINE)  # its kernels' compiler, brought by torch
