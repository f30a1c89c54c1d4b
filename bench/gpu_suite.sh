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
python3 -m pytest -q -p no:cacheprovider -m gpu tests/trainer tests/rollout_engine tests/trainer_rl 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 bench/train_step.py --device cuda --out "$OUT/train_step.json" 2>&1 | tail -30 | tee "$OUT/train_step.txt"
# both decoders side by side at 64 and 256 rows (PEFT at 64 rows takes ~50 s a run on an H200)
python3 bench/rollout.py --device cuda --repeats 2 --out "$OUT/rollout.json" 2>&1 | grep -v warm | tail -30 | tee "$OUT/rollout.txt"
# the static decoder's kernel variants side by side (SDPA vs Triton attention, torch vs Triton
# prologue), then the GRPO shape; --peft-max-rows 0 skips PEFT (~47 s a run at 64 rows)
python3 bench/rollout.py --device cuda --decoders static+sdpa,static,static+prologue --peft-max-rows 0 \
  --repeats 3 --out "$OUT/rollout_kernels.json" 2>&1 | grep -v warm | tail -30 | tee "$OUT/rollout_kernels.txt"
python3 bench/rollout.py --device cuda --batch 256 --new-tokens 256 --decoders static,static+prologue \
  --peft-max-rows 0 --repeats 2 --out "$OUT/rollout_grpo.json" 2>&1 | grep -v warm | tail -14 | tee "$OUT/rollout_grpo.txt"
if [ -d /tmp/carry/smollm2-135m ]; then  # the real model, once bench/carry.py has landed it
  python3 bench/adapter_load.py --device cuda --dtype bfloat16 --model /tmp/carry/smollm2-135m \
    --out "$OUT/adapter_load.json" 2>&1 | tail -5 | tee "$OUT/adapter_load.txt"
fi
# the service end to end (issue 10's control-plane share): overlapped steps, then inline ones
python3 bench/e2e.py --device cuda --dtype bfloat16 --random-hidden 1024 --random-layers 8 \
  --out "$OUT/e2e_gpu.json" 2>&1 | sed -n 2,26p | tee "$OUT/e2e_gpu.txt"
MULTILORA_TRAINER_OVERLAP_STEPS=false python3 bench/e2e.py --device cuda --dtype bfloat16 \
  --random-hidden 1024 --random-layers 8 --out "$OUT/e2e_gpu_inline.json" 2>&1 | sed -n 2,26p \
  | tee "$OUT/e2e_gpu_inline.txt"
