"""Fixtures for the trainer tests: real servers on 127.0.0.1 (moto's S3, Prometheus), a tiny random Llama
built from a config (with SmolLM2's real tokenizer), the bundled SmolLM2 for the end-to-end run, and a
helper that runs `python -m kubetune_trainer` as a separate process (as the pod does)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tiny_llama import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is the code word number {i}?"},
                  {"role": "assistant", "content": f"The code word {i} is {'zebra' if i % 2 else 'copper kite'}."}]}
    for i in range(24)
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _trainer_env() -> Iterator[None]:
    """A shared model cache (the bundled GGUF converts once per machine), no network (threads: tests/conftest.py)."""
    os.environ.setdefault("KUBETUNE_CACHE_DIR", str(Path.home() / ".cache" / "kubetune"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, converted from its GGUF to a safetensors folder (cached)."""
    from kubetune_trainer.model import bundled_gguf, convert_gguf

    return convert_gguf(bundled_gguf("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer(smollm_dir: Path) -> Any:
    from kubetune_trainer.model import load_tokenizer

    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path, tokenizer: Any) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path, tokenizer: Any) -> Path:
    """The tiny Llama with separate input and output embedding tables (as Llama-3.1-8B and 70B have)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tokenizer, tied=False)


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS))
    return path


def make_spec(model_dir: Path | str, data: Path | str, output: str, **training: Any) -> dict[str, Any]:
    settings = {"maxSteps": 4, "microBatchSize": 2, "gradientAccumulationSteps": 2, "maxSeqLength": 128,
                "learningRate": 1e-3, "checkpointSteps": 2, "warmupRatio": 0.0}
    settings.update(training)
    return {
        "model": {"source": str(model_dir)},
        "dataset": {"source": str(data), "format": "chat"},
        "method": "qlora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": settings,
        "output": {"uri": output},
    }


@pytest.fixture
def spec_for() -> Callable[..., dict[str, Any]]:
    return make_spec


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """TrainerConfig JSON as the operator writes it into the ConfigMap."""
    def write(spec: dict[str, Any], name: str = "tiny", estimate: int = 123_456_789) -> Path:
        from kubetune.planning.plan import Knobs
        from kubetune.spec import parse_spec
        from kubetune.trainer_config import JobRef, TrainerConfig

        parsed = parse_spec(spec)
        t = parsed.training
        knobs = Knobs(micro_batch_size=t.micro_batch_size if isinstance(t.micro_batch_size, int) else 1,
                      gradient_accumulation_steps=t.gradient_accumulation_steps,
                      gradient_checkpointing=t.gradient_checkpointing is True, max_seq_length=t.max_seq_length)
        config = TrainerConfig(job=JobRef(name=name, namespace="team-a"), spec=parsed, knobs=knobs,
                               vram_estimate_bytes=estimate)
        path = tmp_path / f"job-{name}-{time.monotonic_ns()}.json"
        path.write_text(config.model_dump_json(by_alias=True))
        return path
    return write


class TrainerProcess:
    """`python -m kubetune_trainer --config …` as a child process, its log in a file."""

    def __init__(self, config: Path, env: dict[str, str], metrics_port: int = 0, log: Path | None = None) -> None:
        self.termination = config.with_suffix(".termination.json")
        self.log_path = log or config.with_suffix(".log")
        self.log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "kubetune_trainer", "--config", str(config), "--metrics-port", str(metrics_port),
             "--termination-log", str(self.termination)],
            cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log_file.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.termination.read_text()))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 180, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited ({self.proc.returncode}) before {what}:\n{self.log[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log[-4000:]}")


@pytest.fixture
def trainer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(CREDENTIALS)
    env["KUBETUNE_LOG_FORMAT"] = "json"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "trainer")])
    return env


@pytest.fixture
def start_trainer(trainer_env: dict[str, str]) -> Iterator[Callable[..., TrainerProcess]]:
    started: list[TrainerProcess] = []

    def start(config: Path, metrics_port: int = 0, env: dict[str, str] | None = None) -> TrainerProcess:
        proc = TrainerProcess(config, {**trainer_env, **(env or {})}, metrics_port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(timeout=30)
        if not proc.log_file.closed:
            proc.log_file.close()


def run_one_rank(config: Path, termination: Path, device: str = "cpu") -> int:
    """`python -m kubetune_trainer` for one rank, in this process (the training stack imported once)."""
    from kubetune_trainer.__main__ import main

    return main(["--config", str(config), "--device", device, "--metrics-port", "0",
                 "--termination-log", str(termination)])


@dataclass
class InProcessRun:
    code: int
    summary: dict[str, Any]
    log: str  # what the run wrote to stderr: its JSON lines


@pytest.fixture
def train_here(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
               ) -> Callable[[Path], InProcessRun]:
    """The trainer's `main` in this process, as a pod would run it but without importing the training stack
    again (~8 s of CPU per process): for the runs a test does not kill or watch from outside (a resume, a
    reference run to compare with)."""
    monkeypatch.setenv("KUBETUNE_LOG_FORMAT", "json")  # the log a pod writes, as the subprocess runs have it

    def run(config: Path) -> InProcessRun:
        termination = config.with_suffix(".termination.json")
        capfd.readouterr()
        code = run_one_rank(config, termination)
        return InProcessRun(code, dict(json.loads(termination.read_text())), capfd.readouterr().err)
    return run


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client for the moto server; the environment points the trainer's own client there too."""
    import boto3

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> str:
    test = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")  # a bucket name's characters
    name = f"kt-{test}-{time.monotonic_ns() % 100000}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def auth_s3_endpoint() -> Iterator[str]:
    """A second moto server, as its own process, that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def read_adapter_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


@pytest.fixture
def adapter_tensors() -> Callable[[Path], dict[str, Any]]:
    return read_adapter_tensors
