"""Check a `moe-lab train` command line before Hydra runs it: nothing is read, trained or written on a mistake.

The check uses Hydra's public API only. It parses the overrides with Hydra's override grammar, checks every
GROUP=OPTION against the options Hydra's config loader lists and every KEY=VALUE against the keys of the composed
schema, then composes the config exactly as Hydra will (`hydra.compose`, same config directory, same overrides), once
per value of every swept parameter, and validates each composition (`moe_lab.training.schemas.validate`). It also
refuses a run directory that already holds a run, a missing data path and a checkpoint that does not fit the model.
Every message is built from structured data (option lists, schema keys, OmegaConf's `full_key`), never by parsing
the text of Hydra's errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from moe_lab.cli.hydra_args import hydra_arguments, shows_only
from moe_lab.errors import UserError
from moe_lab.training.run_dir import (
    claim_run_dir,
    externally_launched,
    launched_worker,
    refuse_used_run_dir,
    refuse_used_sweep_dir,
)
from moe_lab.training.schemas import config_dir, omegaconf_message, validate
from moe_lab.training.sweeps import continue_sweep, same_sweep

# Hints after "X is not a setting" for the nodes whose keys are not all in the schema.
KEY_HINTS = {
    "trainer": "; add other Lightning Trainer arguments with +trainer.NAME=VALUE",
    "data": "; the other data options (data=embedded, text, hf) have settings of their own",
}


def preflight(args: list[str], claim: bool = False, pinned: Optional[list[str]] = None) -> Optional[str]:
    """None if the command line is fine, else the one message to show. With `claim`, the run (or sweep) directory is
    then claimed for this process (moe_lab.training.run_dir.claim_run_dir), before Hydra writes into it; `pinned`
    then receives the override that names it (`hydra.run.dir=...`) where the command line did not: Hydra resolves the
    default `outputs/${now:...}` again when it starts, seconds later, and would write another directory than the one
    claimed (leaving the claimed one empty)."""
    try:
        parsed = hydra_arguments().parse_args(args)
    except SystemExit:  # argparse already printed its usage error
        return "could not parse the command line (see above)"
    modes = [
        flag
        for flag, on in (
            ("--run", parsed.run),
            ("-m", parsed.multirun),
            ("--cfg", parsed.cfg),
            ("--info", parsed.info),
            ("-sc", parsed.shell_completion),
        )
        if on
    ]
    if len(modes) > 1:  # Hydra would raise a bare ValueError
        return (
            f"{' and '.join(modes)} cannot go together: Hydra runs, sweeps, shows the config or completes, one at "
            "a time (drop -m to see a sweep's first config with --cfg job)"
        )
    if parsed.experimental_rerun:
        return (
            "--experimental-rerun unpickles a run's .hydra/config.pickle, and a pickle can run code; moe-lab does "
            "not read one. Rerun with the run's overrides instead: moe-lab train $(cat RUN/.hydra/overrides.yaml "
            "| sed 's/^- //'), or resume it with ckpt_path=RUN/checkpoints/last.ckpt"
        )
    if shows_only(parsed) and not (parsed.cfg or parsed.info):
        return None  # Hydra shows something and runs nothing
    try:
        if shows_only(parsed):  # --cfg and --info show a config: a mistake in it is one line too, nothing claimed
            check(parsed, inputs=False)
            return None
        target = check(parsed)
        if target is not None:
            directory, multirun, sweeper_params = target
            # Under torchrun or SLURM the other ranks start with this one, and their Hydra may have made .hydra.
            hydra_made = not externally_launched()
            continuing = (
                multirun
                and directory.is_dir()
                and any(directory.iterdir())
                and same_sweep(directory, list(parsed.overrides), sweeper_params)
            )
            if claim:  # refuses a used directory, then takes it
                if continuing:  # the same sweep again: it continues (training/sweeps.py)
                    print(continue_sweep(directory), file=sys.stderr, flush=True)
                setting = "hydra.sweep.dir" if multirun else "hydra.run.dir"
                claim_run_dir(directory, hydra_made, setting=setting)
                if pinned is not None and not any(o.lstrip("+").startswith(f"{setting}=") for o in parsed.overrides):
                    pinned.append(f"{setting}={quoted(str(directory))}")
            elif multirun and not continuing:
                refuse_used_sweep_dir(directory)
            else:
                refuse_used_run_dir(directory, hydra_made=hydra_made)
    except UserError as e:
        return str(e)
    return None


def quoted(value: str) -> str:
    """`value` as a quoted string of Hydra's override grammar: a quote is escaped, and so are the backslashes before a
    quote or at the end (elsewhere a backslash stands for itself)."""
    import re

    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


def check(parsed: argparse.Namespace, inputs: bool = True) -> Optional[tuple[Path, bool, dict]]:
    """Raises UserError on a mistake; returns the run directory (or the sweep directory, and True), with the sweeper's
    configured params (`hydra.sweeper.params`), when it is known before the job runs, for preflight() to refuse or
    claim. With `inputs`, the data are read and the checkpoint to
    resume or upcycle is checked too (not for --cfg and --info, which show a config and read nothing)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals
    from hydra.errors import HydraException

    setup_globals()  # the ${now:...} resolver of the run directory
    conf = os.path.abspath(parsed.config_path) if parsed.config_path else config_dir()
    name = parsed.config_name or "train"
    overrides = list(parsed.overrides)
    if parsed.config_dir:
        overrides.append(f"hydra.searchpath=[file://{os.path.abspath(parsed.config_dir)}]")
    parser = OverridesParser.create()
    try:
        given = parser.parse_overrides(overrides)
    except HydraException as e:
        raise UserError(f"could not parse the overrides: {_first_line(e)}") from None

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            search_path = [o for o in overrides if o.startswith("hydra.searchpath=")]
            groups = GroupIndex(GlobalHydra.instance().config_loader(), name, search_path)
            groups.check(given)
            base = _compose(compose, name, search_path + first_of_each_sweep([o for o in given if groups.is_group(o)]))
            # Sweeps configured in a file (hparams_search/*.yaml: hydra.sweeper.params) count like command-line ones.
            params = OmegaConf.select(base, "hydra.sweeper.params", default=None) or {}
            keys_given = {o.key_or_group for o in given}
            from_file = parser.parse_overrides([f"{k}={v}" for k, v in params.items() if k not in keys_given])
            groups.check(from_file)
            everything = list(given) + from_file
            base = _compose(
                compose, name, search_path + first_of_each_sweep([o for o in everything if groups.is_group(o)])
            )
            for o in everything:
                if not groups.is_group(o):
                    check_key(o, base, groups.top_level())
            composed = [_compose(compose, name, variant) for variant in variants(everything)]
            for cfg in composed:
                run = validate(_with_stand_in_output_dir(cfg))
                if inputs:
                    _check_inputs(run)
            multirun = parsed.multirun or OmegaConf.select(composed[0], "hydra.mode") == "MULTIRUN"
            sweeps = [o.input_line for o in given if o.is_sweep_override()]
            if sweeps and not multirun:
                raise UserError(
                    f"{sweeps[0]} is a sweep: add -m (--multirun) to run one job per value, or write "
                    "a list value in brackets ([1,2])"
                )
            if not launched_worker():  # workers share the directory rank 0 made
                return _output_dir(composed[0], multirun)
            return None
    finally:
        GlobalHydra.instance().clear()


