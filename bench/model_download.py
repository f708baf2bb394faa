"""Model download: a hub id into an empty model cache, then a second attempt on the same cache (not a test).

    .venv/bin/python bench/model_download.py [--attempts 3]

The test hub (tests/hub_server.py) serves the bundled SmolLM2-135M-Instruct (270 MB of bf16 safetensors
plus decoys the download must skip) on 127.0.0.1; each attempt is `kubetune_trainer.hub.download` in a
fresh child process with a pod's environment (HF_ENDPOINT, HF_HUB_CACHE), as a trainer pod runs it.
Reported per attempt: wall time of the child (interpreter start included), the files whose bodies the hub
served, bytes served, and the hub requests; then the same with the revision pinned to the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hub_server import SMOLLM_REPO, HubServer, hub_env, serve_smollm  # noqa: E402

CHILD = """
import json, sys, time
started = time.perf_counter()
from kubetune_trainer.hub import download
snap = download(sys.argv[1], sys.argv[2] or None)
print(json.dumps({"seconds": time.perf_counter() - started, "downloaded": snap.downloaded, "commit": snap.commit}))
"""


def attempt(hub: HubServer, cache: Path, revision: str = "") -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | hub_env(hub) | {
        "HF_HUB_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "trainer")])}
    hub.clear_log()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, SMOLLM_REPO, revision], env=env, capture_output=True,
                          text=True, check=True)
    wall = time.perf_counter() - started
    inner = json.loads(done.stdout.strip().splitlines()[-1])
    files = hub.file_downloads(SMOLLM_REPO)
    sha = str(inner["commit"])
    served = sum(hub.repos[SMOLLM_REPO].commits[sha][f].size for f in files)
    return {"wall_s": round(wall, 2), "download_s": round(float(inner["seconds"]), 2), "files": len(files),
            "MB": round(served / 1e6, 1), "requests": len(hub.requests), "commit": sha}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=3)
    args = parser.parse_args()
    with HubServer() as hub, tempfile.TemporaryDirectory() as tmp:
        serve_smollm(hub)
        cache = Path(tmp) / "model-cache"
        rows = [("first (empty cache)", attempt(hub, cache))]
        for i in range(2, args.attempts + 1):
            rows.append((f"attempt {i} (cache hit, branch main)", attempt(hub, cache)))
        sha = str(rows[0][1]["commit"])
        rows.append(("cache hit, revision pinned to the commit", attempt(hub, cache, sha)))
    print(f"{'attempt':42} {'wall s':>7} {'in-process s':>12} {'files':>5} {'MB':>7} {'requests':>8}")
    for name, row in rows:
        print(f"{name:42} {row['wall_s']:>7} {row['download_s']:>12} {row['files']:>5} {row['MB']:>7} "
              f"{row['requests']:>8}")
    first, hit = rows[0][1]["wall_s"], rows[1][1]["wall_s"]
    assert isinstance(first, float) and isinstance(hit, float)
    print(f"\ncache hit / first download, wall: {hit / first:.2f}x")


if __name__ == "__main__":
    main()
