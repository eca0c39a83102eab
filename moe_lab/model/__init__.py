"""The model: a decoder-only transformer (`gpt.py`) whose FFNs are MoE layers (`moe.py`), built from a router
(`routers.py`), a bank of experts (`experts.py`) and auxiliary losses (`losses.py`)."""

from moe_lab.model.config import AuxLossConfig, ModelConfig, MoEConfig
from moe_lab.model.gpt import LMOutput, MoETransformer
from moe_lab.model.moe import MoELayer, MoELayerOutput, expert_capacity
from moe_lab.model.routers import ROUTERS, Router, RouterOutput, register_router

__all__ = [
    "AuxLossConfig", "LMOutput", "ModelConfig", "MoEConfig", "MoELayer", "MoELayerOutput", "MoETransformer",
    "ROUTERS", "Router", "RouterOutput", "expert_capacity", "register_router",
]
