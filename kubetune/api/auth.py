"""Who is calling, and may they do this? Kubernetes answers; the API only asks and remembers briefly.

Two modes (KUBETUNE_API_AUTH):

- passthrough (default): the caller's bearer token goes to Kubernetes on every call, so Kubernetes RBAC
  decides. Before any work (planning reads S3 and files) the token is checked: a
  SelfSubjectAccessReview (verb, finetunejobs, namespace) made with the caller's own token, or, for
  `/v1/plan`, a SelfSubjectReview (`kubectl auth whoami`). An unknown token is 401, a refusal 403.
- serviceaccount: the API acts on the cluster with its own identity, so it must check the caller
  itself: a TokenReview authenticates the caller's token, a SubjectAccessReview (the caller's user,
  groups and extra; verb, finetunejobs, namespace) authorizes the action. Both are made with the API's
  own token.

Fail closed: a review that errors, times out or answers something unreadable refuses the request (401
for authentication, 403 for authorization); nothing is ever allowed by default. Answers (allowed or
refused, never errors) are cached for `review_ttl` seconds under a hash of the token.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import HTTPException

from kubetune.spec import API_GROUP, PLURAL

BEARER_HELP = "send your Kubernetes token as 'Authorization: Bearer <token>'"


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; a missing, other-scheme or blank one is 401."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() or not c.isprintable() for c in token):
        raise HTTPException(401, BEARER_HELP, headers={"WWW-Authenticate": "Bearer"})
    return token


@dataclass(frozen=True)
class Caller:
    """An authenticated caller, as Kubernetes names them."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_user_info(cls, info: Any) -> Caller:
        if not isinstance(info, dict) or not isinstance(info.get("username"), str) or not info["username"]:
            raise ValueError("no username in the review's answer")
        extra = info.get("extra") or {}
        return cls(username=info["username"], uid=str(info.get("uid") or ""),
                   groups=tuple(str(g) for g in info.get("groups") or ()),
                   extra={str(k): [str(x) for x in v] for k, v in extra.items()} if isinstance(extra, dict) else {})


