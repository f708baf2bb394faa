"""Where checkpoints, adapters and inputs live: a local directory or an S3 prefix, behind one interface.

S3 goes through boto3 with the endpoint URL and credentials from the environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: secret refs in the pod) or spec.output.endpointUrl, multipart
uploads for large files and retries with backoff (botocore's "standard" mode). Every failure surfaces as a
`StorageError` (exit code 4) that says which URI and what to check.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from kubetune.contracts import ExitCode
from kubetune.errors import KubetuneError
from kubetune.s3 import s3_client

MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024


class StorageError(KubetuneError):
    """Reading or writing the output/model/dataset location failed (exit code 4)."""

    exit_code: int = ExitCode.STORAGE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def contained(root: Path, key: str, what: str) -> Path:
    """root / key, or StorageError when the key would land outside root: an absolute key, a '..' segment,
    a NUL byte, or a path that resolves (through symlinks) elsewhere. Every key from a listing, a manifest
    or a URI goes through here before anything is written or read on disk."""
    parts = key.replace("\\", "/").split("/")
    if key.startswith(("/", "\\")) or ".." in parts or "\x00" in key:
        raise StorageError(f"{what}: key {key!r} would leave {root} ('..', an absolute path or a NUL byte); "
                           "refusing it")
    path = root / key
    if not path.resolve().is_relative_to(root.resolve()):
        raise StorageError(f"{what}: key {key!r} resolves outside {root}; refusing it")
    return path


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


class Storage(ABC):
    """A place addressed by relative keys ('checkpoints/step-00010/adapter_model.safetensors')."""

    uri: str

    @abstractmethod
    def put_file(self, local: Path, key: str) -> int:
        """Upload one file; returns the bytes written."""

    @abstractmethod
    def get_file(self, key: str, local: Path) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under prefix, relative to this storage's root."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def delete_key(self, key: str) -> None:
        """Remove one object if it exists (no error when it does not)."""

    @abstractmethod
    def check(self) -> None:
        """Fail early (before any training) when the location cannot be written."""

    def put_bytes(self, data: bytes, key: str) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            return self.put_file(path, key)

    def get_bytes(self, key: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "blob"
            self.get_file(key, path)
            return path.read_bytes()

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def put_dir(self, local: Path, prefix: str, skip: tuple[str, ...] = ()) -> int:
        written = 0
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            if rel not in skip:
                written += self.put_file(path, f"{prefix}/{rel}")
        return written

    def get_dir(self, prefix: str, local: Path) -> None:
        for key in self.list(prefix + "/"):
            self.get_file(key, contained(local, key[len(prefix) + 1:], self.join(key)))

    def join(self, key: str) -> str:
        return self.uri.rstrip("/") + "/" + key


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return contained(self.root, key, self.uri) if key else self.root

    def put_file(self, local: Path, key: str) -> int:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)  # atomic: a reader sees the old file or the whole new one
        except OSError as exc:
            raise StorageError(f"output {self.uri}: cannot write {key} ({exc.strerror or exc})") from None
        return target.stat().st_size

    def get_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._path(key), local)
        except OSError as exc:
            raise StorageError(f"{self.join(key)}: cannot read ({exc.strerror or exc})") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        start = base if base.is_dir() else base.parent
        if not start.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in start.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith("."))

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def delete_key(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"output {self.uri}: cannot delete {key} ({exc.strerror or exc})") from None

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".kubetune-write-check"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"output {self.uri}: not writable ({exc.strerror or exc})") from None


def _explain(exc: Exception, uri: str, action: str) -> StorageError:
    """One line a person can act on, for every way S3 fails."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: cannot {action}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            "or spec.output.credentialsSecret)")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{uri}: cannot {action}: S3 endpoint unreachable ({exc})")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        hints = {
            "NoSuchBucket": "the bucket does not exist; create it or fix the URI",
            "InvalidAccessKeyId": "wrong credentials: the access key id is not known to the endpoint",
            "SignatureDoesNotMatch": "wrong credentials: the secret access key does not match",
            "AccessDenied": "access denied: the credentials may not use this bucket/prefix",
            "403": "access denied (HTTP 403): check the credentials and the bucket policy",
            "NoSuchKey": "no such object",
            "404": "not found (HTTP 404)",
        }
        return StorageError(f"{uri}: cannot {action}: {code}: {hints.get(code, exc)}")
    return StorageError(f"{uri}: cannot {action}: {exc.__class__.__name__}: {exc}")


