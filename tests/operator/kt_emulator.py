"""kmock's KubernetesEmulator with the realism the operator tests need.

kmock 0.8 serves the Kubernetes HTTP API (discovery, errors, watch streams) but stores objects as plain
dicts with naive merging. This subclass keeps kmock's server, request parsing, discovery and error
format, and stores objects the way kube-apiserver does:

- uid, resourceVersion (one global counter), creationTimestamp, generation (bumped by spec changes),
  generateName;
- JSON merge patch (RFC 7386: null deletes) and PUT with optimistic concurrency (409 on a stale
  resourceVersion); the `status` subresource: the main endpoint ignores .status, /status only writes it;
- list (in pages with `limit` and `continue`, cut from one snapshot) and watch with labelSelector (=, ==, !=,
  in, notin, exists, !exists) and fieldSelector on metadata.name/namespace (and an Event's involvedObject.*,
  reason, type: `kubectl describe` lists by them); watches resume from a resourceVersion and end after timeoutSeconds;
- deletion with finalizers (deletionTimestamp) and ownerReference garbage collection (cascading);
- fault injection: `inject(method, plural, status, times)` answers the next matching requests with an
  API error (409 Conflict, 500, 503...) before touching any state.

Tests (the "kubelet" and "job controller") change objects in-process through `put_object`/`patch_object`,
which produce the same watch events as API requests.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import json
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import rendering  # the parsed request type (kmock's own)

ResKey = tuple[str, str, str]  # group, version, plural
CRD_FILE = Path(__file__).resolve().parents[2] / "manifests" / "crd.yaml"
ObjKey = tuple[ResKey, str | None, str]  # resource, namespace, name


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = True

    @property
    def key(self) -> ResKey:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

KINDS = [
    Kind("", "v1", "nodes", "Node", namespaced=False),
    Kind("", "v1", "pods", "Pod", namespaced=True),
    Kind("", "v1", "configmaps", "ConfigMap", namespaced=True, status_subresource=False),
    Kind("", "v1", "services", "Service", namespaced=True),
    Kind("", "v1", "secrets", "Secret", namespaced=True, status_subresource=False),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", namespaced=True),
    Kind("", "v1", "events", "Event", namespaced=True, status_subresource=False),
    Kind("", "v1", "namespaces", "Namespace", namespaced=False),
    Kind("batch", "v1", "jobs", "Job", namespaced=True),
    Kind("events.k8s.io", "v1", "events", "Event", namespaced=True, status_subresource=False),
    Kind("kubetune.io", "v1alpha1", "finetunejobs", "FineTuneJob", namespaced=True),
    Kind("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", namespaced=False, status_subresource=False),
    Kind("kopf.dev", "v1", "kopfpeerings", "KopfPeering", namespaced=True, status_subresource=False),
]


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_SELECTOR = re.compile(r"\s*([^,]+?\s+(?:notin|in)\s+\([^)]*\)|[^,]+)\s*(?:,|$)")


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in _SELECTOR.findall(selector or ""):
        term = term.strip()
        if not term:
            continue
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if (op == "in") != (labels.get(key) in values):
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _dotted(obj: Mapping[str, Any], path: str) -> str | None:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return None if value is None else str(value)


def field_selector_matches(selector: str, obj: Mapping[str, Any]) -> bool:
    meta = obj.get("metadata") or {}
    for term in (t.strip() for t in (selector or "").split(",")):
        if not term:
            continue
        negate = "!=" in term
        key, value = (s.strip() for s in re.split(r"!=|==|=", term, maxsplit=1))
        actual = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}.get(key)
        if key.startswith("involvedObject.") or key in ("reason", "type"):  # core/v1 Events' selectable fields,
            actual = _dotted(obj, key)  # what `kubectl describe` lists an object's Events by
        if (actual == value) == negate:
            return False
    return True


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    store: dict[ObjKey, dict[str, Any]] = attrs.field(factory=dict, init=False)
    log: dict[ResKey, list[tuple[int, dict[str, Any]]]] = attrs.field(factory=lambda: defaultdict(list), init=False)
    watchers: dict[ResKey, set[asyncio.Queue[Any]]] = attrs.field(factory=lambda: defaultdict(set), init=False)
    faults: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    counts: dict[tuple[str, str], int] = attrs.field(factory=lambda: defaultdict(int), init=False)
    # called with (METHOD, plural) as each request arrives, before it is answered: a test acts at an exact point
    observers: list[Callable[[str, str], None]] = attrs.field(factory=list, init=False)
    kinds: dict[ResKey, Kind] = attrs.field(factory=dict, init=False)
    revision: int = attrs.field(default=1000, init=False)
    created_at: dict[ObjKey, float] = attrs.field(factory=dict, init=False)  # perf_counter() at creation
    phase_at: dict[tuple[ObjKey, str], float] = attrs.field(factory=dict, init=False)  # first status.phase seen
    # Set by a kubelet (tests/cluster/kt_kubelet.py): deleting a running pod bound to a node only marks it
    # (deletionTimestamp, deletionGracePeriodSeconds); the kubelet stops its containers, then deletes it again.
    graceful_pods: bool = attrs.field(default=False, init=False)

    crds: dict[ResKey, dict[str, Any]] = attrs.field(factory=dict, init=False)  # CRD version entries (kubectl)
    pages: dict[str, tuple[str, list[dict[str, Any]]]] = attrs.field(factory=dict, init=False)  # continue -> rest
    reads: list[tuple[str, str, dict[str, str]]] = attrs.field(factory=list, init=False)  # (LIST|WATCH, plural, params)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind in KINDS:
            self.register(kind)
        if CRD_FILE.exists():
            self.register_crd(yaml.safe_load(CRD_FILE.read_text()))

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve a CustomResourceDefinition as kube-apiserver does: discovery with short names and categories,
        its schema under /openapi/v3, and Table responses from its additionalPrinterColumns."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            kind = Kind(spec["group"], version["name"], names["plural"], names["kind"],
                        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                        status_subresource="status" in (version.get("subresources") or {}))
            self.register(kind)
            info = self.resources[f"{kind.group}/{kind.version}/{kind.plural}"]
            info.shortnames = set(names.get("shortNames") or [])
            info.categories = set(names.get("categories") or [])
            info.singular = names.get("singular") or kind.kind.lower()
            self.crds[kind.key] = dict(version)

    def register(self, kind: Kind) -> None:
        self.kinds[kind.key] = kind
        self.resources[f"{kind.group}/{kind.version}/{kind.plural}" if kind.group else f"v1/{kind.plural}"] = (
            kmock.ResourceInfo(kind=kind.kind, singular=kind.kind.lower(), namespaced=kind.namespaced, verbs=VERBS,
                               subresources={"status"} if kind.status_subresource else set())
        )

    async def _serve_version(self, request: rendering.Request) -> Any:
        """kmock's APIResourceList as kube-apiserver writes it: the core group is `v1` (not `/v1`), and
        subresources carry no short names or categories."""
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and str(payload.get("groupVersion", "")).startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]
        for entry in payload.get("resources", []) if isinstance(payload, dict) else []:
            if "/" in entry["name"]:
                entry["shortNames"], entry["categories"] = [], []
        return payload

    def _validate_fields(self, kind: Kind, body: dict[str, Any], mode: str) -> None:
        """`?fieldValidation=Strict|Warn|Ignore` (what kubectl sends) on a custom resource: unknown fields are a
        400 under Strict, else pruned, as the structural schema prunes them. Requests without the parameter
        (the operator's, the tests') are stored as sent."""
        schema = (self.crds[kind.key].get("schema") or {}).get("openAPIV3Schema") or {}
        unknown = prune_unknown(body, schema)
        if unknown and mode == "Strict":
            raise ApiError(400, "BadRequest", "strict decoding error: " + ", ".join(
                f'unknown field "{path}"' for path in unknown))

    # --- test-side helpers ----------------------------------------------------------------------------

    def inject(self, method: str, plural: str, status: int, times: int = 1, subresource: str | None = None) -> None:
        """Answer the next `times` matching requests with HTTP `status` (before any state change)."""
        self.faults.append({"method": method.upper(), "plural": plural, "status": status, "times": times,
                            "subresource": subresource})

    def kind_of(self, plural: str, group: str | None = None) -> Kind:
        for kind in self.kinds.values():
            if kind.plural == plural and (group is None or kind.group == group):
                return kind
        raise KeyError(plural)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        """`get(plural, namespace, name)` reads a stored object (as `read`); `get("/path")` is kmock's HTTP GET."""
        if args and isinstance(args[0], str) and not args[0].startswith(("/", "http:", "https:")):
            return self.read(*args, **kwargs)
        return super().get(*args, **kwargs)

    def read(self, plural: str, namespace: str | None, name: str,
             group: str | None = None) -> dict[str, Any] | None:
        kind = self.kind_of(plural, group)
        obj = self.store.get((kind.key, namespace if kind.namespaced else None, name))
        return copy.deepcopy(obj) if obj else None

    def items(self, plural: str, namespace: str | None = None, selector: str = "",
              group: str | None = None) -> list[dict[str, Any]]:
        kind = self.kind_of(plural, group)
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.store.items(), key=lambda kv: (kv[0][1] or "",
                                                                                                 kv[0][2]))
                if k == kind.key and (namespace is None or ns == namespace)
                and selector_matches(selector, (o.get("metadata") or {}).get("labels") or {})]

    async def put_object(self, plural: str, obj: dict[str, Any], group: str | None = None) -> dict[str, Any]:
        """Create (as the test or a controller would); returns a copy of the stored object."""
        created = self._create(self.kind_of(plural, group), obj.get("metadata", {}).get("namespace"),
                               copy.deepcopy(obj))
        return copy.deepcopy(created)

    async def patch_object(self, plural: str, namespace: str | None, name: str, patch: dict[str, Any],
                           group: str | None = None) -> dict[str, Any]:
        """Merge-patch anything, status included (kubelet / job-controller writes)."""
        kind = self.kind_of(plural, group)
        return copy.deepcopy(self._patch(kind, namespace if kind.namespaced else None, name, patch, subresource="*"))

    async def remove_object(self, plural: str, namespace: str | None, name: str, group: str | None = None,
                            grace_seconds: int | None = None) -> None:
        kind = self.kind_of(plural, group)
        self._delete(kind, namespace if kind.namespaced else None, name, grace_seconds)

    def request_count(self, method: str | None = None, plural: str | None = None) -> int:
        return sum(n for (m, p), n in self.counts.items()
                   if (method is None or m == method.upper()) and (plural is None or p == plural))

    # --- the API ---------------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path.startswith("/openapi/v3") and raw_request.method == "GET":
            document = openapi_v3(self.crds, self.kinds, raw_request.path.removeprefix("/openapi/v3").strip("/"))
            if document is None:
                return self._json({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                   "reason": "NotFound", "message": f"{raw_request.path} not found"}, 404)
            return self._json(document)
        # kmock 0.8's path parser takes /api/v1/namespaces for the prefix of a namespaced path and fails;
        # kopf lists and watches namespaces when it serves a set of namespaces.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces" and raw_request.method == "GET":
            await raw_request.read()
            params = dict(raw_request.query)
            request = rendering.Request(
                method="GET", url=raw_request.url, params=params, headers=dict(raw_request.headers),
                action=kmock.action.WATCH if params.get("watch") == "true" else kmock.action.LIST,
                resource=kmock.resource("", "v1", "namespaces"), raw_request=raw_request,
            )
            return await self._handle(request)
        return await super().__call__(raw_request)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        key = (str(resource.group), str(resource.version), str(resource.plural)) if resource is not None else None
        if key is None or key not in self.kinds:
            return await super()._handle(request)  # discovery, version, unknown paths: kmock's own answers
        kind = self.kinds[key]
        method = str(request.method.value).upper()
        self.counts[(method, kind.plural)] += 1
        for observe in self.observers:
            observe(method, kind.plural)
        try:
            for fault in self.faults:
                if fault["times"] > 0 and fault["method"] == method and fault["plural"] == kind.plural and \
                        fault["subresource"] in (None, request.subresource):
                    fault["times"] -= 1
                    raise ApiError(fault["status"], {409: "Conflict", 500: "InternalError", 503: "ServiceUnavailable",
                                                     429: "TooManyRequests"}.get(fault["status"], "Error"),
                                   f"injected fault: {method} {kind.plural} -> {fault['status']}")
            namespace = request.namespace if kind.namespaced else None
            params = request.params
            if request.action == kmock.action.WATCH:
                self.reads.append(("WATCH", kind.plural, dict(params)))
                return await self._watch(request, kind, namespace)
            as_table = "as=Table" in request.headers.get("Accept", "")
            if method in ("POST", "PUT", "PATCH") and params.get("fieldValidation") and kind.key in self.crds \
                    and isinstance(request.data, dict):
                self._validate_fields(kind, request.data, params["fieldValidation"])
            if method == "GET" and request.name is None:
                self.reads.append(("LIST", kind.plural, dict(params)))
                listed = self._list(kind, namespace, params)
                return self._json(table(listed["items"], self.crds.get(kind.key), listed["metadata"]) if as_table
                                  else listed)
            if method == "GET" and request.name:
                found = self._fetch(kind, namespace, request.name)
                return self._json(table([found], self.crds.get(kind.key), {}) if as_table else found)
            if method == "POST" and request.name is None:
                return self._json(self._create(kind, namespace, request.data or {}), 201)
            if method == "PATCH" and request.name:
                content_type = request.headers.get("Content-Type", "")
                if "json-patch" in content_type:
                    return self._json(self._json_patch(kind, namespace, request.name, request.data or [],
                                                       subresource=request.subresource))
                if "strategic-merge-patch" in content_type or "apply-patch" in content_type:
                    raise ApiError(415, "UnsupportedMediaType", "this emulator supports merge and JSON patches")
                return self._json(self._patch(kind, namespace, request.name, request.data or {},
                                              subresource=request.subresource))
            if method == "PUT" and request.name:
                return self._json(self._replace(kind, namespace, request.name, request.data or {},
                                                subresource=request.subresource))
            if method == "DELETE" and request.name:
                body = request.data if isinstance(request.data, dict) else {}
                grace = params.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
                return self._json(self._delete(kind, namespace, request.name,
                                               None if grace is None else int(grace)))
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        except ApiError as exc:
            return self._json({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                               "code": exc.code, "reason": exc.reason, "message": exc.message}, exc.code)

    @staticmethod
    def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(data, status=status)

    def _bump(self) -> str:
        self.revision += 1
        return str(self.revision)

    def _emit(self, kind: Kind, etype: str, obj: dict[str, Any]) -> None:
        phase = (obj.get("status") or {}).get("phase") if isinstance(obj.get("status"), dict) else None
        if phase:
            meta = obj["metadata"]
            self.phase_at.setdefault(((kind.key, meta.get("namespace"), meta["name"]), phase), time.perf_counter())
        event = {"type": etype, "object": obj}  # stored objects are replaced on every write, never changed in place
        self.log[kind.key].append((int(obj["metadata"]["resourceVersion"]), event))
        for queue in list(self.watchers[kind.key]):
            queue.put_nowait(event)

    def _fetch(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get((kind.key, namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
        return obj

    def _list(self, kind: Kind, namespace: str | None, params: Mapping[str, str]) -> dict[str, Any]:
        """A list, or one page of it (`limit`, `continue`): pages are cut from one snapshot taken by the first
        request, in key order (namespace, name), all at that snapshot's resourceVersion, as etcd serves them;
        an unknown or used-up continue token is 410 Expired."""
        token = params.get("continue") or ""
        if token:
            page = self.pages.pop(token, None)
            if page is None:
                raise ApiError(410, "Expired", "the provided continue parameter is too old to display a consistent "
                                               "list result; start a new list without it")
            revision, items = page
        else:
            revision = str(self.revision)
            items = [o for (k, ns, name), o in sorted(self.store.items(), key=lambda kv: (kv[0][1] or "", kv[0][2]))
                     if k == kind.key and (namespace is None or ns == namespace)
                     and selector_matches(params.get("labelSelector", ""), o["metadata"].get("labels") or {})
                     and field_selector_matches(params.get("fieldSelector", ""), o)]
        meta: dict[str, Any] = {"resourceVersion": revision}
        limit = int(params.get("limit") or 0)
        if 0 < limit < len(items):
            items, rest = items[:limit], items[limit:]
            meta["continue"] = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            meta["remainingItemCount"] = len(rest)
            self.pages[meta["continue"]] = (revision, rest)  # stored objects are replaced on write, never mutated
        return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List", "metadata": meta, "items": items}

    def _create(self, kind: Kind, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """Store `body` (the emulator's own from here: a parsed request, or put_object's copy)."""
        obj = dict(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        ns = (namespace or meta.get("namespace") or "default") if kind.namespaced else None
        key = (kind.key, ns, meta["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{kind.plural} "{meta["name"]}" already exists')
        if ns:
            meta["namespace"] = ns
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._bump(), creationTimestamp=_now(), generation=1)
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        if kind.plural == "secrets" and "stringData" in obj:  # write-only: the API server stores it base64'd
            obj["data"] = {**(obj.get("data") or {}), **{k: base64.b64encode(str(v).encode()).decode()
                                                          for k, v in (obj.pop("stringData") or {}).items()}}
        self.store[key] = obj
        self.created_at[key] = time.perf_counter()
        self._emit(kind, "ADDED", obj)
        return obj

    def _apply(self, kind: Kind, key: ObjKey, new: dict[str, Any]) -> dict[str, Any]:
        old = self.store[key]
        new["metadata"] = dict(new["metadata"])  # a merge patch without metadata shares old's: leave old as it was
        spec_of = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        new["metadata"]["uid"] = old["metadata"]["uid"]
        new["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        new["metadata"]["generation"] = old["metadata"].get("generation", 1) + (spec_of(new) != spec_of(old))
        if new == old:
            return old  # a no-op write changes nothing, not even the resourceVersion
        new["metadata"]["resourceVersion"] = self._bump()
        self.store[key] = new
        meta = new["metadata"]
        stopping = kind.plural == "pods" and self.graceful_pods and (new.get("spec") or {}).get("nodeName") and \
            (new.get("status") or {}).get("phase") not in ("Succeeded", "Failed")  # its kubelet is still at it
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not stopping:
            self._delete(kind, key[1], key[2])
        else:
            self._emit(kind, "MODIFIED", new)
        return new

    def _patch(self, kind: Kind, namespace: str | None, name: str, patch: dict[str, Any],
               subresource: str | None) -> dict[str, Any]:
        key = (kind.key, namespace, name)
        old = self._fetch(kind, namespace, name)
        want_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'the object "{name}" has been modified; please apply your changes '
                                            "to the latest version and try again")
        if subresource == "status":
            patch = {"status": patch.get("status")} if "status" in patch else {}
        elif subresource is None and kind.status_subresource:
            patch = {k: v for k, v in patch.items() if k != "status"}
        new = merge_patch(old, patch)
        new.setdefault("metadata", {})
        return self._apply(kind, key, new)

    def _json_patch(self, kind: Kind, namespace: str | None, name: str, ops: list[dict[str, Any]],
                    subresource: str | None) -> dict[str, Any]:
        """RFC 6902 (add, remove, replace, test); a failed test is 422, as kube-apiserver answers."""
        old = self._fetch(kind, namespace, name)
        new = copy.deepcopy(old)
        for op in ops:
            path = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")] \
                if op["path"] != "/" else []
            is_status = bool(path) and path[0] == "status"
            if op["op"] != "test" and kind.status_subresource and (subresource == "status") != is_status:
                continue  # the main endpoint ignores .status; /status ignores everything else
            parent: Any = new
            for part in path[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
            last = path[-1] if path else ""
            if op["op"] == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
                if current != op.get("value"):
                    raise ApiError(422, "Invalid", f"the test operation on {op['path']} failed")
            elif op["op"] in ("add", "replace"):
                if isinstance(parent, list):
                    if last == "-":
                        parent.append(op["value"])
                    elif op["op"] == "add":
                        parent.insert(int(last), op["value"])
                    else:
                        parent[int(last)] = op["value"]
                else:
                    parent[last] = op["value"]
            elif op["op"] == "remove":
                if isinstance(parent, list):
                    parent.pop(int(last))
                else:
                    parent.pop(last, None)
            else:
                raise ApiError(422, "Invalid", f"unsupported JSON patch op {op['op']!r}")
        return self._apply(kind, (kind.key, namespace, name), new)

    def _replace(self, kind: Kind, namespace: str | None, name: str, body: dict[str, Any],
                 subresource: str | None) -> dict[str, Any]:
        old = self._fetch(kind, namespace, name)
        want_rv = (body.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'the object "{name}" has been modified')
        new = copy.deepcopy(body)
        if subresource == "status":
            new = {**copy.deepcopy(old), "status": new.get("status")}
        elif kind.status_subresource:
            new["status"] = copy.deepcopy(old.get("status"))
        return self._apply(kind, (kind.key, namespace, name), new)

    def _delete(self, kind: Kind, namespace: str | None, name: str,
                grace_seconds: int | None = None) -> dict[str, Any]:
        key = (kind.key, namespace, name)
        obj = self._fetch(kind, namespace, name)
        graceful = kind.plural == "pods" and self.graceful_pods and (obj.get("spec") or {}).get("nodeName") and \
            (obj.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and grace_seconds != 0
        if (obj["metadata"].get("finalizers") or graceful) and not obj["metadata"].get("deletionTimestamp"):
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = _now()
            if kind.plural == "pods":
                default = (obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
                new["metadata"]["deletionGracePeriodSeconds"] = default if grace_seconds is None else grace_seconds
            new["metadata"]["resourceVersion"] = self._bump()
            self.store[key] = new  # not through _apply: a marked pod without finalizers stays until its kubelet
            self._emit(kind, "MODIFIED", new)  # has stopped it
            return new
        if obj["metadata"].get("finalizers"):
            return obj
        del self.store[key]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._bump()
        self._emit(kind, "DELETED", gone)
        self._collect_garbage(obj["metadata"]["uid"])
        return gone

    def _collect_garbage(self, owner_uid: str) -> None:
        """Background cascading deletion: whatever lists the deleted object as an owner goes too."""
        for (res, ns, name), obj in list(self.store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == owner_uid for r in refs) and (res, ns, name) in self.store:
                self._delete(self.kinds[res], ns, name)

    async def _watch(self, request: rendering.Request, kind: Kind, namespace: str | None) -> aiohttp.web.StreamResponse:
        params = request.params
        labels, fields = params.get("labelSelector", ""), params.get("fieldSelector", "")
        since = int(params.get("resourceVersion") or 0)
        timeout = float(params.get("timeoutSeconds") or 3600)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        backlog: Iterable[dict[str, Any]]
        if since:
            backlog = [event for rv, event in self.log[kind.key] if rv > since]
        else:
            backlog = [{"type": "ADDED", "object": copy.deepcopy(o)} for (k, _, _), o in self.store.items()
                       if k == kind.key]
        self.watchers[kind.key].add(queue)
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)

        def wanted(event: Mapping[str, Any]) -> bool:
            obj = event["object"]
            meta = obj.get("metadata") or {}
            return (namespace is None or meta.get("namespace") == namespace) and \
                (request.name is None or meta.get("name") == request.name) and \
                selector_matches(labels, meta.get("labels") or {}) and field_selector_matches(fields, obj)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for event in backlog:
                if wanted(event):
                    await response.write(json.dumps(event).encode() + b"\n")
            while (left := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=left)
                except TimeoutError:
                    break
                if event["type"] == "ERROR":
                    await response.write(json.dumps(event).encode() + b"\n")
                    break
                if wanted(event):
                    await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError, RuntimeError):
            pass
        finally:
            self.watchers[kind.key].discard(queue)
        return response

    async def close_watches(self) -> None:
        """Drop every open watch stream (a disconnect, as when an API server restarts)."""
        for queues in self.watchers.values():
            for queue in list(queues):
                queue.put_nowait({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                              "message": "watch closed by the emulator"}})


# --- what kubectl needs: OpenAPI v3 from CRD schemas, Table responses from printer columns ---------------

def openapi_v3(crds: Mapping[ResKey, Mapping[str, Any]], kinds: Mapping[ResKey, Kind],
               path: str) -> dict[str, Any] | None:
    """`/openapi/v3` (the index of group-versions) or `/openapi/v3/apis/<group>/<version>` (their schemas)."""
    served = {f"apis/{g}/{v}": [(kinds[(g, v, p)], crd) for (g2, v2, p), crd in crds.items() if (g2, v2) == (g, v)]
              for (g, v, _) in crds}
    if not path:
        return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={abs(hash(gv)):X}"} for gv in served}}
    if path not in served:
        return None
    schemas: dict[str, Any] = {}
    for kind, crd in served[path]:
        reversed_group = ".".join(reversed(kind.group.split(".")))
        schema = copy.deepcopy((crd.get("schema") or {}).get("openAPIV3Schema") or {"type": "object"})
        schema.setdefault("properties", {})["metadata"] = {
            "allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}]}
        schema["x-kubernetes-group-version-kind"] = [{"group": kind.group, "version": kind.version,
                                                      "kind": kind.kind}]
        schemas[f"{reversed_group}.{kind.version}.{kind.kind}"] = schema
        schemas[f"{reversed_group}.{kind.version}.{kind.kind}List"] = {
            "type": "object", "required": ["items"],
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                           "metadata": {"type": "object"},
                           "items": {"type": "array", "items": {
                               "$ref": f"#/components/schemas/{reversed_group}.{kind.version}.{kind.kind}"}}},
            "x-kubernetes-group-version-kind": [{"group": kind.group, "version": kind.version,
                                                 "kind": f"{kind.kind}List"}]}
    schemas["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"] = {
        "type": "object", "x-kubernetes-preserve-unknown-fields": True,
        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "generateName": {"type": "string"},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    paths: dict[str, Any] = {}
    for kind, _ in served[path]:
        gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
        scope = "/namespaces/{namespace}" if kind.namespaced else ""
        params = [{"name": n, "in": "query", "schema": {"type": "string"}} for n in ("dryRun", "fieldManager",
                                                                                      "fieldValidation")]
        item = f"/apis/{kind.group}/{kind.version}{scope}/{kind.plural}/{{name}}"
        paths[item] = {verb: {"x-kubernetes-action": verb, "x-kubernetes-group-version-kind": gvk,
                              "parameters": params if verb in ("patch", "put") else [],
                              "responses": {"200": {"description": "OK"}}}
                       for verb in ("get", "put", "patch", "delete")}
        paths[f"/apis/{kind.group}/{kind.version}{scope}/{kind.plural}"] = {"post": {
            "x-kubernetes-action": "post", "x-kubernetes-group-version-kind": gvk, "parameters": params,
            "responses": {"201": {"description": "Created"}}}}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths,
            "components": {"schemas": schemas}}


def prune_unknown(obj: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """Remove (in place) the fields `schema` does not declare; returns their paths (`spec.foo`)."""
    if not isinstance(obj, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        if isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
            return [u for i, v in enumerate(obj) for u in prune_unknown(v, schema["items"], f"{path}[{i}]")]
        return []
    props = schema.get("properties")
    extra = schema.get("additionalProperties")
    unknown: list[str] = []
    for key in list(obj):
        here = f"{path}.{key}" if path else key
        if path == "" and key in ("apiVersion", "kind", "metadata"):
            continue
        if props is not None and key in props:
            unknown += prune_unknown(obj[key], props[key], here)
        elif isinstance(extra, Mapping):
            unknown += prune_unknown(obj[key], extra, here)
        elif props is not None or extra is False:
            unknown.append(here)
            del obj[key]
    return unknown


_STEP = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]")


def json_path(obj: Any, path: str) -> Any:
    """The subset of JSONPath printer columns use: `.a.b`, `[0]`, `[?(@.type=="Ready")]`."""
    values = [obj]
    position = 0
    path = path.strip().removeprefix("{").removesuffix("}").strip()
    while position < len(path):
        m = _STEP.match(path, position)
        if m is None:
            raise ValueError(f"jsonPath {path!r}: unsupported at {path[position:]!r}")
        position = m.end()
        nxt: list[Any] = []
        for value in values:
            if m.group(1) is not None and isinstance(value, Mapping) and m.group(1) in value:
                nxt.append(value[m.group(1)])
            elif m.group(2) is not None and isinstance(value, list) and int(m.group(2)) < len(value):
                nxt.append(value[int(m.group(2))])
            elif m.group(3) is not None and isinstance(value, list):
                nxt += [v for v in value
                        if isinstance(v, Mapping) and str(json_path(v, "." + m.group(3))) == m.group(4)]
        values = nxt
    return values[0] if len(values) == 1 else (values or None)


def _age(timestamp: str) -> str:
    try:
        then = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return "<invalid>"
    seconds = max(0, int((dt.datetime.now(dt.UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "d" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(items: Iterable[Mapping[str, Any]], crd: Mapping[str, Any] | None,
          list_meta: Mapping[str, Any]) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table, as kube-apiserver converts a CRD (Name + additionalPrinterColumns; dates as ages)
    or, without columns, as its default convertor does (Name, Created At)."""
    columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                "description": "Name must be unique within a namespace."}]
    printer = list((crd or {}).get("additionalPrinterColumns") or [])
    if crd is None or not printer:
        printer = [{"name": "Created At", "type": "date", "jsonPath": ".metadata.creationTimestamp",
                    "description": "CreationTimestamp is a timestamp representing the server time when this object "
                                   "was created."}]
    for column in printer:
        columns.append({"name": column["name"], "type": column.get("type", "string"),
                        "format": column.get("format", ""), "description": column.get("description", ""),
                        "priority": column.get("priority", 0)})
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in printer:
            value = json_path(obj, column["jsonPath"])
            if column.get("type") == "date" and isinstance(value, str):
                value = _age(value)
            cells.append(value)
        meta = obj["metadata"]
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                "metadata": meta}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": list_meta.get("resourceVersion", "")}, "columnDefinitions": columns,
            "rows": rows}
