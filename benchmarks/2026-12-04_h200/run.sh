#!/usr/bin/env bash
# The GPU checks of 2026-12-04, on one lent NVIDIA H200 (the device's own python3 and torch; moe-lab's missing
# dependencies carried as wheels in .whl/). Run from the repository root with OUT set to a folder for the results.
# Each phase has its own time limit, so that one stuck phase leaves the others' results.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
REPO=$PWD
LOG=$OUT/all.log
phase() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }
{ nvidia-smi -L; python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"

phase "CUDA tests"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_speed.py tests/test_config.py -k "gpu" 2>&1 | tail -15 | tee -a "$LOG"

phase "bench --compare bfloat16 (layer, peers, steps, whole model vs transformers)"
timeout 180 python3 -m moe_lab bench --compare --dtype bfloat16 --device cuda --out "$OUT/compare" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"

phase "bench --baseline (default step vs float32 eager)"
timeout 80 python3 -m moe_lab bench --baseline --device cuda --out "$OUT/baseline" >>"$LOG" 2>&1
echo "rc=$?" | tee -a "$LOG"

for compile in false true; do
  phase "train trainer=gpu compile=$compile, 300 steps of the default model"
  mkdir -p /tmp/run_$compile && cd /tmp/run_$compile
  timeout 60 python3 -m moe_lab train trainer=gpu compile=$compile trainer.max_steps=300 >>"$LOG" 2>&1
  echo "rc=$?" | tee -a "$LOG"
  cp outputs/*/*/summary.json "$OUT/train_compile_$compile.json" 2>/dev/null
  cd "$REPO"
done
phase "done"
