"""The README holds against the command line, so that it cannot drift: every `moe-lab` command in its code blocks
parses (train: composes and validates, each value of a sweep), every config group and option it names exists, every
option of every command's --help appears in it, and its recipes run (the cheap ones, for a few steps)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_lab.cli.commands import COMMANDS
from moe_lab.errors import UserError

from conftest import FAST, REPO, compose_cfg, router_options

README = (REPO / "README.md").read_text()
COMMAND_NAMES = {c.name for c in COMMANDS}
CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> set[str]:
    return set(router_options()) if group == "router" else {p.stem for p in (CONF / group).glob("*.yaml")}


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced code block."""
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S)]


def commands_in(block: str) -> list[tuple[list[str], bool]]:
    """The words after `moe-lab` of every command in a code block (continued lines joined, `&&` chains split, `#`
    comments dropped), and whether srun or torchrun starts it; a line that only mentions moe-lab (its output, the
    layout tree) is not a command."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            for i, word in enumerate(words):
                # `moe-lab CMD` first on its line, after srun, or as torchrun's $(which moe-lab)
                starts = (word == "moe-lab" and (i == 0 or words[i - 1] == "srun")) or word == "moe-lab)"
                if starts and i + 1 < len(words) and words[i + 1] in COMMAND_NAMES:
                    found.append((words[i + 1 :], i > 0))
                    break
    return found


README_COMMANDS = [
    (line, words, launched) for line, block in code_blocks(README) for words, launched in commands_in(block)
]


def check_command(words: list[str]) -> None:
    """Parse one README command the way moe-lab would, reading no file: UserError or SystemExit on a mistake."""
    from moe_lab.cli.hydra_args import expand_seeds, hydra_arguments
    from moe_lab.cli.preflight import check, compose_checked

    name, args = words[0], words[1:]
    if "--help" in args or "-h" in args:
        return
    if name == "train":
        check(hydra_arguments().parse_args(expand_seeds(args)), inputs=False)
        return
    parsed = next(c for c in COMMANDS if c.name == name).parser().parse_args(args)
    overrides = {"eval": "overrides", "analyze": "sources"}.get(name)
    if overrides is not None:
        settings = [a for a in getattr(parsed, overrides) if "=" in a]
        compose_checked(settings, ("data", "paths.cache_dir", "logger"), f"moe-lab {name}", "data settings")


def test_the_readme_has_commands_of_every_kind():
    assert {words[0] for _, words, _ in README_COMMANDS} == COMMAND_NAMES
    assert len(README_COMMANDS) >= 20


@pytest.mark.parametrize(
    "line,words,launched", README_COMMANDS, ids=[f"L{line}-{w[0]}" for line, w, _ in README_COMMANDS]
)
def test_every_readme_command_parses(line, words, launched, monkeypatch):
    from moe_lab.training.rendezvous import LAUNCHER_VARIABLES

    for variable in LAUNCHER_VARIABLES:  # as typed in a shell; srun and torchrun say they started it
        monkeypatch.delenv(variable, raising=False)
    if launched:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "readme")
    try:
        check_command(words)
    except (UserError, SystemExit) as e:
        pytest.fail(f"README line ~{line}: moe-lab {' '.join(words)}: {e}")


def named_settings(text: str) -> list[str]:
    """Every `KEY=VALUE` word the README's inline code and code blocks hold."""
    # Inline code that calls Python (`load_model(CKPT, capacity="checkpoint")`) names no config setting.
    spans = [s for s in re.findall(r"`([^`\n]+)`", text) if "(" not in s] + [block for _, block in code_blocks(text)]
    words = []
    for span in spans:
        try:
            words += shlex.split(span, comments=True)
        except ValueError:
            words += span.split()
    return [w for w in words if re.fullmatch(r"\+{0,2}[a-z_][\w.]*=\S*", w)]


def unknown_options(text: str) -> list[str]:
    wrong = []
    for word in named_settings(text):
        key, _, value = word.lstrip("+").partition("=")
        if key in GROUPS and value and not value.startswith(("$", "NAME", "OPTION")):
            values = re.split(r"[,|]", value.rstrip(").,;:"))
            wrong += [f"{key}={v}" for v in values if v not in options(key) | {"null"}]
    return sorted(set(wrong))


