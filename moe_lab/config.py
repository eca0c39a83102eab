"""Schemas for everything `conf/train.yaml` composes, and the validation that runs before any work starts.

The YAML files in `conf/` hold values; the dataclasses here (and `moe_lab/model/config.py`) hold the keys, types
and defaults. `validate(cfg)` turns a composed config into typed objects or raises one `ConfigError` whose
message names the offending key and what is allowed. It runs before Hydra creates a run directory (see
`moe_lab/cli.py`) and again at the top of `train()`, for callers that skip the command line.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_lab.model.config import ModelConfig
from moe_lab.model.experts import ACTIVATIONS
from moe_lab.model.routers import ROUTERS


class UserError(Exception):
    """A mistake in what the user asked for: reported as one message, never as a traceback."""


class ConfigError(UserError):
    pass


@dataclass
class DataConfig:
    """Where the tokens come from and how they are batched (`conf/data/`)."""

    # embedded: a corpus built from files every Python install carries (no download); text: local files;
    # hf: any dataset `datasets.load_dataset` can load (hub name or a builder such as json/parquet).
    source: str = "embedded"
    # Tokens per training sequence; must not exceed model.max_seq_len.
    seq_len: int = 256
    # Sequences per micro-batch on each device.
    batch_size: int = 16
    # Share of token blocks held out for validation (per domain, so every domain is evaluated).
    val_fraction: float = 0.05
    # At most this many validation blocks, so validation stays cheap on large corpora.
    max_val_blocks: int = 256
    # DataLoader worker processes.
    num_workers: int = 0
    # embedded: which domains, and how many characters of each.
    domains: list[str] = field(default_factory=lambda: ["code", "docs", "math"])
    max_chars_per_domain: int = 1_500_000
    # text: a file, a directory or a glob; .txt/.md, .json/.jsonl and .parquet are read by datasets' builders.
    path: Optional[str] = None
    # hf: dataset name (e.g. roneneldan/TinyStories), its configuration, split, revision and optional data_files.
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    data_files: Optional[Any] = None
    # hf: stream instead of downloading everything; validation is then the first blocks of the stream.
    streaming: bool = False
    # text/hf: the text column, and an optional column of domain labels (for routing-by-domain analysis).
    text_column: str = "text"
    domain_column: Optional[str] = None
    # text/hf: read at most this many documents (null = all).
    max_documents: Optional[int] = None


@dataclass
class TokenizerConfig:
    # null: byte-level (256 bytes + <eos>), nothing to download. Otherwise a Hugging Face hub id (e.g. gpt2)
    # or a local tokenizer.json (or a directory holding one), loaded with the `tokenizers` library.
    name: Optional[str] = None
    # End-of-document token of a named tokenizer; null = the first of <|endoftext|>, </s>, <eos> it has.
    eos_token: Optional[str] = None


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


@dataclass
class CheckpointConfig:
    # A periodic checkpoint every n optimizer steps (checkpoints/step{N}.ckpt), besides checkpoints/last.ckpt.
    every_n_steps: int = 500
    # How many periodic checkpoints to keep (-1 = all).
    keep: int = 2


@dataclass
class MetricsConfig:
    """Observability settings beyond trainer.log_every_n_steps (see moe_lab/observe.py)."""

    # W&B: per-layer expert-load heatmaps (experts x time) and the load table, every n optimizer steps.
    image_every_n_steps: int = 100
    # Write dashboard.html (moe-lab dashboard) into the run directory when the run ends.
    dashboard: bool = True


@dataclass
class PathsConfig:
    output_dir: str = "."
    # Tokenised-data cache; datasets' own cache holds the raw data.
    cache_dir: str = "~/.cache/moe_lab"


@dataclass
class RunConfig:
    """The typed view of a composed `conf/train.yaml`."""

    model: ModelConfig
    data: DataConfig
    tokenizer: TokenizerConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    metrics: MetricsConfig
    paths: PathsConfig
    trainer: dict
    logger: dict
    seed: int = 1234
    ckpt_path: Optional[str] = None
    run_name: Optional[str] = None


TOP_LEVEL_KEYS = [f.name for f in dataclasses.fields(RunConfig)]
DATA_SOURCES = ["embedded", "text", "hf"]
EMBEDDED_DOMAINS = ["code", "docs", "math"]
# Keys train() sets itself; users set them through other settings.
RESERVED_TRAINER_KEYS = {"callbacks": "logger=... and checkpoint.*", "logger": "logger=...",
                         "default_root_dir": "hydra.run.dir", "use_distributed_sampler": "(always false)",
                         "check_val_every_n_epoch": "trainer.val_check_interval", "max_epochs": "trainer.max_steps"}


def _dataclass_type(f: dataclasses.Field) -> Optional[type]:
    factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    return factory if factory is not None and dataclasses.is_dataclass(factory) else None


def typed_config(values: Any, cls: type, prefix: str) -> Any:
    """Check a plain config mapping against a dataclass and build it: unknown keys and bad types are errors."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of settings, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{prefix}.{key} is not a setting; the settings of {prefix} are: {sorted(fields)}")
    nested = {key: typed_config(values[key], _dataclass_type(f), f"{prefix}.{key}")
              for key, f in fields.items() if _dataclass_type(f) is not None and key in values}
    flat = {key: value for key, value in values.items() if key not in nested}
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), flat))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        reason = str(getattr(e, "msg", e)).split("\n")[0]
        raise ConfigError(f"{prefix}.{key}: {reason}") from None
    for key, value in nested.items():
        setattr(obj, key, value)
    return obj


