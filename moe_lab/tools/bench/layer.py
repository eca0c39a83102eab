"""One MoE layer timed: moe-lab's grouped layer, its per-expert reference, the peers' layers on the same weights
(`peers.py`) and a dense SwiGLU of equal active parameters."""

from __future__ import annotations

import dataclasses

import torch

from moe_lab.tools.bench.cases import Case, Result, count_ops, median_ms, saved_for_backward_mb


def moe_layer(case: Case, implementation: str, device: torch.device, dtype: torch.dtype):
    from moe_lab.model import MoEConfig, MoELayer
    from moe_lab.model.routers import TopKRouterConfig

    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=case.num_experts,
        expert_hidden=case.expert_hidden,
        capacity_factor=case.capacity_factor,
        eval_capacity_factor=case.capacity_factor,
        implementation=implementation,
        router=TopKRouterConfig(top_k=case.top_k, normalize=True),
    )
    return MoELayer(case.d_model, cfg).to(device=device, dtype=dtype)


def implementations(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    compare: bool,
    with_loop: bool,
    x: torch.Tensor,
    grad: torch.Tensor,
    not_timed: list[dict],
):
    """name -> (module, forward(x) -> y, note): every implementation of a case, on the same weights. A peer is
    checked against moe-lab's layer on (x, grad) first; one that cannot run or computes something else goes to
    `not_timed` with the reason instead."""
    from moe_lab.model.experts import FeedForward
    from moe_lab.tools.bench import peers as bench_peers

    grouped = moe_layer(case, "grouped", device, dtype)
    reference = lambda t: grouped(t)[0]  # noqa: E731
    impls = {"grouped": (grouped, reference, "")}
    if with_loop:
        loop = moe_layer(case, "loop", device, dtype)
        loop.load_state_dict(grouped.state_dict())
        impls["loop"] = (loop, lambda t: loop(t)[0], "")
    if compare and case.capacity_factor is None:  # the peers' layers are dropless
        # In bfloat16, routing ties fall either way: compare the tokens whose routing is unambiguous.
        compared_T = None
        if dtype == torch.bfloat16:
            compared_T = bench_peers.unambiguous_tokens(grouped.router.gate_ED, x.view(-1, case.d_model), case.top_k)
        for name, build in bench_peers.PEERS.items():
            try:
                module = build(grouped, case, device, dtype)
                bf16 = name in bench_peers.COMPUTES_IN_BF16
                same = bench_peers.check_same_math(reference, module, x, grad, bf16, compared_T)
            except Exception as e:  # not installed, or cannot run on this device: the table says why
                reason = str(e) if isinstance(e, bench_peers.PeerUnavailable) else f"{type(e).__name__}: {e}"
                hint = bench_peers.KNOWN_LIMITS.get((name, device.type))
                not_timed.append(
                    {"case": case.name, "impl": name, "reason": reason.strip() + (f" ({hint})" if hint else "")}
                )
                continue
            if not same.ok:
                not_timed.append({"case": case.name, "impl": name, "reason": f"computes something else: {same}"})
                continue
            impls[name] = (module, module, str(same))
    if compare:
        torch.manual_seed(0)
        dense = FeedForward(case.d_model, case.dense_hidden).to(device=device, dtype=dtype)
        impls["dense"] = (dense, dense, "")
    return impls


def time_case(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    compare: bool,
    with_loop: bool,
    warmup: int,
    repeats: int,
    not_timed: list[dict],
) -> list[Result]:
    results = []
    torch.manual_seed(1)
    x = torch.randn(1, case.tokens, case.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    impls = implementations(case, device, dtype, compare, with_loop, x, grad, not_timed)
    for name, (module, forward, same_math) in impls.items():
        module.train()
        x_req = x.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                forward(x)

        def fwd_bwd():
            module.zero_grad(set_to_none=True)
            x_req.grad = None
            forward(x_req).backward(grad)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        forward_ms = median_ms(fwd, device, warmup, repeats)
        backward_ms = median_ms(fwd_bwd, device, warmup, repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        saved = saved_for_backward_mb(lambda: forward(x_req), module)
        extra = {"same_math": same_math} if same_math else {}
        extra.update(operation_counts(name, module, fwd_bwd))
        results.append(
            Result(
                case.name,
                name,
                case.tokens,
                case.d_model,
                case.num_experts,
                case.top_k,
                case.expert_hidden,
                case.capacity_factor,
                forward_ms,
                backward_ms,
                saved,
                peak,
                extra,
            )
        )
    return results


def operation_counts(name: str, module: torch.nn.Module, fwd_bwd) -> dict[str, int]:
    """The aten operations of one forward + backward in training mode (a step that does not log: no routing
    statistics are read). moe-lab's layer is also counted without its aux losses, which the peers compute outside
    their layers (transformers in the model, once for all layers, when asked for): that count is the one set
    against theirs."""
    counted = count_ops(fwd_bwd)
    out = {"aten_ops": counted.total, "kernels": counted.kernels, "host_reads": counted.host_reads}
    if name == "grouped":
        from moe_lab.model.config import AuxLossConfig

        configured = module.cfg
        module.cfg = dataclasses.replace(configured, aux_loss=AuxLossConfig(load_balance=0.0, z_loss=0.0))
        try:
            bare = count_ops(fwd_bwd)
        finally:
            module.cfg = configured
        out.update({"aten_ops_without_aux": bare.total, "kernels_without_aux": bare.kernels})
    return out
