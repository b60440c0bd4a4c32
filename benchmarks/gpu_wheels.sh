#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels benchmarks/gpu.sh installs on a lent
# H200, whose image (Python 3.12; ../.library/device/KINDS.md) has jax, flax,
# optax, orbax, torch and timm but not these, and fetches nothing there. Run
# here, where PyPI is reachable; then the device call carries '.whl'.
#
#   benchmarks/gpu_wheels.sh
#
# ml-collections, Grain and TFDS at requirements.txt's pins; the packages they
# need that the image lacks, at the versions this repo's tests ran with. The
# image's protobuf version is not listed: .whl/fallback holds a newer one, which
# gpu.sh installs only if the import check fails with the image's own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

pin() {  # NAME -> NAME==VERSION as requirements.txt pins it
  grep -E "^$1==" requirements.txt | cut -d ' ' -f 1 | grep . ||
    { echo "gpu_wheels.sh: requirements.txt pins no '$1==VERSION'" >&2; exit 1; }
}

download() {  # DIR SPEC...: CPython 3.12 x86-64 wheels, without their dependencies
  local dir=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
      -d "$dir" "$@"
}

# Assignments (set -e stops at a missing pin), before the old .whl is removed.
ml_collections=$(pin ml-collections)
grain=$(pin grain)
tfds=$(pin tensorflow-datasets)
rm -rf .whl
mkdir -p .whl/fallback
download .whl "$ml_collections" "$grain" "$tfds" \
    array-record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1 portpicker==1.6.0 \
    simple-parsing==0.1.9 docstring-parser==0.18.0 termcolor==3.3.0 toml==0.10.2 \
    tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
# promise (a TFDS import) is published as source only; pure Python, so a wheel built here runs there.
"$PY" -m pip wheel -q --no-deps --no-binary=:all: -w .whl promise==2.3
download .whl/fallback protobuf==7.36.2
ls .whl .whl/fallback
du -sh .whl
