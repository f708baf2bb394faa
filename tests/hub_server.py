"""A Hugging Face Hub compatible file server for the tests, on 127.0.0.1.

It speaks the routes the real, unpatched `huggingface_hub` 2.x client calls for `snapshot_download`,
`hf_hub_download` and `model_info` (checked against huggingface_hub 2.4's source):

- `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{rev}`: model info (`id`, `sha`,
  `siblings`, `private`, `gated`).
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true`: the file tree (files with `oid`, `size`
  and `lfs` for large files; folders as `directory`).
- `HEAD` and `GET /{repo}/resolve/{rev}/{file}`: the file, with `X-Repo-Commit`, `ETag` (the git blob
  sha1, or the sha256 for LFS files, as the hub sends), `X-Linked-Etag`/`X-Linked-Size` for LFS files,
  `Content-Length`, and `Range: bytes=N-` for resumed downloads.
- Errors as the hub sends them, with `X-Error-Code`: an unknown repo is 404 `RepoNotFound`; a private
  repo without a valid token is 401 `RepoNotFound`; a gated repo is 401 `GatedRepo` without a token and
  403 `GatedRepo` with a token that has no access; an unknown revision is 404 `RevisionNotFound`, an
  unknown file 404 `EntryNotFound`.

Every request is logged (method, path, status, repo, file) so that tests can count what was fetched, for
example that a second attempt downloads no file bodies: `server.file_downloads(repo)`.

Use it from pytest through the fixtures in tests/conftest.py (`hub_server`, `hub`), or standalone:
`python tests/hub_server.py --port 8765 [--token hf_x]` serves the bundled SmolLM2 until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SMOLLM_REPO = "kubetune-test/SmolLM2-135M-Instruct"
GATED_REPO = "kubetune-test/SmolLM2-135M-Instruct-gated"
TEST_TOKEN = "hf_kubetuneTestToken0123456789"  # the one token the gated repo accepts
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".onnx", ".onnx_data", ".msgpack", ".h5")
# Files a training download must never fetch; the server holds them so that a test can prove it.
DECOYS = ("original/consolidated.00.pth", "original/params.json", "pytorch_model.bin", "model.Q4_1.gguf",
          "onnx/model.onnx", "onnx/model_quantized.onnx", "README.md", ".gitattributes")

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")


@dataclass(frozen=True)
class Blob:
    """One file of a commit: its bytes live on disk or in memory."""

    size: int
    git_oid: str  # sha1 of the git blob (what the hub calls `oid` for a small file)
    sha256: str
    path: Path | None = None
    data: bytes | None = None

    @classmethod
    def of(cls, content: bytes | Path) -> Blob:
        if isinstance(content, Path):
            stat = content.stat()
            key = (str(content.resolve()), stat.st_size, stat.st_mtime_ns)
            if key not in _HASHED:  # a 270 MB safetensors file takes a second to hash: once per process
                _HASHED[key] = cls._of_file(content)
            return _HASHED[key]
        sha1 = hashlib.sha1(f"blob {len(content)}\0".encode() + content)
        return cls(len(content), sha1.hexdigest(), hashlib.sha256(content).hexdigest(), data=content)

    @classmethod
    def _of_file(cls, content: Path) -> Blob:
        size = content.stat().st_size
        sha1 = hashlib.sha1(f"blob {size}\0".encode())
        sha256 = hashlib.sha256()
        with content.open("rb") as f:
            while chunk := f.read(1 << 20):
                sha1.update(chunk)
                sha256.update(chunk)
        return cls(size, sha1.hexdigest(), sha256.hexdigest(), path=content)

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES) or self.size > 10 * 2**20

    def etag(self, name: str) -> str:
        return self.sha256 if self.is_lfs(name) else self.git_oid

    def open_range(self, start: int) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data[start:]
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(start)
            while chunk := f.read(1 << 20):
                yield chunk


_HASHED: dict[tuple[str, int, int], Blob] = {}


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha -> {path: blob}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    private: bool = False
    gated: bool = False
    tokens: frozenset[str] = frozenset()

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    repo: str | None
    file: str | None  # set for resolve/ requests
    authorized: bool  # an Authorization header was sent


class HubServer:
    """The server, in a daemon thread. `url` is what HF_ENDPOINT should be set to."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.repos: dict[str, Repo] = {}
        self.seconds_per_mib = 0.0  # > 0: file bodies trickle out (to kill a downloader mid-file)
        self._log: list[Request] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ---- content -------------------------------------------------------------------------------------

    def publish(self, repo_id: str, files: Mapping[str, bytes | Path], ref: str = "main", *, private: bool = False,
                gated: bool = False, tokens: tuple[str, ...] = ()) -> str:
        """A new commit holding exactly `files` (repo path -> bytes or a local file); moves `ref` to it.
        Returns the commit sha (40 hex digits, derived from the content, so stable across runs)."""
        blobs = {name: Blob.of(content) for name, content in sorted(files.items())}
        with self._lock:
            repo = self.repos.get(repo_id) or Repo(repo_id)
            parent = repo.refs.get(ref, "")
            digest = hashlib.sha1(parent.encode())
            for name, blob in blobs.items():
                digest.update(f"{name}\0{blob.git_oid}\n".encode())
            sha = digest.hexdigest()
            repo.commits[sha] = blobs
            repo.refs[ref] = sha
            repo.private, repo.gated = private or repo.private, gated or repo.gated
            repo.tokens = repo.tokens | frozenset(tokens)
            self.repos[repo_id] = repo
        return sha

    # ---- the request log -----------------------------------------------------------------------------

    def record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def file_downloads(self, repo_id: str | None = None) -> list[str]:
        """The files whose bodies were served (GET resolve/ answered 200 or 206), in order."""
        return [r.file for r in self.requests
                if r.method == "GET" and r.file is not None and r.status in (200, 206)
                and (repo_id is None or r.repo == repo_id)]

    # ---- what a request may see ----------------------------------------------------------------------

    def access(self, repo_id: str, authorization: str | None) -> tuple[Repo | None, int, str, str]:
        """(repo, status, error code, message): status 200 when the caller may read the repo."""
        repo = self.repos.get(repo_id)
        token = authorization.removeprefix("Bearer ").strip() if authorization else ""
        if repo is None:
            return None, 404, "RepoNotFound", "Repository not found"
        if repo.private and token not in repo.tokens:
            return None, 401, "RepoNotFound", "Repository not found"
        if repo.gated and not token:
            return None, 401, "GatedRepo", (f"Access to model {repo_id} is restricted. You must have access to it "
                                            "and be authenticated to access it. Please log in.")
        if repo.gated and token not in repo.tokens:
            return None, 403, "GatedRepo", (f"Access to model {repo_id} is restricted and you are not in the "
                                            "authorized list.")
        return repo, 200, "", ""


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "kubetune-test-hub/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is in HubServer.requests; stderr stays quiet

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    # ---- routing -------------------------------------------------------------------------------------

    def _dispatch(self, body: bool) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        query = parse_qs(parts.query)
        if match := _RESOLVE.match(path):
            self._resolve(match["repo"], unquote(match["rev"]), unquote(match["file"]), body)
        elif match := _TREE.match(path):
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            self._tree(match["repo"], unquote(match["rev"]), unquote(match["path"] or ""), recursive, body)
        elif match := _INFO.match(path):
            self._info(match["repo"], unquote(match["rev"] or "main"), body)
        else:
            self._error(404, "", "Not Found", body, None, None)

    def _repo(self, repo_id: str, revision: str, body: bool, file: str | None = None) -> tuple[Repo, str] | None:
        repo, status, code, message = self.hub.access(repo_id, self.headers.get("Authorization"))
        if repo is None:
            self._error(status, code, message, body, repo_id, file)
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body, repo_id, file)
            return None
        return repo, sha

    def _info(self, repo_id: str, revision: str, body: bool) -> None:
        found = self._repo(repo_id, revision, body)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        self._json({"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                    "author": repo_id.split("/")[0], "sha": sha, "private": repo.private,
                    "gated": "manual" if repo.gated else False, "disabled": False, "library_name": "transformers",
                    "tags": ["transformers", "safetensors", "llama", "text-generation"],
                    "pipeline_tag": "text-generation", "siblings": [{"rfilename": name} for name in files]},
                   body, repo_id)

    def _tree(self, repo_id: str, revision: str, under: str, recursive: bool, body: bool) -> None:
        found = self._repo(repo_id, revision, body)
        if found is None:
            return
        repo, sha = found
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, blob in repo.commits[sha].items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    oid = hashlib.sha1(f"tree {sha} {folder}".encode()).hexdigest()
                    entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(rest) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": name}
                if blob.is_lfs(name):
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
                entries[name] = entry
        if prefix and not entries:
            self._error(404, "EntryNotFound", f"{under} does not exist on {revision}", body, repo_id, None)
            return
        self._json(sorted(entries.values(), key=lambda e: str(e["path"])), body, repo_id)

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        found = self._repo(repo_id, revision, body, name)
        if found is None:
            return
        repo, sha = found
        blob = repo.commits[sha].get(name)
        if blob is None:
            self._error(404, "EntryNotFound", f"{name} does not exist on {revision}", body, repo_id, name,
                        commit=sha)
            return
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged and 0 < int(ranged[1]) < blob.size:
            start = int(ranged[1])
        status = 206 if start else 200
        self.send_response(status)
        etag = f'"{blob.etag(name)}"'
        self.send_header("ETag", etag)
        self.send_header("X-Repo-Commit", sha)
        if blob.is_lfs(name):
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(blob.size))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{blob.size - 1}/{blob.size}")
        self.send_header("Content-Length", str(blob.size - start))
        self.end_headers()
        self.hub.record(Request(self.command, self.path, status, repo_id, name, "Authorization" in self.headers))
        if body:
            try:
                for chunk in blob.open_range(start):
                    for offset in range(0, len(chunk), 1 << 20):
                        self.wfile.write(chunk[offset:offset + (1 << 20)])
                        if self.hub.seconds_per_mib:
                            time.sleep(self.hub.seconds_per_mib)
            except ConnectionError:  # the client went away (a killed downloader)
                self.close_connection = True

    # ---- responses -----------------------------------------------------------------------------------

    def _json(self, payload: Any, body: bool, repo_id: str | None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.hub.record(Request(self.command, self.path, 200, repo_id, None, "Authorization" in self.headers))
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, body: bool, repo_id: str | None, file: str | None,
               commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.hub.record(Request(self.command, self.path, status, repo_id, file, "Authorization" in self.headers))
        if body:
            self.wfile.write(data)


# ---- the bundled SmolLM2 as a hub repo -------------------------------------------------------------------

def decoy_files() -> dict[str, bytes]:
    """Files the hub holds next to the weights that a training download must skip (Llama repos ship
    `original/*.pth`, `.bin` duplicates, GGUF and ONNX exports). Small, but not empty."""
    return {name: (f"decoy {name} ".encode() * 4096)[: 64 * 1024] for name in DECOYS}


def model_files(model_dir: Path, decoys: bool = True) -> dict[str, bytes | Path]:
    """A safetensors model folder (config.json, *.safetensors, tokenizer files, generation config) as repo
    files, plus the decoys."""
    files: dict[str, bytes | Path] = {}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            files[path.relative_to(model_dir).as_posix()] = path
    if "generation_config.json" not in files:
        files["generation_config.json"] = json.dumps({"bos_token_id": 1, "eos_token_id": 2}).encode()
    if decoys:
        files.update(decoy_files())
    return files


def smollm_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF converted once to safetensors by the trainer's own conversion
    (cached under $KUBETUNE_CACHE_DIR)."""
    from kubetune_trainer.model import bundled_gguf, convert_gguf

    return convert_gguf(bundled_gguf("smollm2-135m-instruct"))


def serve_smollm(server: HubServer, model_dir: Path | None = None) -> dict[str, str]:
    """Publish the SmolLM2 repos: public and gated (accepting TEST_TOKEN). Returns {repo id: commit sha}."""
    files = model_files(model_dir or smollm_model_dir())
    return {SMOLLM_REPO: server.publish(SMOLLM_REPO, files),
            GATED_REPO: server.publish(GATED_REPO, files, gated=True, tokens=(TEST_TOKEN,))}


def hub_env(server: HubServer, token: str | None = None) -> dict[str, str]:
    """The environment a process needs to download from this server with huggingface_hub: the endpoint,
    online mode, no telemetry, and the token when given."""
    env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    if token:
        env["HF_TOKEN"] = token
    return env


def copy_model_dir(model_dir: Path, target: Path) -> Path:
    """A private copy of a model folder (for tests that publish a modified model)."""
    shutil.copytree(model_dir, target, dirs_exist_ok=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the bundled SmolLM2 as a Hugging Face Hub repo.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model-dir", type=Path, default=None, help="a safetensors model folder to serve")
    args = parser.parse_args()
    server = HubServer(port=args.port)
    shas = serve_smollm(server, args.model_dir)
    print(f"HF_ENDPOINT={server.url}")
    for repo_id, sha in shas.items():
        print(f"{repo_id} @ {sha}")
    print(f"gated repo token: HF_TOKEN={TEST_TOKEN}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server._httpd.serve_forever()


if __name__ == "__main__":
    main()
