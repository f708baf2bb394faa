#!/usr/bin/env bash
# Regenerate the images' lock files (requirements/*.lock): every package pinned with its sha256 hashes, for
# the image's Python and platform. The Dockerfiles install only from these, with pip --require-hashes.
# Needs `uv` (in kubetune[test]) and PyPI. Run after changing dependencies in pyproject.toml; a test checks
# that the locks still satisfy pyproject.toml (tests/trainer/test_supply_chain.py).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/requirements"
UV=${UV:-$(command -v uv || echo "$ROOT/.venv/bin/uv")}  # uv is in the test extra
export UV_PYTHON_DOWNLOADS=never  # resolve for --python-version without fetching an interpreter
compile() { "$UV" pip compile --generate-hashes --only-binary :all: --python-platform x86_64-manylinux_2_28 \
  --no-header "$@"; }
compile ../pyproject.toml --extra operator --extra api --python-version 3.11 -o operator.lock   # python:3.11-slim
compile ../pyproject.toml --extra trainer --extra liger -c trainer-constraints.txt --python-version 3.12 -o trainer.lock  # ubuntu24.04; Liger: the loss kernel on CUDA
compile smollm2.in --no-deps --python-version 3.12 -o smollm2.lock  # its declared deps belong to another tool
compile build.in --python-version 3.11 -o build.lock  # setuptools, to build kubetune itself without isolation
