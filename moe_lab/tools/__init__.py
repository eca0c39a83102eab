"""The commands around the trainer, each a module with a `run` that `moe_lab/cli/commands.py` calls once the command
line is parsed and checked: `hf_import` (moe-lab import), `export`, `generate`, `evaluate` (moe-lab eval), `analyze`,
`dashboard` and `bench` (a package: cases, layer and step timing, the machine's peaks, the peers, the report)."""
