"""A hub id reaches the trainer: the real huggingface_hub downloads from the test hub (tests/hub_server.py)
into a model cache, only the files training reads, once; gated, private and missing repos exit 2 with a
message that says what to set. Every download runs in a child process with a pod's environment
(HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE), as in a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hub_server import DECOYS, HubServer, hub_env, model_files

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

TINY = "kubetune-test/tiny-llama"
TINY_GATED = "kubetune-test/tiny-llama-gated"
TINY_TOKEN = "hf_tinyGatedToken42"
TRAINING_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja"}

DOWNLOAD = """
import json, sys
from kubetune_trainer.hub import download
snap = download(sys.argv[1], sys.argv[2] or None, say=lambda m: print(m, file=sys.stderr, flush=True))
print(json.dumps({"path": str(snap.path), "commit": snap.commit, "files": list(snap.files),
                  "downloaded": snap.downloaded}))
"""


@pytest.fixture
def tiny_hub(hub: HubServer, tiny_model_dir: Path) -> HubServer:
    files = model_files(tiny_model_dir)
    hub.publish(TINY, files)
    hub.publish(TINY_GATED, files, gated=True, tokens=(TINY_TOKEN,))
    hub.clear_log()
    return hub


def pod_env(hub: HubServer, cache: Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_", "KUBETUNE_MODEL"))}
    return env | hub_env(hub, token) | {"HF_HUB_CACHE": str(cache), "KUBETUNE_LOG_FORMAT": "json",
                                         "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "trainer")])}


def start_download(hub: HubServer, cache: Path, repo: str, revision: str = "",
                   token: str | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, "-c", DOWNLOAD, repo, revision], env=pod_env(hub, cache, token), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.fixture
def run_trainer(write_config: Callable[..., Path], start_trainer: Callable[..., Any]) -> Callable[..., Any]:
    """`python -m kubetune_trainer` to its end, as the pod runs it."""
    def run(spec: dict[str, Any], env: dict[str, str]) -> Any:
        proc = start_trainer(write_config(spec), env=env)
        proc.wait(timeout=300)
        return proc

    return run


@pytest.mark.slow
def test_trainer_downloads_the_training_files_once(tiny_hub: HubServer, tmp_path: Path, chat_file: Path,
                                                   spec_for: Callable[..., dict[str, Any]],
                                                   run_trainer: Callable[..., Any]) -> None:
    cache = tmp_path / "model-cache"
    sha = tiny_hub.repos[TINY].refs["main"]
    spec = spec_for("unused", chat_file, str(tmp_path / "out-1"), maxSteps=1)
    spec["model"] = {"name": TINY}
    first = run_trainer(spec, pod_env(tiny_hub, cache))
    assert first.proc.returncode == 0, first.log[-3000:]
    fetched = tiny_hub.file_downloads(TINY)
    assert sorted(fetched) == sorted(TRAINING_FILES)  # each once, and no decoy
    assert not set(fetched) & set(DECOYS)
    assert first.summary()["modelCommit"] == sha
    manifest = json.loads((tmp_path / "out-1" / "adapter" / "manifest.json").read_text())
    assert (manifest["baseModel"]["name"], manifest["baseModel"]["commit"]) == (TINY, sha)
    assert '"event": "download"' in first.log

    tiny_hub.clear_log()  # a second attempt (same cache): no file body, one metadata request for `main`
    spec["output"]["uri"] = str(tmp_path / "out-2")
    second = run_trainer(spec, pod_env(tiny_hub, cache))
    assert second.proc.returncode == 0, second.log[-3000:]
    assert tiny_hub.file_downloads() == []
    assert [r.path.split("?")[0] for r in tiny_hub.requests] == [f"/api/models/{TINY}/revision/main"]

    tiny_hub.clear_log()  # pinned to the commit: the cache answers without asking the hub at all
    spec["model"]["revision"] = sha
    spec["output"]["uri"] = str(tmp_path / "out-3")
    pinned = run_trainer(spec, pod_env(tiny_hub, cache))
    assert pinned.proc.returncode == 0, pinned.log[-3000:]
    assert tiny_hub.requests == []
    assert pinned.summary()["modelCommit"] == sha


@pytest.mark.slow
def test_gated_private_and_missing_repos_exit_2(tiny_hub: HubServer, tmp_path: Path, chat_file: Path,
                                                spec_for: Callable[..., dict[str, Any]],
                                                run_trainer: Callable[..., Any]) -> None:
    cache = tmp_path / "model-cache"
    spec = spec_for("unused", chat_file, str(tmp_path / "out"), maxSteps=1)
    cases: list[tuple[dict[str, Any], str | None, str]] = [
        ({"name": TINY_GATED}, None, "is gated on http://127.0.0.1"),
        ({"name": TINY_GATED}, "hf_not_the_token", "refused the token in HF_TOKEN"),
        ({"name": "kubetune-test/no-such-model"}, None, "does not exist on http://127.0.0.1"),
        ({"name": TINY, "revision": "v9"}, None, "spec.model.revision: 'v9' is not a branch, tag or commit"),
    ]
    for model, token, expected in cases:
        spec["model"] = model
        proc = run_trainer(spec, pod_env(tiny_hub, cache, token))
        summary = proc.summary()
        assert proc.proc.returncode == 2 and summary["outcome"] == "InvalidInput", proc.log[-2000:]
        assert expected in summary["error"]
        if "gated" in expected or "does not exist" in expected:
            assert "HF_TOKEN" in summary["error"] and "spec.model.tokenSecret" in summary["error"]
        if token:
            assert token not in proc.log and token not in json.dumps(summary)
    assert tiny_hub.file_downloads() == []

    spec["model"] = {"name": TINY_GATED}
    ok = run_trainer(spec, pod_env(tiny_hub, cache, TINY_TOKEN))
    assert ok.proc.returncode == 0, ok.log[-3000:]
    assert sorted(tiny_hub.file_downloads(TINY_GATED)) == sorted(TRAINING_FILES)
    assert TINY_TOKEN not in ok.log and TINY_TOKEN not in json.dumps(ok.summary())


@pytest.mark.slow
def test_two_downloaders_at_once_share_one_download(hub: HubServer, tmp_path: Path) -> None:
    """Two pods on one cache volume start together: one downloads the 270 MB SmolLM2, the other waits for
    it and then uses the same files. Each file body crosses the wire once."""
    from hub_server import SMOLLM_REPO

    cache = tmp_path / "shared-pvc"
    hub.seconds_per_mib = 0.01  # about 3 s for the weights: the two surely overlap
    try:
        procs = [start_download(hub, cache, SMOLLM_REPO) for _ in range(2)]
        results = [finish(p) for p in procs]
    finally:
        hub.seconds_per_mib = 0.0
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["downloaded"] for r in results) == [False, True]
    fetched = hub.file_downloads(SMOLLM_REPO)
    assert len(fetched) == len(set(fetched)) and "model.safetensors" in fetched
    folder = Path(results[0]["path"])
    assert (folder / "model.safetensors").stat().st_size == hub.repos[SMOLLM_REPO].commits[
        results[0]["commit"]]["model.safetensors"].size


def test_a_killed_download_is_never_used_and_resumes(tiny_hub: HubServer, tmp_path: Path) -> None:
    """SIGKILL while the weights stream in: no completion marker, so the next attempt does not load the
    partial files; it fetches what is missing and only then returns the snapshot."""
    cache = tmp_path / "cache"
    tiny_hub.seconds_per_mib = 2.0
    try:
        proc = start_download(tiny_hub, cache, TINY)
        deadline = time.monotonic() + 60
        while not any(r.file == "model.safetensors" for r in tiny_hub.requests if r.method == "GET"):
            assert time.monotonic() < deadline and proc.poll() is None, "the download never started"
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        tiny_hub.seconds_per_mib = 0.0
    repo = cache / f"models--{TINY.replace('/', '--')}"
    assert not list(repo.glob("kubetune-complete/*.json"))
    assert not (repo / "snapshots").exists() or not list(repo.glob("snapshots/*/model.safetensors"))

    tiny_hub.clear_log()
    again = finish(start_download(tiny_hub, cache, TINY))
    assert again["downloaded"] is True
    assert "model.safetensors" in tiny_hub.file_downloads(TINY)
    assert (Path(again["path"]) / "model.safetensors").stat().st_size == tiny_hub.repos[TINY].commits[
        again["commit"]]["model.safetensors"].size
    assert list(repo.glob("kubetune-complete/*.json"))


def test_select_files_skips_duplicates_and_follows_the_index() -> None:
    from kubetune_trainer.hub import select_files

    from kubetune.errors import SpecError

    llama = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "original/consolidated.00.pth",
             "original/params.json", "original/tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "LICENSE", "README.md", "USE_POLICY.md", ".gitattributes"]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    assert select_files(llama, index) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"]
    mistral = ["config.json", "consolidated.safetensors", "model.safetensors", "tokenizer.model", "pytorch_model.bin"]
    assert select_files(mistral) == ["config.json", "tokenizer.model", "model.safetensors"]
    with pytest.raises(SpecError, match=r"no safetensors weights.*pytorch_model\.bin"):
        select_files(["config.json", "pytorch_model.bin"])
    with pytest.raises(SpecError, match="names shards the repo does not have"):
        select_files(["config.json", "model.safetensors.index.json"], index)


def test_standalone_hub_server_serves_smollm(tmp_path: Path) -> None:
    """`python tests/hub_server.py` (for trying kubetune by hand against a local hub)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("HF_ENDPOINT=http://127.0.0.1:")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigterm_while_starting_or_downloading_exits_143_at_once(tiny_hub: HubServer, tmp_path: Path,
                                                                 chat_file: Path,
                                                                 spec_for: Callable[..., dict[str, Any]],
                                                                 write_config: Callable[..., Path],
                                                                 start_trainer: Callable[..., Any]) -> None:
    """The handler is installed before torch is imported; before the first step there is nothing new to
    save, so the trainer stops at once (a download is abandoned mid-file) instead of running into SIGKILL."""
    cache = tmp_path / "cache"
    spec = spec_for("unused", chat_file, str(tmp_path / "out"), maxSteps=1)
    spec["model"] = {"name": TINY}

    starting = start_trainer(write_config(spec, name="starting"), env=pod_env(tiny_hub, cache))
    time.sleep(1.0)  # importing the training stack (torch takes seconds)
    starting.kill(signal.SIGTERM)
    assert starting.wait(timeout=60) == 143, starting.log[-2000:]
    assert starting.summary()["outcome"] == "Preempted" and "SIGTERM" in starting.summary()["error"]

    tiny_hub.seconds_per_mib = 5.0  # the weights would take about 30 s
    try:
        downloading = start_trainer(write_config(spec, name="downloading"), env=pod_env(tiny_hub, cache))
        downloading.wait_for(lambda: any(r.file == "model.safetensors" for r in tiny_hub.requests), timeout=120,
                             what="the weights download")
        signalled = time.monotonic()
        downloading.kill(signal.SIGTERM)
        assert downloading.wait(timeout=60) == 143, downloading.log[-2000:]
        assert time.monotonic() - signalled < 15  # not after the download
    finally:
        tiny_hub.seconds_per_mib = 0.0
    summary = downloading.summary()
    assert summary["outcome"] == "Preempted" and summary["steps"] == 0
    assert "while preparing" in summary["error"]
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_kubetune_train_on_a_gated_hub_id_needs_the_token(tiny_hub: HubServer, tmp_path: Path, chat_file: Path
                                                          ) -> None:
    """`kubetune train -f` on this machine: the same download (into the local HF cache), planned from the
    repo's config.json on HF_ENDPOINT; without HF_TOKEN it exits 2 saying what to set."""
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "gated"},
           "spec": {"model": {"name": TINY_GATED}, "dataset": {"source": str(chat_file), "format": "chat"},
                    "training": {"maxSteps": 1, "maxSeqLength": 128, "microBatchSize": 2},
                    "output": {"uri": str(tmp_path / "out")}}}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    kubetune = str(Path(PYTHON).parent / "kubetune")
    env = pod_env(tiny_hub, tmp_path / "hf-cache")
    refused = subprocess.run([kubetune, "train", "-f", str(path)], env=env, capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "is gated" in refused.stderr and "HF_TOKEN" in refused.stderr
    assert "Traceback" not in refused.stderr

    trained = subprocess.run([kubetune, "train", "-f", str(path)], env=env | {"HF_TOKEN": TINY_TOKEN},
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "manifest.json").is_file()
    # the planner read config.json (it is not in the catalog), then the trainer fetched the training files
    assert sorted(tiny_hub.file_downloads(TINY_GATED)) == sorted([*TRAINING_FILES, "config.json"])
    assert TINY_TOKEN not in trained.stderr + trained.stdout
    # nothing a newcomer cannot act on: no library deprecation noise, no optional-kernel notice, no bar
    # redrawn per tensor when the output is not a terminal
    for noise in ("FutureWarning", "kernels-community", "Loading weights", "Traceback"):
        assert noise not in trained.stderr, (noise, trained.stderr[-3000:])
