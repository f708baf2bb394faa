"""Fuzz the API with schemathesis from its own OpenAPI schema: no 5xx, no hang, >= 500 cases.

The API runs in serviceaccount mode against the emulator (TokenReview, SubjectAccessReview, RBAC), with
a caller who may do everything with finetunejobs in every namespace, so generated requests get past auth
into planning and Kubernetes. S3 points at a closed local port (a model source on s3:// fails fast, never the internet).

Reproduce by hand (the same run, printed):  pytest tests/api/test_api_fuzz.py -s
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kt_api import FTJ, MakeStack, free_port
from kt_auth import Rule, User

EXAMPLES_PER_OPERATION = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "30"))
SEED = 11


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_schemathesis_finds_no_server_error_and_no_hang(make_stack: MakeStack, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fuzz")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fuzz")
    report = tmp_path / "junit.xml"
    async with make_stack(auth="serviceaccount", plan_timeout=5.0) as stack:
        stack.kube.tokens["fuzz-token"] = User("fuzzer", ("platform-admins",))
        stack.kube.rules.append(Rule("platform-admins", "*", FTJ))  # every namespace: requests go past RBAC
        command = [
            str(Path(sys.executable).with_name("st")), "run", f"{stack.url}/openapi.json",
            "--checks", "not_a_server_error", "--max-response-time", "10", "--request-timeout", "15",
            "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--workers", "1",
            "--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all", "--no-shrink",
            "-H", "Authorization: Bearer fuzz-token", "--report", "junit", "--report-junit-path", str(report),
            # the event streams never end by design (test_api_events.py covers them, refusals and bad ids too)
            "--exclude-path-regex", "/events$",
        ]
        result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=800,
                                         cwd=tmp_path)
        print(result.stdout[-4000:], result.stderr[-2000:])
        stats = json.dumps({"cases": _cases(result.stdout), "exit": result.returncode})
        print("fuzz:", stats)
        assert result.returncode == 0, result.stdout[-6000:]
        assert _cases(result.stdout) >= 500
        assert (await stack.client.get("/healthz")).status_code == 200


def _cases(stdout: str) -> int:
    """The total of 'N generated' / 'N test cases' that schemathesis prints in its summary."""
    import re

    found = re.findall(r"(\d+) (?:generated|test cases)", stdout)
    return max((int(n) for n in found), default=0)
