"""The family registry: `config.model_type` -> the family's adapter (models/adapter.py, one file a family).

Adding a family: its file, one entry in `FAMILIES`, its tests.
"""
from __future__ import annotations

from torch import nn

from .adapter import FamilyAdapter
from .bert import BertAdapter
from .distilbert import DistilBertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .roberta import RobertaAdapter

FAMILIES: tuple[type[FamilyAdapter], ...] = (BertAdapter, RobertaAdapter, DistilBertAdapter, GPT2Adapter, LlamaAdapter)
ADAPTERS: dict[str, type[FamilyAdapter]] = {t: a for a in FAMILIES for t in a.lm_classes}


def supported_classes() -> str:
    return ", ".join(c for a in FAMILIES for c in a.lm_classes.values())


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of `model`'s family, bound to it; a TypeError naming the supported classes otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None or not adapter.accepts(model):
        raise TypeError(f"model must be a language model of a supported family ({supported_classes()}), got "
                        f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else ""))
    return adapter(model)
