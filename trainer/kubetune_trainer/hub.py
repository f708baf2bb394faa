"""Weights from a Hugging Face Hub repo (or a mirror behind HF_ENDPOINT) into a model cache.

What is fetched: only what training reads (`select_files`): the safetensors weights (the shards an index
names, or `model.safetensors`), config.json, generation_config.json, tokenizer files and the chat template.
Never `original/*.pth`, `*.bin` duplicates, GGUF or ONNX exports: a Llama repo would otherwise be
downloaded twice over.

The cache is huggingface_hub's own layout (`models--org--name/snapshots/<commit>/`), in
$KUBETUNE_MODEL_CACHE, else $HF_HUB_CACHE, else huggingface_hub's default. In a cluster it is an emptyDir
or a PersistentVolumeClaim shared by every trainer pod, so:
- one downloader at a time per repo (a file lock in the cache; others wait, then find the files there);
- a snapshot is used only once a completion marker names its commit and files: an interrupted download is
  resumed by the next attempt, never loaded half-written;
- a commit already complete in the cache costs no request at all when `model.revision` pins it, and one
  small metadata request (the branch's commit) otherwise. No file body is downloaded twice.

Errors a user can act on are `SpecError`s (exit 2) that say what to set: the token (HF_TOKEN, or the
Secret named by spec.model.tokenSecret in a cluster), the repo id, the revision, HF_ENDPOINT.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune.errors import KubetuneError, SpecError
from kubetune_trainer.stop import Preempted

TOP_LEVEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
INDEX = "model.safetensors.index.json"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
TOKEN_HINT = ("set HF_TOKEN to a token with access (in a cluster: spec.model.tokenSecret, or the chart's "
              "model.tokenSecret default, naming a Secret with key HF_TOKEN)")
T = TypeVar("T")
LOCK_TIMEOUT_SECONDS = 6 * 3600  # a 70B download over a slow link; the waiting pod logs why it waits


class HubUnavailable(KubetuneError):
    """The hub (or the mirror in HF_ENDPOINT) did not answer: worth a retry, not a spec problem."""

    exit_code = 1


@dataclass(frozen=True)
class Snapshot:
    """A complete local copy of one commit of a repo."""

    repo_id: str
    commit: str
    path: Path
    files: tuple[str, ...]
    downloaded: bool  # False: everything came from the cache


def select_files(paths: Iterable[str], index: dict[str, Any] | None = None) -> list[str]:
    """The files training reads, from a repo's file list. `index` is the parsed model.safetensors.index.json
    when the repo has one (its weight_map names the shards). Pure: no I/O."""
    available = set(paths)
    chosen = [name for name in TOP_LEVEL_FILES if name in available]
    if index is not None:
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if s not in available]
        if missing:
            raise SpecError(f"spec.model.name: {INDEX} names shards the repo does not have: {missing[:3]}")
        weights = [INDEX, *shards]
    elif "model.safetensors" in available:
        weights = ["model.safetensors"]
    else:
        weights = sorted(p for p in available if "/" not in p and p.endswith(".safetensors"))
    if not weights:
        others = sorted(p for p in available if p.endswith((".bin", ".pth", ".gguf", ".pt")))
        raise SpecError("spec.model.name: the repo has no safetensors weights at its top level"
                        + (f" (it has {', '.join(others[:3])})" if others else "")
                        + "; kubetune loads safetensors: point spec.model.source at a converted copy "
                          "(s3://, a directory) or at a .gguf file")
    if "config.json" not in available:
        raise SpecError("spec.model.name: the repo has no config.json at its top level")
    return chosen + weights


def model_cache() -> Path:
    """Where hub snapshots live (read at call time: pods and tests set it late)."""
    root = os.environ.get("KUBETUNE_MODEL_CACHE") or os.environ.get("HF_HUB_CACHE")
    if not root:
        from huggingface_hub import constants

        root = constants.HF_HUB_CACHE
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE as it is now: huggingface_hub reads it once, at import, which may predate the setting."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}"


def _marker(cache: Path, repo_id: str, commit: str) -> Path:
    return _repo_folder(cache, repo_id) / "kubetune-complete" / f"{commit}.json"


def complete_snapshot(cache: Path, repo_id: str, commit: str) -> Snapshot | None:
    """The snapshot of `commit` if a finished download recorded it and every file is still there."""
    marker = _marker(cache, repo_id, commit)
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    folder = _repo_folder(cache, repo_id) / "snapshots" / commit
    files = tuple(record.get("files", ()))
    sizes = record.get("sizes", {})
    for name in files:
        path = folder / name
        if not path.is_file() or (name in sizes and path.stat().st_size != sizes[name]):
            return None
    return Snapshot(repo_id, commit, folder, files, downloaded=False) if files else None


def _cached_commit(cache: Path, repo_id: str, revision: str) -> str | None:
    if COMMIT.match(revision):
        return revision
    ref = _repo_folder(cache, repo_id) / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def _explain(exc: Exception, repo_id: str, revision: str, url: str, has_token: bool) -> KubetuneError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"on {url}"
    if isinstance(exc, GatedRepoError):
        told = "refused the token in HF_TOKEN" if has_token else "needs a token and none is set"
        return SpecError(f"spec.model.name: {repo_id!r} is gated {where}: the hub {told}; {TOKEN_HINT}. "
                         "The token's account must also have accepted the model's license on the hub.")
    if isinstance(exc, RevisionNotFoundError):
        return SpecError(f"spec.model.revision: {revision!r} is not a branch, tag or commit of {repo_id!r} {where}")
    if isinstance(exc, RepositoryNotFoundError):
        return SpecError(f"spec.model.name: {repo_id!r} does not exist {where}, or it is private and "
                         + ("the token in HF_TOKEN has no access" if has_token else "no token is set")
                         + f"; check the id, or {TOKEN_HINT}")
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return SpecError(f"spec.model.name: {repo_id!r} is not in the model cache and downloads are off "
                         "(HF_HUB_OFFLINE=1); unset it, or set spec.model.source")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return SpecError(f"spec.model.name: {where} refused access to {repo_id!r} "
                         f"(HTTP {exc.response.status_code}); {TOKEN_HINT}")
    return HubUnavailable(f"spec.model.name: downloading {repo_id!r} from {url} failed: "
                          f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                          "(check HF_ENDPOINT and the network; the next attempt retries)")


def download(repo_id: str, revision: str | None = None, *, cache: Path | None = None,
             say: Callable[[str], None] = lambda _m: None, progress: bool = False) -> Snapshot:
    """A complete snapshot of `repo_id` at `revision` (default: main) in the model cache. Safe for several
    processes (pods on one shared volume) at once: one downloads, the others wait and then reuse it."""
    cache = cache or model_cache()
    revision = revision or "main"
    pinned = _cached_commit(cache, repo_id, revision) if COMMIT.match(revision) else None
    if pinned and (snap := complete_snapshot(cache, repo_id, pinned)):
        return snap  # a pinned commit already complete here: no request at all
    with _download_lock(cache, repo_id, say):
        if offline():
            return _offline_snapshot(cache, repo_id, revision)
        return _fetch(cache, repo_id, revision, say, progress)


@contextmanager
def _download_lock(cache: Path, repo_id: str, say: Callable[[str], None]) -> Iterator[None]:
    """One downloader per repo and cache; the others wait (and say so) up to LOCK_TIMEOUT_SECONDS."""
    from filelock import FileLock, Timeout

    locks = cache / ".kubetune-locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{repo_id.replace('/', '--')}.lock"))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        say(f"waiting for another download of {repo_id} into {cache}")
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_SECONDS)
        except Timeout:
            raise HubUnavailable(f"spec.model.name: another process held the download lock of {repo_id} in "
                                 f"{cache} for {LOCK_TIMEOUT_SECONDS}s") from None
    try:
        yield
    finally:
        lock.release()


def _offline_snapshot(cache: Path, repo_id: str, revision: str) -> Snapshot:
    """HF_HUB_OFFLINE: the cached snapshot of `revision`, or an error that says downloads are off."""
    from huggingface_hub import snapshot_download

    commit = _cached_commit(cache, repo_id, revision)
    snap = complete_snapshot(cache, repo_id, commit) if commit else None
    if snap is not None:
        return snap
    try:  # a cache filled by `hf download` has no kubetune marker: let huggingface_hub check it
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except Exception as exc:
        raise _explain(exc, repo_id, revision, endpoint(), token() is not None) from None
    return Snapshot(repo_id, path.name, path, (), downloaded=False)


def _fetch(cache: Path, repo_id: str, revision: str, say: Callable[[str], None], progress: bool) -> Snapshot:
    """Resolve `revision` to a commit (one metadata request), then download what training reads, unless the
    cache has that commit complete already."""
    from huggingface_hub import HfApi, hf_hub_download

    url, secret = endpoint(), token()
    api = HfApi(endpoint=url, token=secret)
    try:
        info = api.model_info(repo_id, revision=revision)
        commit = str(info.sha)
        if snap := complete_snapshot(cache, repo_id, commit):
            _write_ref(cache, repo_id, revision, commit)
            return snap
        names = [s.rfilename for s in info.siblings or []]
        index = None
        if INDEX in names:
            index = json.loads(Path(hf_hub_download(repo_id, INDEX, revision=commit, cache_dir=cache,
                                                    endpoint=url, token=secret)).read_text())
        files = select_files(names, index)
        say(f"downloading {repo_id}@{commit[:12]} from {url}: {len(files)} files into {cache}")
        started = time.perf_counter()
        path = _snapshot_files(repo_id, commit, cache, url, secret, files, progress)
    except (KubetuneError, Preempted):
        raise
    except Exception as exc:
        raise _explain(exc, repo_id, revision, url, secret is not None) from None
    _write_ref(cache, repo_id, revision, commit)
    sizes = {name: (path / name).stat().st_size for name in files}
    marker = _marker(cache, repo_id, commit)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"repo": repo_id, "commit": commit, "files": files, "sizes": sizes,
                               "endpoint": url, "seconds": round(time.perf_counter() - started, 2)}))
    tmp.replace(marker)  # the marker appears whole, after every file
    say(f"downloaded {repo_id}@{commit[:12]}: {sum(sizes.values()) / 1e6:.1f} MB in "
        f"{time.perf_counter() - started:.1f}s")
    return Snapshot(repo_id, commit, path, tuple(files), downloaded=True)


def _snapshot_files(repo_id: str, commit: str, cache: Path, url: str, secret: str | None, files: list[str],
                    progress: bool) -> Path:
    """huggingface_hub's snapshot_download of `files`, interruptible by SIGTERM; its progress bars only when
    asked for (a terminal)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        return Path(interruptible(lambda: snapshot_download(
            repo_id, revision=commit, cache_dir=cache, endpoint=url, token=secret, allow_patterns=files)))
    finally:
        if not progress:
            enable_progress_bars()


def interruptible(work: Callable[[], T]) -> T:
    """`work()` in a daemon thread while this (the main) thread waits in short slices, so a SIGTERM handler
    runs within a fraction of a second. A signal may land on any thread, and a main thread blocked on a
    download pool's lock would run the handler only when the download is over."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="hub-download", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.25)
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def _write_ref(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    if COMMIT.match(revision) or revision == commit:
        return
    ref = _repo_folder(cache, repo_id) / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != commit:
            tmp = ref.with_name(f".{ref.name}.tmp{os.getpid()}")
            tmp.write_text(commit)
            tmp.replace(ref)
    except OSError:
        pass
