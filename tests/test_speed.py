"""The fast path: compile without graph breaks, no host synchronisation on GPU,
and `moe-lab bench` itself (its numbers are in benchmarks/, not asserted here: timing tests are flaky)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from moe_lab.model import MoEConfig, MoELayer


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_moe_layer_compiles_without_graph_breaks(capacity_factor):
    """fullgraph=True fails on any graph break. bf16, because torch 2.13's fake kernel of _grouped_mm (the one
    compile traces with) accepts only bf16, as the fast GPU kernel does; eager float32 on CPU is unaffected."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=8, expert_hidden=64, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor
    )
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


def bench_args(out, argv: list[str], **asked) -> SimpleNamespace:
    """`moe-lab bench --quick` on the CPU as its parser would give it, with `asked` set."""
    defaults = dict(device="cpu", threads=None, dtype="float32", capacity=False, quick=True, compare=False)
    defaults.update(loop=False, warmup=1, repeats=10, no_steps=False, baseline=False, checkpointing=False)
    return SimpleNamespace(**{**defaults, **asked, "out": str(out), "argv": argv})


def test_bench_quick_compare(tmp_path):
    pytest.importorskip("transformers")
    from moe_lab.tools.bench import measure

    report = measure(bench_args(tmp_path, ["--quick"], compare=True, loop=True, repeats=2))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == report["ratios"] and (tmp_path / "bench.csv").is_file()
    impls = {(c["case"], c["impl"]) for c in saved["cases"]}
    assert {("E8-top2", "grouped"), ("E8-top2", "loop"), ("E8-top2", "hf_eager"), ("E8-top2", "dense")} <= impls
    for case in saved["cases"]:
        assert case["forward_ms"] > 0 and case["forward_backward_ms"] > 0 and case["saved_mb"] > 0
    comparisons = {r["comparison"] for r in saved["ratios"]}
    assert {
        "time / dense SwiGLU of equal active params",
        "activation memory / dense SwiGLU",
        "training step tokens/s, MoE / dense of equal active",
    } <= comparisons
    assert any(c.startswith("speed-up over the fastest peer (hf_") for c in comparisons)
    assert any(c.startswith("activation memory / the least peer's (hf_") for c in comparisons)
    # --quick is a smoke test: the ratios are reported, no bar is judged on tiny shapes
    assert all(r["met"] is None and r["target"] == "(--quick)" for r in saved["ratios"])
    # every peer is either timed (after the same-math check) or listed with the reason it was not
    for case in ("E8-top2", "E64-top8"):
        timed = {impl for c, impl in impls if c == case}
        skipped = {n["impl"] for n in saved["not_timed"] if n["case"] == case}
        assert timed | skipped >= {"hf_eager", "hf_grouped", "torchtitan", "olmo_core"}
        assert not timed & skipped
    for case in saved["cases"]:
        if case["impl"].startswith("hf_"):
            assert case["extra"]["same_math"].startswith("relative error")
    whole = saved["whole_models"][0]
    assert whole["logits_error"] < 1e-4 and whole["moe_lab_ms"] > 0 and whole["transformers_ms"] > 0
    assert saved["training_steps"][0]["tokens_per_sec"] > 0 and saved["training_steps"][0]["mfu"] is None  # CPU
    # The machine's own peak, measured in the same run, and every step as a fraction of it.
    peaks = saved["gemm_peaks"]
    assert set(peaks) == {"float32", "bfloat16"} and all(p["peak"] > 0 and p["model"] > 0 for p in peaks.values())
    step = saved["training_steps"][0]
    achieved = step["tokens_per_sec"] * step["flops_per_token"]
    assert step["achieved_flops"] == pytest.approx(achieved)
    assert step["of_peak"] == pytest.approx(achieved / peaks["float32"]["peak"])
    assert step["of_bf16_model_peak"] == pytest.approx(achieved / peaks["bfloat16"]["model"])
    # Against the bf16 GEMM at the model's shape: a bar only where bfloat16 is faster than float32 (AMX, GPUs); on
    # a CPU that emulates bfloat16 the row says so
    emulated = step["bf16_gemm_at_shape"] < step["fp32_gemm_at_shape"]
    suffix = " (bf16 emulated here: no bar)" if emulated else ""
    assert "training step FLOP/s / the bf16 GEMM's at the model's shape" + suffix in comparisons


def test_scatter_add_rows_keeps_only_the_index():
    from moe_lab.model.dispatch import scatter_add_rows

    y = torch.randn(7, 4, requires_grad=True)
    index = torch.tensor([0, 2, 2, 1, 0, 3, 2])
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = scatter_add_rows(y, index, 5)
    assert [t.dtype for t in kept] == [torch.int64]
    torch.testing.assert_close(out, torch.zeros(5, 4).index_add(0, index, y.detach()))
    grad = torch.randn(5, 4)
    out.backward(grad)
    torch.testing.assert_close(y.grad, grad[index])


