"""The model: a decoder-only transformer (`gpt.py`) whose FFNs are MoE layers (`moe.py`), each built from a router
(`routers.py`), a token dispatcher (`dispatch.py`), a bank of experts (`experts.py`) and auxiliary losses
(`losses.py`); every default is in `config.py`. Torch only: nothing here knows about training."""

from moe_lab.model.config import AuxLossConfig, ModelConfig, MoEConfig
from moe_lab.model.dispatch import AllToAllDispatcher, DispatchPlan, LocalDispatcher, plan_dispatch
from moe_lab.model.gpt import LMOutput, MoETransformer
from moe_lab.model.moe import MoELayer, MoELayerOutput, expert_capacity
from moe_lab.model.routers import ROUTERS, Router, RouterConfig, Routing, register_router, router_config

__all__ = [
    "AllToAllDispatcher", "AuxLossConfig", "DispatchPlan", "LMOutput", "LocalDispatcher", "ModelConfig", "MoEConfig",
    "MoELayer", "MoELayerOutput", "MoETransformer", "ROUTERS", "Router", "RouterConfig", "Routing", "expert_capacity",
    "plan_dispatch", "register_router", "router_config",
]
