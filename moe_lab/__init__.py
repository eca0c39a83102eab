"""moe-lab: an experiment runner for Mixture-of-Experts language models (Lightning + Hydra)."""

__version__ = "0.1.0"


def load_model(ckpt_path, map_location="cpu", capacity="dropless"):
    """The model of a moe-lab checkpoint in eval mode: `load_model(path)(token_ids_BT)` -> logits (B, T, vocab).
    Dropless by default (`capacity="checkpoint"`: the run's eval_capacity_factor); see
    moe_lab.training.checkpoint.load_model. (Imported on call, so `import moe_lab` stays light.)"""
    from moe_lab.training.checkpoint import load_model as _load

    return _load(ckpt_path, map_location=map_location, capacity=capacity)


__all__ = ["load_model", "__version__"]
