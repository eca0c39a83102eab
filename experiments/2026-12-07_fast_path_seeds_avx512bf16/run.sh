#!/usr/bin/env bash
# The seeded check of the CPU default on a CPU with AVX512-BF16 and no AMX: the default run (500 steps) with 3 seeds
# on the default there (bf16-mixed with float32 weights, torch.compile, fused AdamW) and in float32 eager
# (trainer.precision=32-true, the default there before). About 25 minutes on 2 CPU cores (AMD EPYC, Zen 4).
set -euo pipefail
moe-lab train seeds=3 hydra.sweep.dir=bf16_compiled
moe-lab train seeds=3 trainer.precision=32-true hydra.sweep.dir=float32
