"""moe-lab: an experiment runner for Mixture-of-Experts language models (Lightning + Hydra)."""

__version__ = "0.1.0"
