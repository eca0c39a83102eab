"""The model: a decoder-only transformer (`gpt.py`) whose FFNs are MoE layers (`moe.py`), each built from a router
(`routers.py`), a token dispatcher (`dispatch.py`), a bank of experts (`experts.py`) and auxiliary losses
(`losses.py`); every default is in `config.py` and `router_configs.py`. Torch only: nothing here knows about
training.

The names below load on first use, so that the configuration (`config.py`, `router_configs.py`) can be imported
without torch: composing a config or completing a command line on TAB never pays torch's import time.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AuxLossConfig": "config",
    "ModelConfig": "config",
    "MoEConfig": "config",
    "AllToAllDispatcher": "dispatch",
    "DispatchPlan": "dispatch",
    "LocalDispatcher": "dispatch",
    "plan_dispatch": "dispatch",
    "LMOutput": "gpt",
    "MoETransformer": "gpt",
    "MoELayer": "moe",
    "MoELayerOutput": "moe",
    "expert_capacity": "moe",
    "ReplayMismatch": "replay",
    "RoutingTape": "replay",
    "Selection": "replay",
    "ROUTERS": "routers",
    "Router": "routers",
    "RouterInputs": "routers",
    "Routing": "routers",
    "RouterConfig": "router_configs",
    "router_config": "router_configs",
    "ROUTER_CONFIGS": "router_configs",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'moe_lab.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moe_lab.model.{_WHERE[name]}"), name)
