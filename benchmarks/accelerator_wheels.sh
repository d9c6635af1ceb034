#!/usr/bin/env bash
# Downloads, on a machine with package-registry access, the wheels that
# benchmarks/accelerator.sh installs on an accelerator machine that has JAX, PyTorch,
# Pillow and the dependencies of Flax and Orbax but no registry access (CPython 3.12,
# x86-64). Flax, Optax and Orbax come at requirements.txt's pins, whatever is there.
#
#   bash benchmarks/accelerator_wheels.sh [DIR]     # default DIR: .whl (keep it ignored)
#
# accelerator.sh installs DIR/*.whl with --no-deps into /tmp/site when DIR exists.
set -euo pipefail
dir="${1:-.whl}"
mkdir -p "$dir"
# Versions: requirements.txt's pins, and for their dependencies those of the CPU venv.
packages=(
  flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
  grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 simplejpeg==1.9.0
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 importlib_resources==7.1.0
  tensorboardX==2.6.5 immutabledict==4.3.1 portpicker==1.6.0 promise==2.3 toml==0.10.2
  zstandard==0.25.0 dm-tree==0.1.10 simple-parsing==0.1.9 termcolor==3.3.0
)
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35 2_39; do
  platforms+=(--platform "manylinux_${n}_x86_64")
done
for package in "${packages[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
    --platform any -d "$dir" "$package" \
    || python3 -m pip wheel --quiet --no-deps -w "$dir" "$package" \
    || echo "accelerator_wheels: could not fetch $package" >&2  # pure-Python sdists: built here
done
du -sh "$dir"