def _plain(cfg: Any, key: str) -> Any:
    """A top-level node as plain Python, interpolations resolved where they can be outside a Hydra job."""
    if not isinstance(cfg, DictConfig):
        return cfg.get(key)
    if key not in cfg:
        return None
    node = cfg._get_node(key)
    try:
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else cfg[key]
    except OmegaConfBaseException:  # ${hydra:...} before Hydra has set the job up: keep it as literal text
        return _escape_interpolations(OmegaConf.to_container(node, resolve=False))


def _escape_interpolations(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(v) for v in value]
    return value.replace("${", "\\${") if isinstance(value, str) else value


def model_config(values: dict) -> ModelConfig:
    """A checked ModelConfig from its plain form (a composed `model` node, or the copy inside a checkpoint).

    The router's keys are checked against the Config of the router class its `name` selects.
    """
    values = dict(values)
    moe = dict(values.get("moe") or {})
    router_values = moe.pop("router", None) or {"name": "topk"}
    model = typed_config({**values, "moe": moe}, ModelConfig, "model")
    router_name = router_values.get("name", "topk")
    if router_name not in ROUTERS:
        raise ConfigError(f"model.moe.router.name={router_name!r} is not a router; the routers are {sorted(ROUTERS)}"
                          " (router=NAME picks one)")
    try:
        model.moe.router = dataclasses.asdict(typed_config(router_values, ROUTERS[router_name].Config,
                                                           "model.moe.router"))
    except ConfigError as e:
        raise ConfigError(f"{e} (for router={router_name})") from None
    return model


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Typed, checked view of a composed config. Raises ConfigError naming the key and what is allowed."""
    for key in cfg:
        if key != "hydra" and key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"'{key}' is not a setting; the top-level settings are: {TOP_LEVEL_KEYS}")

    model = model_config(_plain(cfg, "model") or {})
    run = RunConfig(
        model=model,
        data=typed_config(_plain(cfg, "data"), DataConfig, "data"),
        tokenizer=typed_config(_plain(cfg, "tokenizer"), TokenizerConfig, "tokenizer"),
        optim=typed_config(_plain(cfg, "optim"), OptimConfig, "optim"),
        checkpoint=typed_config(_plain(cfg, "checkpoint"), CheckpointConfig, "checkpoint"),
        metrics=typed_config(_plain(cfg, "metrics"), MetricsConfig, "metrics"),
        paths=typed_config(_plain(cfg, "paths"), PathsConfig, "paths"),
        trainer=_plain(cfg, "trainer") or {},
        logger=_plain(cfg, "logger") or {},
        seed=_plain(cfg, "seed") if _plain(cfg, "seed") is not None else 1234,
        ckpt_path=_plain(cfg, "ckpt_path"),
        run_name=_plain(cfg, "run_name"),
    )
    _check_semantics(run)
    return run


def _check_semantics(run: RunConfig) -> None:
    m, moe, router, d = run.model, run.model.moe, run.model.moe.router, run.data

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(isinstance(run.seed, int), f"seed={run.seed!r} must be an integer")
    for key in ("d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
        need(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be at least 1")
    need(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    need(m.head_dim % 2 == 0, f"model.d_model={m.d_model} / model.n_heads={m.n_heads} gives head dim {m.head_dim}; "
                              "rotary embeddings need an even head dim")
    need(m.n_heads % m.kv_heads == 0,
         f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    if m.vocab_size is not None:
        need(m.vocab_size >= 1, f"model.vocab_size={m.vocab_size} must be at least 1 (or null for the tokenizer's)")

    need(moe.num_experts >= 1, f"model.moe.num_experts={moe.num_experts} must be at least 1 "
                               "(for a dense model use experts=dense or model=dense_tiny)")
    router_cls = ROUTERS[router["name"]]
    try:
        router_cls.check(router_cls.Config(**router), moe.num_experts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_aux_losses(router_cls, router, moe.aux_loss)
    _check_expert_parallel(run, router_cls)
    need(moe.drop_policy in ("position", "probability"),
         f"model.moe.drop_policy={moe.drop_policy!r}; choose position or probability")
    need(moe.min_capacity >= 0, f"model.moe.min_capacity={moe.min_capacity} must be >= 0")
    need(not moe.shared_gate or moe.num_shared > 0,
         "model.moe.shared_gate=true gates the shared experts, but model.moe.num_shared is 0")
    for key in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, key)
        need(value is None or (math.isfinite(value) and value > 0),
             f"model.moe.{key}={value} must be > 0 (or null for dropless routing)")
    need(moe.expert_hidden >= 1, f"model.moe.expert_hidden={moe.expert_hidden} must be at least 1")
    # torch._grouped_mm needs 16-byte-aligned row strides: multiples of 8 elements cover bf16 and float32.
    for key, value in (("model.d_model", m.d_model), ("model.moe.expert_hidden", moe.expert_hidden)):
        need(not moe.enabled or value % 8 == 0,
             f"{key}={value} must be a multiple of 8 (the grouped GEMM needs 16-byte-aligned rows)")
    need(moe.num_shared >= 0, f"model.moe.num_shared={moe.num_shared} must be >= 0")
    need(moe.activation in ACTIVATIONS,
         f"model.moe.activation={moe.activation!r} is not known; choose one of {sorted(ACTIVATIONS)}")
    need(moe.every_n_layers >= 1, f"model.moe.every_n_layers={moe.every_n_layers} must be at least 1")
    need(0 <= moe.first_dense_layers <= m.n_layers,
         f"model.moe.first_dense_layers={moe.first_dense_layers} must be in 0..n_layers ({m.n_layers})")
    need(moe.implementation in ("grouped", "loop"),
         f"model.moe.implementation={moe.implementation!r}; choose grouped or loop")
    need(not moe.enabled or m.moe_layers, "no layer is MoE with these settings: lower model.moe.first_dense_layers "
                                          "or set experts=dense for a dense model")

    need(d.source in DATA_SOURCES, f"data.source={d.source!r}; choose one of {DATA_SOURCES}")
    need(d.seq_len >= 1, f"data.seq_len={d.seq_len} must be at least 1")
    need(d.seq_len <= m.max_seq_len,
         f"data.seq_len={d.seq_len} is longer than the model's maximum model.max_seq_len={m.max_seq_len}; "
         f"lower data.seq_len or raise model.max_seq_len")
    need(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be at least 1")
    need(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be between 0 and 1")
    need(d.max_val_blocks >= 1, f"data.max_val_blocks={d.max_val_blocks} must be at least 1")
    need(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
    if d.source == "embedded":
        unknown = [x for x in d.domains if x not in EMBEDDED_DOMAINS]
        need(not unknown and len(d.domains) > 0,
             f"data.domains={d.domains}: the embedded corpus has the domains {EMBEDDED_DOMAINS}")
        need(d.max_chars_per_domain >= 10_000, "data.max_chars_per_domain must be at least 10000")
    if d.source == "text":
        need(bool(d.path), "data=text needs a file, directory or glob: data.path=FILE_OR_GLOB")
    if d.source == "hf":
        need(bool(d.name), "data=hf needs a dataset: data.name=NAME (a hub id such as roneneldan/TinyStories, "
                           "or a builder such as json/parquet with data.data_files=...)")

    o = run.optim
    need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas} must be two values in [0, 1)")
    need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    need(run.checkpoint.every_n_steps >= 1, "checkpoint.every_n_steps must be at least 1")
    need(run.metrics.image_every_n_steps >= 1, "metrics.image_every_n_steps must be at least 1")

    _check_trainer(run.trainer)
    for name, logger in run.logger.items():
        need(isinstance(logger, dict) and "_target_" in logger,
             f"logger.{name} must be a logger config with a _target_ (see conf/logger/)")


def _check_expert_parallel(run: "RunConfig", router_cls: type) -> None:
    moe, ep = run.model.moe, run.model.moe.expert_parallel
    if ep < 1:
        raise ConfigError(f"model.moe.expert_parallel={ep} must be at least 1")
    if ep == 1 or not moe.enabled:
        return
    if moe.num_experts % ep:
        raise ConfigError(f"model.moe.expert_parallel={ep} must divide model.moe.num_experts={moe.num_experts}: "
                          "every rank of an expert-parallel group holds the same number of experts")
    if router_cls.registered_name == "expert_choice":
        raise ConfigError("router=expert_choice cannot be expert-parallel: each expert chooses among all tokens of "
                          "its group, which needs every rank's router scores and activations on the expert's rank "
                          "(an all-gather), not the all-to-all token exchange moe-lab's expert parallelism is; "
                          "use model.moe.expert_parallel=1 (data parallel) or a token-choice router")
    if moe.implementation != "grouped":
        raise ConfigError("model.moe.implementation=loop is the single-device reference; expert parallelism runs the "
                          "grouped path")
    strategy = str(run.trainer.get("strategy", ""))
    if not strategy.startswith("ddp") or "spawn" in strategy or "notebook" in strategy:
        raise ConfigError(f"model.moe.expert_parallel={ep} needs several processes: add trainer=ddp "
                          f"(with trainer.devices and trainer.num_nodes making a world size divisible by {ep})")
    devices, nodes = run.trainer.get("devices"), run.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int) and (devices * nodes) % ep:
        raise ConfigError(f"model.moe.expert_parallel={ep} must divide the world size trainer.devices x "
                          f"trainer.num_nodes = {devices} x {nodes} = {devices * nodes}")


def _check_aux_losses(router_cls: type, router: dict, aux: Any) -> None:
    """Aux-loss weights the router can use: a loss a router cannot have is an error, not a silent no-op."""
    weights = aux.weights()
    for name, weight in weights.items():
        if weight < 0:
            raise ConfigError(f"model.moe.aux_loss.{name}={weight} must be >= 0")
    used = sorted(name for name, weight in weights.items() if weight > 0)
    name = router["name"]
    if not router_cls.has_gate and used:
        raise ConfigError(f"router={name} has no learned gate, so no router loss applies, but aux_loss weights "
                          f"{used} are set: add aux_loss=none")
    if weights["seq_load_balance"] > 0 and name == "expert_choice":
        raise ConfigError("aux_loss.seq_load_balance needs token-choice routing; router=expert_choice is balanced "
                          "by construction: use aux_loss=none or z")
    if weights["load"] > 0 and name != "noisy_topk":
        raise ConfigError(f"model.moe.aux_loss.load (Shazeer's smooth load) needs router=noisy_topk, not {name}; "
                          "set model.moe.aux_loss.load=0 or use router=noisy_topk")


def _check_trainer(trainer: dict) -> None:
    from lightning.pytorch import Trainer

    allowed = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} is set by moe-lab; use {RESERVED_TRAINER_KEYS[key]} instead")
        if key not in allowed:
            raise ConfigError(f"trainer.{key} is not a Lightning Trainer argument; they are: {sorted(allowed)}")
    max_steps = trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps} must be a positive number of optimizer steps")



def config_dir() -> str:
    """Absolute path of the Hydra configs: `conf/` beside the package in a source checkout or editable install,
    `moe_lab/conf/` inside an installed wheel. Absolute, because Hydra turns a relative `config_path` into a
    module path that breaks behind a console script (style-anchors.md section 5, hydra issue 2125)."""
    from pathlib import Path

    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"moe-lab's configs (conf/train.yaml) are missing next to {package}; reinstall moe-lab")


# `${idiv:a,b}`: integer division in YAML, e.g. fine-grained experts `expert_hidden: ${idiv:${..ffn_hidden},8}`.
if not OmegaConf.has_resolver("idiv"):
    OmegaConf.register_new_resolver("idiv", lambda a, b: int(a) // int(b))