def compose_checked(overrides: list[str], allowed: tuple[str, ...], command: str, takes: str) -> DictConfig:
    """The composed `train` config with `overrides`, for commands that take some of its settings (`moe-lab eval
    data=...`): each override must start with one of `allowed` (a group or key prefix), and is checked as `moe-lab
    train` checks it (options, keys); UserError otherwise, saying what the command `takes`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals
    from hydra.errors import HydraException

    setup_globals()
    try:
        given = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UserError(f"could not parse the overrides: {_first_line(e)}") from None
    for o in given:
        key = o.key_or_group
        if o.is_sweep_override():
            raise UserError(f"{o.input_line} is a sweep; {command} takes one value per setting")
        if not any(key == a or key.startswith(a + ".") for a in allowed):
            raise UserError(f"{key} is not a setting of {command}; it takes {takes}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            groups = GroupIndex(GlobalHydra.instance().config_loader(), "train", [])
            groups.check(given)
            base = _compose(compose, "train", [o.input_line for o in given if groups.is_group(o)])
            for o in given:
                if not groups.is_group(o):
                    check_key(o, base, groups.top_level())
            return _compose(compose, "train", list(overrides))
    finally:
        GlobalHydra.instance().clear()


class GroupIndex:
    """Hydra's config groups and their options, from its config loader (with any --config-dir search path)."""

    def __init__(self, loader: Any, config_name: str, search_path: list[str]):
        self.loader, self.config_name, self.search_path = loader, config_name, search_path
        self._known: dict[tuple, list[str]] = {}

    def options(self, group: str, kind: Any = None) -> list[str]:
        from hydra.core.object_type import ObjectType

        kind = kind or ObjectType.CONFIG
        if (group, kind) not in self._known:
            self._known[group, kind] = self.loader.get_group_options(group, kind, self.config_name, self.search_path)
        return self._known[group, kind]

    def top_level(self) -> list[str]:
        """The config groups a user picks from (router, experts, ...; not hydra's nor the schemas)."""
        from hydra.core.object_type import ObjectType

        return [g for g in self.options("", ObjectType.GROUP) if g != "hydra" and not g.startswith("schema")]

    def is_group(self, o: Any) -> bool:
        from hydra.core.object_type import ObjectType

        parent, _, leaf = o.key_or_group.rpartition("/")
        return leaf in self.options(parent, ObjectType.GROUP)

    def check(self, overrides: list) -> None:
        """Every GROUP=OPTION names an option of the group."""
        for o in overrides:
            if not self.is_group(o) or o.is_delete():
                continue
            options = self.options(o.key_or_group)
            for value in option_values(o):
                if value not in options and value != "null":
                    raise UserError(
                        f"{o.key_or_group}={value} is not an option; the options of {o.key_or_group} "
                        f"are: {', '.join(options)}"
                    )


