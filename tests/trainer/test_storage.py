"""Storage against a real S3 server (moto standalone, over HTTP) and a local directory: same interface,
multipart uploads, integrity-checked model downloads, and failures that say what is wrong."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    download_prefix,
    open_storage,
)

from kubetune.s3 import read_s3_config


def roundtrip(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01" * 1000)
    written = store.put_dir(src, "ckpt")
    assert written == 5 + 2000
    assert store.list("ckpt/") == ["ckpt/a.txt", "ckpt/sub/b.bin"]
    assert store.get_bytes("ckpt/a.txt") == b"alpha"
    store.get_dir("ckpt", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == b"\x00\x01" * 1000
    assert store.exists("ckpt/a.txt") and not store.exists("ckpt/zzz")
    store.delete_prefix("ckpt")
    assert store.list("ckpt/") == []


def test_local_and_s3_behave_the_same(tmp_path: Path, s3: Any, bucket: str) -> None:
    local = open_storage(str(tmp_path / "out"))
    assert isinstance(local, LocalStorage)
    local.check()
    roundtrip(local, tmp_path / "l")
    remote = open_storage(f"s3://{bucket}/jobs/one/")
    assert isinstance(remote, S3Storage)
    remote.check()
    roundtrip(remote, tmp_path / "r")


def test_large_files_go_multipart(tmp_path: Path, s3: Any, bucket: str) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"k" * (17 * 1024 * 1024))  # over the 16 MiB threshold: two parts
    S3Storage(f"s3://{bucket}/x").put_file(big, "big.bin")
    head = s3.head_object(Bucket=bucket, Key="x/big.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-2")  # S3's multipart ETag: md5-of-parts, then the part count


def test_missing_bucket_is_a_storage_error(s3: Any) -> None:
    with pytest.raises(StorageError) as err:
        open_storage("s3://no-such-bucket-here/prefix").check()
    assert err.value.exit_code == 4
    assert "bucket 'no-such-bucket-here' does not exist" in str(err.value)


def test_wrong_credentials_is_a_storage_error(auth_s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError) as err:
        S3Storage("s3://adapters/x", endpoint_url=auth_s3_endpoint).check()
    assert "s3://adapters/x: cannot access the bucket" in str(err.value)
    assert "403" in str(err.value) or "credentials" in str(err.value)


def test_model_prefix_download_is_verified_and_cached(tmp_path: Path, s3: Any, bucket: str) -> None:
    config = {"model_type": "llama", "hidden_size": 64}
    s3.put_object(Bucket=bucket, Key="models/m/config.json", Body=json.dumps(config).encode())
    s3.put_object(Bucket=bucket, Key="models/m/weights.bin", Body=b"w" * 4096)
    assert read_s3_config(f"s3://{bucket}/models/m/") == config
    assert read_s3_config(f"s3://{bucket}/models/none/") is None
    target = download_prefix(f"s3://{bucket}/models/m/", tmp_path / "cache")
    assert json.loads((target / "config.json").read_text()) == config
    assert (target / "weights.bin").read_bytes() == b"w" * 4096
    # a second call finds the verified copy and downloads nothing
    (target / "weights.bin").write_bytes(b"tampered")
    assert download_prefix(f"s3://{bucket}/models/m/", tmp_path / "cache") == target
    assert (target / "weights.bin").read_bytes() == b"tampered"
    # a manifest whose sha256 does not match what was downloaded is refused
    manifest = {"files": {"weights.bin": {"sha256": hashlib.sha256(b"other").hexdigest()}}}
    s3.put_object(Bucket=bucket, Key="models/m/manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(StorageError, match=r"sha256 does not match manifest\.json"):
        download_prefix(f"s3://{bucket}/models/m/", tmp_path / "cache")


def test_unwritable_local_output(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="not writable"):
        LocalStorage(blocker / "out").check()
