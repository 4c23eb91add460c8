#!/usr/bin/env bash
# A side virtual environment with EleutherAI's sparsify, for scripts/peer_sparsify.py:
#     bash scripts/peer_sparsify_venv.sh            # -> .venv-sparsify
#     bash scripts/peer_sparsify_venv.sh /some/dir
# sparsify (PyPI eai-sparsify) brings transformers, datasets and accelerate, whose versions need not
# match this project's, so it lives apart. torch is pinned to the CPU wheel (constraints/cpu.txt).
# PyPI's torchvision does not import beside that wheel and breaks `import transformers`, which
# sparsify imports at the top; nothing here uses it, so it is removed if anything pulled it in.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.venv-sparsify}
rm -f "$DEST/READY"
PY=${PYTHON:-python3}
$PY -m venv "$DEST"
"$DEST/bin/python" -m pip install -q -c constraints/cpu.txt torch==2.13.0 eai-sparsify==1.3.3
"$DEST/bin/python" -m pip uninstall -q -y torchvision || true
"$DEST/bin/python" -c "import importlib.metadata as m, sparsify; print('sparsify venv:', '$DEST', 'eai-sparsify', m.version('eai-sparsify'))"
touch "$DEST/READY"