class S3Storage(Storage):
    def __init__(self, uri: str, endpoint_url: str | None = None, client: Any = None) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, prefix = split_s3(self.uri)
        self.prefix = prefix.strip("/")
        self.client = client or s3_client(endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, local: Path, key: str) -> int:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                                max_concurrency=4)
        try:
            self.client.upload_file(str(local), self.bucket, self._key(key), Config=config)
        except Exception as exc:
            raise _explain(getattr(exc, "last_exception", None) or exc, self.join(key), "upload") from None
        return local.stat().st_size

    def get_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise _explain(exc, self.join(key), "download") from None
        os.replace(tmp, local)

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        root = self._key("")
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                keys.extend(obj["Key"][len(root):] for obj in page.get("Contents", []))
        except Exception as exc:
            raise _explain(exc, self.join(prefix), "list") from None
        return sorted(keys)

    def head(self, key: str) -> dict[str, Any]:
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except Exception as exc:
            raise _explain(exc, self.join(key), "read") from None

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
            except Exception as exc:
                raise _explain(exc, self.join(prefix), "delete") from None

    def delete_key(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise _explain(exc, self.join(key), "delete") from None

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                raise StorageError(f"{self.uri}: bucket {self.bucket!r} does not exist; create it or fix "
                                   "spec.output.uri") from None
            raise _explain(exc, self.uri, "access the bucket") from None
        # head_bucket may pass with read-only rights: prove we can write
        probe = ".kubetune-write-check"
        self.put_bytes(b"ok", probe)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(probe))
        except Exception as exc:
            raise _explain(exc, self.join(probe), "delete") from None


def open_storage(uri: str, endpoint_url: str | None = None) -> Storage:
    if uri.startswith("s3://"):
        return S3Storage(uri, endpoint_url)
    return LocalStorage(uri)


def download_prefix(uri: str, cache_root: Path, endpoint_url: str | None = None) -> Path:
    """Copy an s3:// model prefix into the local cache once, integrity-checked.

    Each object's size must match; single-part objects' MD5 must match their ETag; if the prefix holds a
    kubetune `manifest.json` (a merged model we wrote), every listed file's sha256 must match too. A
    `.complete` marker (written last) records what was verified, so a half-finished copy is redone.
    """
    store = S3Storage(uri, endpoint_url)
    target = contained(cache_root, f"{store.bucket}/{store.prefix or '_root'}", uri)
    marker = target / ".complete"
    keys = [k for k in store.list("") if k and not k.endswith("/")]
    if not keys:
        raise StorageError(f"{uri}: no objects under this prefix (spec.model.source)")
    listing = {k: store.head(k) for k in keys}
    fingerprint = hashlib.sha256(
        json.dumps({k: [h.get("ContentLength"), h.get("ETag")] for k, h in listing.items()}, sort_keys=True).encode()
    ).hexdigest()
    if marker.is_file() and marker.read_text() == fingerprint:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for key, head in listing.items():
        local = contained(target, key, store.join(key))
        store.get_file(key, local)
        if local.stat().st_size != head.get("ContentLength"):
            raise StorageError(f"{store.join(key)}: size mismatch after download "
                               f"({local.stat().st_size} != {head.get('ContentLength')})")
        etag = str(head.get("ETag", "")).strip('"')
        if etag and "-" not in etag:
            md5 = hashlib.md5(local.read_bytes(), usedforsecurity=False).hexdigest()
            if md5 != etag:
                raise StorageError(f"{store.join(key)}: checksum mismatch after download (md5 {md5} != ETag {etag})")
    manifest = target / "manifest.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        for name, entry in files.items():
            want = entry.get("sha256") if isinstance(entry, dict) else entry
            if want and contained(target, name, store.join("manifest.json")).is_file() and \
                    sha256_file(target / name) != want:
                raise StorageError(f"{store.join(name)}: sha256 does not match manifest.json")
    marker.write_text(fingerprint)
    return target


def fetch_input(uri: str, cache_root: Path, endpoint_url: str | None = None) -> Path:
    """A dataset file: local paths as they are, s3:// objects downloaded into the cache."""
    if not uri.startswith("s3://"):
        return Path(uri).expanduser()
    bucket, key = split_s3(uri)
    if not key:
        raise StorageError(f"{uri}: a dataset source must name an object, not a bucket")
    store = S3Storage(f"s3://{bucket}", endpoint_url)
    local = contained(cache_root, f"{bucket}/{key}", uri)
    store.get_file(key, local)
    return local
