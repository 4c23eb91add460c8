#!/usr/bin/env bash
# The GPU checks (compiled Triton kernels, GPU bench) and the CUDA paths, for a lent GPU machine whose Python image has torch and
# Triton but not this project's other needs (it cannot fetch anything).
#
#   bash scripts/gpu_kit.sh fetch             # here, with pip access: wheels the GPU image lacks -> .whl/
#   bash scripts/gpu_kit.sh run STEP...       # there: install from .whl/, then each STEP, logs under $OUT
#
# STEPs: env (versions, nvidia-smi), kernels (pytest tests/test_kernels.py: compiled Triton on CUDA),
# compile (scripts/compile_kernels.py), bench (scripts/bench_kernels.py at the issue's GPU shapes),
# train (a short synthetic job on cuda: fp32, and bf16 weights under DeepSpeed), device (tests/test_device.py).
# With the `device` tool: command "bash scripts/gpu_kit.sh run env kernels compile", carry [".whl"], then
# "bash scripts/gpu_kit.sh run bench" and "... run train device" (each call stays under 10 minutes).
# .whl/ is ignored by git (.git/info/exclude) and about 5 MB. PYVER=3.11 fetch: wheels for another Python.
set -euo pipefail
cd "$(dirname "$0")/.."

fetch() {
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  local plat=(--only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # Hydra + OmegaConf (config), DeepSpeed's pure-Python needs (bf16 / ZeRO); torch, Triton, numpy, safetensors,
  # fsspec, tqdm, psutil, msgpack, ninja, py-cpuinfo, einops, pytest are in the GPU image already
  python3 -m pip download -q --no-deps "${plat[@]}" -d .whl hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  python3 -m pip download -q --no-deps --no-binary=:all: -d .whl antlr4-python3-runtime==4.9.3  # sdist only
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8  # pure Python
  ls -la .whl
}

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target /tmp/site .whl/*
  # a copy of the tree with the package laid out as setuptools maps it (kernels/ is sae_dist.kernels), so
  # nothing is built; the steps run in it (python -m puts the working folder first on the path)
  rm -rf /tmp/pkg && mkdir -p /tmp/pkg
  tar --exclude=./.git --exclude=./.whl -cf - . | tar -xf - -C /tmp/pkg
  cp -r kernels /tmp/pkg/sae_dist/kernels
  cd /tmp/pkg
  export PYTHONPATH=/tmp/pkg:/tmp/site DS_BUILD_OPS=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}

step() {
  local name=$1 log=$OUT/$1.txt
  echo "== $name" | tee "$log"
  case $name in
    env)
      nvidia-smi -L 2>&1 | tee -a "$log" || true
      python3 -c "import torch, triton, deepspeed, sae_dist.kernels as k; print('torch', torch.__version__, 'triton',
triton.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available()
else 'no CUDA', 'kernels on cuda:', k.backend_for(torch.empty(1, device='cuda')) if torch.cuda.is_available() else '-')" \
        2>&1 | tee -a "$log" ;;
    kernels) python3 -m pytest -q -rs tests/test_kernels.py 2>&1 | tee -a "$log" ;;
    compile) python3 scripts/compile_kernels.py --k-aux 64 384 2>&1 | tee -a "$log" ;;
    bench) python3 scripts/bench_kernels.py --cases 768:32768:32:16384 4096:262144:32:16384 --memory-cases \
             4096:262144:32:16384 2>&1 | tee -a "$log" ;;
    train)
      local n=${KIT_N:-32768} batch=${KIT_BATCH:-16384} steps=${KIT_STEPS:-200}  # KIT_DEVICE=cpu: a dry run
      for dtype in fp32 bf16; do
        python3 -m sae_dist data=synthetic model.d_model=768 sae.n_latents="$n" sae.k=32 trainer.batch_tokens="$batch" \
          trainer.total_tokens=$((batch * steps)) trainer.device="${KIT_DEVICE:-cuda}" trainer.param_dtype=$dtype \
          trainer.log_every=20 tracking=none checkpoint.every_steps=0 hydra.run.dir=/tmp/train-$dtype 2>&1 \
          | grep -v -i warn | tail -5 | tee -a "$log"
        cp /tmp/train-$dtype/results.json "$OUT/train-$dtype.json"
      done ;;
    device) python3 -m pytest -q -rs tests/test_device.py 2>&1 | tee -a "$log" ;;
    *) echo "unknown step $name (env kernels compile bench train device)" | tee -a "$log"; return 2 ;;
  esac
}

case ${1:-} in
  fetch) fetch ;;
  run)
    shift
    OUT=$(realpath -m "${OUT:-/tmp/gpu-kit}"); mkdir -p "$OUT"
    install
    status=0
    for s in "$@"; do step "$s" || status=1; done
    exit $status ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