def option_values(o: Any) -> list[str]:
    if o.is_sweep_override():
        return list(o.sweep_string_iterator()) if o.is_discrete_sweep() else []
    return [o.get_value_element_as_str()]


def check_key(o: Any, base: DictConfig, groups: Optional[list[str]] = None) -> None:
    """KEY=VALUE names a setting the composed schema has (`+KEY=...` adds one on purpose: validate() judges it). The
    error names the closest setting, or config group (`groups`: the top-level ones), to a misspelt name."""
    if o.is_add() or o.is_force_add() or o.is_delete():
        return
    key = o.key_or_group
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent, default=None) if parent else base
    if isinstance(node, DictConfig) and leaf in node:
        return
    while parent and not isinstance(node, DictConfig):  # the deepest node that exists
        parent = parent.rpartition(".")[0]
        node = OmegaConf.select(base, parent, default=None) if parent else base
    allowed = sorted(k for k in node.keys() if k != "hydra") if isinstance(node, DictConfig) else []
    where = parent or "the top level"
    missing = key[len(parent) + 1 if parent else 0 :].split(".")[0]  # the first name that is not there
    raise UserError(
        f"{key} is not a setting{_did_you_mean(missing, parent, allowed, [] if parent else groups or [])}; the "
        f"settings of {where} are: {allowed}{KEY_HINTS.get(parent, '')}"
    )


def _did_you_mean(name: str, parent: str, settings: list[str], groups: list[str]) -> str:
    """` (did you mean ...?)` for the setting or config group closest to a misspelt `name`, or nothing."""
    import difflib

    close = difflib.get_close_matches(name, [*settings, *groups], n=1, cutoff=0.6)
    if not close:
        return ""
    if close[0] in groups and close[0] not in settings:
        return f" (did you mean the config group {close[0]}, as in {close[0]}=OPTION?)"
    return f" (did you mean {f'{parent}.' if parent else ''}{close[0]}?)"


def first_of_each_sweep(overrides: list) -> list[str]:
    out = []
    for o in overrides:
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                continue  # interval() sweeps belong to sweepers such as Optuna; checked by their bounds there
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


