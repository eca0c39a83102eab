"""The run configuration: schemas of everything `conf/train.yaml` composes, registered with Hydra, and the check that
runs before any work starts.

Every default lives in one dataclass: the model's in `moe_lab/model/config.py` (each router's in its Config in
`moe_lab/model/router_configs.py`), the data sources' in `moe_lab/data/config.py`, the rest here.
`register_configs()` stores them in Hydra's ConfigStore: `train_schema` heads the defaults list of `conf/train.yaml`,
and every router and data option extends the schema of its kind (`schema/router/NAME`, `schema/data/SOURCE`), so a
key an option does not have, or a value of the wrong type, fails when Hydra composes the config. A registered router
without a `conf/router/NAME.yaml` is the option `router=NAME` itself. `validate(cfg)` turns a composed config into
these dataclasses and checks what types cannot (ranges and combinations), raising one ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from moe_lab.data.config import SOURCES, DataConfig, TokenizerConfig
from moe_lab.errors import ConfigError, UserError
from moe_lab.model.config import ModelConfig
from moe_lab.model.router_configs import (
    RouterConfig,
    RouterPluginError,
    registered_routers,
    router_config,
    routers_where,
)
from moe_lab.training import auto
from moe_lab.training.rendezvous import check_launch

# The parts of the model that optim.freeze and optim.lr_mult name (training/module.py: part_of).
PARTS = ("embeddings", "head", "attention", "norms", "router", "experts", "shared_experts", "dense_ffn", "mtp")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay (`conf/optim/`)."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 50
    # The cosine decays to lr * min_lr_ratio at trainer.max_steps.
    min_lr_ratio: float = 0.1
    # Parts of the model that do not train (fine-tuning): any of embeddings, head, attention, norms, router, experts,
    # shared_experts, dense_ffn, mtp (PARTS below). E.g. optim.freeze=[router].
    freeze: list[str] = field(default_factory=list)
    # Learning-rate multipliers per part, e.g. optim.lr_mult.router=0.1 (parts not named keep 1).
    lr_mult: dict[str, float] = field(default_factory=dict)
    # AdamW's fused kernel (one pass over each tensor). null = on a GPU, and on a CPU in bf16-mixed (1.05x the default
    # step's tokens/s there); float32 CPU runs keep the for-loop AdamW their figures were measured with.
    fused: Optional[bool] = None


@dataclass
class UpcycleConfig:
    """How model.init_from's dense FFNs become experts (`conf/upcycle/`; moe_lab/model/upcycled_weights.py)."""

    # copy (sparse upcycling), granular (fine-grained shards) or drop (Drop-Upcycling); null = no upcycling.
    method: Optional[str] = None
    # granular: the dense FFN is cut into this many shards (experts are FFN / granularity wide).
    granularity: int = 2
    # drop: the share of each expert's hidden units re-initialised (Nakamura et al. 2025 found 0.5 best).
    drop_ratio: float = 0.5


@dataclass
class CheckpointConfig:
    # A periodic checkpoint every n optimizer steps (checkpoints/step{N}.ckpt), besides checkpoints/last.ckpt.
    every_n_steps: int = 500
    # How many periodic checkpoints to keep (-1 = all).
    keep: int = 2
    # auto: sharded when expert parallelism splits the experts over ranks, one file otherwise. sharded: a
    # torch.distributed.checkpoint folder in which each rank writes its own experts and optimizer moments (no process
    # holds them all; it resumes under any expert-parallel size and reads whole in one process). file: one file, for
    # which rank 0 first gathers every expert.
    format: str = "auto"
    # Write sharded checkpoints in the background (DCP's async_save): the step goes on while a copy of this rank's
    # part is written; the next save and the end of the run wait for it. Sharded format only.
    async_save: bool = False


