"""Issue 11, findings 1-4: who may call the API, and what one caller can do to it.

Every test runs the real API (uvicorn) against the emulator acting as kube-apiserver (kt_auth): tokens,
RBAC, TokenReview / SubjectAccessReview, and HTTPS with a test CA where it says so.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from kt_api import API_SA, JOB, MakeStack, Stack
from kt_auth import make_ca

from kubetune.api.auth import Caller, TtlCache, bearer_token
from kubetune.api.kube import job_path

BASE = "/v1/namespaces/team-a/finetunejobs"
NONE = {"Authorization": ""}
ENDPOINTS = [
    ("POST", BASE, JOB), ("GET", BASE, None), ("GET", f"{BASE}/support-bot", None),
    ("POST", f"{BASE}/support-bot/suspend", None), ("POST", f"{BASE}/support-bot/resume", None),
    ("DELETE", f"{BASE}/support-bot", None), ("POST", "/v1/plan", JOB),
    ("GET", "/v1/namespaces/team-a/events", None), ("GET", f"{BASE}/support-bot/events", None),
    ("GET", f"{BASE}/support-bot/loss", None), ("GET", "/v1/namespaces/team-a/quota", None),
    ("GET", "/v1/gpus", None), ("GET", "/v1/models", None), ("GET", "/v1/schema/finetunejob", None),
    ("GET", "/v1/namespaces", None),
]


def job_in(namespace: str, name: str = "support-bot") -> dict[str, Any]:
    return {**JOB, "metadata": {"name": name, "namespace": namespace}}


def stored(stack: Stack, namespace: str = "team-a", name: str = "support-bot") -> dict[str, Any] | None:
    return stack.kube.get("finetunejobs", namespace, name)


def kube_calls(stack: Stack, method: str | None = None) -> list[Any]:
    return [r for r in stack.kube if "finetunejobs" in str(r.url)
            and (method is None or str(r.method.value).upper() == method)]


# --- 1. serviceaccount mode authenticates and authorizes every caller ---------------------------------------

@pytest.mark.parametrize("auth", ["serviceaccount", "passthrough"])
@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic YWxpY2U6eA==", "Bearer nobody-knows-me"])
async def test_every_v1_endpoint_refuses_a_caller_without_a_valid_token(make_stack: MakeStack, auth: str,
                                                                        header: str | None) -> None:
    async with make_stack(auth=auth) as stack:
        await stack.kube.put_object("finetunejobs", {**job_in("team-a"), "spec": JOB["spec"]})
        headers = {} if header is None else {"Authorization": header}
        async with httpx.AsyncClient(base_url=stack.url, timeout=15) as anonymous:
            for method, path, body in ENDPOINTS:
                response = await anonymous.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, header, response.text)
                assert response.headers.get("WWW-Authenticate") == "Bearer"
        assert stored(stack) is not None and stored(stack)["spec"].get("suspend") is None
        writes = [r for r in kube_calls(stack) if str(r.method.value).upper() != "GET"]
        assert writes == []


@pytest.mark.parametrize("auth", ["serviceaccount", "passthrough"])
async def test_a_team_cannot_touch_another_namespace(make_stack: MakeStack, auth: str) -> None:
    async with make_stack(auth=auth) as stack:
        assert (await stack.client.post(BASE, json=JOB)).status_code == 201  # alice in team-a: allowed
        await stack.kube.put_object("finetunejobs", job_in("team-b", "their-job"))

        refused = [
            await stack.client.post("/v1/namespaces/kube-system/finetunejobs", json=job_in("kube-system")),
            await stack.client.get("/v1/namespaces/team-b/finetunejobs"),
            await stack.client.delete("/v1/namespaces/team-b/finetunejobs/their-job"),
            await stack.client.post("/v1/namespaces/team-b/finetunejobs/their-job/suspend"),
        ]
        assert [r.status_code for r in refused] == [403, 403, 403, 403], [r.text for r in refused]
        assert "alice may not create finetunejobs.kubetune.io in namespace 'kube-system'" in refused[0].text \
            or "may not create finetunejobs.kubetune.io in namespace 'kube-system'" in refused[0].text
        assert stored(stack, "kube-system") is None
        assert stored(stack, "team-b", "their-job") is not None

        # bob may read team-b but not delete there
        bob = {"Authorization": "Bearer team-b-token"}
        assert (await stack.client.get("/v1/namespaces/team-b/finetunejobs", headers=bob)).status_code == 200
        gone = await stack.client.delete("/v1/namespaces/team-b/finetunejobs/their-job", headers=bob)
        assert gone.status_code == 403
        assert stored(stack, "team-b", "their-job") is not None


async def test_serviceaccount_mode_reviews_the_caller_and_acts_as_itself(make_stack: MakeStack) -> None:
    async with make_stack(auth="serviceaccount") as stack:
        assert (await stack.client.post(BASE, json=JOB)).status_code == 201
        kinds = [kind for kind, _ in stack.kube.reviews]
        assert kinds == ["TokenReview", "SubjectAccessReview"]
        token_review, access_review = (spec for _, spec in stack.kube.reviews)
        assert token_review == {"token": "team-a-token"}
        assert access_review["user"] == "alice" and access_review["uid"] == "u-alice"
        assert access_review["groups"] == ["team-a-devs", "system:authenticated"]
        assert access_review["resourceAttributes"] == {"group": "kubetune.io", "resource": "finetunejobs",
                                                       "verb": "create", "namespace": "team-a"}
        seen = {r.headers.get("Authorization") for r in kube_calls(stack)}
        assert seen == {"Bearer api-token"}  # the API's own identity, never the caller's token


async def test_review_answers_are_cached_briefly(make_stack: MakeStack) -> None:
    async with make_stack(auth="serviceaccount") as stack:
        for _ in range(3):
            assert (await stack.client.get(BASE)).status_code == 200
        assert [kind for kind, _ in stack.kube.reviews] == ["TokenReview", "SubjectAccessReview"]
        assert (await stack.client.post(BASE, json=JOB)).status_code == 201  # another verb: one more SAR
        assert [kind for kind, _ in stack.kube.reviews][2:] == ["SubjectAccessReview"]


def test_ttl_cache_expires_and_stays_bounded() -> None:
    now = [100.0]
    cache = TtlCache(ttl=10, size=2, clock=lambda: now[0])
    cache.put("a", 1)
    now[0] = 109.9
    assert cache.get("a") == 1
    now[0] = 110.0
    assert cache.get("a") is None
    cache.put("a", 1), cache.put("b", 2), cache.put("c", 3)
    assert cache.get("a") is None and cache.get("c") == 3
    assert TtlCache(ttl=0).get("x") is None


@pytest.mark.parametrize("broken", ["tokenreviews", "subjectaccessreviews", "kube-down"])
async def test_serviceaccount_mode_fails_closed(make_stack: MakeStack, broken: str) -> None:
    async with make_stack(auth="serviceaccount") as stack:
        if broken == "kube-down":
            stack.kube.tokens.pop("api-token")  # the API's own token is no longer accepted
        else:
            stack.kube.rules[:] = [r for r in stack.kube.rules if not r.resource.startswith(broken)]
        response = await stack.client.post(BASE, json=JOB)
        assert response.status_code == (403 if broken == "subjectaccessreviews" else 401), response.text
        assert "cannot" in response.json()["detail"]
        assert stored(stack) is None


@pytest.mark.parametrize("auth", ["serviceaccount", "passthrough"])
async def test_plan_preview_needs_an_authenticated_caller(make_stack: MakeStack, auth: str) -> None:
    async with make_stack(auth=auth) as stack:
        assert (await stack.client.post("/v1/plan", json=JOB)).status_code == 200
        assert (await stack.client.post("/v1/plan", json=JOB, headers=NONE)).status_code == 401
        refused = await stack.client.post("/v1/plan", json=JOB, headers={"Authorization": "Bearer stolen"})
        assert refused.status_code == 401


async def test_health_and_docs_stay_open(make_stack: MakeStack) -> None:
    async with make_stack(auth="serviceaccount") as stack, httpx.AsyncClient(base_url=stack.url) as anonymous:
        for path in ("/healthz", "/metrics", "/docs", "/openapi.json"):
            assert (await anonymous.get(path)).status_code == 200, path


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc.def") == "abc.def"
    assert bearer_token("bearer   abc  ") == "abc"
    for bad in (None, "", "Bearer", "Bearer  ", "Basic abc", "Bearer a b", "Bearer a\tb", "abc"):
        with pytest.raises(Exception) as info:
            bearer_token(bad)
        assert getattr(info.value, "status_code", None) == 401, bad
    assert Caller.from_user_info({"username": "u", "groups": ["g"]}).groups == ("g",)


# --- 2. TLS to the API server, verified ---------------------------------------------------------------

@pytest.mark.parametrize("auth", ["serviceaccount", "passthrough"])
async def test_both_modes_over_https_with_the_clusters_ca(make_stack: MakeStack, auth: str) -> None:
    async with make_stack(auth=auth, tls=True) as stack:
        assert stack.kube_url.startswith("https://")
        created = await stack.client.post(BASE, json=JOB)
        assert created.status_code == 201, created.text
        assert (await stack.client.get(f"{BASE}/support-bot")).status_code == 200


@pytest.mark.parametrize("auth", ["serviceaccount", "passthrough"])
async def test_an_api_server_with_another_ca_is_not_trusted(make_stack: MakeStack, tmp_path, auth: str) -> None:
    other = make_ca(tmp_path / "other", common_name="someone-else")
    async with make_stack(auth=auth, tls=True, ca_file=other.ca_file) as stack:
        response = await stack.client.post(BASE, json=JOB)
        assert response.status_code in (401, 403), response.text
        assert "CERTIFICATE_VERIFY_FAILED" in response.text or "certificate verify failed" in response.text
        assert stored(stack) is None


# --- 3. one slow or unauthenticated request cannot stall the API ---------------------------------------

class Blackhole:
    """A TCP server that accepts connections and never answers (an S3 endpoint that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def blackhole(monkeypatch: pytest.MonkeyPatch) -> Iterator[Blackhole]:
    hole = Blackhole()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hole.port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    yield hole
    hole.close()


S3_MODEL = {**JOB, "spec": {**JOB["spec"], "model": {"source": "s3://models/llama-3-8b/"}}}


async def test_an_unauthenticated_submit_never_reaches_s3(make_stack: MakeStack, blackhole: Blackhole) -> None:
    async with make_stack(auth="serviceaccount") as stack:
        for path in (BASE, "/v1/plan"):
            started = time.perf_counter()
            response = await stack.client.post(path, json=S3_MODEL, headers=NONE)
            assert response.status_code == 401
            assert time.perf_counter() - started < 2
        await asyncio.sleep(0.2)
        assert blackhole.accepted == []


async def test_a_hanging_model_source_neither_blocks_health_nor_piles_up(make_stack: MakeStack,
                                                                          blackhole: Blackhole) -> None:
    async with make_stack(auth="passthrough", plan_timeout=2.0, plan_concurrency=1) as stack:
        slow = asyncio.create_task(stack.client.post(BASE, json=S3_MODEL))
        for _ in range(100):
            if blackhole.accepted:
                break
            await asyncio.sleep(0.05)
        assert blackhole.accepted, "the planner never reached the S3 endpoint"
        started = time.perf_counter()
        assert (await stack.client.get("/healthz")).status_code == 200
        assert time.perf_counter() - started < 1.0  # at once, not after the hanging plan gives up (2 s)
        busy = await stack.client.post("/v1/plan", json=S3_MODEL)
        assert busy.status_code == 503 and busy.headers.get("Retry-After")
        response = await slow
        assert response.status_code == 504, response.text
        assert stored(stack) is None


# --- 4. request handling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True])
async def test_bodies_above_one_mib_are_413(stack: Stack, chunked: bool) -> None:
    big = {**JOB, "metadata": {"name": "support-bot", "annotations": {"x": "y" * (1 << 20)}}}
    import json

    data = json.dumps(big).encode()

    async def chunks() -> Any:
        for start in range(0, len(data), 65536):
            yield data[start:start + 65536]

    response = await stack.client.post(BASE, content=chunks() if chunked else data,
                                       headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"errors": ["body: larger than 1048576 bytes"]}
    assert stored(stack) is None
    assert (await stack.client.post(BASE, json=JOB)).status_code == 201  # the server is fine afterwards


@pytest.mark.parametrize("path", [
    f"{BASE}/support-bot%3FpropagationPolicy=Orphan",
    f"{BASE}/support-bot%2F..%2F..%2Fother",
    f"{BASE}/Support_Bot",
    f"{BASE}/{'a' * 254}",
    "/v1/namespaces/Team%20A/finetunejobs/support-bot",
    "/v1/namespaces/team-a%2Fx/finetunejobs/support-bot",
])
async def test_names_are_dns_1123_and_never_reach_the_url(stack: Stack, path: str) -> None:
    await stack.client.post(BASE, json=JOB)
    response = await stack.client.delete(path)
    assert response.status_code in (404, 422), response.text
    assert kube_calls(stack, "DELETE") == []
    assert stored(stack) is not None


def test_kubernetes_paths_are_quoted() -> None:
    assert job_path("team-a", "a?propagationPolicy=Orphan") == \
        "/apis/kubetune.io/v1alpha1/namespaces/team-a/finetunejobs/a%3FpropagationPolicy%3DOrphan"
    assert job_path("a/b") == "/apis/kubetune.io/v1alpha1/namespaces/a%2Fb/finetunejobs"


async def test_openapi_types_request_bodies_as_the_finetunejob_model(stack: Stack) -> None:
    schema = (await stack.client.get("/openapi.json")).json()
    for path in ("/v1/namespaces/{namespace}/finetunejobs", "/v1/plan"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/FineTuneJob"}
    job = schema["components"]["schemas"]["FineTuneJob"]
    assert job["required"] == ["apiVersion", "kind", "metadata", "spec"]
    assert job["properties"]["spec"] == {"$ref": "#/components/schemas/FineTuneJobSpec"}
    assert "microBatchSize" in schema["components"]["schemas"]["TrainingSpec"]["properties"]
    params = {p["name"]: p["schema"] for p in schema["paths"]["/v1/namespaces/{namespace}/finetunejobs/{name}"]
              ["get"]["parameters"]}
    assert params["namespace"]["maxLength"] == 63 and params["name"]["maxLength"] == 253


def test_the_api_sa_in_the_tests_is_the_charts() -> None:
    assert API_SA.username == "system:serviceaccount:kubetune:kubetune-api"
