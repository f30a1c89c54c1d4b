#!/usr/bin/env bash
# The GPU run: GPU tests, then the train-step and rollout benchmarks. Usage on a CUDA machine
# (torch, transformers, peft installed; msgspec/redis wheels in .whl/ if missing):
#   OUT=results bash bench/gpu_suite.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/trainer tests/rollout_engine 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 bench/train_step.py --device cuda --out "$OUT/train_step.json" 2>&1 | tail -30 | tee "$OUT/train_step.txt"
python3 bench/rollout.py --device cuda --out "$OUT/rollout.json" 2>&1 | tail -20 | tee "$OUT/rollout.txt"