@dataclass
class MetricsConfig:
    """Observability settings beyond trainer.log_every_n_steps (see moe_lab/training/metrics.py)."""

    # W&B: per-layer expert-load heatmaps (experts x time) and the load table, every n optimizer steps.
    image_every_n_steps: int = 100
    # The cheap routing analyses of `moe-lab analyze` (vocabulary specialisation, repeat rate, co-activation) on the
    # validation data, at the first validation at or after every n optimizer steps, at step 0 and at the end; 0 = off
    # (it costs a pass of NumPy counting per analysed validation). See moe_lab/training/routing_analysis.py.
    analysis_every_n_steps: int = 0
    # Write dashboard.html (moe-lab dashboard) into the run directory when the run ends.
    dashboard: bool = True


@dataclass
class RoutingConfig:
    """Routing replay (moe_lab/training/routing_replay.py, moe_lab/model/replay.py)."""

    # A routing trace (Parquet, as `moe-lab analyze --trace` or routing.record writes): every training micro-batch
    # takes the experts it recorded for its sequences (found by their token ids), weighted by the live router's own
    # scores; validation routes live. The training forward runs eager (compile leaves it).
    replay: Optional[str] = None
    # Write every training micro-batch's routing to this new Parquet file (one process).
    record: Optional[str] = None


@dataclass
class PathsConfig:
    # The run directory Hydra makes (outputs/DATE/TIME, or a sweep's job directory; hydra.run.dir=... names one).
    output_dir: str = "${hydra:runtime.output_dir}"
    # Tokenised-data cache ($MOE_LAB_CACHE, else ~/.cache/moe_lab); datasets' own cache holds the raw data.
    cache_dir: str = "${oc.env:MOE_LAB_CACHE,'~/.cache/moe_lab'}"


@dataclass
class TrainConfig:
    """The typed view of a composed `conf/train.yaml`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # The base schema; the data=... option types it as its source's class.
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    # Lightning Trainer arguments (conf/trainer/), passed as they are.
    trainer: dict[str, Any] = field(default_factory=dict)
    # Loggers (conf/logger/): name -> a node with the logger's _target_.
    logger: dict[str, Any] = field(default_factory=dict)
    # Seeds Python, NumPy and torch (weights and data order).
    seed: int = 1234
    # Intra-op CPU threads of each training process; null = the CPUs this process may run on
    # (os.sched_getaffinity), shared among the processes a data-parallel run starts on this machine.
    threads: Optional[int] = None
    # Resume: the path of a checkpoint (e.g. outputs/2026-01-01/12-00-00/checkpoints/last.ckpt).
    ckpt_path: Optional[str] = None
    # Run name for loggers; null = built from the command-line overrides.
    run_name: Optional[str] = None
    # torch.compile the training forward and backward (inductor: fused elementwise kernels); validation stays eager.
    # null = on where it was measured to pay: a single-process CPU run in bf16-mixed (with trainer=auto, the default
    # on a CPU with AMX or AVX512-BF16), 1.4-1.9x the tokens/s of float32 eager on the default model after 10-25 s
    # of compiling at the start, 1.3-1.5x bf16-mixed eager's (benchmarks/README.md). The math is eager's up to float
    # rounding. Not with expert parallelism.
    compile: Optional[bool] = None
    # Seconds the processes of a several-process run (trainer=ddp) wait for each other at the start; then the run
    # ends in one line (nothing written). Nodes of one job may start minutes apart (torchrun waits 600 s too).
    rendezvous_timeout_s: float = 600.0


# The loggers a run can have (conf/logger/): moe-lab builds these classes and no other, whatever a config names.
LOGGER_CLASSES = (
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.WandbLogger",
)

# Keys train() sets itself; users set them through other settings.
RESERVED_TRAINER_KEYS = {
    "callbacks": "logger=... and checkpoint.*",
    "logger": "logger=...",
    "default_root_dir": "hydra.run.dir",
    "use_distributed_sampler": "(always false)",
    "check_val_every_n_epoch": "trainer.val_check_interval",
    "max_epochs": "trainer.max_steps",
}
# Trainer arguments that would undo what a run writes, with what to use instead.
REFUSED_TRAINER_KEYS = {
    "fast_dev_run": "turns off the loggers and checkpoints a run writes its folder with (it would train, then fail); "
    "for a quick check use trainer.max_steps=2 trainer.val_check_interval=2 data.max_val_blocks=8",
}


# The routers (name, Config class) whose schemas are in the ConfigStore: storing them takes 25-30 ms, which every
# composition would pay again (a test suite or a sweep composes hundreds of times in one process).
_stored_routers: Optional[tuple] = None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent): before any composition of conf/. Stored again only when
    the registered routers changed (a plugin registered one since)."""
    global _stored_routers
    try:
        routers = registered_routers()
    except RouterPluginError as e:
        raise ConfigError(str(e)) from None
    if _stored_routers == tuple(routers.items()):
        return
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    described = {p.stem for p in (_conf_dir() / "router").glob("*.yaml")}
    for name, options in routers.items():
        store.store(group="schema/router", name=name, node=options)
        if name not in described:  # router=NAME needs no conf/router/NAME.yaml (one only adds a description)
            store.store(group="router", name=name, node=router_option(options), package="_global_")
    for source, cls in SOURCES.items():
        store.store(group="schema/data", name=source, node=cls)
    _stored_routers = tuple(routers.items())


