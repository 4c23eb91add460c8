#!/usr/bin/env bash
# One-command setup on a fresh machine: bash scripts/setup.sh
#
# - With no torch installed, pins torch==2.13.0 (constraints/cpu.txt), the CPU wheel; without the pin a
#   dependency asking for "torch" would pull a multi-GB CUDA build.
# - With torch already installed (a GPU machine), keeps it and installs the rest around it.
# - Installs the project editable with the extras the tests use, and (as root, where apt exists) Debian's
#   python3.11-doc (~12 MB more of CPython's documentation for the default corpus) and chromium.
# EXTRAS overrides the extras (default: dev,ray,s3,deepspeed); PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,ray,s3,deepspeed}
export DS_BUILD_OPS=0  # DeepSpeed without compiled ops: its ZeRO optimizer runs on CPU and GPU
if $PY -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $($PY -c 'import torch; print(torch.__version__)')"
  $PY -m pip install -e ".[${EXTRAS}]"
else
  $PY -m pip install -c constraints/cpu.txt -e ".[${EXTRAS}]"
fi
# As root with apt: Debian's python3.11-doc (more prose for the default corpus) and chromium (the
# dashboard's browser test drives /usr/bin/chromium through Playwright, which never downloads a browser).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  want=()
  ls /usr/share/doc/python3*/html/_sources >/dev/null 2>&1 || want+=(python3.11-doc)
  [ -x /usr/bin/chromium ] || want+=(chromium)
  if [ ${#want[@]} -gt 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}") \
      || echo "setup: could not install ${want[*]} (the corpus falls back to the stdlib's docs)"
  fi
fi
echo "setup: done. Run the default job with: sae-dist"
