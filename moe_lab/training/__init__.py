"""Training: the run's schemas and their check (`schemas.py`), `train(cfg)` (`train.py`), the LightningModule
(`module.py`), the distributed strategy that owns expert parallelism (`strategy.py`), routing metrics (`metrics.py`),
callbacks, loggers, checkpoints and run directories."""
