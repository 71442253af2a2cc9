#!/usr/bin/env bash
# upm_jax on an NVIDIA GPU in one call of under 8 minutes, everything it measures in $OUT:
#
#   1. JAX with CUDA: the installed JAX if it sees a GPU, else `pip install jax[cuda12]==0.10.2`
#      (wheels in ./.whl, e.g. ml-collections and tensorboardX, are installed first, for a
#      machine without a package index);
#   2. the benchmark's training rows (steps/s and frames/s of DAL, LAM and GAM, float32 and
#      bfloat16, batch 64, 256x128) with the roofline of each compiled step on this GPU, and
#      its extraction rows (frames/s);
#   3. 50 training steps of the demo at matmul precision 'highest' on this GPU and on this
#      machine's CPU: the loss at every step, the final features and Rank-1 side by side;
#   4. the demo (python -m upm_jax.main --config configs/demo.py), timed.
#
#   OUT=/tmp/out bash tools/gpu_check.sh               # on the GPU machine, from the repo root
#   OUT=/tmp/out bash tools/gpu_check.sh --rehearse    # here, on the CPU at tiny sizes: checks
#                                                      # every command of the script
# Files in $OUT (at most 7): summary.txt (the figures), bench.json, trajectory.json, and the
# logs setup.log, bench.log, trajectory.log, demo.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=""   # every compilation measured as a fresh machine has it
REHEARSE=0 LIMIT_SCALE=1
[ "${1:-}" = "--rehearse" ] && REHEARSE=1 LIMIT_SCALE=6   # a small shared CPU: no time limits to speak of
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "== $(date +%T) $*" | tee -a "$SUMMARY"; }
stage() {  # stage NAME LOG SECONDS COMMAND...: runs it under a time limit, its output added to $OUT/LOG.log
  local name=$1 log=$2 limit=$(($3 * LIMIT_SCALE)); shift 3
  local start=$SECONDS
  echo "== $name: $*" >> "$OUT/$log.log"
  timeout "$limit" "$@" >> "$OUT/$log.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - start)) s (log: $log.log)"
  return $rc
}

if [ "$REHEARSE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  BENCH_SIZE=(--image-size 64 --depth-multiplier 0.25 --n-part 2 --batches 16 --steps 1
              --repeats 1 --extract-ids 4 --extract-batch 32)
  TRAJECTORY_STEPS=5
  DEMO=(--config.train.steps=20 --config.data.image_size=64 --config.data.synthetic_ids=8
        --config.train.batch_size=16 --config.eval.batch_size=64)
else
  BENCH_SIZE=(--image-size 256 --depth-multiplier 1.0 --n-part 8 --batches 64 --steps 20
              --repeats 3 --extract-ids 40 --extract-batch 256)
  TRAJECTORY_STEPS=50
  DEMO=()
fi
say "upm_jax GPU check ($( [ $REHEARSE = 1 ] && echo 'CPU rehearsal' || echo 'GPU' )), load $(cut -d' ' -f1-3 /proc/loadavg)"

# 1. JAX with CUDA
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  stage install_wheels setup 120 "$PY" -m pip install --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH=$WORK/site:$PYTHONPATH
fi
if [ "$REHEARSE" = 0 ] && ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" > /dev/null 2>&1; then
  stage install_jax setup 240 "$PY" -m pip install "jax[cuda12]==0.10.2"
fi
"$PY" - <<'EOF' 2>> "$OUT/setup.log" | tee -a "$SUMMARY"
import jax, flax, optax, orbax.checkpoint
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", orbax.checkpoint.__version__, "devices", jax.devices())
if jax.__version__ != "0.10.2":
    print("note: upm_jax pins jax 0.10.2; these figures come from jax", jax.__version__)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  >> "$SUMMARY" 2>> "$OUT/setup.log"

# 2. the benchmark rows
stage bench_train bench 210 "$PY" -m upm_jax.benchmark --sections train --backbones mobilenet_v1 \
  --heads dal,upm_local,upm_global --dtypes float32,bfloat16 "${BENCH_SIZE[@]}" --out "$OUT/bench.json"
