"""The fast path's building blocks: the fused SwiGLU, compile without graph breaks, no host synchronisation on GPU,
and `moe-lab bench` itself (its numbers are in benchmarks/, not asserted here: timing tests are flaky)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from moe_lab.model import MoEConfig, MoELayer
from moe_lab.model.experts import _ScaledSwiGLU, apply_activation


def test_fused_swiglu_matches_autograd_and_passes_gradcheck():
    h = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, s: _ScaledSwiGLU.apply(h, s), (h, scale))
    assert torch.autograd.gradcheck(lambda h: _ScaledSwiGLU.apply(h, None), (h,))
    torch.testing.assert_close(_ScaledSwiGLU.apply(h, scale), apply_activation(h, "swiglu") * scale[:, None])


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_moe_layer_compiles_without_graph_breaks(capacity_factor):
    """fullgraph=True fails on any graph break. bf16, because torch 2.13's fake kernel of _grouped_mm (the one
    compile traces with) accepts only bf16, as the fast GPU kernel does; eager float32 on CPU is unaffected."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, expert_hidden=64, capacity_factor=capacity_factor,
                    eval_capacity_factor=capacity_factor)
    layer = MoELayer(64, cfg).to(torch.bfloat16)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    y, _ = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    y.float().square().sum().backward()
    torch.testing.assert_close(y, layer(x)[0], rtol=0, atol=0)
    assert layer.experts.w_in_EGFD.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dropless_layer_has_no_host_synchronisation_on_gpu():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=16, expert_hidden=256, capacity_factor=None, eval_capacity_factor=None)
    layer = MoELayer(512, cfg).cuda()
    x = torch.randn(4, 256, 512, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x)  # warm-up: first calls may initialise CUDA state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x)
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_layer_on_gpu():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(512, MoEConfig(num_experts=16, expert_hidden=256, capacity_factor=1.25)).cuda()
    x = torch.randn(4, 256, 512, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = torch.compile(layer, fullgraph=True)(x)
        ref, _ = layer(x)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_retain_freed_memory_is_idempotent():
    from moe_lab.training.runtime import retain_freed_memory

    first = retain_freed_memory()
    assert retain_freed_memory() == first
    if sys.platform.startswith("linux"):
        assert first  # glibc here


def test_bench_quick_compare(tmp_path):
    pytest.importorskip("transformers")
    from moe_lab.tools.bench import run

    args = SimpleNamespace(device="cpu", threads=None, dtype="float32", capacity=False, quick=True, compare=True,
                           loop=True, warmup=1, repeats=2, no_steps=False, out=str(tmp_path), argv=["--quick"])
    report = run(args)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == report["ratios"] and (tmp_path / "bench.csv").is_file()
    impls = {(c["case"], c["impl"]) for c in saved["cases"]}
    assert {("E8-top2", "grouped"), ("E8-top2", "loop"), ("E8-top2", "hf_eager"), ("E8-top2", "dense")} <= impls
    for case in saved["cases"]:
        assert case["forward_ms"] > 0 and case["forward_backward_ms"] > 0 and case["saved_mb"] > 0
    assert {r["comparison"] for r in saved["ratios"]} >= {"speed-up over HF eager Mixtral block",
                                                          "time / dense SwiGLU of equal active params"}
    assert saved["training_steps"][0]["tokens_per_sec"] > 0 and saved["training_steps"][0]["mfu"] is None  # CPU
