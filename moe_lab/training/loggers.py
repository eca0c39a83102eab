"""Loggers of a run: the CSV logger always, W&B and TensorBoard on request (`conf/logger/`).

W&B runs are named after the command-line overrides that define the experiment and grouped by sweep. Without
credentials for the configured server (`wandb.login(prompt=False)`, which reads WANDB_API_KEY and ~/.netrc for
WANDB_BASE_URL, self-hosted servers included), or when the server cannot be reached, W&B logs offline and says so
once: a run never fails or waits for W&B's sake.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, cast

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moe_lab.errors import UserError
from moe_lab.training.schemas import LOGGER_CLASSES, TrainConfig

# Overrides that change where and how a run is recorded, not the experiment: left out of run names.
NOT_IN_NAME = ("hydra.", "paths.", "logger", "trainer.", "metrics.", "checkpoint.", "run_name")


def run_name(run: TrainConfig) -> str:
    if run.run_name:
        return run.run_name
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(NOT_IN_NAME)]
    except ValueError:  # not inside a Hydra job
        overrides = []
    name = ",".join(overrides) or "defaults"
    return name if len(name) <= 128 else name[:125] + "..."


def sweep_group() -> Optional[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            return Path(hc.sweep.dir).name
    except ValueError:
        pass
    return None


def wandb_server_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason): a TCP connection to the W&B server (WANDB_BASE_URL, else the public one), so a dead or
    absent server costs seconds here rather than wandb.init's 90-second timeout."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"{url.hostname}:{port}: {e.strerror or type(e).__name__}"


def wandb_has_credentials() -> bool:
    """Whether W&B has an API key for its configured server, asked without a prompt and without contacting it."""
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # a malformed netrc, an unusable host setting: no usable credentials
        return False


def build_loggers(
    run: TrainConfig, cfg: DictConfig | dict, output_dir: Path, produced_by: Optional[dict[str, Any]] = None
) -> list:
    """The run's loggers; W&B and TensorBoard get the resolved config and, under `produced_by`, what produced the
    run (code version, packages, machine: moe_lab/training/provenance.py)."""
    loggers = []
    resolved = dict(cast(dict, OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else cfg)
    resolved.pop("hydra", None)
    if produced_by is not None:
        resolved["produced_by"] = produced_by
    for node in run.logger.values():
        node = dict(node)
        target = node["_target_"]
        logger = build_wandb_logger(node, run, output_dir) if target.endswith("WandbLogger") else build_logger(node)
        if not target.endswith("CSVLogger"):
            logger.log_hyperparams(resolved)  # the resolved Hydra config is the run config
        loggers.append(logger)
    return loggers


def build_logger(node: dict[str, Any]):
    """The logger a config node describes, built from the classes moe-lab knows (schemas.LOGGER_CLASSES, checked by
    validate) with the node's plain settings: no other callable is reached, whatever the node names."""
    import lightning.pytorch.loggers as loggers

    target = node["_target_"]
    if target not in LOGGER_CLASSES:
        raise UserError(f"logger _target_={target}: moe-lab builds only {', '.join(LOGGER_CLASSES)}")
    cls = getattr(loggers, target.rpartition(".")[2])
    return cls(**{k: v for k, v in node.items() if k != "_target_"})


def wandb_told_offline(node: dict[str, Any]) -> bool:
    """The user asked for no online run: `offline: true`, or WANDB_MODE offline or disabled."""
    return bool(node.get("offline")) or os.environ.get("WANDB_MODE") in ("offline", "disabled")


def wandb_online(node: dict[str, Any], offline_note: str) -> bool:
    """Whether W&B should log online: not asked to be offline (`offline: true`, WANDB_MODE), has credentials and can
    reach its server; when it cannot, says why once, followed by `offline_note`."""
    if os.environ.get("WANDB_MODE") == "":  # empty means unset; wandb's settings reject it
        del os.environ["WANDB_MODE"]
    if wandb_told_offline(node):
        return False
    if not wandb_has_credentials():
        rank_zero_only(print)(
            f"moe-lab: W&B has no credentials (WANDB_API_KEY or ~/.netrc): {offline_note}", file=sys.stderr
        )
        return False
    reachable, reason = wandb_server_reachable()
    if not reachable:
        rank_zero_only(print)(f"moe-lab: W&B could not reach its server ({reason}): {offline_note}", file=sys.stderr)
        return False
    return True


def build_wandb_logger(node: dict[str, Any], run: TrainConfig, output_dir: Path):
    """A WandbLogger named after the overrides and grouped by sweep; offline (said once) without credentials or
    server."""
    node = {**node, "name": node.get("name") or run_name(run), "group": node.get("group") or sweep_group()}
    where = output_dir / "wandb"
    offline_note = f"logging offline to {where}; upload later with `wandb sync {where}/offline-run-*`"
    online = wandb_online(node, offline_note)
    if not online and not wandb_told_offline(node):  # mode= reaches wandb.init; WANDB_MODE may say otherwise
        node["offline"], node["mode"] = True, "offline"
    logger = build_logger(node)
    if online:
        try:
            logger.experiment  # noqa: B018 - starts the run now, so a dead network shows here, not mid-training
        except Exception as e:  # wandb.errors.CommError and kin
            import wandb

            if wandb.run is not None:  # a half-started run
                wandb.finish(exit_code=1)
            reason = str(e).splitlines()[0][:200]
            rank_zero_only(print)(
                f"moe-lab: W&B could not reach its server ({reason}): {offline_note}", file=sys.stderr
            )
            # mode= reaches wandb.init directly: the WANDB_MODE that offline=True sets is ignored by then.
            logger = build_logger({**node, "offline": True, "mode": "offline"})
    return logger


def finish_wandb(loggers: list) -> None:
    """Close the W&B run, so the next job of a sweep starts a run of its own (lightning-hydra-template issue 289)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()