def test_every_config_option_the_readme_names_exists():
    assert not unknown_options(README), f"options the README names that do not exist: {unknown_options(README)}"


def known_key(key: str, base) -> bool:
    """A setting moe-lab has: in the default config, or under another option of its group (a data source's, a
    router's, a logger's), or a Lightning Trainer argument."""
    from moe_lab.data.config import SOURCES
    from moe_lab.model.router_configs import registered_routers
    from moe_lab.training.schemas import lightning_trainer_arguments

    if OmegaConf.select(base, key, default="<missing>") != "<missing>" or key.startswith(("hydra.", "paths.")):
        return True
    head, _, leaf = key.rpartition(".")
    if head == "optim.lr_mult":
        from moe_lab.training.schemas import PARTS

        return leaf in PARTS
    if head == "data":
        return any(leaf in cls.__dataclass_fields__ for cls in SOURCES.values())
    if head == "model.moe.router":
        return any(leaf in cls.__dataclass_fields__ for cls in registered_routers().values())
    if head == "trainer":
        return leaf in lightning_trainer_arguments()
    if key.startswith("logger."):
        logger = key.split(".")[1]
        return OmegaConf.select(compose_cfg([f"logger={logger}"], fast=False), key, default=None) is not None
    return False


def test_every_setting_the_readme_names_exists():
    base = compose_cfg([], fast=False)
    keys = {w.lstrip("+").partition("=")[0] for w in named_settings(README)}
    unknown = sorted(
        k for k in keys if "." in k and k.split(".")[0] not in ("seed", "seeds") and not known_key(k, base)
    )
    assert not unknown, f"settings the README names that moe-lab does not have: {unknown}"


def test_every_option_of_every_command_is_in_the_readme():
    missing = []
    for command in COMMANDS:
        if command.raw is not None:
            continue
        for action in command.parser()._actions:  # argparse's public fields for its options
            flags = [flag for flag in action.option_strings if flag not in ("-h", "--help")]
            if flags and not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README) for flag in flags):
                missing.append(f"moe-lab {command.name} {flags[-1]}")
    missing += [f"config group {group}" for group in GROUPS if f"`{group}`" not in README and f"{group}=" not in README]
    assert not missing, f"in --help but not in the README: {missing}"


def test_a_renamed_option_fails_this_test(monkeypatch):
    """The check is real: a README naming an option that does not exist, or a flag a command lacks, is caught."""
    assert unknown_options(README.replace("capacity=cf1_25", "capacity=cf1_33")) == ["capacity=cf1_33"]
    renamed = next(c for c in COMMANDS if c.name == "generate").parser()
    assert any("--max-new-tokens" in a.option_strings for a in renamed._actions)
    with pytest.raises(SystemExit):
        check_command(["eval", "CKPT", "--max-batchs", "3"])
    with pytest.raises(UserError, match="experts=e99 is not an option"):
        check_command(["train", "experts=e99"])


# ------------------------------------------------------------------------------------------------------------
# The recipes, run


