#!/usr/bin/env bash
# Federated Ark, parallel against sequential: configs/federated_demo.py:parallel
# (four clients stacked on a 'client' mesh axis, one vmapped step) and :steps
# (the same four clients with the same fixed local steps, one after another),
# on DEVICES devices (fake CPU devices here; real ones on a GPU/TPU host).
# Prints each run's round wall times (DIR/rounds.jsonl; round 0 includes
# compilation) and the median of the later rounds, sequential / parallel.
#
#   benchmarks/federated_parallel.sh DATA_DIR [ROUNDS] [DEVICES]
#   benchmarks/federated_parallel.sh workdir/data 3 8
#
# DATA_DIR holds the four demo datasets prepared at 64 px (make demo does it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
data=${1:?DATA_DIR with the prepared demo datasets}
rounds=${2:-3}
devices=${3:-8}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for variant in steps parallel; do
  JAX_NUM_CPU_DEVICES=$devices PYTHONPATH=. "$PY" -m ark_jax.main \
    --config=configs/federated_demo.py:$variant --workdir="$out/$variant" \
    --config.data.data_dir="$data" --config.federated.rounds="$rounds" \
    --config.federated.eval_every_rounds=-1 --config.progress_bar=False \
    >"$out/$variant.log" 2>&1 || { tail -n 30 "$out/$variant.log"; exit 1; }
done

"$PY" - "$out" <<'EOF'
import json, statistics, sys
medians = {}
for variant in ('steps', 'parallel'):
  with open(f'{sys.argv[1]}/{variant}/rounds.jsonl') as f:
    rounds = [json.loads(line) for line in f]
  seconds = [r['seconds'] for r in rounds]
  medians[variant] = statistics.median(seconds[1:] or seconds)
  print(f'{variant:>9}: rounds {[round(s, 1) for s in seconds]} s, steps/round '
        f'{rounds[0]["steps"]}, median after round 0 {medians[variant]:.1f} s')
print(f'sequential / parallel: {medians["steps"] / medians["parallel"]:.2f}')
EOF
