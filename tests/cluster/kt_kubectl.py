"""The machine's `kubectl` (1.32) pointed at the emulator through a kubeconfig file."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


class Kubectl:
    def __init__(self, server: str, folder: Path, namespace: str = "default") -> None:
        binary = shutil.which("kubectl")
        if binary is None:
            raise RuntimeError("kubectl is not on PATH: the machine image provides kubectl 1.32")
        self.binary = binary
        self.kubeconfig = folder / "kubeconfig"
        folder.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": server}}],
            "users": [{"name": "tester", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                          "namespace": namespace}}],
        }))
        self.cache = folder / "kube-cache"

    async def __call__(self, *args: str, stdin: str | None = None, timeout: float = 60) -> Result:
        process = await asyncio.create_subprocess_exec(
            self.binary, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache), *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(stdin.encode() if stdin is not None else None), timeout)
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())
