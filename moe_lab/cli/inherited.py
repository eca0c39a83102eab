"""What a resumed run takes from the checkpoint it resumes: the overrides of the run that wrote it, as data only.

`moe-lab train ckpt_path=CKPT` applies the command-line overrides saved in CKPT (or, for a checkpoint older than
that, in its run directory's `.hydra/overrides.yaml`) before the user's own. A checkpoint is someone else's file, so
each saved override must be a plain value of a setting the run schema defines, or the choice of an option of a
config group; anything else (a `_target_` or any other `_key_`, a node the schema does not have, `hydra.*`, a sweep,
a deletion, a value that is a mapping or calls an OmegaConf resolver) is refused in one line naming the file and the
override, before anything runs. Loggers are built from the classes moe-lab knows (training/loggers.py) whatever a
config says, so even a `logger.NAME.KEY` that passes here cannot name a callable.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from typing import Any, Optional

from moe_lab.cli.hydra_args import hydra_arguments
from moe_lab.errors import UserError

# A value may refer to another setting (`${seed}`, `${..ffn_hidden}`), never call a resolver (`${oc.create:...}`).
PLAIN_INTERPOLATION = re.compile(r"\$\{[A-Za-z0-9_.]+\}")
# The settings moe-lab's logger options have (conf/logger/*.yaml), less `_target_`.
LOGGER_KEYS = {
    "csv": {"save_dir", "name", "version", "flush_logs_every_n_steps", "prefix"},
    "tensorboard": {"save_dir", "name", "version", "default_hp_metric", "prefix", "log_graph"},
    "wandb": {
        "project",
        "entity",
        "name",
        "group",
        "job_type",
        "tags",
        "save_dir",
        "offline",
        "log_model",
        "notes",
        "prefix",
        "id",
        "version",
        "anonymous",
        "checkpoint_name",
    },
}


def with_checkpoint_overrides(args: list[str]) -> list[str]:
    """`moe-lab train ckpt_path=CKPT [overrides]` resumes the run that wrote CKPT: that run's overrides (saved in the
    checkpoint) come first, and those given on this command line replace them key by key. Other command lines are
    returned as they are. Raises UserError if CKPT cannot be read or a saved override is not plain data."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = hydra_arguments().parse_args(args)
        given = OverridesParser.create().parse_overrides(list(parsed.overrides))
    except (SystemExit, HydraException):
        return args  # preflight reports it
    resume = [o for o in given if o.key_or_group == "ckpt_path" and not o.is_sweep_override() and not o.is_delete()]
    if not resume or resume[-1].value() in (None, "null"):
        return args
    from moe_lab.training.checkpoint import checkpoint_origin  # torch and Lightning: only for a resume

    ckpt_path = str(resume[-1].value())
    origin = checkpoint_origin(ckpt_path)
    saved = parse_saved(origin.overrides, origin.source)
    keys = {o.key_or_group for o in given}
    # `+key=value` saved when the key was new is `++key=value` now: the same value whether or not a config option
    # has since given the key a default (e.g. trainer.deterministic).
    inherited = [
        "+" + o.input_line if o.is_add() and not o.is_force_add() else o.input_line
        for o in saved
        if o.key_or_group not in keys
    ]
    if origin.imported:
        print(
            f"moe-lab: fine-tuning {origin.imported} (imported): a new run from its weights, with its model and "
            "tokenizer settings",
            file=sys.stderr,
            flush=True,
        )
    elif inherited:
        print(
            f"moe-lab: resuming from step {origin.step} of {origin.run_dir or ckpt_path} with its overrides: "
            f"{' '.join(inherited)}",
            file=sys.stderr,
            flush=True,
        )
    rest = list(args)
    for word in parsed.overrides:  # the flags stay where they were; all overrides go last
        rest.remove(word)
    return rest + inherited + list(parsed.overrides)


def parse_saved(overrides: list[str], source: str) -> list:
    """The saved overrides, parsed with Hydra's grammar; UserError naming `source` and the first one that is not a
    plain setting (see the module's docstring)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except (HydraException, ValueError) as e:
            raise UserError(
                f"{source}: its saved override {text!r} cannot be read ({str(e).splitlines()[0][:120]}); "
                "the file is damaged or was not written by moe-lab"
            ) from None
        reason = refusal(override)
        if reason is not None:
            raise UserError(
                f"{source}: its saved override {text!r} {reason}; a resume takes only plain values of "
                "moe-lab's own settings from a checkpoint. Resume from a checkpoint you trust, or start a "
                "new run with model.init_from=CKPT"
            )
        out.append(override)
    return out


def refusal(o: Any) -> Optional[str]:
    """Why a saved override is not plain data, or None if it is."""
    key = o.key_or_group
    parts = re.split(r"[./]", key)
    if o.is_sweep_override():
        return "is a sweep"
    if o.is_delete():
        return "deletes a setting"
    if "@" in key or o.package:
        return "moves a config to another package"
    if any(part.startswith("_") for part in parts):
        return f"sets {key}, which names code (a key of the form _key_ is Hydra's, not a setting)"
    if parts[0] == "hydra":
        return "sets Hydra's own configuration (hydra.*), which a checkpoint never carries"
    value = o.value()
    if not _plain(value):
        return "has a value that is not a plain number, string, boolean, null or list of those"
    if "/" not in key and "." not in key and key in config_groups():
        return None if isinstance(value, str) and not o.is_add() else "is not the choice of one option of a group"
    if not schema_setting(parts):
        return f"sets {key}, which is not a setting of moe-lab's run schema"
    return None


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (str, int, float, bool)) or v is None for v in value) and all(map(_plain, value))
    if isinstance(value, str):
        return "${" not in PLAIN_INTERPOLATION.sub("", value)
    return value is None or isinstance(value, (int, float, bool))


def config_groups() -> set[str]:
    """The top-level config groups of conf/ (router, experts, model, logger, ...)."""
    from pathlib import Path

    from moe_lab.training.schemas import config_dir

    return {p.name for p in Path(config_dir()).iterdir() if p.is_dir()} - {"hydra"}


def schema_setting(parts: list[str]) -> bool:
    """Whether the dotted key `parts` is a leaf of the run schema: a dataclass field at each level (any router's
    settings under model.moe.router, any data source's under data), a Lightning Trainer argument under trainer, a
    model part under optim.lr_mult, a known setting of one of moe-lab's loggers under logger."""
    from moe_lab.data.config import SOURCES
    from moe_lab.model.router_configs import registered_routers
    from moe_lab.training.schemas import PARTS, RESERVED_TRAINER_KEYS, TrainConfig, lightning_trainer_arguments

    head, rest = parts[0], parts[1:]
    if head == "trainer":
        return len(rest) == 1 and rest[0] in lightning_trainer_arguments() and rest[0] not in RESERVED_TRAINER_KEYS
    if head == "logger":
        return len(rest) == 2 and rest[1] in LOGGER_KEYS.get(rest[0], set())
    if parts[:2] == ["optim", "lr_mult"]:
        return len(parts) == 3 and parts[2] in PARTS
    if parts[:3] == ["model", "moe", "router"]:
        return len(parts) == 4 and any(parts[3] in _fields(cls) for cls in registered_routers().values())
    if head == "data":
        return len(rest) == 1 and any(rest[0] in _fields(cls) for cls in SOURCES.values())
    node: Any = TrainConfig
    for part in parts:
        fields = _fields(node)
        if part not in fields:
            return False
        node = fields[part]
    return not dataclasses.is_dataclass(node)


def _fields(cls: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
