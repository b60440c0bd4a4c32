#!/usr/bin/env bash
# UNTESTED: written on a CPU-only machine, never run on a GPU yet. Installs
# nothing: expects the repo's .venv with a CUDA jaxlib already in place.
#
# Forward throughput on one GPU, bfloat16: Swin-B/224 batch 128 and Swin-L/768
# window 12 at the largest batch of 32, 16, 8 that runs. Each run's last-line
# JSON becomes a row of the markdown table "$OUT/gpu_forward.md".
#
#   OUT=/some/dir benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export PYTHONPATH=.
OUT=${OUT:?set OUT to the output folder}
table="$OUT/gpu_forward.md"

forward() {  # CONFIG_ARG BATCH -> the JSON line, or fails
  "$PY" -m ark_jax.benchmark --mode=forward --config="configs/ark6.py:$1" \
      --config.model.dtype=bfloat16 --config.batch_size="$2" --steps=20 --warmup=3 \
      2>>"$OUT/gpu_forward.stderr" | tail -n 1
}

row() {
  "$PY" -c 'import json, sys; r = json.loads(sys.argv[1]); print(
    "| {model} | {img_size} | {window_size} | {batch_size} | {dtype} | {img_per_s:.1f} "
    "| {ms:.1f} | {compile_s:.1f} | {gflops_per_image:.1f} | {tflops_per_s:.1f} "
    "| {peak_tflops_per_s:.1f} | {mfu:.1%} | {gib:.1f} | {device} |".format(
        ms=r["step_time_s_median"] * 1e3, gib=r["peak_memory_bytes"] / 2**30, **r))' "$1"
}

{
  echo "# GPU forward ($(date -u +%Y-%m-%d), jax $("$PY" -c 'import jax; print(jax.__version__)'))"
  echo
  echo "| model | img | window | batch | dtype | img/s | step ms (median) | compile s" \
       "| GFLOPs/img | TFLOP/s | matmul peak TFLOP/s | MFU | peak GiB | device |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
} > "$table"

row "$(forward swin_base,224,7 128)" >> "$table"
for batch in 32 16 8; do  # Swin-L/768: the largest batch that fits
  if json=$(forward swin_large,768,12 "$batch") && [[ -n "$json" ]]; then
    row "$json" >> "$table"
    break
  fi
  echo "swin_large 768 batch $batch failed (out of memory?), trying smaller" >&2
done
cat "$table"
