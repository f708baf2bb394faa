"""The test hub answers the real, unpatched huggingface_hub client as the Hugging Face Hub does.

The client runs in a child process with the environment a pod gets (HF_ENDPOINT, HF_TOKEN): the
huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT once at import, and the trainer tests turn the hub
off for this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from hub_server import DECOYS, GATED_REPO, SMOLLM_REPO, TEST_TOKEN, HubServer, hub_env

CLIENT = textwrap.dedent("""
    import json, sys
    from huggingface_hub import HfApi, snapshot_download, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    args = json.loads(sys.argv[1])
    try:
        if args["call"] == "snapshot":
            path = snapshot_download(args["repo"], revision=args.get("revision"), cache_dir=args["cache"],
                                     allow_patterns=args.get("allow"))
            print(json.dumps({"path": path}))
        elif args["call"] == "info":
            info = HfApi().model_info(args["repo"], revision=args.get("revision"))
            print(json.dumps({"sha": info.sha, "files": [s.rfilename for s in info.siblings]}))
        elif args["call"] == "head":
            meta = get_hf_file_metadata(hf_hub_url(args["repo"], args["file"], revision=args.get("revision")))
            print(json.dumps({"commit": meta.commit_hash, "etag": meta.etag, "size": meta.size}))
    except HfHubHTTPError as exc:
        print(json.dumps({"error": type(exc).__name__, "status": exc.response.status_code}))
""")


def client(hub: HubServer, token: str | None = None, **args: Any) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | hub_env(hub, token)
    done = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_snapshot_of_allowed_files_and_cache_hit(hub: HubServer, tmp_path: Path) -> None:
    allow = ["config.json", "generation_config.json", "tokenizer*", "*.safetensors", "*.jinja"]
    first = client(hub, call="snapshot", repo=SMOLLM_REPO, cache=str(tmp_path), allow=allow)
    folder = Path(first["path"])
    sha = hub.repos[SMOLLM_REPO].refs["main"]
    assert folder.name == sha
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()}
    fetched = hub.file_downloads(SMOLLM_REPO)
    assert "model.safetensors" in fetched and not set(fetched) & set(DECOYS)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert (folder / "model.safetensors").stat().st_size > 100 * 2**20

    hub.clear_log()
    again = client(hub, call="snapshot", repo=SMOLLM_REPO, cache=str(tmp_path), allow=allow)
    assert again["path"] == first["path"]
    assert hub.file_downloads() == []  # the cache answers: no file body twice
    assert [r.path.split("?")[0] for r in hub.requests] == [f"/api/models/{SMOLLM_REPO}/revision/main"]


def test_headers_the_client_needs(hub: HubServer) -> None:
    sha = hub.repos[SMOLLM_REPO].refs["main"]
    small = client(hub, call="head", repo=SMOLLM_REPO, file="config.json")
    large = client(hub, call="head", repo=SMOLLM_REPO, file="model.safetensors")
    blobs = hub.repos[SMOLLM_REPO].commits[sha]
    assert small == {"commit": sha, "etag": blobs["config.json"].git_oid, "size": blobs["config.json"].size}
    assert large == {"commit": sha, "etag": blobs["model.safetensors"].sha256,
                     "size": blobs["model.safetensors"].size}
    assert hub.file_downloads() == []  # HEAD sends no body


def test_gated_repo_needs_the_token(hub: HubServer, tmp_path: Path) -> None:
    assert client(hub, call="info", repo=GATED_REPO) == {"error": "GatedRepoError", "status": 401}
    assert client(hub, "hf_wrong", call="info", repo=GATED_REPO) == {"error": "GatedRepoError", "status": 403}
    assert client(hub, call="snapshot", repo=GATED_REPO, cache=str(tmp_path), allow=["config.json"]) == {
        "error": "GatedRepoError", "status": 401}
    ok = client(hub, TEST_TOKEN, call="snapshot", repo=GATED_REPO, cache=str(tmp_path), allow=["config.json"])
    assert (Path(ok["path"]) / "config.json").is_file()
    assert all(r.authorized for r in hub.requests if r.status == 200)


def test_unknown_repo_revision_and_private(hub: HubServer) -> None:
    assert client(hub, call="info", repo="kubetune-test/nope") == {"error": "RepositoryNotFoundError",
                                                                   "status": 404}
    assert client(hub, call="info", repo=SMOLLM_REPO, revision="v9") == {"error": "RevisionNotFoundError",
                                                                         "status": 404}
    hub.publish("kubetune-test/private", {"config.json": b"{}"}, private=True, tokens=("hf_owner",))
    assert client(hub, call="info", repo="kubetune-test/private")["error"] == "RepositoryNotFoundError"
    assert client(hub, "hf_owner", call="info", repo="kubetune-test/private")["files"] == ["config.json"]


def test_revisions_pin_commits(hub: HubServer, tmp_path: Path) -> None:
    repo = "kubetune-test/moving"
    old = hub.publish(repo, {"config.json": b'{"v": 1}'})
    new = hub.publish(repo, {"config.json": b'{"v": 2}', "extra.json": b"{}"})
    assert old != new and hub.repos[repo].refs["main"] == new
    pinned = client(hub, call="snapshot", repo=repo, revision=old, cache=str(tmp_path))
    latest = client(hub, call="snapshot", repo=repo, cache=str(tmp_path))
    assert json.loads((Path(pinned["path"]) / "config.json").read_text()) == {"v": 1}
    assert json.loads((Path(latest["path"]) / "config.json").read_text()) == {"v": 2}
    assert client(hub, call="info", repo=repo, revision=old) == {"sha": old, "files": ["config.json"]}
