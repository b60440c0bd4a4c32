#!/usr/bin/env bash
# The Ark+ train step, JAX (python -m ark_jax.benchmark --mode=step) against the
# PyTorch reference step (benchmarks/torch_reference.py) on the same config,
# alternating A B A B so drift of a shared machine hits both sides alike. Prints
# each pair's img/s and the JAX/PyTorch ratio, then the median ratio; every
# run's JSON line is appended to $LOG.
#
#   benchmarks/compare.sh [MODEL] [IMG_SIZE] [WINDOW] [BATCH] [PAIRS] [STEPS] [WARMUP]
#   benchmarks/compare.sh                                # swin_tiny 128 4 16 2 5 2 (CPU)
#   benchmarks/compare.sh swin_base 224 7 128 2 10 3     # GPU: bfloat16 on both sides
#
# MODEL is a configs/ark6.py name (swin_tiny|swin_small|swin_base|swin_large):
# Ark-6's six heads, a linear projector to 1376, SGD Nesterov, ema='pass' (no
# EMA in the step, on either side). The JAX step reads uint8 images stored at
# R = IMG*8/7 (the config's data.image_size; 146 for 128) and augments them to
# IMG on the device inside the step; the PyTorch step gets both views ready at
# IMG (the reference augments on the host, in DataLoader workers). The JAX run
# skips its split variants (--split=false): only the full step is compared.
# Where torch sees CUDA, both sides compute in bfloat16 (torch: autocast).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=.

model=${1:-swin_tiny} img=${2:-128} window=${3:-4} batch=${4:-16}
pairs=${5:-2} steps=${6:-5} warmup=${7:-2}
# Any timm Swin name works: img_size and window_size override what it says.
timm_name="${model}_patch4_window7_224"
LOG=${LOG:-${TMPDIR:-/tmp}/compare_step_${model}_${img}_w${window}_b${batch}.jsonl}
err=$(mktemp)
trap 'rm -f "$err"' EXIT

jax_dtype=()
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  jax_dtype=(--config.model.dtype=bfloat16)  # torch_reference.py autocasts to bfloat16 on CUDA
fi

last_json() {  # runs "$@", appends its last stdout line (JSON) to $LOG, echoes it
  local out
  out=$("$@" 2>"$err") || { tail -n 30 "$err" >&2; echo "failed: $*" >&2; exit 1; }
  echo "${out##*$'\n'}" | tee -a "$LOG"
}

field() {  # JSON KEY [FORMAT]
  "$PY" -c 'import json, sys; print(format(json.loads(sys.argv[1])[sys.argv[2]], sys.argv[3]))' \
      "$1" "$2" "${3:-.2f}"
}

echo "JAX vs PyTorch train step: ${model} ${img}px window ${window} batch ${batch}" \
     "${jax_dtype[*]:-float32}, ${pairs} pairs x ${steps} steps (warm-up ${warmup});" \
     "PyTorch excludes augmentation, JAX includes it; no EMA in either step;" \
     "JSON lines -> ${LOG}"
ratios=()
for pair in $(seq "$pairs"); do
  # Other users of a shared machine show up here; compare pairs with similar loads.
  load=$(cut -d ' ' -f 1 /proc/loadavg 2>/dev/null || echo '?')
  jax_json=$(last_json "$PY" -m ark_jax.benchmark --mode=step \
      --config="configs/ark6.py:${model},${img},${window}" --config.batch_size="$batch" \
      "${jax_dtype[@]}" --split=false --steps="$steps" --warmup="$warmup")
  torch_json=$(last_json "$PY" benchmarks/torch_reference.py --model "$timm_name" \
      --img_size "$img" --window_size "$window" --batch_size "$batch" \
      --steps "$steps" --warmup "$warmup")
  jax_ips=$(field "$jax_json" img_per_s)
  torch_ips=$(field "$torch_json" img_per_s)
  ratio=$("$PY" -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}")' \
      "$jax_ips" "$torch_ips")
  ratios+=("$ratio")
  echo "pair ${pair}: JAX ${jax_ips} img/s (MFU $(field "$jax_json" mfu .1%))" \
       " PyTorch ${torch_ips} img/s (MFU $(field "$torch_json" mfu .1%))" \
       " JAX/PyTorch ${ratio}  (1-min load before: ${load}, after: $(cut -d ' ' -f 1 /proc/loadavg))"
done
"$PY" -c 'import statistics, sys; r = [float(x) for x in sys.argv[1:]];
print(f"JAX/PyTorch step ratio: median {statistics.median(r):.2f}, range {min(r):.2f}-{max(r):.2f}")' \
    "${ratios[@]}"
