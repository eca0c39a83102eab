"""Every place a setting or a file enters moe-lab, each fed a hostile value: nothing in it runs code, and each is
refused in one `moe-lab: error:` line naming the file (or setting) and what is wrong, before anything is written.

The places: a checkpoint's saved overrides and its run folder's .hydra/overrides.yaml (what a resume inherits), a
checkpoint's saved model settings, a Hugging Face model folder (config.json, its auto_map, its sizes), a run's
pickled config (Hydra's --experimental-rerun), a logger node of any config, the callback state inside a checkpoint.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from moe_lab.cli.main import main
from moe_lab.errors import UserError
from moe_lab.training.train import train

from conftest import FAST


class RunsCode:
    """Unpickled, it writes a marker file: the payload of a hostile pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def run_main(args: list[str], capsys, stdin: str = "y\n") -> tuple[int, str]:
    """moe-lab in this process, with 'y' waiting on standard input (as `echo y | moe-lab ...` would answer a prompt
    to run a folder's code)."""
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    finally:
        sys.stdin = old
    err = capsys.readouterr().err
    return code, err


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("moe-lab: resuming")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("moe-lab: error:"), err[-2000:]
    return lines[0]


# -- what a resume inherits ------------------------------------------------------------------------------------

# Saved overrides that would reach a callable, or are not plain settings of the run schema. Each is refused whether
# it comes from the checkpoint itself or from the .hydra/overrides.yaml of the run folder beside it.
HOSTILE_OVERRIDES = {
    "numpy.load of a pickle": [
        "+logger.x._target_=numpy.load",
        "+logger.x.file={payload}",
        "+logger.x.allow_pickle=true",
    ],
    "exec": ["+logger.x._target_=builtins.exec", "+logger.x._args_=[\"open('{marker}','w')\"]"],
    "an existing logger's _target_": ["logger.csv._target_=pickle.load"],
    "a Hydra callback": ["+hydra.callbacks.x._target_=builtins.exec"],
    "a Hydra setting": ["hydra.job.chdir=true"],
    "a resolver": ["run_name='${{oc.create:{{_target_:os.system,command:touch}}}}'"],
    "a mapping value": ["model.moe={{_target_:os.system,command:touch}}"],
    "a node the schema lacks": ["+model.evil=1"],
    "a Trainer key moe-lab sets": ["+trainer.callbacks=[1]"],
    "a Trainer plugin node": ["+trainer.plugins._target_=os.system"],
    "a _partial_": ["+optim._partial_=true"],
    "a deletion": ["~model"],
    "a sweep": ["seed=1,2"],
    "a package move": ["experts@model=e4"],
}


def _with_saved_overrides(real_checkpoint: Path, folder: Path, overrides: list[str], in_yaml: bool) -> Path:
    run = folder / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(real_checkpoint, weights_only=True)
    if in_yaml:  # an older checkpoint: the overrides come from its run folder
        del ckpt["moe_lab_run"]
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides))
    else:
        ckpt["moe_lab_run"] = {"overrides": overrides, "run_dir": None}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    (run / "metrics.csv").write_text("step\n0\n")
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("in_yaml", [False, True], ids=["checkpoint", "overrides.yaml"])
@pytest.mark.parametrize("case", list(HOSTILE_OVERRIDES))
def test_a_resume_inherits_only_plain_settings(case, in_yaml, real_checkpoint, tmp_path, capsys):
    marker, payload = tmp_path / "marker", tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(RunsCode(marker)))
    overrides = [o.format(marker=marker, payload=payload) for o in HOSTILE_OVERRIDES[case]]
    ckpt = _with_saved_overrides(real_checkpoint, tmp_path, ["experts=e8", *overrides], in_yaml)
    code, err = run_main(["train", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'new'}", *FAST], capsys)
    line = one_line(code, err)
    source = ckpt.parent.parent / ".hydra" / "overrides.yaml" if in_yaml else ckpt
    assert str(source) in line and "saved override" in line, line
    assert not marker.exists() and not (tmp_path / "new").exists()


def test_plain_saved_overrides_are_inherited(real_checkpoint, tmp_path):
    from moe_lab.cli.inherited import with_checkpoint_overrides

    plain = [
        "experts=e8",
        "model.moe.router.top_k=2",
        "+trainer.deterministic=true",
        "+optim.lr_mult.router=0.5",
        "logger=wandb",
        "logger.wandb.project=mine",
        "model.init_from='dense/${seed}/x.ckpt'",
        "seed=7",
    ]
    ckpt = _with_saved_overrides(real_checkpoint, tmp_path, plain, in_yaml=False)
    assert with_checkpoint_overrides([f"ckpt_path={ckpt}", "seed=8"]) == [
        "experts=e8",
        "model.moe.router.top_k=2",
        "++trainer.deterministic=true",
        "++optim.lr_mult.router=0.5",
        "logger=wandb",
        "logger.wandb.project=mine",
        "model.init_from='dense/${seed}/x.ckpt'",
        f"ckpt_path={ckpt}",
        "seed=8",
    ]


# -- loggers are moe-lab's own classes, whatever a config names --------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "+logger.x._target_=builtins.print",
        "logger.csv._target_=builtins.exec",
        "+logger.csv._args_=[1]",
        "+logger.csv.x={_target_:os.system}",
    ],
)
def test_a_logger_is_only_one_of_moe_labs(override, tmp_path, capsys):
    code, err = run_main(["train", override, f"hydra.run.dir={tmp_path / 'run'}", *FAST], capsys)
    assert "logger" in one_line(code, err)
    assert not (tmp_path / "run").exists()