def router_option(options: type[RouterConfig]) -> dict:
    """The option `router=NAME` of a registered router without a YAML: its settings at model.moe.router, and the
    aux_loss option its Config says it brings (e.g. none for a gate-less router)."""
    defaults: list = [] if options.brings_aux_loss is None else [{"override /aux_loss": options.brings_aux_loss}]
    return {"defaults": [*defaults, "_self_"], "model": {"moe": {"router": options}}}


def config_dir() -> str:
    """Absolute path of the Hydra configs, with the schemas registered: `conf/` beside the package in a source
    checkout or editable install, `moe_lab/conf/` inside an installed wheel. Absolute, because Hydra turns a relative
    `config_path` into a module path that breaks behind a console script (hydra issue 2125)."""
    register_configs()
    return str(_conf_dir())


def _conf_dir() -> Path:
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"moe-lab's configs (conf/train.yaml) are missing next to {package}; reinstall moe-lab")


# `${idiv:a,b}`: integer division in YAML, e.g. fine-grained experts `expert_hidden: ${idiv:${..ffn_hidden},8}`.
if not OmegaConf.has_resolver("idiv"):
    OmegaConf.register_new_resolver("idiv", lambda a, b: int(a) // int(b))
register_configs()


# ------------------------------------------------------------------------------------------------------------
# Validation


def validate(cfg: DictConfig) -> TrainConfig:
    """The typed, checked run config of a composed `conf/train.yaml` (its `hydra` node, if any, is ignored).
    Raises ConfigError naming the key and what is allowed."""
    node = cfg.copy()
    if "hydra" in node:
        with open_dict(node):
            del node["hydra"]
    _refuse_extra_keys(node, "")
    try:
        run = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(omegaconf_message(e)) from None
    if not isinstance(run, TrainConfig):
        raise ConfigError(
            "the config was not composed with moe-lab's schema (conf/train.yaml starts with "
            "train_schema); compose it from moe_lab.training.schemas.config_dir()"
        )
    try:
        run.model.moe.router = router_config(run.model.moe.router)
        run.model.check()
        run.data.check(run.model.max_seq_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    auto.resolve_auto(run)  # this machine's values of the `auto` settings, then the checks that depend on them
    _check_router_losses(run)
    _check_expert_parallel(run)
    _check_training(run)
    check_training_memory(run)
    return run


def check_training_memory(run: TrainConfig) -> None:
    """ConfigError unless the model fits in this machine's memory as training holds it: on the CPU weights,
    gradients and AdamW's two moments (16 bytes a parameter); on a GPU the weights are built here first (4 bytes)."""
    from moe_lab.memory import check_fits

    accelerator = str(run.trainer.get("accelerator", "cpu"))
    if accelerator == "auto":
        import torch

        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    on_cpu = accelerator == "cpu"
    try:
        check_fits(
            run.model,
            16 if on_cpu else 4,
            "training this model" + (" on the CPU" if on_cpu else ""),
            "Lower the sizes (model=tiny is the default preset).",
        )
    except UserError as e:
        raise ConfigError(str(e)) from None


def omegaconf_message(e: OmegaConfBaseException) -> str:
    """One line from an OmegaConf error's structured fields (the key and the reason), not from its text dump."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    reason = str(getattr(e, "msg", None) or e).split("\n")[0]
    return f"{key}: {reason}" if key else reason


def _refuse_extra_keys(node: DictConfig, prefix: str) -> None:
    """Keys added with +key=... that the schema does not have (`trainer` and `logger` are open by design)."""
    typed = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(typed):
        fields = [f.name for f in dataclasses.fields(typed)]
        for key in node.keys():
            if key not in fields:
                where = prefix.rstrip(".") or "the top level"
                raise ConfigError(
                    f"{prefix}{key!s} is not a setting; the settings of {where} are: {sorted(fields)}"
                    if prefix
                    else f"'{key!s}' is not a setting; the top-level settings are: {fields}"
                )
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _refuse_extra_keys(child, f"{prefix}{key!s}.")


def _check_router_losses(run: TrainConfig) -> None:
    """Aux-loss weights the router can use (its capability flags decide): a loss a router cannot have is an error,
    not a silent no-op."""
    moe = run.model.moe
    router = type(moe.router)  # its Config class: the capability flags
    weights = moe.aux_loss.weights()
    for name, weight in weights.items():
        if weight < 0:
            raise ConfigError(f"model.moe.aux_loss.{name}={weight} must be >= 0")
    used = sorted(name for name, weight in weights.items() if weight > 0)
    if not moe.enabled:
        return
    if not router.has_gate and used:
        raise ConfigError(
            f"router={moe.router.name} has no learned gate, so no router loss applies, but aux_loss "
            f"weights {used} are set: add aux_loss=none"
        )
    if weights["seq_load_balance"] > 0 and not router.token_choice:
        raise ConfigError(
            f"aux_loss.seq_load_balance needs token-choice routing; router={moe.router.name} is "
            "balanced by construction: use aux_loss=none or z"
        )
    if weights["load"] > 0 and not router.smooth_load:
        smooth = routers_where("smooth_load")
        raise ConfigError(
            f"model.moe.aux_loss.load (Shazeer's smooth load) needs router={' or '.join(smooth)}, not "
            f"{moe.router.name}; set model.moe.aux_loss.load=0 or use router={smooth[0]}"
        )


def _check_expert_parallel(run: TrainConfig) -> None:
    if str(run.trainer.get("strategy", "")) == "fsdp" and run.model.moe.implementation != "grouped":
        raise ConfigError(
            "trainer=fsdp runs the grouped experts (model.moe.implementation=loop is the one-device reference); "
            "set model.moe.implementation=grouped"
        )
    ep = run.model.moe.expert_parallel
    if ep == 1 or not run.model.moe.enabled:
        return
    strategy = str(run.trainer.get("strategy", ""))
    if not strategy.startswith(("ddp", "fsdp")) or "spawn" in strategy or "notebook" in strategy:
        raise ConfigError(
            f"model.moe.expert_parallel={ep} needs several processes: add trainer=ddp "
            f"(with trainer.devices and trainer.num_nodes making a world size divisible by {ep})"
        )
    devices, nodes = run.trainer.get("devices"), run.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int) and (devices * nodes) % ep:
        raise ConfigError(
            f"model.moe.expert_parallel={ep} must divide the world size trainer.devices x "
            f"trainer.num_nodes = {devices} x {nodes} = {devices * nodes}"
        )


def _check_routing(run: TrainConfig) -> None:
    """routing.replay names a file; routing.record a new one, in a folder that exists, of a one-process run; both
    need a model with routing."""
    r = run.routing
    for key, path in (("routing.replay", r.replay), ("routing.record", r.record)):
        if path is not None and not run.model.moe.enabled:
            raise ConfigError(f"{key}: the model is dense (experts=dense), it has no routing")
    if r.replay is not None and not Path(r.replay).expanduser().is_file():
        raise ConfigError(
            f"routing.replay={r.replay}: no such file (moe-lab analyze --trace and routing.record write one)"
        )
    if r.record is not None:
        record = Path(r.record).expanduser()
        if record.exists():
            raise ConfigError(f"routing.record={r.record} exists; moe-lab never writes over a file: give a new name")
        if not record.parent.is_dir():
            raise ConfigError(f"routing.record={r.record}: the folder {record.parent} does not exist")
        if str(run.trainer.get("strategy", "")).startswith(("ddp", "fsdp")):
            raise ConfigError("routing.record writes one trace from one process; record a single-process run")


def _check_training(run: TrainConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    o = run.optim
    need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas} must be two values in [0, 1)")
    need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    parts = PARTS
    for key, named in (("optim.freeze", list(o.freeze)), ("optim.lr_mult", list(o.lr_mult))):
        for part in named:
            need(part in parts, f"{key}: {part!r} is not a part of the model; the parts are {', '.join(parts)}")
    for part, mult in o.lr_mult.items():
        need(mult >= 0, f"optim.lr_mult.{part}={mult} must be >= 0")
    u = run.upcycle
    need(
        u.method in (None, "copy", "granular", "drop"),
        f"upcycle.method={u.method!r}; choose copy, granular or drop (upcycle=copy|granular|drop)",
    )
    need(
        u.method is None or run.model.init_from is not None,
        f"upcycle={u.method} needs model.init_from=DENSE_CHECKPOINT_OR_HF_MODEL (the dense model to upcycle)",
    )
    need(
        math.isfinite(run.rendezvous_timeout_s) and run.rendezvous_timeout_s > 0,
        f"rendezvous_timeout_s={run.rendezvous_timeout_s} must be a positive number of seconds",
    )
    check_launch(run.trainer)
    need(u.granularity >= 1, f"upcycle.granularity={u.granularity} must be at least 1")
    need(0 <= u.drop_ratio <= 1, f"upcycle.drop_ratio={u.drop_ratio} must be in [0, 1]")
    need(run.checkpoint.every_n_steps >= 1, "checkpoint.every_n_steps must be at least 1")
    need(
        run.checkpoint.keep >= -1,
        f"checkpoint.keep={run.checkpoint.keep} must be -1 (keep all), 0 (only last.ckpt) "
        "or a number of periodic checkpoints to keep",
    )
    need(
        run.checkpoint.format in ("auto", "sharded", "file"),
        f"checkpoint.format={run.checkpoint.format!r}; choose auto, sharded or file",
    )
    need(
        not (run.checkpoint.async_save and run.checkpoint.format == "file"),
        "checkpoint.async_save=true writes sharded checkpoints (DCP saves in the background); drop "
        "checkpoint.format=file",
    )
    need(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    need(
        run.threads is None or run.threads >= 1,
        f"threads={run.threads} must be at least 1 (or null: the CPUs this process may use)",
    )
    need(run.metrics.image_every_n_steps >= 1, "metrics.image_every_n_steps must be at least 1")
    need(run.metrics.analysis_every_n_steps >= 0, "metrics.analysis_every_n_steps must be 0 (off) or a number of steps")
    _check_trainer(run.trainer)
    _check_loggers(run.logger)
    _check_compile(run)
    _check_routing(run)


def _check_compile(run: TrainConfig) -> None:
    """compile=true (asked for, or chosen by compile=null) needs what inductor needs (a C++ compiler for CPU kernels)
    and a layout it was tested on."""
    if not run.compile:
        return
    if run.model.moe.expert_parallel > 1:
        raise ConfigError(
            "compile=true is not tested with expert parallelism (model.moe.expert_parallel > 1); "
            "leave compile=false there"
        )
    if run.model.activation_checkpointing != "none":
        raise ConfigError(
            f"compile=true does not go with model.activation_checkpointing={run.model.activation_checkpointing} "
            "(a recompute replays the forward's routing, which torch.compile cannot trace); leave compile=false"
        )
    if run.trainer.get("accelerator") == "cpu" and not auto.can_build_cpu_kernels():
        raise ConfigError(
            "compile=true on the CPU needs a C++ compiler (g++ or clang++) on PATH and Python's headers "
            "(Python.h, e.g. the python3-dev package) for inductor's kernels; install them or leave compile=false"
        )


def _check_loggers(loggers: dict[str, Any]) -> None:
    """Each logger is one of moe-lab's (LOGGER_CLASSES) with plain settings: no other class, no Hydra _key_."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name, logger in loggers.items():
        need(
            isinstance(logger, dict) and "_target_" in logger,
            f"logger.{name} must be a logger config with a _target_ (see conf/logger/)",
        )
        need(
            logger["_target_"] in LOGGER_CLASSES,
            f"logger.{name}._target_={logger['_target_']}: moe-lab builds only "
            f"its own loggers ({', '.join(LOGGER_CLASSES)}); choose one with logger=csv|wandb|tensorboard",
        )
        for key, value in logger.items():
            need(
                key == "_target_" or not key.startswith("_"),
                f"logger.{name}.{key}: a _key_ of Hydra's instantiate has no place in a logger's settings",
            )
            need(
                _plain_value(value),
                f"logger.{name}.{key} must be a plain value (a number, string, boolean, null or list of those)",
            )
        if logger["_target_"].endswith("TensorBoardLogger"):
            import importlib.util

            need(
                importlib.util.find_spec("tensorboard") is not None,
                "logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' (or pip install "
                "'moe-lab[tensorboard]')",
            )


def lightning_trainer_arguments() -> list[str]:
    """The arguments of Lightning's Trainer (what trainer.KEY may set)."""
    from lightning.pytorch import Trainer

    return [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]


def _check_trainer(trainer: dict) -> None:
    allowed = lightning_trainer_arguments()
    for key in trainer:
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} is set by moe-lab; use {RESERVED_TRAINER_KEYS[key]} instead")
        if key in REFUSED_TRAINER_KEYS and trainer[key] not in (False, 0, None):
            raise ConfigError(f"trainer.{key}={trainer[key]} {REFUSED_TRAINER_KEYS[key]}")
        if key not in allowed:
            raise ConfigError(f"trainer.{key} is not a Lightning Trainer argument; they are: {sorted(allowed)}")
    max_steps = trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps} must be a positive number of optimizer steps")
    for key, what in (
        ("log_every_n_steps", "optimizer steps between logged metrics"),
        ("accumulate_grad_batches", "micro-batches per optimizer step"),
    ):
        value = trainer.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"trainer.{key}={value} must be a positive whole number ({what})")
    interval = trainer.get("val_check_interval", 1.0)
    if interval is not None and (
        isinstance(interval, bool)
        or not isinstance(interval, (int, float))
        or interval <= 0
        or (isinstance(interval, float) and interval > 1)
    ):
        raise ConfigError(
            f"trainer.val_check_interval={interval} must be a number of training batches (an integer "
            "> 0) or a fraction of an epoch in (0, 1]"
        )


def _plain_value(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) and not isinstance(v, (list, tuple)) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))
