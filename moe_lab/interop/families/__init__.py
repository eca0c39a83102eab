"""The Hugging Face model families moe-lab reads and writes, one module each: what its config means in moe-lab's
settings and back, the parts moe-lab refuses, and which moe-lab models it expresses. A family is found by its
`model_type` (its config.json's); adding one is one new module here with its Family subclass (and its test).

Importing this package imports no torch and no transformers: composing a command's help reads the families' names.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from moe_lab.interop.families.family import FAMILIES, Family

_loaded = False


def registered() -> list[Family]:
    """Every family, in the order they are listed and tried for export (`Family.order`)."""
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return sorted(FAMILIES.values(), key=lambda family: (family.order, family.model_type))


def family(model_type: object) -> Optional[Family]:
    """The family of a config's `model_type`, or None."""
    return next((f for f in registered() if f.model_type == model_type), None)


def supported(moe: bool = True) -> list[Family]:
    """The families moe-lab reads: MoE (imported, exported), or dense (read for upcycling)."""
    return [f for f in registered() if f.moe == moe and f.unsupported is None]


def titles(moe: bool = True, last: str = "and") -> str:
    """The supported families' names for a sentence, e.g. "Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE"."""
    names = [f.title for f in supported(moe)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


__all__ = ["Family", "family", "registered", "supported", "titles"]
