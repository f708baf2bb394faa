"""Log output: a progress line per logging step for people at a terminal, one JSON object per line for log
collectors (kubectl logs, Loki) otherwise. KUBETUNE_LOG_FORMAT=json|text overrides the TTY guess."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n:.1f}GiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Log:
    def __init__(self, stream: TextIO | None = None, fmt: str | None = None) -> None:
        self.stream = stream or sys.stderr
        fmt = fmt or os.environ.get("KUBETUNE_LOG_FORMAT")
        self.json = fmt == "json" if fmt in ("json", "text") else not self.stream.isatty()

    def event(self, event: str, message: str = "", **fields: Any) -> None:
        if self.json:
            record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event}
            if message:
                record["message"] = message
            record.update(fields)
            print(json.dumps(record, default=str), file=self.stream, flush=True)
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            print(f"[kubetune] {message or event}" + (f"  ({extra})" if extra and not message else ""),
                  file=self.stream, flush=True)

    def step(self, *, step: int, total: int, loss: float, lr: float, grad_norm: float, tokens_per_second: float,
             eta_seconds: float | None, memory_bytes: int) -> None:
        if self.json:
            self.event("step", step=step, total=total, loss=round(loss, 5), lr=lr, gradNorm=round(grad_norm, 4),
                       tokensPerSecond=round(tokens_per_second, 1), etaSeconds=eta_seconds and round(eta_seconds),
                       memoryBytes=memory_bytes)
            return
        width = 24
        done = int(width * step / max(total, 1))
        bar = "█" * done + "·" * (width - done)
        print(f"  {bar} {step:>{len(str(total))}}/{total}  loss {loss:.4f}  {tokens_per_second:,.0f} tok/s  "
              f"ETA {_duration(eta_seconds)}  mem {_human_bytes(memory_bytes)}", file=self.stream, flush=True)