stage bench_extract bench 60 "$PY" -m upm_jax.benchmark --sections extract --backbones mobilenet_v1 \
  --heads upm_local --dtypes float32,bfloat16 "${BENCH_SIZE[@]}" --out "$WORK/extract.json"
"$PY" - "$OUT/bench.json" "$WORK/extract.json" <<'EOF' 2>> "$OUT/bench.log" | tee -a "$SUMMARY"
import json, os, sys
rows = []
for path in sys.argv[1:]:
    if os.path.isfile(path):
        rows += json.load(open(path))
json.dump(rows, open(sys.argv[1], "w"), indent=1)
for r in rows:
    if r["section"] == "train":
        roof = r.get("roofline_steps_per_s")
        print(f"train {r['method']:10s} {r['dtype']:8s} batch {r['batch']}: {r['steps_per_s']:.1f} "
              f"steps/s, {r['frames_per_s']:.0f} frames/s" + (
                  f"; roofline {roof:.0f} steps/s ({r['steps_per_s'] / roof:.0%} of it)" if roof else ""))
    else:
        print(f"extract {r['method']:10s} {r['dtype']:8s} {r['input']}: {r['frames_per_s']:.0f} frames/s")
EOF

# 3. the same training steps on this GPU and on this CPU, precision 'highest'
TRAJ=(--config=configs/demo.py --mode=all "${DEMO[@]}" --config.train.steps=$TRAJECTORY_STEPS
      --config.train.log_every=1 --config.train.checkpoint_every=$TRAJECTORY_STEPS
      --config.model.matmul_precision=highest --config.eval.initial=false)
stage trajectory_accelerator trajectory 60 "$PY" -m upm_jax.main "${TRAJ[@]}" --workdir="$WORK/accelerator"
JAX_PLATFORMS=cpu stage trajectory_cpu trajectory 60 "$PY" -m upm_jax.main "${TRAJ[@]}" --workdir="$WORK/cpu"
"$PY" - "$WORK" "$OUT/trajectory.json" <<'EOF' 2>> "$OUT/trajectory.log" | tee -a "$SUMMARY"
import json, os, sys
import numpy as np
from upm_jax import evaluation
work, out = sys.argv[1:]
runs = {}
for name in ("accelerator", "cpu"):
    model = os.path.join(work, name, "split_1", "lam")
    losses = [json.loads(line)["loss"] for line in open(os.path.join(model, "metrics.jsonl"))]
    feats = evaluation.load_features(os.path.join(model, "features.npz"))["frame_feat"]
    rank1 = json.load(open(os.path.join(work, name, "results.json")))["mean"]["paper"]["rank1"]
    runs[name] = dict(losses=losses, feats=np.asarray(feats, np.float64), rank1=rank1)
a, c = runs["accelerator"], runs["cpu"]
gap = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["losses"], c["losses"])]
feat_gap = float(np.max(np.abs(a["feats"] - c["feats"])) / np.max(np.abs(c["feats"])))
record = dict(steps=len(gap), loss_accelerator=a["losses"], loss_cpu=c["losses"],
              loss_relative_gap=gap, features_relative_gap=feat_gap,
              rank1_accelerator=a["rank1"], rank1_cpu=c["rank1"])
json.dump(record, open(out, "w"), indent=1)
first = next((i for i, g in enumerate(gap) if g > 1e-4), None)
print(f"{len(gap)} steps: loss gap {gap[0]:.1e} at step 1, max {max(gap):.1e}"
      + (f", first above 1e-4 at step {first + 1}" if first is not None else "")
      + f"; features {feat_gap:.1e}; Rank-1 {a['rank1']:.1f} (accelerator) vs {c['rank1']:.1f} (CPU)")
EOF

# 4. the demo
stage demo demo 75 "$PY" -m upm_jax.main --config=configs/demo.py --workdir="$WORK/demo" "${DEMO[@]}"
tail -n 12 "$OUT/demo.log" >> "$SUMMARY"
say "done"
rm -rf "$WORK"