class TtlCache:
    """A small bounded cache whose entries expire; the clock is injectable for tests."""

    def __init__(self, ttl: float, size: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.size, self.clock = ttl, size, clock
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> Any | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0] <= self.clock():
            del self._items[key]
            return None
        return hit[1]

    def put(self, key: Any, value: Any) -> None:
        if self.ttl <= 0:
            return
        self._items[key] = (self.clock() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def resource_attributes(verb: str, namespace: str | None, name: str | None) -> dict[str, str]:
    attributes = {"group": API_GROUP, "resource": PLURAL, "verb": verb}
    if namespace:
        attributes["namespace"] = namespace
    if name:
        attributes["name"] = name
    return attributes


class OwnToken:
    """The API pod's own (projected, rotating) service-account token, re-read at most once a minute."""

    def __init__(self, path: str | None, refresh: float = 60.0) -> None:
        self.path, self.refresh = path, refresh
        self._value, self._read_at = "", -1e9

    def get(self) -> str:
        if self.path is None:
            raise HTTPException(503, "serviceaccount mode: the API has no token of its own (KUBETUNE_KUBE_TOKEN_FILE)")
        now = time.monotonic()
        if not self._value or now - self._read_at > self.refresh:
            try:
                self._value = Path(self.path).read_text().strip()
            except OSError as exc:
                raise HTTPException(503, f"cannot read the API's own token {self.path}: {exc.strerror}") from None
            self._read_at = now
        return self._value


class Gate:
    """authenticate + authorize, by reviews against the Kubernetes API (see the module docstring)."""

    def __init__(self, client: httpx.AsyncClient, mode: str, own_token: OwnToken, ttl: float) -> None:
        self.client, self.mode, self.own_token = client, mode, own_token
        self.cache = TtlCache(ttl)

    async def _review(self, path: str, kind: str, spec: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
        """POST one review; (HTTP status, status object). Raises ValueError on anything unreadable."""
        body = {"apiVersion": path.split("/")[2] + "/v1", "kind": kind, "spec": spec}
        response = await self.client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
        if response.status_code in (401, 403):
            return response.status_code, {}
        if response.status_code >= 300:
            raise ValueError(f"{kind}: HTTP {response.status_code}")
        answer = response.json()
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, dict):
            raise ValueError(f"{kind}: the answer has no status")
        return response.status_code, status

    async def authenticate(self, token: str) -> Caller:
        key = ("authn", _digest(token))
        cached = self.cache.get(key)
        if cached is not None:
            if isinstance(cached, Caller):
                return cached
            raise HTTPException(401, cached, headers={"WWW-Authenticate": "Bearer"})
        try:
            if self.mode == "serviceaccount":
                code, status = await self._review("/apis/authentication.k8s.io/v1/tokenreviews", "TokenReview",
                                                  {"token": token}, self.own_token.get())
                if code in (401, 403):
                    raise ValueError(f"the API's own identity may not create TokenReviews (HTTP {code})")
                ok, info = status.get("authenticated") is True, status.get("user")
            else:
                code, status = await self._review("/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                                  "SelfSubjectReview", {}, token)
                ok, info = code not in (401, 403), status.get("userInfo")
            caller = Caller.from_user_info(info) if ok else None
        except (httpx.HTTPError, ValueError) as exc:
            raise HTTPException(401, f"cannot verify your token: {exc}",
                                headers={"WWW-Authenticate": "Bearer"}) from None
        if caller is None:
            message = "your token was not accepted by Kubernetes (expired, revoked or unknown)"
            self.cache.put(key, message)
            raise HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})
        self.cache.put(key, caller)
        return caller

    async def authorize(self, token: str, verb: str, namespace: str, name: str | None = None) -> None:
        """Return when the token's owner may `verb` finetunejobs in namespace; 401 or 403 otherwise."""
        attributes = resource_attributes(verb, namespace, name)
        key = ("authz", _digest(token), verb, namespace, name)
        cached = self.cache.get(key)
        if cached is None:
            cached = await self._authorize(token, attributes)
            self.cache.put(key, cached)
        if cached != "allowed":
            raise HTTPException(403, cached)

    async def _authorize(self, token: str, attributes: dict[str, str]) -> str:
        what = f"{attributes['verb']} {PLURAL}.{API_GROUP} in namespace {attributes['namespace']!r}"
        try:
            if self.mode == "serviceaccount":
                caller = await self.authenticate(token)
                spec: dict[str, Any] = {"resourceAttributes": attributes, "user": caller.username,
                                        "groups": list(caller.groups)}
                if caller.uid:
                    spec["uid"] = caller.uid
                if caller.extra:
                    spec["extra"] = caller.extra
                code, status = await self._review("/apis/authorization.k8s.io/v1/subjectaccessreviews",
                                                  "SubjectAccessReview", spec, self.own_token.get())
                if code in (401, 403):
                    raise ValueError(f"the API's own identity may not create SubjectAccessReviews (HTTP {code})")
                who = caller.username
            else:
                code, status = await self._review("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                                                  "SelfSubjectAccessReview", {"resourceAttributes": attributes}, token)
                if code == 401:
                    raise HTTPException(401, "your token was not accepted by Kubernetes (expired, revoked or unknown)",
                                        headers={"WWW-Authenticate": "Bearer"})
                who = "you"
        except (httpx.HTTPError, ValueError) as exc:
            raise HTTPException(403, f"cannot check whether you may {what}: {exc}") from None
        if code == 403 or status.get("allowed") is not True or status.get("denied") is True:
            reason = status.get("reason") or "no RBAC rule allows it"
            return f"{who} may not {what}: {reason}"
        return "allowed"
