"""A hub id the catalog does not know is planned from its config.json, read from the hub the trainer will
download from (HF_ENDPOINT) with the same token (HF_TOKEN), by the CLI, the API and the operator alike;
the read has a timeout, and the async form never holds up an event loop."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hub_server import GATED_REPO, SMOLLM_REPO, TEST_TOKEN, HubServer

from kubetune.cli import main
from kubetune.errors import HubUnreachable, SpecError
from kubetune.hub_config import read_hub_config, read_hub_config_async
from kubetune.sources import model_architecture, model_architecture_async


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung proxy)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield int(server.getsockname()[1])


def test_reads_config_json_with_the_token(hub: HubServer) -> None:
    config = read_hub_config(SMOLLM_REPO, endpoint=hub.url)
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    with pytest.raises(SpecError, match=r"is gated on http://127\.0\.0\.1.*needs a token.*spec\.model\.tokenSecret"):
        read_hub_config(GATED_REPO, endpoint=hub.url, token="")
    with pytest.raises(SpecError, match="refused the token in HF_TOKEN"):
        read_hub_config(GATED_REPO, endpoint=hub.url, token="hf_wrong")
    assert read_hub_config(GATED_REPO, endpoint=hub.url, token=TEST_TOKEN)["hidden_size"] == 576
    with pytest.raises(SpecError, match="'kubetune-test/nope' does not exist on"):
        read_hub_config("kubetune-test/nope", endpoint=hub.url)
    with pytest.raises(SpecError, match=r"spec\.model\.revision: 'v9'"):
        read_hub_config(SMOLLM_REPO, "v9", endpoint=hub.url)
    assert [r.file for r in hub.requests if r.status == 200] == ["config.json", "config.json"]


def test_unreachable_and_hung_hubs_are_not_spec_errors(silent_port: int) -> None:
    with pytest.raises(HubUnreachable, match="cannot read"):
        read_hub_config(SMOLLM_REPO, endpoint="http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(HubUnreachable):
        asyncio.run(read_hub_config_async(SMOLLM_REPO, endpoint=f"http://127.0.0.1:{silent_port}", timeout=1.0))
    assert time.monotonic() - started < 5


def test_the_async_read_leaves_the_event_loop_free(silent_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_port}")

    async def scenario() -> tuple[int, BaseException | None]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        error: BaseException | None = None
        try:
            await model_architecture_async("acme/uncatalogued-9b", None, timeout=1.0)
        except Exception as exc:
            error = exc
        task.cancel()
        return ticks, error

    ticks, error = asyncio.run(scenario())
    assert ticks >= 10  # the loop kept running while the read waited
    assert isinstance(error, HubUnreachable)  # not the spec's fault: callers retry


def test_cli_plans_an_uncatalogued_hub_id_from_the_hub(hub: HubServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    arch = model_architecture(SMOLLM_REPO, None)
    assert (arch.layers, arch.hidden, arch.vocab) == (30, 576, 49152)
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "smol"},
           "spec": {"model": {"name": GATED_REPO}, "dataset": {"source": "s3://data/train.jsonl"},
                    "output": {"uri": "s3://adapters/smol/"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["plan", "-f", str(path)]) == 2
    assert "spec.model.tokenSecret" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    assert main(["plan", "-f", str(path), "-o", "json"]) == 0
    assert '"gpuClass"' in capsys.readouterr().out


def test_an_unreachable_hub_is_a_retryable_error_in_the_cli_not_an_invalid_spec(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # nothing listens: connection refused
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubUnreachable, match="cannot read 'acme/uncatalogued-9b'"):
        model_architecture("acme/uncatalogued-9b", None)
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
           "spec": {"model": {"name": "acme/uncatalogued-9b"}, "dataset": {"source": "s3://data/train.jsonl"},
                    "output": {"uri": "s3://adapters/x/"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["plan", "-f", str(path)]) == 1  # ExitCode.ERROR, not BAD_INPUT (2)
    assert "check HF_ENDPOINT and the network" in capsys.readouterr().err
