#!/usr/bin/env bash
# Set up (with test extras) and run the whole check: lint, types, tests. No GPU needed: GPU tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
.venv/bin/mypy
# One pytest-xdist worker per core, at most 4 (each worker's trainer and pod processes take memory);
# KUBETUNE_TEST_WORKERS=0 runs the tests in this process, and arguments after ours win.
cores=$(nproc)
workers=${KUBETUNE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
echo "==> pytest ($workers workers)"
set +e
.venv/bin/python -m pytest -n "$workers" --dist worksteal --durations=15 "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit $rc
