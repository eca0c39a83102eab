"""W&B without credentials or network: the run goes offline, says so once, never crashes, and what it wrote reads
back with wandb's own record format and `wandb sync`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, run_cli
from wandb_records import of_type, read_records

pytestmark = pytest.mark.slow


def offline_run(run_dir: Path) -> Path:
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def keys_of(history) -> set[str]:
    return {item.key or "/".join(item.nested_key) for h in history for item in h.item}


def test_offline_run_reads_back(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "train",
            "experts=e4",
            "logger=wandb",
            *FAST,
            f"paths.cache_dir={cache_dir}",
            "trainer.max_steps=6",
            "metrics.image_every_n_steps=3",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env_extra={"WANDB_MODE": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("logging offline") == 1
    wandb_dir = offline_run(run_dir)
    records = read_records(next(wandb_dir.glob("run-*.wandb")))
    run = of_type(records, "run")[0]
    # Named after the overrides that define the experiment (not logger=, trainer.*, ...).
    assert run.display_name.startswith("experts=e4,model.d_model=64") and "logger" not in run.display_name
    assert "trainer." not in run.display_name and run.job_type == "train"
    config_keys = {u.key for c in of_type(records, "config") for u in c.update}
    assert {"model", "data", "optim", "trainer"} <= config_keys  # the resolved Hydra config is the run config
    model = json.loads(next(u.value_json for c in of_type(records, "config") for u in c.update if u.key == "model"))
    assert model["moe"]["num_experts"] == 4
    keys = keys_of(of_type(records, "history"))
    for key in ("train/loss", "val/loss", "moe/layer0/expert3/load", "moe/layer1/imbalance", "train/tokens_per_sec"):
        assert key in keys, key
    assert {"moe/heatmap/_type", "moe/domains/_type", "moe/load_table/_type"} <= keys
    # Figures, not pixel grids: axes with titles, and a colour bar that reads in multiples of the fair share.
    heatmaps = sorted((wandb_dir / "files" / "media" / "plotly" / "moe").glob("heatmap_*.plotly.json"))
    assert len(heatmaps) >= 2
    figure = json.loads(heatmaps[-1].read_text())
    traces = figure["data"]
    assert [t["type"] for t in traces] == ["heatmap", "heatmap"] and traces[0]["showscale"]
    assert traces[0]["colorbar"]["ticktext"][0] == "1/4x" and traces[0]["colorbar"]["ticktext"][-1] == "4x"
    assert figure["layout"]["xaxis2"]["title"]["text"] == "optimizer step"
    assert figure["layout"]["yaxis"]["title"]["text"] == "expert"
    domains = json.loads(
        next((wandb_dir / "files" / "media" / "plotly" / "moe").glob("domains_*.plotly.json")).read_text()
    )
    assert domains["data"][0]["y"] == ["code", "docs", "math"] and domains["data"][0]["showscale"]
    # W&B writes one file per logged table (load_table_STEP_HASH.table.json), each the loads up to its step: the last
    tables = (wandb_dir / "files" / "media" / "table" / "moe").glob("load_table*.json")
    table = json.loads(max(tables, key=lambda p: int(p.name.split("_")[2])).read_text())
    assert table["columns"] == ["step", "layer", "expert", "load"] and len(table["data"]) == 2 * 2 * 4
    assert of_type(records, "exit")  # wandb.finish() closed the run
    sync = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(wandb_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert sync.returncode == 0, sync.stderr
    assert wandb_dir.name.split("-")[-1] in sync.stdout + sync.stderr


def test_unreachable_server_falls_back_to_offline(tmp_path, cache_dir):
    """A server that refuses connections (wandb.init would wait 90 s for it) costs seconds: the whole short run,
    process start and data included, stays far under that."""
    import time

    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "", "HOME": str(tmp_path), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    started = time.time()
    result = run_cli(
        [
            "train",
            "logger=wandb",
            *FAST,
            f"paths.cache_dir={cache_dir}",
            "trainer.max_steps=3",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env_extra=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.time() - started < 60
    assert "W&B could not reach its server" in result.stderr and "logging offline" in result.stderr
    assert (run_dir / "summary.json").is_file()
    keys = keys_of(of_type(read_records(next(offline_run(run_dir).glob("run-*.wandb"))), "history"))
    assert "train/loss" in keys


def test_analyze_logs_its_tables_and_figures_to_an_offline_run(tmp_path, cache_dir):
    """`moe-lab analyze ... logger=wandb`: one run of job type analyze with a table per analysis and the page's
    figures, offline without credentials (said once)."""
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    assert (
        run_cli(
            [
                "train",
                "experts=e4",
                *FAST,
                f"paths.cache_dir={cache_dir}",
                "trainer.max_steps=3",
                "metrics.dashboard=false",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=tmp_path,
            env_extra=env,
        ).returncode
        == 0
    )
    data = [o for o in FAST if o.startswith(("data.", "++data."))]
    out = tmp_path / "report"
    out.mkdir()
    result = run_cli(
        [
            "analyze",
            str(run_dir / "checkpoints" / "last.ckpt"),
            *data,
            f"paths.cache_dir={cache_dir}",
            "logger=wandb",
            "logger.wandb.project=routing",
            "-o",
            str(out / "analysis.html"),
        ],
        cwd=tmp_path,
        env_extra=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("logging offline") == 1 and "logged to W&B" in result.stderr
    records = read_records(next(offline_run(out).glob("run-*.wandb")))
    run = of_type(records, "run")[0]
    assert run.job_type == "analyze" and run.project == "routing" and run.display_name.startswith("analyze ")
    keys = keys_of(of_type(records, "history"))
    for table in (
        "layers",
        "domain_shares",
        "expert_tokens",
        "coactivation",
        "transitions",
        "drops_by_position",
        "saturation",
    ):
        assert f"analysis/{table}/_type" in keys, table
    for figure in ("domains", "summary", "coactivation", "position"):
        assert f"analysis/figure/{figure}/_type" in keys, figure
    table = json.loads(
        next((offline_run(out) / "files" / "media" / "table" / "analysis").glob("layers_*.table.json")).read_text()
    )
    assert table["columns"][0] == "layer" and [row[0] for row in table["data"]] == [0, 1]
