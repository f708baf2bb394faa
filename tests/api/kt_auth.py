"""The operator suite's Kubernetes emulator with what a real API server does about identity, and TLS.

kube-apiserver, with anonymous requests off (as managed clusters run it):
- authenticates every request by its bearer token (unknown or missing: 401 Unauthorized, a Status);
- authorizes every resource request by RBAC rules (none matching: 403 Forbidden, with the sentence
  kube-apiserver writes: `finetunejobs.kubetune.io is forbidden: User "x" cannot list resource ...`);
- serves the review APIs: TokenReview and SubjectAccessReview (which the requester needs RBAC to create),
  SelfSubjectReview and SelfSubjectAccessReview (every authenticated user may, as system:basic-user grants).

Rules are (username or group, verb, group/resource, namespace or '*'). Served over HTTPS with a test CA
(made here with `cryptography`), the way kubernetes.default.svc presents its serving certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.test_utils
import aiohttp.web
import attrs
import kmock
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kmock._internal import rendering
from kt_emulator import KubeEmulator


@dataclass(frozen=True)
class User:
    username: str
    groups: tuple[str, ...] = ("system:authenticated",)
    uid: str = ""


@dataclass(frozen=True)
class Rule:
    subject: str  # a username or a group
    verb: str  # get, list, create, patch, delete, ... or '*'
    resource: str  # 'finetunejobs.kubetune.io', 'tokenreviews.authentication.k8s.io', ... or '*'
    namespace: str = "*"  # '*' for a ClusterRole binding


_VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
_REVIEWS = {
    "/apis/authentication.k8s.io/v1/tokenreviews": "tokenreviews.authentication.k8s.io",
    "/apis/authorization.k8s.io/v1/subjectaccessreviews": "subjectaccessreviews.authorization.k8s.io",
    "/apis/authentication.k8s.io/v1/selfsubjectreviews": "",
    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews": "",
}


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                                      "code": code, "reason": reason, "message": message}, status=code)


@attrs.define(kw_only=True)
class AuthEmulator(KubeEmulator):
    tokens: dict[str, User] = attrs.field(factory=dict)
    rules: list[Rule] = attrs.field(factory=list)
    reviews: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list, init=False)  # (kind, spec) as received
    used: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)  # (user, verb, resource) allowed
    denied: list[tuple[str, str, str, str | None]] = attrs.field(factory=list, init=False)  # (user, verb, res, ns)

    def allows(self, user: User, verb: str, resource: str, namespace: str | None) -> bool:
        subjects = {user.username, *user.groups}
        return any(r.subject in subjects and r.verb in (verb, "*") and r.resource in (resource, "*")
                   and r.namespace in ("*", namespace) for r in self.rules)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        header = request.headers.get("Authorization") or ""
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        user = self.tokens.get(token) if token else None
        if user is None:
            return _status(401, "Unauthorized", "Unauthorized")
        path = request.url.path.rstrip("/")
        if path in _REVIEWS:
            return self._review(path, user, request.data if isinstance(request.data, dict) else {})
        resource = request.resource
        if resource is not None and resource.plural and request.action is not None:  # discovery: open to all
            plural = str(resource.plural)
            full = f"{plural}.{resource.group}" if resource.group else plural
            method = str(request.method.value).upper()
            verb = {kmock.action.WATCH: "watch", kmock.action.LIST: "list"}.get(request.action) or _VERBS.get(method)
            if request.subresource:
                full = f"{plural}/{request.subresource}.{resource.group}" if resource.group else \
                    f"{plural}/{request.subresource}"
            namespace = request.namespace
            if verb and self.allows(user, verb, full, namespace):
                self.used.add((user.username, verb, full))
            elif verb:
                self.denied.append((user.username, verb, full, namespace))
                where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
                return _status(403, "Forbidden", f'{full} is forbidden: User "{user.username}" cannot {verb} '
                                                 f'resource "{plural}" in API group "{resource.group}"{where}')
        return await super()._handle(request)

    def _review(self, path: str, requester: User, body: dict[str, Any]) -> aiohttp.web.Response:
        needed = _REVIEWS[path]
        kind = body.get("kind", "")
        spec = body.get("spec") if isinstance(body.get("spec"), dict) else {}
        self.reviews.append((kind, spec))
        if needed and not self.allows(requester, "create", needed, None):
            plural, _, group = needed.partition(".")
            return _status(403, "Forbidden", f'{needed} is forbidden: User "{requester.username}" cannot create '
                                             f'resource "{plural}" in API group "{group}" at the cluster scope')
        if path.endswith("/tokenreviews"):
            found = self.tokens.get(str(spec.get("token") or ""))
            status: dict[str, Any] = {"authenticated": found is not None}
            if found:
                status["user"] = {"username": found.username, "uid": found.uid, "groups": list(found.groups)}
        elif path.endswith("/selfsubjectreviews"):
            status = {"userInfo": {"username": requester.username, "uid": requester.uid,
                                   "groups": list(requester.groups)}}
        else:
            attributes = spec.get("resourceAttributes") or {}
            if path.endswith("/subjectaccessreviews") and "self" not in path:
                subject = User(str(spec.get("user") or ""), tuple(spec.get("groups") or ()))
            else:
                subject = requester
            resource = f"{attributes.get('resource')}.{attributes.get('group')}" if attributes.get("group") else \
                str(attributes.get("resource"))
            allowed = bool(subject.username) and self.allows(subject, str(attributes.get("verb")), resource,
                                                              attributes.get("namespace"))
            status = {"allowed": allowed}
            if not allowed:
                status["reason"] = "no RBAC policy matched"
        return aiohttp.web.json_response({"apiVersion": body.get("apiVersion"), "kind": kind, "metadata": {},
                                          "spec": spec, "status": status}, status=201)


# --- TLS: a test CA and a serving certificate for 127.0.0.1 / kubernetes.default.svc -------------------

@dataclass(frozen=True)
class TestCA:
    ca_file: Path  # what the API pod gets as kube-root-ca.crt
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_ca(folder: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost", "kubernetes.default.svc"),
            common_name: str = "kubetune-test-ca") -> TestCA:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    files = TestCA(folder / "ca.crt", folder / "tls.crt", folder / "tls.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return files


def tls_server(handler: Any, context: ssl.SSLContext) -> kmock.Server:
    """kmock's Server (same handler, same URL logic) listening with TLS."""

    class TlsRawServer(aiohttp.test_utils.RawTestServer):
        async def start_server(self, **kwargs: Any) -> None:
            kwargs.setdefault("ssl", context)
            await super().start_server(**kwargs)

    return kmock.Server(handler, server_cls=TlsRawServer)