def recipes() -> list[str]:
    block = README.split("<!-- recipes -->", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", block, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.replace("\\\n", " ").strip().splitlines()]


RUN = [*FAST, "trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint.every_n_steps=2"]


def test_the_recipes_come_straight_after_set_up():
    assert README.index("## Recipes") < README.index("## Configuration") < README.index("<!-- recipes -->") + 10**6
    assert README.index("## Set-up") < README.index("## Recipes") < README.index("## What a run does and writes")


@pytest.mark.slow
def test_the_recipes_run(tmp_path, cache_dir, capsys, monkeypatch):
    """Each recipe as the README has it: the cheap ones run (a few steps, the test's folders and a tiny local OLMoE
    for the hub id), the multi-GPU ones are composed and checked."""
    from test_import import save_hf_model

    from moe_lab.cli.main import main

    monkeypatch.chdir(tmp_path)
    common = [*RUN, f"paths.cache_dir={cache_dir}"]
    done = []
    for recipe in recipes():
        words = shlex.split(recipe)
        launcher = words[0] == "torchrun"
        assert words[0] == "moe-lab" or (launcher and "moe-lab)" in words), recipe
        args = words[words.index("moe-lab)") + 1 :] if launcher else words[1:]
        if "trainer=ddp" in args:  # several GPUs or nodes: composed and checked, not run here
            if launcher:
                monkeypatch.setenv("TORCHELASTIC_RUN_ID", "readme")
            check_command(args)
            monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        elif args[0] == "train":
            multirun = "-m" in args
            where = (
                f"hydra.sweep.dir={tmp_path / 'sweep'}" if multirun else f"hydra.run.dir={tmp_path / str(len(done))}"
            )
            assert main([*args, *common, where]) == 0, recipe
        elif args[0] == "dashboard":
            assert main(["dashboard", str(tmp_path / "sweep")]) == 0, recipe
            assert "configurations over seeds" in capsys.readouterr().out
        elif args[0] == "import":
            save_hf_model("olmoe", tmp_path / "hub")
            assert main(["import", str(tmp_path / "hub"), args[2]]) == 0, recipe
        elif args[0] == "analyze":
            ckpt = args[1] if Path(args[1]).parts[0] != "outputs" else str(tmp_path / "1" / "checkpoints" / "last.ckpt")
            rest = [a if a != "cuda" else "cpu" for a in args[2:] if a != "20"]
            rest = [a for a in rest if a != "--max-batches"]
            out = str(tmp_path / f"a{len(done)}.html")
            assert main(["analyze", ckpt, "data.seq_len=64", *rest, "--max-batches", "2", "-o", out]) == 0, recipe
        else:
            pytest.fail(f"a recipe this test does not know how to run: {recipe}")
        done.append(recipe)
    assert len(done) == len(recipes()) >= 8
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 6  # 2 routers x 3 seeds


# ----------------------------------------------------------------------------------------------------------
# The README's figures that a quick run checks


def readme_number(pattern: str) -> tuple[float, ...]:
    found = re.search(pattern, README)
    assert found, f"the README no longer says {pattern!r}"
    return tuple(float(g) for g in found.groups())


def test_the_readme_parameter_counts_are_the_models():
    """The presets' sizes in the README are what the run's header prints (byte-level vocabulary padded to 320)."""
    from pathlib import Path

    from moe_lab.data.tokenizer import ByteTokenizer
    from moe_lab.model import MoETransformer
    from moe_lab.model.config import padded_vocab_size
    from moe_lab.training.schemas import validate

    claims = {
        "tiny": r"`tiny` \(default, ([\d.]+)M parameters, ([\d.]+)M active\)",
        "dense_tiny": r"`dense_tiny` \(dense, FFN 768: [^)]*?([\d.]+)M / ([\d.]+)M active",
        "dense_tiny_total": r"`dense_tiny_total` \(dense, FFN 3072: [^)]*?([\d.]+)M / ([\d.]+)M active",
    }
    for preset, pattern in claims.items():
        model = validate(compose_cfg([f"model={preset}"], output_dir=Path("/nonexistent"), fast=False)).model
        model.vocab_size = padded_vocab_size(ByteTokenizer.vocab_size)
        p = MoETransformer(model).num_params()
        assert readme_number(pattern) == (round(p["total"] / 1e6, 2), round(p["active"] / 1e6, 2)), preset


@pytest.mark.slow
def test_the_readme_loss_before_training(tmp_path, cache_dir):
    """'validation loss 5.69 before training (seed 1234 ...)': the default model and data, float32, at step 0."""
    import json

    from moe_lab.training.train import train

    (claimed,) = readme_number(r"validation\s+loss ([\d.]+) before training \(seed 1234")
    overrides = ["trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.precision=32-true", "compile=false"]
    train(
        compose_cfg([*overrides, "metrics.dashboard=false"], output_dir=tmp_path / "run", cache=cache_dir, fast=False)
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert round(summary["initial_val_loss"], 2) == claimed