@pytest.mark.parametrize("num_experts,top_k,width", [(8, 2, 128), (64, 8, 32)])
def test_moe_layer_activation_memory_at_most_1_6x_the_dense_ffn(num_experts, top_k, width):
    """The layer keeps no (R, D) copy of its gathered inputs nor of its expert outputs for backward: its activation
    memory (parameters excluded) stays within 1.6x a dense SwiGLU of the same active width (the speed issue's bar)."""
    from moe_lab.model.experts import FeedForward
    from moe_lab.tools.bench.cases import saved_for_backward_mb

    torch.manual_seed(0)
    from moe_lab.model.routers import TopKRouterConfig

    cfg = MoEConfig(
        num_experts=num_experts,
        expert_hidden=width,
        capacity_factor=None,
        eval_capacity_factor=None,
        router=TopKRouterConfig(top_k=top_k),
    )
    layer = MoELayer(64, cfg)
    dense = FeedForward(64, top_k * width)
    x = torch.randn(2, 512, 64, requires_grad=True)
    moe_mb = saved_for_backward_mb(lambda: layer(x)[0], layer)
    dense_mb = saved_for_backward_mb(lambda: dense(x), dense)
    assert moe_mb <= 1.6 * dense_mb, (moe_mb, dense_mb)


def test_bench_baseline_interleaves_at_least_five_rounds_and_reports_the_spread(monkeypatch, tmp_path):
    """`moe-lab bench --baseline` compares the default step with float32 eager, both built from the config `moe-lab
    train` composes; here on a small model, with the default forced to bf16-mixed eager so that nothing compiles."""
    from moe_lab.tools.bench import baseline as bench_baseline
    from moe_lab.tools.bench import steps as bench

    run = bench.compose_run("tiny", ["model.d_model=64", "model.n_layers=1", "data.seq_len=32", "data.batch_size=2"])
    run.trainer["precision"], run.compile, run.optim.fused = "bf16-mixed", False, True
    assert [(s.precision, s.compile, s.fused_adamw) for s in bench_baseline.settings_here(run)] == [
        ("32-true", False, False),
        ("bf16-mixed", False, True),
    ]
    monkeypatch.setattr(bench_baseline, "STEPS_PER_ROUND", 1)
    peaks = {dtype: {"peak": 1e12, "model": 1e11} for dtype in ("float32", "bfloat16")}
    report = bench_baseline.compare(run, torch.device("cpu"), warmup=0, repeats=1, peaks=peaks)
    assert report["rounds"] == 5  # --repeats 1 asks for fewer than a spread needs
    assert report["speedup_low"] <= report["speedup"] <= report["speedup_high"]
    for row in report["settings"]:
        assert row["tokens_per_sec_low"] <= row["tokens_per_sec"] <= row["tokens_per_sec_high"]
        achieved = row["tokens_per_sec"] * report["flops_per_token"]
        assert row["of_bf16_model_peak"] == pytest.approx(achieved / 1e11)
    assert report["met"] == (report["speedup"] >= bench_baseline.BASELINE_TARGET)


