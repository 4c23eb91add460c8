#!/usr/bin/env bash
# A million-latent TopK SAE through the whole stack on one machine: a MiniLM producer actor feeding
# 2 feature-parallel trainer actors on a local Ray cluster, checkpoints to s3:// on a local moto server,
# one trainer actor killed (SIGKILL) after the first checkpoint and the group restarted from it, the
# feature-sharded export, then `sae-dist eval` and dashboards for a sample of features.
#
#     bash scripts/million.sh                                   # n = 2^20, 2^18 tokens (a benchmark: hours here)
#     N=16384 TOKENS=32768 EVERY=2 OUT=/tmp/m bash scripts/million.sh   # the same path at a toy size
#
# Settings (environment): N latents, TOKENS training tokens, BATCH tokens per step, EVERY steps between
# checkpoints, OUT the run folder, PORT of the moto server, FEATURES dashboards to build (of the first
# latents that fire on 4,096 tokens: most of a short run's 2^20 are dead), EVAL_TOKENS
# held-out tokens evaluated (in training and by `sae-dist eval`), DASH_TOKENS tokens the dashboards read
# (each token costs the encoder 2 d n FLOP, 0.8 GFLOP at 2^20 latents: the default job's 50,300 and
# 131,072 would add about 40 minutes here to a two-hour run; from 2^18 latents up the defaults are
# 16,384 and 32,768), TIMEOUT
# seconds an actor may take to start (cluster.timeout_s: minutes on a loaded 2-core machine). Extra
# arguments go to the training command as Hydra overrides (e.g. `data=cache data.cache_dir=/tmp/acts`
# to read the activation cache instead of running the LM).
# Prints wall time, tokens/s, per-rank peak RSS, dead fraction and the eval; all of it lands in OUT.
set -euo pipefail

N=${N:-1048576}
TOKENS=${TOKENS:-262144}
BATCH=${BATCH:-4096}
EVERY=${EVERY:-16}
OUT=${OUT:-outputs/million}
PORT=${PORT:-9100}
FEATURES=${FEATURES:-32}
big=$(( N >= 262144 ))  # at the small sizes, the default job's held-out set and dashboard reading
EVAL_TOKENS=${EVAL_TOKENS:-$(( big ? 16384 : 65536 ))}
DASH_TOKENS=${DASH_TOKENS:-$(( big ? 32768 : 131072 ))}
TIMEOUT=${TIMEOUT:-1800}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# freed tensors go back to the OS at once (glibc keeps blocks under its dynamic mmap threshold, up to
# 32 MB, in its heaps): two ranks of ~8 GB each and a checkpoint's host copy share 24 GB here
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}

rm -rf "$OUT" && mkdir -p "$OUT"
cat > "$OUT/first_checkpoint.py" <<'PYW'
"""Exit 0 once a checkpoint step under s3://million/runs/sae is complete (its manifest.json, written last)."""
import os
import sys

import s3fs

fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
sys.exit(0 if fs.glob("million/runs/sae/step-*/manifest.json") else 1)
PYW
cat > "$OUT/train.sh" <<EOF
#!/usr/bin/env bash
# run by scripts/local_s3.py with the AWS variables pointing at the moto server
set -uo pipefail
sae-dist cluster.producers=1 parallel.fp=2 sae.n_latents=$N trainer.batch_tokens=$BATCH \\
  trainer.total_tokens=$TOKENS trainer.eval_tokens=$EVAL_TOKENS trainer.log_every=4 checkpoint=s3 checkpoint.url=s3://million/runs \\
  checkpoint.every_steps=$EVERY checkpoint.async_upload=false cluster.timeout_s=$TIMEOUT tracking=none \\
  hydra.run.dir=$OUT $* \\
  > $OUT/train.log 2>&1 &
job=\$!
# the fault: once the first checkpoint is complete, SIGKILL one trainer rank's process
until python $OUT/first_checkpoint.py 2>/dev/null; do
  kill -0 \$job 2>/dev/null || break
  sleep 30  # each check starts python and imports s3fs: ~1 s of a core, taken from the trainers
done
victim=\$(pgrep -f "TrainerWorker" | tail -1 || true)
if [ -n "\$victim" ]; then
  echo "SIGKILL to trainer actor process \$victim once a checkpoint was complete" | tee $OUT/fault.txt
  kill -9 "\$victim"
fi
wait \$job
EOF
chmod +x "$OUT/train.sh"

start=$(date +%s)
python scripts/local_s3.py --port "$PORT" --bucket million --run -- bash "$OUT/train.sh" \
  2> "$OUT/s3.log" || { tail -30 "$OUT/train.log"; exit 1; }
wall=$(( $(date +%s) - start ))
python - "$OUT" "$wall" "$TOKENS" <<'PY'
import json, os, sys
out, wall, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = json.load(open(f"{out}/results.json"))
print(f"wall {wall} s, {tokens / wall:.0f} tokens/s over the whole job (LM, restart and export included)")
summary = json.loads([line for line in open(f"{out}/train.log") if line.startswith("{")][-1])
print("trainer group restarts:", summary.get("group_restarts"))
fault = open(f"{out}/fault.txt").read().strip() if os.path.exists(f"{out}/fault.txt") else "none"
print("fault:", fault)
print("held-out FVU %.4f  L0 %.1f  dead %.2f%%" % (r["fvu"], r["l0"], 100 * r["dead_fraction"]))
print("training tokens/s (the attempt that finished):", r["train_tokens_per_s"])
print("peak RSS per rank, GiB (the attempt that finished: training, export, eval):", r["peak_rss_gib"])
PY
sae-dist eval "$OUT" | tee "$OUT/eval.txt"
sae-dist dashboard build "$OUT" --features "$FEATURES" --alive 4096 --tokens "$DASH_TOKENS" --out "$OUT/dash" | tail -3
echo "run folder: $OUT (train.log, results.json, eval/, dash/)"
