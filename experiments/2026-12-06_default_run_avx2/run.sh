#!/usr/bin/env bash
# The README's default-run figures on a CPU without AMX (float32 eager, the default there): `moe-lab train` with 3
# seeds, as the README's first command runs it. About 15 minutes on 2 CPU cores (AVX2).
set -euo pipefail
/usr/bin/time -v moe-lab train seeds=3 hydra.sweep.dir=default_seeds
