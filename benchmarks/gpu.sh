#!/usr/bin/env bash
# Issue 6's GPU measurements on a lent H200, in one device call (under 8 minutes):
#
#   here, first:      benchmarks/gpu_wheels.sh     # .whl/: what the H200 image lacks
#   on the device:    bash benchmarks/gpu.sh       # device tool: carry ['.whl'], timeout_s 560
#   on any machine:   OUT=/tmp/gpu PY=.venv/bin/python benchmarks/gpu.sh [gpu_suite flags]
#
# Nothing is fetched: the image's python3 (3.12) has jax with CUDA, flax, optax,
# orbax, torch and timm; the wheels in .whl (ml-collections, Grain, TFDS and
# what they need) install into /tmp/ark_jax_site. benchmarks/gpu_suite.py then
# runs the Swin-B/224 train step with the teacher in bfloat16 at batch 128 and
# 256, the PyTorch reference step beside it, the Ark+ Swin-L/768 step at the
# largest batch that runs, and the split of the first step, each run
# measuring its own matmul peak, within GPU_BUDGET_S seconds (default 450).
# Flags after the script go to gpu_suite.py (the CPU test shrinks the models).
#
# Writes to $OUT: env.txt (device, driver, versions), gpu.md (the table,
# printed last), gpu.jsonl (each run's JSON) and gpu.log (commands, errors).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python3}
mkdir -p "$OUT"

install_wheels() {  # DIR: its wheels into the site folder, ahead of the image's packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/ark_jax_site "$1"/*.whl
  export PYTHONPATH=/tmp/ark_jax_site${PYTHONPATH:+:$PYTHONPATH}
}

import_check() {  # fails fast, before any compile, if a package is missing or broken
  PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$PY" -c '
import jax, flax, optax, orbax.checkpoint, grain, ml_collections, tensorflow_datasets
import torch, timm
import ark_jax.benchmark
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "grain", grain.__version__ if hasattr(grain, "__version__") else "?",
      "torch", torch.__version__, "timm", timm.__version__)
print("jax devices:", jax.devices())
print("torch cuda:", torch.cuda.is_available())'
}

{
  date -u
  uname -a
  "$PY" --version
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv
  else
    echo 'no nvidia-smi'
  fi
} > "$OUT/env.txt" 2>&1
# The wheels go in only where the interpreter lacks something: the image does,
# a developer's .venv does not. The fallback (a newer protobuf) only if needed too.
for wheels in '' .whl .whl/fallback; do
  if [[ -n "$wheels" ]]; then
    [[ -d "$wheels" ]] || continue
    echo "import check failed: installing $wheels/*.whl" >> "$OUT/env.txt"
    install_wheels "$wheels"
  fi
  if import_check >> "$OUT/env.txt" 2>&1; then
    checked=1
    break
  fi
done
cat "$OUT/env.txt"
[[ -n "${checked:-}" ]] || { echo 'gpu.sh: the import check failed (above)' >&2; exit 1; }
exec "$PY" benchmarks/gpu_suite.py --out="$OUT" --python="$PY" \
    --budget_s="${GPU_BUDGET_S:-450}" "$@"
