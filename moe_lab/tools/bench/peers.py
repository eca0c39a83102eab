"""The peers of `moe-lab bench --compare`: other projects' MoE layers, built on the weights of a moe-lab layer.

Every peer is one function (moe-lab layer, case, device, dtype) -> module mapping x (1, T, D) to y (1, T, D), with the
moe-lab layer's router and expert weights copied in, and the same routing: softmax over the experts, top-k, the k
weights renormalised to sum to 1 (Mixtral's rule, which every peer here can express). A peer that is not installed or
cannot run on the device raises PeerUnavailable with the reason, which the bench prints in its table; a peer that runs
is compared with moe-lab's output and gradients on the case's input before it is timed (`check_same_math`), and one
that disagrees is not timed.

    hf_eager      transformers' MixtralSparseMoeBlock, eager experts (a loop over the experts hit)
    hf_grouped    the same block with transformers' `grouped_mm` experts (its default in transformers 5)
    torchtitan    torchtitan's MoE (models/common/moe.py): TokenChoiceTopKRouter, LocalTokenDispatcher, GroupedExperts
    olmo_core     OLMo-core's dropless MoE (olmo_core.nn.moe, the layer of OLMoE-style models)

The peers are optional dependencies of the bench only: `pip install -e ".[bench-peers]"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn


class PeerUnavailable(Exception):
    """The peer cannot be timed here; the message says why, in words for the bench table."""


def _copy_weights_to_hf_layout(layer, gate_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    with torch.no_grad():
        gate_weight.copy_(layer.router.gate_ED)
        gate_up.copy_(layer.experts.w_in_EGFD)
        down.copy_(layer.experts.w_out_EDF)


def hf_block(layer, case, device: torch.device, dtype: torch.dtype, experts_implementation: str) -> nn.Module:
    """transformers' Mixtral block (softmax top-k, renormalised: the same routing) holding `layer`'s weights."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        raise PeerUnavailable(f"transformers is not installed ({e}); pip install -e '.[bench-peers]'") from e
    config = MixtralConfig(
        hidden_size=case.d_model,
        intermediate_size=case.expert_hidden,
        num_local_experts=case.num_experts,
        num_experts_per_tok=case.top_k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(config).to(device=device, dtype=dtype)
    _copy_weights_to_hf_layout(layer, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)
    return block


def hf_eager(layer, case, device, dtype) -> nn.Module:
    return hf_block(layer, case, device, dtype, "eager")


def hf_grouped(layer, case, device, dtype) -> nn.Module:
    return hf_block(layer, case, device, dtype, "grouped_mm")


def torchtitan_moe(layer, case, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """torchtitan's MoE layer (softmax scores, route_norm: the same routing; no load-balancing bias, no shared expert).

    Its GroupedExperts always runs the grouped GEMMs in bfloat16 (it casts the tokens and weights), whatever the
    model's dtype: in a float32 bench it computes in bfloat16 where the others compute in float32."""
    try:
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    except ImportError as e:
        raise PeerUnavailable(f"torchtitan is not installed ({e}); pip install -e '.[bench-peers]'") from e
    E, D, F, K = case.num_experts, case.d_model, case.expert_hidden, case.top_k
    config = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            gate=Linear.Config(in_features=D, out_features=E),
            top_k=K,
            score_func="softmax",
            route_norm=True,
        ),
        load_balance_coeff=None,
    )
    moe = config.build().to(device=device, dtype=dtype)
    if device.type == "cpu" and dtype != torch.float32:
        # torchtitan computes the gate under torch.autocast(dtype=float32), which CPU autocast does not support (it
        # warns and runs the gate in bfloat16, whose scores pick other experts on near-ties). Do here what that
        # autocast does on a GPU: the gate's matmul in float32.
        gate = moe.router.gate
        gate.forward = lambda x, gate=gate: torch.nn.functional.linear(x.float(), gate.weight.float())
    experts = moe.routed_experts.inner_experts
    gate_up = layer.experts.w_in_EGFD
    with torch.no_grad():
        moe.router.gate.weight.copy_(layer.router.gate_ED)
        experts.w1_EFD.copy_(gate_up[:, :F])  # moe-lab fuses [gate | up]; torchtitan keeps w1 (gate), w3 (up)
        experts.w3_EFD.copy_(gate_up[:, F:])
        experts.w2_EDF.copy_(layer.experts.w_out_EDF)
    return moe


