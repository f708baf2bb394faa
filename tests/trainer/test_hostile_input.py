"""Issue 11 findings 5-7: what the trainer does with hostile input (real files, moto's S3, real training).

- a checkpoint whose trainer_state.pt is a pickle that runs code is never unpickled;
- S3 and local keys that would leave their root ('..', absolute) are refused before anything is written;
- binary or malformed rows exit 2 naming line and field (never 1, which the Job would retry on a GPU);
- a YAML alias bomb fails fast instead of expanding in an error message;
- a re-run to the same output removes the old manifest before writing adapter files.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer.__main__ import load_config
from kubetune_trainer.data import DataError, read_rows
from kubetune_trainer.loop import CHECKPOINTS, COMPLETE, RunOptions, fingerprint
from kubetune_trainer.progress import Log
from kubetune_trainer.runner import run_job
from kubetune_trainer.storage import LocalStorage, StorageError, contained, download_prefix, fetch_input

GOOD = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'


def run_inprocess(config: Path, tmp_path: Path, log: Path | None = None) -> tuple[int, dict[str, Any]]:
    termination = tmp_path / f"termination-{time.monotonic_ns()}.json"
    stream = log.open("w") if log else None
    try:
        code, _ = run_job(load_config(str(config)), RunOptions(device="cpu", termination_log=str(termination)),
                          Log(fmt="json", stream=stream) if stream else Log(fmt="json"))
    finally:
        if stream:
            stream.close()
    return code, json.loads(termination.read_text())


# --- 5. checkpoints cannot run code ---------------------------------------------------------------------------

class Payload:
    """Unpickling this calls Path.write_text: what an attacker's checkpoint would do (here, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "code ran while loading a checkpoint"))


def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                     spec_for: Callable[..., dict[str, Any]],
                                                     write_config: Callable[..., Path]) -> None:
    out = tmp_path / "out"
    config = write_config(spec_for(tiny_model_dir, chat_file, str(out), maxSteps=2))
    planted = out / CHECKPOINTS / "step-00000001"
    planted.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "scheduler": {}, "rng": {}}, planted / "trainer_state.pt")
    (planted / "adapter_model.safetensors").write_bytes(b"not read")
    state = {"step": 1, "tokens": 10, "loss": 1.0, "fingerprint": fingerprint(load_config(str(config)))}
    (planted / "state.json").write_text(json.dumps(state))
    (planted / COMPLETE).write_text(json.dumps(state))

    log = tmp_path / "log.jsonl"
    code, summary = run_inprocess(config, tmp_path, log)
    assert not marker.exists(), "torch.load ran code from the checkpoint"
    assert code == 0, summary
    assert summary["steps"] == 2  # trained from the start: the planted step 1 was not resumed
    assert "ignoring checkpoints/step-00000001: trainer_state.pt holds more than tensors" in log.read_text()


# --- 6. keys stay inside their root ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a/\x00b"])
def test_contained_refuses_keys_that_leave_the_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError, match="refusing it"):
        contained(tmp_path / "root", key, "s3://b/p")
    assert contained(tmp_path / "root", "a/b..c/d.txt", "x") == tmp_path / "root" / "a" / "b..c" / "d.txt"


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(StorageError, match="resolves outside"):
        contained(root, "link/escape.txt", "x")


def test_s3_model_download_refuses_a_key_with_dot_dot(tmp_path: Path, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="models/m/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="models/m/../../../../escape.txt", Body=b"owned")
    assert any(".." in o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])  # S3 stores it as is
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(StorageError, match=r"escape\.txt.*refusing it"):
        download_prefix(f"s3://{bucket}/models/m/", cache)
    assert not list(tmp_path.rglob("escape.txt"))


def test_s3_dataset_and_prefix_uris_with_dot_dot_are_refused(tmp_path: Path, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="../../escape.jsonl", Body=GOOD.encode())
    with pytest.raises(StorageError, match="refusing it"):
        fetch_input(f"s3://{bucket}/../../escape.jsonl", tmp_path / "cache")
    with pytest.raises(StorageError, match="refusing it"):
        download_prefix(f"s3://{bucket}/../../", tmp_path / "cache")
    assert not list(tmp_path.rglob("escape.jsonl"))


def test_local_storage_and_get_dir_keep_keys_inside(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "out")
    source = tmp_path / "f.txt"
    source.write_text("x")
    for bad in ("../escape.txt", "ckpt/../../escape.txt"):
        with pytest.raises(StorageError, match="refusing it"):
            store.put_file(source, bad)
    with pytest.raises(StorageError):
        store.get_file("../f.txt", tmp_path / "copy.txt")
    assert not (tmp_path / "escape.txt").exists()
    store.put_file(source, "ckpt/a.txt")
    store.get_dir("ckpt", tmp_path / "back")
    assert (tmp_path / "back" / "a.txt").read_text() == "x"


