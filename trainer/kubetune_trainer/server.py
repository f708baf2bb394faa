"""The trainer's one HTTP port: /metrics (Prometheus), /healthz (the process is alive), /readyz (the model is
loaded and training or done), /status (JSON progress). Runs in a daemon thread beside the training loop."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubetune.contracts import TrainerPhase, TrainerStatus
from kubetune_trainer.metrics import Telemetry

READY_PHASES = frozenset({TrainerPhase.TRAINING, TrainerPhase.CHECKPOINTING, TrainerPhase.EVALUATING,
                          TrainerPhase.UPLOADING, TrainerPhase.SUCCEEDED})


def build_app(telemetry: Telemetry) -> FastAPI:
    app = FastAPI(title="kubetune trainer", docs_url=None, redoc_url=None)

    @app.get("/metrics")
    def metrics() -> Response:
        telemetry.memory()
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        phase = telemetry.snapshot().phase
        ready = phase in READY_PHASES
        return JSONResponse({"ready": ready, "phase": phase.value}, status_code=200 if ready else 503)

    @app.get("/status", response_model=TrainerStatus)
    def status() -> dict[str, Any]:
        """The one /status document (kubetune.contracts.TrainerStatus), camelCase keys."""
        return telemetry.snapshot().document()

    return app


class MetricsServer:
    """uvicorn in a daemon thread; port 0 means off."""

    def __init__(self, telemetry: Telemetry, port: int, host: str = "0.0.0.0") -> None:
        import uvicorn

        self.port = port
        config = uvicorn.Config(build_app(telemetry), host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="kubetune-metrics", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        if not self.server.started:
            raise OSError(f"metrics server did not start on port {self.port} (in use?)")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
