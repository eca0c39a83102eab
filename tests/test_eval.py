"""`moe-lab eval`: the same numbers as the run's own validation, per domain, with routing statistics."""

from __future__ import annotations

import json
import math

import pytest

from moe_lab.cli.main import main
from moe_lab.training.train import train

from conftest import FAST

DATA = [o for o in FAST if o.startswith(("data.", "++data."))]


def test_eval_agrees_with_the_runs_validation(make_cfg, tmp_path, cache_dir, capsys):
    summary = train(make_cfg("trainer.max_steps=6", "metrics.dashboard=false", name="run"))
    ckpt = summary["checkpoint"]
    out = tmp_path / "eval.json"
    assert (
        main(["eval", ckpt, *DATA, f"paths.cache_dir={cache_dir}", "--capacity", "checkpoint", "--json", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    # The same held-out blocks in the same batches and the same capacity: the run's validation loss, per domain too.
    assert report["overall"]["loss"] == pytest.approx(summary["val/loss"], rel=1e-6)
    for domain, q in report["domains"].items():
        assert q["loss"] == pytest.approx(summary[f"val/loss/{domain}"], rel=1e-6), domain
        assert q["ppl"] == pytest.approx(math.exp(q["loss"]))
        # Byte tokens: every target token is one byte but the end-of-document token, which is none.
        assert q["bytes"] <= q["tokens"] and q["bits_per_byte"] == pytest.approx(
            q["loss"] * q["tokens"] / math.log(2) / q["bytes"]
        )
    assert set(report["layers"]) == {"0", "1"}
    for layer in report["layers"].values():
        assert sum(layer["load"]) == pytest.approx(1.0) and layer["imbalance"] >= 1
        assert 0 <= layer["specialization"] <= 1 and len(layer["domain_counts"]) == 8
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "specialization" in printed
    # Dropless (the default) differs only through drops: none here.
    assert main(["eval", ckpt, *DATA, f"paths.cache_dir={cache_dir}", "--json", str(out)]) == 0
    assert all(e["dropped_frac"] == 0 for e in json.loads(out.read_text())["layers"].values())


def test_eval_refuses_other_settings(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "x.ckpt"), "model.d_model=8"]) == 2
    assert "model.d_model is not a setting of moe-lab eval" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "x.ckpt"), "data=nope"]) == 2
    assert "data=nope is not an option" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "x.ckpt")]) == 2
    assert "x.ckpt: no such checkpoint file or model directory" in capsys.readouterr().err


def test_eval_of_a_hugging_face_directory(tmp_path, cache_dir, capsys):
    from test_import import save_hf_model

    save_hf_model("qwen2_moe", tmp_path / "hf")
    assert (
        main(
            [
                "eval",
                str(tmp_path / "hf"),
                *DATA,
                f"paths.cache_dir={cache_dir}",
                "--max-batches",
                "2",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "e.json").read_text())
    assert set(report["layers"]) == {"1", "2"}  # layer 0 is dense (mlp_only_layers)
    assert report["overall"]["loss"] > 0 and len(report["domains"]) >= 2


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_blocks_longer_than_the_model_are_one_line(command, real_checkpoint, tmp_path, capsys):
    """The default data.seq_len (256) is longer than this model's positions (128): said before any data is read."""
    out = ["--json", str(tmp_path / "r.json")] if command == "eval" else ["-o", str(tmp_path / "a.html")]
    code = main([command, str(real_checkpoint), *out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "data.seq_len=256 is longer than the model's max_seq_len=128; give data.seq_len=128" in err[0]
    assert not list(tmp_path.iterdir())
