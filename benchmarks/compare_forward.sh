#!/usr/bin/env bash
# JAX (python -m ark_jax.benchmark --mode=forward) against PyTorch eager timm
# (benchmarks/timm_forward.py) on the same Swin config, alternating A B A B so
# drift of a shared machine hits both sides alike. Prints each pair's img/s and
# the JAX/PyTorch ratio; every run's JSON line is appended to $LOG.
#
#   benchmarks/compare_forward.sh [MODEL] [IMG_SIZE] [WINDOW] [BATCH] [PAIRS] [STEPS] [WARMUP]
#   benchmarks/compare_forward.sh                             # swin_tiny 128 4 16 2 20 3
#   benchmarks/compare_forward.sh swin_base 224 7 4 2 5 2
#
# MODEL is a configs/ark6.py name (swin_tiny|swin_small|swin_base|swin_large).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=.

model=${1:-swin_tiny} img=${2:-128} window=${3:-4} batch=${4:-16}
pairs=${5:-2} steps=${6:-20} warmup=${7:-3}
# Any timm Swin name works: img_size and window_size override what it says.
timm_name="${model}_patch4_window7_224"
LOG=${LOG:-${TMPDIR:-/tmp}/compare_forward_${model}_${img}_w${window}_b${batch}.jsonl}
err=$(mktemp)
trap 'rm -f "$err"' EXIT

last_json() {  # runs "$@", appends its last stdout line (JSON) to $LOG, echoes it
  local out
  out=$("$@" 2>"$err") || { tail -n 30 "$err" >&2; echo "failed: $*" >&2; exit 1; }
  echo "${out##*$'\n'}" | tee -a "$LOG"
}

img_per_s() {
  "$PY" -c 'import json, sys; print(format(json.loads(sys.argv[1])["img_per_s"], ".2f"))' "$1"
}

echo "JAX vs timm forward: ${model} ${img}px window ${window} batch ${batch}," \
     "${pairs} pairs x ${steps} steps (warm-up ${warmup}); JSON lines -> ${LOG}"
ratios=()
for pair in $(seq "$pairs"); do
  # Other users of a shared machine show up here; compare pairs with similar loads.
  load=$(cut -d ' ' -f 1 /proc/loadavg 2>/dev/null || echo '?')
  jax_json=$(last_json "$PY" -m ark_jax.benchmark --mode=forward \
      --config="configs/ark6.py:${model},${img},${window}" --config.batch_size="$batch" \
      --steps="$steps" --warmup="$warmup")
  torch_json=$(last_json "$PY" benchmarks/timm_forward.py --model "$timm_name" \
      --img_size "$img" --window_size "$window" --batch_size "$batch" \
      --steps "$steps" --warmup "$warmup")
  jax_ips=$(img_per_s "$jax_json")
  torch_ips=$(img_per_s "$torch_json")
  ratio=$("$PY" -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}")' \
      "$jax_ips" "$torch_ips")
  ratios+=("$ratio")
  echo "pair ${pair}: JAX ${jax_ips} img/s  timm ${torch_ips} img/s  JAX/timm ${ratio}" \
       "(1-min load before: ${load})"
done
"$PY" -c 'import statistics, sys; r = [float(x) for x in sys.argv[1:]];
print(f"JAX/timm ratio: median {statistics.median(r):.2f}, range {min(r):.2f}-{max(r):.2f}")' \
    "${ratios[@]}"
