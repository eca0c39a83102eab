#!/usr/bin/env bash
# The fast path keeps the math: the default run (500 steps) with 3 seeds on the new CPU default (bf16-mixed with
# float32 weights, torch.compile, fused AdamW, on a CPU with AMX) and in float32 eager (trainer.precision=32-true,
# the default before). About 15 minutes on 2 CPU cores with AMX.
set -euo pipefail
moe-lab train seeds=3 hydra.sweep.dir=bf16_compiled
moe-lab train seeds=3 trainer.precision=32-true hydra.sweep.dir=float32
