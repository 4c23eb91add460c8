#!/usr/bin/env bash
# A side virtual environment with the peers' own evaluation code and loaders, for tests/test_peer_metrics.py:
#     bash scripts/peer_venv.sh            # -> .venv-peer (about 3.5 minutes and 2.8 GB here)
#     bash scripts/peer_venv.sh /some/dir
# SAEBench 0.6.0 pins numpy<2 and datasets<4, which would downgrade this project's environment, so the
# peers live apart; SAEBench brings SAELens. torch is pinned to the CPU wheel (constraints/cpu.txt).
# PyPI's torchvision does not import beside that wheel and breaks `import transformers` there; the
# core evaluation never uses it, so it is removed. The test finds the venv at .venv-peer, or at
# $SAE_DIST_PEER_PYTHON (its python).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.venv-peer}
rm -f "$DEST/READY"
PY=${PYTHON:-python3}
$PY -m venv "$DEST"
"$DEST/bin/python" -m pip install -q -c constraints/cpu.txt torch==2.13.0 sae-bench==0.6.0 sae-lens==6.54.12
"$DEST/bin/python" -m pip uninstall -q -y torchvision || true
# circuit-tracer's CLT loader (tests/peer_clt.py) needs only torch, safetensors, numpy and pydantic, all
# there; its full dependencies (nnsight, transformers <= 4.57) are for attribution graphs, never run here
"$DEST/bin/python" -m pip install -q --no-deps circuit-tracer==0.5.0
"$DEST/bin/python" -c "import sae_lens, sae_bench.evals.core.main, circuit_tracer.transcoder.cross_layer_transcoder; print('peer venv:', '$DEST', 'sae-lens', sae_lens.__version__)"
touch "$DEST/READY"  # tests/test_peer_metrics.py uses the venv only once this exists