def olmo_core_moe(layer, case, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """OLMo-core's dropless MoE (softmax gating, top-k weights divided by their L1 norm: the same routing)."""
    try:
        from olmo_core.nn.moe import MoEConfig, MoERouterConfig, MoEType
    except ImportError as e:
        raise PeerUnavailable(f"ai2-olmo-core is not installed ({e}); pip install -e '.[bench-peers]'") from e
    E, D, F, K = case.num_experts, case.d_model, case.expert_hidden, case.top_k
    config = MoEConfig(
        name=MoEType.dropless,
        num_experts=E,
        hidden_size=F,
        router=MoERouterConfig(top_k=K, normalize_expert_weights=1.0),
        lb_loss_weight=None,
        z_loss_weight=None,
    )
    moe = config.build(d_model=D, init_device=str(device)).to(device=device, dtype=dtype)
    mlp = moe.experts.mlp
    gate_up = layer.experts.w_in_EGFD
    with torch.no_grad():
        moe.router.weight.copy_(layer.router.gate_ED.reshape(moe.router.weight.shape))
        # OLMo-core stores each expert's matrices flattened to (E * F, D): w1 gate, w3 up, w2 down (transposed).
        mlp.w1.copy_(gate_up[:, :F].reshape(E * F, D))
        mlp.w3.copy_(gate_up[:, F:].reshape(E * F, D))
        mlp.w2.copy_(layer.experts.w_out_EDF.transpose(1, 2).reshape(E * F, D))
    return moe


# name -> builder, in the order of the bench table
PEERS: dict[str, Callable[..., nn.Module]] = {
    "hf_eager": hf_eager,
    "hf_grouped": hf_grouped,
    "torchtitan": torchtitan_moe,
    "olmo_core": olmo_core_moe,
}

# Why a peer fails where it is known to, added to the error the bench reports (the error itself is always shown).
KNOWN_LIMITS: dict[tuple[str, str], str] = {
    (
        "olmo_core",
        "cpu",
    ): "OLMo-core's MoE layers gather and scatter tokens with Triton kernels (olmo_core.kernels.moe), "
    "and Triton has no CPU driver; its v2 experts require the token counts on a CUDA device",
}

# Peers whose expert GEMMs run in bfloat16 whatever the input dtype (compared at bfloat16's tolerance).
COMPUTES_IN_BF16 = {"torchtitan"}


@dataclass
class SameMath:
    """How far a peer's output and gradients are from moe-lab's on the same weights and input (relative L2 error)."""

    output: float
    input_grad: float
    tolerance: float
    compared: Optional[float] = None  # the fraction of tokens compared (those of unambiguous routing); None: all

    @property
    def ok(self) -> bool:
        return max(self.output, self.input_grad) <= self.tolerance

    def __str__(self) -> str:
        tokens = (
            "" if self.compared is None else f", on the {100 * self.compared:.0f}% of tokens of unambiguous routing"
        )
        return (
            f"relative error: output {self.output:.1e}, input gradient {self.input_grad:.1e} (bar {self.tolerance:.0e})"
            + tokens
        )


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# Tokens whose k-th and (k+1)-th router logits (float32) are closer than this are left out of a bfloat16 comparison:
# bfloat16 logits carry errors of a few 1e-3 at these scales, so either implementation may break such a tie either way.
ROUTING_MARGIN = 2e-2


def unambiguous_tokens(gate_ED: torch.Tensor, x_TD: torch.Tensor, top_k: int) -> torch.Tensor:
    """bool (T,): tokens whose top-k experts are the same whichever way a bfloat16 rounding falls, by a float32
    logit margin of ROUTING_MARGIN between the k-th and the (k+1)-th expert."""
    logits_TE = x_TD.float() @ gate_ED.float().t()
    top_TK1 = logits_TE.topk(min(top_k + 1, logits_TE.shape[-1]), dim=-1).values
    if top_TK1.shape[-1] <= top_k:  # every expert is chosen: no tie can change the routing
        return torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
    return (top_TK1[:, top_k - 1] - top_TK1[:, top_k]) > ROUTING_MARGIN


def check_same_math(
    reference: Callable[[torch.Tensor], torch.Tensor],
    peer: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grad: torch.Tensor,
    bf16_compute: bool,
    compared_T: Optional[torch.Tensor] = None,
) -> SameMath:
    """Run both on x (1, T, D), backward with `grad`; compare the outputs and the gradients with respect to x, on the
    tokens of `compared_T` (all when None).

    The bar is a relative L2 error of 1e-4 in float32 (different summation orders only) and 3e-2 when either side
    computes in bfloat16 (8 bits of mantissa); a wrong routing rule or a swapped gate and up projection is off by
    order 1. In bfloat16, pass the tokens whose routing is unambiguous (`unambiguous_tokens`): a token at a routing
    tie goes to different experts in two correct implementations, which is an order-1 difference in its row."""
    results = []
    for fn in (reference, peer):
        x_req = x.detach().clone().requires_grad_(True)
        y = fn(x_req)
        y.backward(grad)
        results.append((y.detach(), x_req.grad.detach()))
    (y_ref, g_ref), (y_peer, g_peer) = results
    if compared_T is not None:
        y_ref, y_peer, g_ref, g_peer = (t[:, compared_T] for t in (y_ref, y_peer, g_ref, g_peer))
    tolerance = 3e-2 if bf16_compute or x.dtype == torch.bfloat16 else 1e-4
    compared = None if compared_T is None else float(compared_T.float().mean())
    return SameMath(_relative_error(y_peer, y_ref), _relative_error(g_peer, g_ref), tolerance, compared)
