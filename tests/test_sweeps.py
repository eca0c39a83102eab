"""Sweeps: Hydra's basic multirun and the Optuna sweeper, the sweep summary, and failure tolerance."""

from __future__ import annotations

import csv

import pytest
import yaml

from conftest import FAST, REPO, run_cli

pytestmark = pytest.mark.slow


def read_summary(sweep):
    with open(sweep / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


def test_basic_sweep_writes_a_summary_sorted_by_validation_loss(sweep_dir):
    rows = read_summary(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    losses = [float(r["val/loss"]) for r in rows]
    assert losses == sorted(losses)
    combos = {tuple(o for o in r["overrides"].split() if o.startswith(("experts=", "aux_loss="))) for r in rows}
    assert combos == {("experts=e4", "aux_loss=none"), ("experts=e4", "aux_loss=switch"),
                      ("experts=e8", "aux_loss=none"), ("experts=e8", "aux_loss=switch")}
    for r in rows:
        assert float(r["moe/mean_imbalance"]) >= 1 and 0 <= float(r["moe/specialization"]) <= 1
        assert (sweep_dir / r["job"] / "dashboard.html").is_file()
    assert (sweep_dir / "dashboard.html").is_file()
    # The end of the sweep prints the same ranking in the terminal.
    printed = (sweep_dir.parent / "stdout.txt").read_text()
    table = printed.split("best validation loss first ('!': dead or starved experts)\n")[1].splitlines()
    assert table[0].split()[:4] == ["#", "run", "val/loss", "imbalance"]
    for rank, (line, row) in enumerate(zip(table[1:5], rows), 1):
        assert line.split()[0] == str(rank) and f"{float(row['val/loss']):.4f}" in line, (line, row)
        assert "experts=" in line and "aux_loss=" in line and line.rstrip().endswith("finished")


def test_optuna_study_survives_a_diverged_trial(tmp_path, cache_dir):
    """Trial 0 (lr 1e6) diverges; with max_failure_rate 0.5 the study goes on and reports the other trial."""
    sweep = tmp_path / "study"
    fast = [o for o in FAST if not o.startswith("optim.lr=")]  # a command-line value would fix the searched lr
    result = run_cli(["train", "--config-dir", str(REPO / "tests" / "configs"), "hparams_search=diverge", *fast,
                      f"paths.cache_dir={cache_dir}", "optim.warmup_steps=0", "trainer.max_steps=6",
                      "metrics.dashboard=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["finished", "failed"]
    failed = sweep / rows[1]["job"]
    assert "diverged" in (failed / "error.txt").read_text() and "optim.lr=1000000.0" in rows[1]["overrides"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"optim.lr": 0.003}
    assert best["best_value"] == pytest.approx(float(rows[0]["val/loss"]))
    assert "Traceback" not in result.stdout


def test_shipped_optuna_search(tmp_path, cache_dir):
    sweep = tmp_path / "study"
    fast = [o for o in FAST if not o.startswith("optim.lr=")]
    result = run_cli(["train", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *fast,
                      f"paths.cache_dir={cache_dir}", "trainer.max_steps=4", "trainer.val_check_interval=4",
                      "metrics.dashboard=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    assert "alembic" not in result.stdout + result.stderr  # the in-memory study's storage says nothing
    for r in rows:  # each trial drew its own values for the searched parameters
        assert "optim.lr=" in r["overrides"] and "model.moe.router.top_k=" in r["overrides"]