# --- 7. bad data keeps the exit contract ----------------------------------------------------------------------

@pytest.mark.parametrize(("name", "content", "message"), [
    ("train.jsonl", GOOD.encode() + b"\xff\xfe\x00garbage\x89PNG\r\n", "train.jsonl line 2: not UTF-8 text"),
    ("train.jsonl", GOOD.encode() + b"[" * 100_000 + b"\n", "train.jsonl line 2: not valid JSON (nested too deeply)"),
    ("train.json", b"\x89PNG\r\n\x1a\n\x00\x00", "train.json file: not UTF-8 text"),
    ("train.csv", b"instruction,output\nhi,there\nhi,there,extra\n",
     "train.csv line 3: 3 fields, but the header names 2 (instruction, output); unexpected field 3 ('extra')"),
    ("train.csv", b"instruction,input,output\nhi,,there\nhi,there\n",
     "train.csv line 3: 2 fields, but the header names 3 (instruction, input, output); field 'output' is missing"),
    ("train.csv", b"instruction,output\n\xff\xfe,x\n", "train.csv file: not UTF-8 text"),
])
def test_malformed_rows_are_data_errors_naming_line_and_field(tmp_path: Path, name: str, content: bytes,
                                                              message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_rows(path, name)
    assert message in str(info.value)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", GOOD.encode() + b"\x80\x81\x82 binary\n", "bad.jsonl line 2: not UTF-8 text"),
    ("bad.csv", b"instruction,output\nhi,there\nhi,there,extra\n", "bad.csv line 3: 3 fields"),
])
def test_malformed_data_exits_2_before_the_model_loads(tmp_path: Path, tiny_model_dir: Path, name: str,
                                                       content: bytes, message: str,
                                                       spec_for: Callable[..., dict[str, Any]],
                                                       write_config: Callable[..., Path], train_here: Any) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    spec = spec_for(tiny_model_dir, path, str(tmp_path / "out"))
    spec["dataset"]["format"] = "alpaca" if name.endswith(".csv") else "chat"
    run = train_here(write_config(spec))
    assert run.code == 2, run.log
    assert run.summary["outcome"] == "InvalidInput" and message in run.summary["error"]
    assert '"event": "model"' not in run.log


BOMB = """apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: bomb}
x: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
y: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
z: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
u: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
v: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
w: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
q: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
spec:
  model: {name: meta-llama/Llama-3.1-8B-Instruct}
  dataset: {source: s3://d/train.jsonl}
  output: {uri: s3://o/x/}
  lora: {targetModules: *g}
"""


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))  # 2 GiB: a regression fails, not the machine


@pytest.mark.parametrize("command", ["plan", "train"])
def test_a_yaml_alias_bomb_fails_fast(tmp_path: Path, command: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB.encode()) < 700
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", command, "-f", str(path)], capture_output=True,
                            text=True, timeout=60, preexec_fn=_limit_memory)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "document 1 expands to more than 10000 YAML nodes (aliases)" in result.stderr
    assert time.perf_counter() - started < 20 and len(result.stderr) < 2000


def test_alias_count_is_capped_and_plain_anchors_still_load() -> None:
    from kubetune.errors import SpecError
    from kubetune.yamlsafe import load_all

    assert load_all("a: &x {r: 8}\nb: *x\n", "ok.yaml") == [{"a": {"r": 8}, "b": {"r": 8}}]
    many = "a: &x 1\nb: [" + ", ".join(["*x"] * 150) + "]\n"
    with pytest.raises(SpecError, match="more than 100 YAML aliases"):
        load_all(many, "many.yaml")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_all("a: [", "bad.yaml")


# --- 7. a re-run never leaves the old manifest over new files -------------------------------------------------

def test_rerun_removes_the_old_manifest_before_writing(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                       spec_for: Callable[..., dict[str, Any]],
                                                       write_config: Callable[..., Path]) -> None:
    out = tmp_path / "out"
    config = write_config(spec_for(tiny_model_dir, chat_file, str(out), maxSteps=2))
    code, _ = run_inprocess(config, tmp_path)
    assert code == 0 and (out / "adapter" / "manifest.json").exists()
    # the re-run's upload fails after adapter_model.safetensors and before the manifest (tokenizer.json
    # cannot be replaced): the old manifest must not be left describing a mix of old and new files
    (out / "adapter" / "tokenizer.json").unlink()
    (out / "adapter" / "tokenizer.json").mkdir()
    (out / "adapter" / "tokenizer.json" / "keep").write_text("x")
    code, summary = run_inprocess(write_config(spec_for(tiny_model_dir, chat_file, str(out), maxSteps=2,
                                                        learningRate=5e-3), name="rerun"), tmp_path)
    assert code == 4 and summary["outcome"] == "StorageError", summary
    assert not (out / "adapter" / "manifest.json").exists()
