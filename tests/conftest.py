"""Fixtures every test directory can use: the hub-compatible file server (tests/hub_server.py) and moto S3."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# One OpenMP thread per core per test worker, set before anything imports torch; every trainer, rank and probe
# process a test starts inherits it. Oversubscribed, OpenMP's threads spin-wait on each other: on 2 cores with 2
# workers, 2 threads per process made the trainer tests 2.7x slower (217 s against 80 s for the same 30 tests).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

sys.path.append(str(Path(__file__).parent))  # for `import hub_server`

from hub_server import HubServer, serve_smollm  # noqa: E402 (after the thread count and the path)

# Nothing in the tests reaches huggingface.co: a hub id the catalog does not know is planned from its
# config.json on HF_ENDPOINT, and here that is a closed local port unless a test points it at the test hub.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """A hub on 127.0.0.1 serving the bundled SmolLM2 as `hub_server.SMOLLM_REPO` (public) and
    `hub_server.GATED_REPO` (gated; `hub_server.TEST_TOKEN` has access), each with decoy files a training
    download must skip. `hub_server.hub_env(server, token)` gives a process's HF_* environment."""
    with HubServer() as server:
        serve_smollm(server)
        yield server


@pytest.fixture
def hub(hub_server: HubServer) -> HubServer:
    """The session's hub with an empty request log (count downloads with `hub.file_downloads(repo)`)."""
    hub_server.clear_log()
    return hub_server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on a free port, reached over HTTP by boto3 with endpoint_url (one per
    session; each test uses its own bucket)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
