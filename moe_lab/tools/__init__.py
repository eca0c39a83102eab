"""Tools around the trainer: `moe-lab bench` (speed against references) and `moe-lab export` (Hugging Face)."""