def test_build_loggers_never_instantiates_another_class(tmp_path, monkeypatch):
    from moe_lab.training.loggers import build_logger

    with pytest.raises(UserError, match="moe-lab builds only"):
        build_logger({"_target_": "builtins.exec", "source": "open('x', 'w')"})


# -- a model folder's own code ----------------------------------------------------------------------------------


def _folder_with_code(folder: Path, marker: Path, model_type: str = "moe_lab_custom") -> Path:
    folder.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_custom.py").write_text(
        code + "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n"
        f"    model_type = {model_type!r}\n"
    )
    (folder / "modeling_custom.py").write_text(code)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": model_type,
                "auto_map": {
                    "AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForCausalLM": "modeling_custom.CustomModel",
                },
            }
        )
    )
    return folder


@pytest.mark.parametrize("command", ["import", "generate", "eval", "analyze", "train"])
def test_a_folder_with_custom_code_is_refused_before_transformers_reads_it(command, tmp_path, capsys):
    pytest.importorskip("transformers")
    marker = tmp_path / "marker"
    folder = str(_folder_with_code(tmp_path / "custom", marker))
    args = {
        "import": ["import", folder, str(tmp_path / "out")],
        "generate": ["generate", folder, "--prompt", "x"],
        "eval": ["eval", folder],
        "analyze": ["analyze", folder, "-o", str(tmp_path / "a.html")],
        "train": ["train", f"model.init_from={folder}", f"hydra.run.dir={tmp_path / 'run'}", *FAST],
    }[command]
    line = one_line(*run_main(args, capsys))
    assert "moe_lab_custom" in line and "auto_map" in line and "never runs" in line, line
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_known_family_naming_custom_code_loads_transformers_own_classes(tmp_path):
    pytest.importorskip("transformers")
    from test_import import save_hf_model

    from moe_lab.tools.hf_import import import_hf

    marker = tmp_path / "marker"
    folder = tmp_path / "hf"
    save_hf_model("mixtral", folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    for name in ("configuration_custom.py", "modeling_custom.py", "tokenization_custom.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    result = import_hf(str(folder), tmp_path / "out")
    assert result["family"] == "mixtral" and not marker.exists()


# The size fields of a config.json; each set absurdly large makes a model no machine here holds. Refused at once,
# from the config alone (before, num_hidden_layers=1000000 hung the import while a million blocks were built).
ABSURD_SIZES = {
    "num_hidden_layers": 1_000_000,
    "hidden_size": 1 << 22,
    "intermediate_size": 10**9,
    "num_local_experts": 10**6,
    "vocab_size": 10**10,
    "max_position_embeddings": 10**12,
}


@pytest.mark.parametrize("field", list(ABSURD_SIZES))
def test_a_config_too_large_for_memory_is_refused_before_building(field, tmp_path):
    pytest.importorskip("transformers")
    from test_import import save_hf_model

    from moe_lab.tools.hf_import import import_hf

    folder = tmp_path / "hf"
    save_hf_model("mixtral", folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = ABSURD_SIZES[field]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="more than the .* of memory here"):
        import_hf(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setting",
    [
        "model.n_layers=1000000",
        "model.d_model=1048576",
        "model.moe.num_experts=1000000",
        "model.max_seq_len=1000000000000",
        "model.vocab_size=10000000000",
        "model.moe.expert_hidden=1000000000",
        "model.ffn_hidden=1000000000000",
    ],
)
def test_a_run_too_large_for_memory_is_refused_before_building(setting, tmp_path, capsys):
    args = ["train", setting, f"hydra.run.dir={tmp_path / 'run'}", *[a for a in FAST if a.split("=")[0] not in setting]]
    if setting.startswith("model.ffn_hidden"):
        args.append("experts=dense")
    line = one_line(*run_main(args, capsys))
    assert "of memory here" in line, line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_settings_are_too_large_is_refused(real_checkpoint, tmp_path):
    import moe_lab

    ckpt = torch.load(real_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["model"]["n_layers"] = 1_000_000
    torch.save(ckpt, tmp_path / "huge.ckpt")
    with pytest.raises(UserError, match="of memory here"):
        moe_lab.load_model(tmp_path / "huge.ckpt")


def test_a_checkpoints_model_settings_name_no_callable(real_checkpoint, tmp_path, capsys):
    ckpt = torch.load(real_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["model"]["_target_"] = "os.system"
    torch.save(ckpt, tmp_path / "target.ckpt")
    for args in (
        ["generate", str(tmp_path / "target.ckpt"), "--prompt", "x"],
        ["export", str(tmp_path / "target.ckpt"), "--format", "hf", str(tmp_path / "hf")],
    ):
        line = one_line(*run_main(args, capsys))
        assert "_target_" in line and "not moe-lab's" in line, line


# -- Hydra's pickled configs -------------------------------------------------------------------------------------


def test_experimental_rerun_of_a_pickled_config_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker"
    (tmp_path / "config.pickle").write_bytes(pickle.dumps(RunsCode(marker)))
    line = one_line(*run_main(["train", "--experimental-rerun", str(tmp_path / "config.pickle")], capsys))
    assert "pickle" in line and not marker.exists()


# -- the callback state inside a checkpoint -----------------------------------------------------------------------


def test_a_checkpoints_callback_state_never_deletes_files_elsewhere(real_checkpoint, make_cfg, tmp_path):
    """ModelCheckpoint deletes the files its saved state lists once they leave the kept set; a resumed checkpoint's
    state that names a file outside the run's checkpoint folder must not reach it. Lightning's own check (it removes
    only files in its current folder) is what holds here; this guards it."""
    precious = tmp_path / "precious.ckpt"
    precious.write_text("mine")
    ckpt = torch.load(real_checkpoint, weights_only=True)
    run_ckpts = tmp_path / "resumed" / "checkpoints"
    for key, state in ckpt["callbacks"].items():
        if key.startswith("ModelCheckpoint"):
            state.update(
                dirpath=str(run_ckpts),
                best_k_models={str(precious): torch.tensor(0.0)},
                kth_best_model_path=str(precious),
                last_model_path=str(precious),
                best_model_path=str(precious),
            )
    torch.save(ckpt, tmp_path / "hostile.ckpt")
    # The same checkpoint settings as the run that wrote it (Lightning restores a callback's state by its settings).
    train(
        make_cfg(
            f"ckpt_path={tmp_path / 'hostile.ckpt'}",
            "trainer.max_steps=12",
            "checkpoint.keep=1",
            "capacity=dropless",
            "metrics.dashboard=false",
            name="resumed",
        )
    )
    assert precious.read_text() == "mine"
    assert sorted(p.name for p in run_ckpts.iterdir()) == ["last.ckpt", "step000012.ckpt"]