def test_bfloat16_peer_check_compares_the_tokens_of_unambiguous_routing():
    """In bfloat16 two correct layers break routing ties differently (an order-1 difference in those rows): the
    check compares the tokens whose top-k is clear by a float32 logit margin, and still refuses a wrong peer."""
    pytest.importorskip("transformers")
    from moe_lab.tools.bench import peers as bench_peers
    from moe_lab.tools.bench.cases import Case
    from moe_lab.tools.bench.layer import moe_layer

    case = Case("E8-top2", 256, 64, 8, 2, 96)
    layer = moe_layer(case, "grouped", torch.device("cpu"), torch.bfloat16)
    torch.manual_seed(1)
    x = torch.randn(1, case.tokens, case.d_model, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    compared_T = bench_peers.unambiguous_tokens(layer.router.gate_ED, x.view(-1, case.d_model), case.top_k)
    logits_TE = x.view(-1, case.d_model).float() @ layer.router.gate_ED.float().t()
    top_T3 = logits_TE.topk(3, dim=-1).values
    assert torch.equal(compared_T, top_T3[:, 1] - top_T3[:, 2] > bench_peers.ROUTING_MARGIN)
    assert 0.5 < compared_T.float().mean() < 1.0  # some ties are left out, most tokens are compared
    peer = bench_peers.hf_grouped(layer, case, torch.device("cpu"), torch.bfloat16)
    same = bench_peers.check_same_math(lambda t: layer(t)[0], peer, x, grad, False, compared_T)
    assert same.ok and same.compared == pytest.approx(compared_T.float().mean().item())
    assert "tokens of unambiguous routing" in str(same)
    with torch.no_grad():  # gate and up projections swapped: wrong on every token
        F = case.expert_hidden
        peer.experts.gate_up_proj.copy_(
            torch.cat([peer.experts.gate_up_proj[:, F:], peer.experts.gate_up_proj[:, :F]], 1)
        )
    assert not bench_peers.check_same_math(lambda t: layer(t)[0], peer, x, grad, False, compared_T).ok


def test_whole_model_bar_is_at_equal_settings():
    """Both eager and both compiled are the targets; moe-lab compiled over transformers eager is only a note."""
    from moe_lab.tools.bench.report import WHOLE_MODEL_TARGET, Ratios, model_ratios

    whole = {"preset": "tiny", "architecture": "MixtralForCausalLM", "dtype": "bfloat16", "speedup": 1.2}
    whole |= {"both_compiled": 1.4, "compiled_speedup": 1.7}
    out = Ratios()
    model_ratios(out, [], [whole])
    rows = {what: (value, met) for _, what, value, _, met in out}
    assert rows["whole-model step, speed-up over transformers (MixtralForCausalLM, bfloat16)"] == (1.2, False)
    assert rows["whole-model step, both compiled (bfloat16)"] == (1.4, True)
    assert rows["whole-model step compiled, over transformers eager (bfloat16)"] == (1.7, None)
    assert WHOLE_MODEL_TARGET == 1.3


def test_each_training_step_is_set_against_the_bf16_gemm_at_its_own_model_shape(monkeypatch):
    """On a GPU the timed presets (small, base) are not the model the peaks' "model shape" GEMM was timed at: each
    step is set against a GEMM of its own (tokens, d_model, ffn_hidden), measured once per shape."""
    from moe_lab.tools.bench import peaks as bench

    measured = []
    monkeypatch.setattr(bench, "gemm_flops", lambda device, dtype, shape, w, r: measured.append((dtype, shape)) or 4e11)
    peaks = {d: {"peak": 1e12, "model": 2e11, "model_shape": [4096, 128, 384]} for d in ("float32", "bfloat16")}
    steps = [
        {"tokens_per_sec": 1000.0, "flops_per_token": 1e8, "precision": "bf16", "gemm_shape": shape}
        for shape in ([4096, 128, 384], [16384, 512, 1536], [16384, 512, 1536])
    ]
    tiny, base, base_again = bench.with_fractions_of_peak(steps, peaks, torch.device("cpu"), 0, 1)
    # bfloat16's, and float32's (which says whether bfloat16 is emulated here), once per new shape
    assert measured == [(torch.bfloat16, (16384, 512, 1536)), (torch.float32, (16384, 512, 1536))]
    assert tiny["fp32_gemm_at_shape"] == 2e11 and base["fp32_gemm_at_shape"] == 4e11
    assert tiny["of_bf16_model_peak"] == pytest.approx(1e11 / 2e11)
    assert base["of_bf16_model_peak"] == base_again["of_bf16_model_peak"] == pytest.approx(1e11 / 4e11)
    assert base["of_peak"] == pytest.approx(1e11 / 1e12)


def counted_layer_step(case_name: str, aux: bool, tokens: int = 256):
    """(moe-lab's grouped layer, transformers' grouped Mixtral block, the case) on one input, in training mode."""
    import dataclasses

    from moe_lab.model.config import AuxLossConfig
    from moe_lab.tools.bench import cases, layer, peers

    case = dataclasses.replace(next(c for c in cases.COMPARE_CASES if c.name == case_name), tokens=tokens)
    ours = layer.moe_layer(case, "grouped", torch.device("cpu"), torch.float32).train()
    if not aux:
        ours.cfg = dataclasses.replace(ours.cfg, aux_loss=AuxLossConfig(load_balance=0.0, z_loss=0.0))
    theirs = peers.hf_grouped(ours, case, torch.device("cpu"), torch.float32).train()
    return ours, theirs, case


def forward_backward(module, forward, case):
    torch.manual_seed(1)
    x = torch.randn(1, case.tokens, case.d_model, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        module.zero_grad(set_to_none=True)
        forward(x).backward(grad)

    step()  # first calls may initialise state
    return step


@pytest.mark.parametrize("case_name", ["E8-top2", "E64-top8"])
def test_the_layer_issues_no_more_operations_than_transformers_grouped_layer(case_name):
    """Forward + backward in training mode, a step that does not log (no statistic is read), counted at dispatch:
    every aten operation, and those that launch a kernel on a GPU. moe-lab's layer without its aux losses is held at
    or below transformers' (which computes its aux loss outside the layer, in the model); the two losses add their
    forward's 7 kernels (z-loss: logsumexp, square, mean; Switch loss: mean, gather, sum, scale). No operation reads
    a value back to the host (a synchronisation on a GPU)."""
    pytest.importorskip("transformers")
    from moe_lab.tools.bench.cases import count_ops

    ours, theirs, case = counted_layer_step(case_name, aux=False)
    mine = count_ops(forward_backward(ours, lambda t: ours(t)[0], case))
    transformers = count_ops(forward_backward(theirs, theirs, case))
    assert mine.kernels <= transformers.kernels, (mine, transformers)
    assert mine.total <= transformers.total, (mine, transformers)
    assert mine.host_reads == 0, mine.by_op
    with_aux, _, _ = counted_layer_step(case_name, aux=True)
    aux = count_ops(forward_backward(with_aux, lambda t: with_aux(t)[0], case))
    assert aux.kernels == mine.kernels + 7, (aux.by_op, mine.by_op)


def test_routing_statistics_are_computed_when_read_and_the_metrics_read_them_at_logging_steps_only(monkeypatch):
    """What only logging needs costs nothing at the other steps: each statistic is a property computed when read,
    and RoutingMetrics reads them for the micro-batches of a logging step (every log_every_n_steps, and the last)."""
    import moe_lab.training.metrics as metrics_module
    from moe_lab.tools.bench.cases import count_ops

    torch.manual_seed(0)
    layer = MoELayer(64, MoEConfig(num_experts=8, expert_hidden=64, capacity_factor=None)).train()
    x = torch.randn(2, 16, 64)
    unread = count_ops(lambda: layer(x))
    read = count_ops(lambda: [layer(x)[1].tokens_per_expert_E, layer(x)[1].router_entropy])
    assert read.kernels > 2 * unread.kernels  # two calls and their statistics

    metrics = metrics_module.RoutingMetrics(domain_names=["a"], flops_per_token=1)
    metrics._last_step = 0
    read_at = []
    monkeypatch.setattr(metrics, "_accumulate", lambda stats, batch, layers, routing: read_at.append(routing))
    monkeypatch.setattr(metrics, "_log", lambda trainer, module: None)
    monkeypatch.setattr(metrics_module, "lm", lambda pl_module: pl_module)
    module = SimpleNamespace(moe_layers=[0])
    trainer = SimpleNamespace(log_every_n_steps=3, max_steps=7, global_step=0)
    for step in range(1, 8):  # two micro-batches per optimizer step (gradient accumulation)
        metrics.on_train_batch_end(trainer, module, {"stats": {}}, {}, 0)
        trainer.global_step = step
        metrics.on_train_batch_end(trainer, module, {"stats": {}}, {}, 1)
    steps = [step for step in range(1, 8) for _ in range(2)]
    assert [step for step, routing in zip(steps, read_at) if routing] == [3, 3, 6, 6, 7, 7]


def test_the_veomni_layer_case_is_reported_in_expert_gemm_tflops():
    """The 128-expert top-8 case at 32768 tokens and d_model 2048 (a GPU case) is set beside VeOmni's 242 TFLOP/s:
    18 x tokens x k x d_model x width FLOPs per forward + backward over its time."""
    from moe_lab.tools.bench.cases import VEOMNI_CASE, Result
    from moe_lab.tools.bench.report import ratios

    case = VEOMNI_CASE
    assert (case.tokens, case.d_model, case.num_experts, case.top_k, case.expert_hidden) == (32768, 2048, 128, 8, 768)
    ms = 40.0
    result = Result(
        case.name,
        "grouped",
        case.tokens,
        case.d_model,
        case.num_experts,
        case.top_k,
        case.expert_hidden,
        None,
        10.0,
        ms,
        1.0,
    )
    (row,) = [r for r in ratios([result]) if r[0] == case.name]
    assert "VeOmni #460: 242 on an H100" in row[1]
    assert row[2] == pytest.approx(18 * 32768 * 8 * 2048 * 768 / (ms / 1e3) / 1e12)  # 185.5
    assert row[4] is None  # beside the figure, not a bar


def test_bench_checkpointing_times_each_setting_and_measures_its_peak_activation_memory(tmp_path):
    """`moe-lab bench --checkpointing --quick`: none, moe and block, each step timed in the same rounds, and each
    step's peak activation memory from torch's memory profile (recomputing keeps less: block and moe below none)."""
    from moe_lab.tools.bench import measure

    report = measure(bench_args(tmp_path, ["--checkpointing", "--quick"], checkpointing=True, repeats=1))
    rows = {r["setting"]: r for r in report["activation_checkpointing"]["rows"]}
    assert list(rows) == ["none", "moe", "block"]
    assert all(r["step_ms"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert rows["none"]["memory_vs_none"] == 1.0 and rows["none"]["time_vs_none"] == 1.0
    assert rows["block"]["peak_mb"] < rows["none"]["peak_mb"] and rows["moe"]["peak_mb"] < rows["none"]["peak_mb"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["activation_checkpointing"]["rows"][2]["setting"] == "block"
