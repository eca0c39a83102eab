"""Check a `moe-lab train` command line before Hydra runs it: nothing is read, trained or written on a mistake.

The preflight composes the config exactly as Hydra will (same config directory, same overrides), once per value
of every swept parameter, and validates each composition with `moe_lab.config.validate`. It also refuses a run
directory that already holds a run, a missing data path and a checkpoint that does not fit the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from moe_lab.config import UserError, config_dir, validate

SHOW_ONLY_FLAGS = ("help", "hydra_help", "info", "shell_completion", "cfg", "experimental_rerun")


def preflight(args: list[str]) -> Optional[str]:
    """None if the command line is fine, else the one message to show."""
    from hydra._internal.utils import get_args_parser

    try:
        parsed, _unknown = get_args_parser().parse_known_args(args)
    except SystemExit:  # argparse already printed its usage error
        return "could not parse the command line (see above)"
    if any(getattr(parsed, flag, None) for flag in SHOW_ONLY_FLAGS):
        return None  # Hydra shows something and runs nothing
    try:
        check(parsed)
    except UserError as e:
        return str(e)
    return None


def check(parsed) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.core.utils import setup_globals

    setup_globals()  # the ${now:...} resolver of the run directory
    conf = os.path.abspath(parsed.config_path) if parsed.config_path else config_dir()
    name = parsed.config_name or "train"
    overrides = list(parsed.overrides)
    if parsed.config_dir:
        overrides.append(f"hydra.searchpath=[file://{os.path.abspath(parsed.config_dir)}]")
    try:
        parsed_overrides = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UserError(f"could not parse the overrides: {_first_line(e)}") from None

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            base = _compose(compose, name, _first_of_each_sweep(parsed_overrides), None)
            combos = _variants(parsed_overrides, base)
            for combo in combos:
                cfg = _compose(compose, name, combo, base)
                run = validate(cfg)
                _check_inputs(run)
            multirun = parsed.multirun or OmegaConf.select(base, "hydra.mode") == "MULTIRUN"
            sweeps = [o.input_line for o in parsed_overrides if o.is_sweep_override()]
            if sweeps and not multirun:
                raise UserError(f"{sweeps[0]} is a sweep: add -m (--multirun) to run one job per value, or write "
                                "a list value in brackets ([1,2])")
            from moe_lab.cli import launched_worker

            if not launched_worker():  # workers share the directory rank 0 made
                _check_output_dir(base, multirun)
    finally:
        GlobalHydra.instance().clear()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _as_override(o, value: str) -> str:
    return f"{o.get_key_element()}={value}"


def _first_of_each_sweep(parsed_overrides) -> list[str]:
    out = []
    for o in parsed_overrides:
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                continue  # interval() sweeps belong to sweepers such as Optuna; checked by their bounds there
            out.append(_as_override(o, next(iter(o.sweep_string_iterator()))))
        else:
            out.append(o.input_line)
    return out


def _variants(parsed_overrides, base: DictConfig) -> list[list[str]]:
    """Every swept value at least once: the first value of all sweeps, then each other value in turn."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Sweeps configured in a file (hparams_search/*.yaml: hydra.sweeper.params) count like command-line ones.
    params = OmegaConf.select(base, "hydra.sweeper.params", default=None) or {}
    given = {o.get_key_element().lstrip("+~") for o in parsed_overrides}
    from_file = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items() if k not in given])
    everything = list(parsed_overrides) + from_file
    first = _first_of_each_sweep(everything)
    variants = [first]
    for o in everything:
        if o.is_sweep_override() and o.is_discrete_sweep():
            key = o.get_key_element() + "="
            for value in list(o.sweep_string_iterator())[1:]:
                variants.append([x for x in first if not x.startswith(key)] + [_as_override(o, value)])
    return variants


def _compose(compose, name: str, overrides: list[str], base: Optional[DictConfig]) -> DictConfig:
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    try:
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        raise UserError(_missing_option_message(e)) from None
    except (ConfigCompositionException, OverrideParseException) as e:
        if base is None:  # the keys a bad key could have been: those of the config its group choices make
            choices = [o for o in overrides if "=" in o and "." not in o.split("=")[0]]
            for attempt in (choices, []):
                try:
                    base = compose(config_name=name, overrides=attempt, return_hydra_config=True)
                    break
                except Exception:
                    continue
        raise UserError(_override_message(e, base)) from None
    except Exception as e:  # OmegaConf errors from interpolations and the like
        raise UserError(_first_line(e)) from None


def _missing_option_message(e) -> str:
    text = str(e)
    options = getattr(e, "options", None)
    group = None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Available options in"):
            group = line.split("'")[1]
    if group and options:
        wanted = lines[0].split("'")[-2] if "'" in lines[0] else lines[0]
        if wanted == "hydra/sweeper/optuna":
            return "hparams_search=optuna needs the Hydra Optuna sweeper: pip install 'moe-lab[sweeps]'"
        return f"{wanted.replace('/', '=', 1)} is not an option; the options of {group} are: {', '.join(options)}"
    return " ".join(lines)


def _override_message(e, base: Optional[DictConfig]) -> str:
    text = str(e)
    first = _first_line(e)
    causes = text + "".join(str(c) for c in _causes(e))
    if first.startswith("Could not override '") and "not in struct" in causes:
        key = first.split("'")[1]
        parent, _, leaf = key.rpartition(".")
        allowed = None
        if base is not None:
            node = OmegaConf.select(base, parent) if parent else base
            if isinstance(node, DictConfig):
                allowed = sorted(k for k in node.keys() if k != "hydra")
        if allowed is not None:
            where = parent or "the top level"
            hint = {"trainer": "; add other Lightning Trainer arguments with +trainer.NAME=VALUE",
                    "data": "; the other data options (data=embedded, text, hf) have settings of their own"}
            return f"{key} is not a setting; the settings of {where} are: {allowed}{hint.get(parent, '')}"
        return f"{key} is not a setting (add it with +{key}=... only if you mean to)"
    if "Could not override" in first or "Could not append" in first:
        cause = e.__cause__
        reason = _first_line(cause) if cause is not None else ""
        return f"{first.rstrip('.')}: {reason}".rstrip(": ")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _causes(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while (e := e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
    return out


def _check_inputs(run) -> None:
    """Inputs that can be checked cheaply: the data path and the checkpoint to resume."""
    from moe_lab.data.datamodule import resolve_text_files
    from moe_lab.train import check_resume

    if run.data.source == "text":
        resolve_text_files(run.data.path)
    check_resume(run)


def _check_output_dir(base: DictConfig, multirun: bool) -> None:
    from moe_lab.train import RUN_MARKERS

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        directory = Path(str(OmegaConf.select(base, key, throw_on_resolution_failure=True)))
    except Exception:
        return  # depends on values only a running job has; train() checks again inside the job
    if multirun:
        if directory.is_dir() and any(directory.iterdir()):
            raise UserError(f"the sweep directory {directory} already holds runs; moe-lab never writes over them. "
                            "Choose another with hydra.sweep.dir=...")
        return
    from moe_lab.cli import externally_launched

    # Under torchrun or SLURM the other ranks start with this one, and their Hydra may already have made .hydra.
    markers = RUN_MARKERS if externally_launched() else (*RUN_MARKERS, ".hydra")
    used = [m for m in markers if (directory / m).exists()]
    if used:
        raise UserError(f"{directory} already holds a run ({', '.join(used)}); moe-lab never writes over one. "
                        "Choose a new directory with hydra.run.dir=..., or resume it with "
                        f"ckpt_path={directory / 'checkpoints' / 'last.ckpt'} (which writes to a new directory)")
