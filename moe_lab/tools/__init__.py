"""The commands around the trainer, each a module with a `run` that `moe_lab/cli/commands.py` calls once the command
line is parsed and checked: `hf_import` (moe-lab import), `export`, `generate`, `evaluate` (moe-lab eval), `analyze`,
`dashboard` and `bench` (with `bench_peers`, the peers' MoE layers it times)."""
