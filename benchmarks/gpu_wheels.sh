#!/usr/bin/env bash
# Downloads, here, the wheels that the device machine's Python (3.12, x86-64, no network) lacks
# for benchmarks/gpu_check.sh: bitsandbytes (QLoRA), trl (the peer), datasets and what datasets
# needs beyond that image. They go to .whl/ (ignored by git); a device run carries .whl and
# gpu_check.sh installs them. About 46 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
