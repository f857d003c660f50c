#!/usr/bin/env bash
# The GPU measurements issues 7 and 11 ask for, in one device run (about 9 minutes at most):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# .whl (git-ignored) holds the diffusers wheel and importlib_metadata; the device image has torch, transformers and
# the rest. To make it: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Results land in $OUT (bench-out without one): copy them to benchmarks/out and the README's GPU sections.
set -o pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:src || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
timeout 150 python3 benchmarks/gpu_checks.py --out "$out/gpu_checks.md" 2>&1 | tee "$out/gpu_checks.log"
timeout 240 python3 benchmarks/gpu_loop.py --out "$out/gpu_loop.md" 2>&1 | tee "$out/gpu_loop.log"
timeout 150 python3 benchmarks/diffusers_speed.py --full-size --out "$out/diffusers_speed.md" 2>&1 \
  | tee "$out/diffusers_speed.log"
