"""The GPU table's script (benchmarks/gpu_table/gpu_table.py) in its CPU smoke-test mode: every row of the table is
measured and written, the compiled model's gradients are checked against eager's, and it refuses what it must."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_table" / "gpu_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_quick_mode_measures_and_writes_every_row_of_the_gpu_table(tmp_path, capsys):
    pytest.importorskip("transformers")
    script = load_script()
    out = tmp_path / "table"
    assert script.main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [row["case"] for row in results["layer"]] == ["E8-top2", "E64-top8"]
    for row in results["layer"]:
        assert row["moe_lab_ms"] > 0 and row["hf_grouped_speedup"] > 0  # transformers is a dependency: always run
        assert 0 < row["ops"]["kernels_without_aux"] < row["ops"]["kernels"]
    moe, dense = results["steps"]
    assert moe["tokens_per_sec"] > 0 and dense["tokens_per_sec"] > 0 and "dense" in dense["preset"]
    assert moe["peak_flops"] is None  # a CPU: no MFU from a guessed peak
    compiled = results["compile"]
    assert compiled["same_parameters"] and compiled["worst_gradient_error"] < 1e-4  # float32, aot_eager
    assert compiled["speedup_low"] <= compiled["speedup"] <= compiled["speedup_high"]
    assert results["veomni"]["tflops"] > 0
    table = (out / "README.md").read_text()
    assert "--quick: a CPU smoke test, not measurements" in table
    for row in ("| layer E8-top2", "| layer E64-top8", "step / its dense twin", "compiled / eager", "VeOmni", "| MFU"):
        assert row in table, row
    assert table in capsys.readouterr().out


def test_it_refuses_an_existing_folder_and_a_machine_without_a_gpu(tmp_path, capsys):
    script = load_script()
    assert script.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "exists; name a new folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert script.main(["--out", str(tmp_path / "new")]) == 2
        assert "no CUDA device here" in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