def variants(overrides: list) -> list[list[str]]:
    """Every swept value at least once: the first value of all sweeps, then each other value in turn."""
    first = first_of_each_sweep(overrides)
    out = [first]
    for o in overrides:
        if o.is_sweep_override() and o.is_discrete_sweep():
            key = o.get_key_element() + "="
            for value in list(o.sweep_string_iterator())[1:]:
                out.append([x for x in first if not x.startswith(key)] + [key + value])
    return out


def _compose(compose, name: str, overrides: list[str]) -> DictConfig:
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        missing = str(e.missing_cfg_file or "")
        if missing.startswith("hydra/sweeper/optuna"):
            raise UserError(
                "hparams_search=optuna needs the Hydra Optuna sweeper: pip install 'moe-lab[sweeps]'"
            ) from None
        raise UserError(f"{missing or 'a config'} is missing: {_first_line(e)}") from None
    except Exception as e:  # composition: OmegaConf's error (with its key) is the cause
        cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
        if isinstance(cause, OmegaConfBaseException):
            raise UserError(omegaconf_message(cause)) from None
        message = _first_line(e)
        if "Could not append to config. An item is already at" in message:
            message += " Drop the + (KEY=VALUE sets a key the config already has; ++KEY=VALUE sets it either way)"
        raise UserError(message) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _with_stand_in_output_dir(cfg: DictConfig) -> DictConfig:
    """paths.output_dir is the directory Hydra makes for the job, which exists only once the job runs; a stand-in
    lets the rest of the config be checked."""
    if OmegaConf.is_interpolation(cfg.paths, "output_dir"):
        cfg = cfg.copy()
        cfg.paths.output_dir = "."
    return cfg


def _check_inputs(run) -> None:
    """Inputs the run would trip over later: the data (read, tokenised and cached now, as the run will find it: a data
    problem is found before a run directory exists) and the checkpoint to resume."""
    import datasets

    from moe_lab.data.datamodule import LMDataModule
    from moe_lab.training.start import starting_point

    accelerator = str(run.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"trainer.accelerator={accelerator} (trainer=gpu) needs a CUDA GPU and none is visible "
                "here; use trainer=cpu, or trainer=ddp trainer.accelerator=cpu"
            )
    starting_point(run)  # the checkpoint's checks; model.init_from's backbone and tokenizer
    data = LMDataModule(run.data, run.tokenizer, run.paths.cache_dir, run.seed)
    if not data.is_cached():
        print(f"moe-lab: reading and tokenising the data ({data.describe()}); cached for later runs", flush=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a data error stays one line
    try:
        data.prepare_data()
        data.setup("fit")
    finally:
        if bars:
            datasets.enable_progress_bars()
    if run.routing.replay is not None:  # the whole trace is read: a damaged or foreign one is found now
        from moe_lab.analysis.trace import RoutingTrace

        router = run.model.moe.router
        RoutingTrace(Path(run.routing.replay).expanduser()).check_model(
            run.model.routed_layers,
            run.model.moe.num_experts,
            {layer: router.experts_per_token(run.model.moe.num_experts) for layer in run.model.routed_layers},
            setting="routing.replay",
        )
    if run.model.vocab_size is not None and run.model.vocab_size < data.vocab_size:
        raise UserError(
            f"model.vocab_size={run.model.vocab_size} is smaller than the tokenizer's {data.vocab_size}; "
            "set it to null to follow the tokenizer"
        )


def _output_dir(base: DictConfig, multirun: bool) -> Optional[tuple[Path, bool, dict]]:
    """The run (or sweep) directory Hydra will use, when it is known before the job runs, with the sweeper's params
    (what a sweep folder's multirun.yaml must also hold for the same command to continue it)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    params = OmegaConf.select(base, "hydra.sweeper.params", default=None)
    params = {str(k): str(v) for k, v in OmegaConf.to_container(params).items()} if params else {}
    try:
        return Path(str(OmegaConf.select(base, key, throw_on_resolution_failure=True))), multirun, params
    except Exception:
        return None  # depends on values only a running job has; train() checks and claims inside the job
