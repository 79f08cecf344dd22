"""The family adapter: everything the intervenable wrapper needs to know about one model family.

One subclass per family file (`bert.py`, `gpt2.py`, ...), bound to one Hugging Face model. The wrapper
(`IntervenableLM` in `intervenable.py`) only ever calls these methods, so adding a family is one file, one
registry line and its tests.

A pass through the wrapper is: `embed` (or resume from given states) -> `block_context` once -> `run_block`
for blocks [start, stop). The block context holds what every block needs per pass (the 4D mask, position
ids, rotary cos/sin, the cache): it depends only on the attention mask and the states' shape, so a resumed
pass rebuilds exactly the context of the full pass.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import transformers
from torch import nn


def mask_args(attention_mask: torch.Tensor, padded: bool | None, skip: str) -> dict:
    """The padding arguments of transformers' mask builders, without a host sync when `padded` is known.

    Given a 2D mask, the builders read it (`mask.all()`, a device sync) to decide whether sdpa can skip the
    mask (is_causal / no bias). The caller knows from the CPU batch: padded False -> no mask is given (the
    builders then skip it, as they would after reading an all-ones mask); True -> the mask is given and the
    skip test is turned off (it would fail); None -> the builders read the mask, as before. `skip` names
    the builder's skip flag (`allow_is_causal_skip` or `allow_is_bidirectional_skip`)."""
    if padded is None:
        return {"attention_mask": attention_mask}
    return {"attention_mask": attention_mask, skip: False} if padded else {"attention_mask": None}


def causal_position_ids(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids of the last `q_len` columns of a (B, S) padding mask, counting real tokens only.

    A real token's position is the number of real tokens before it, so a left-padded row gets the
    positions it would have unpadded (as `generate` does; HF's plain forward uses 0..S-1 whatever the
    padding). Pad positions get a harmless in-range value (they are never attended to).
    """
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    return pos[:, attention_mask.shape[1] - q_len:]            # (B, q_len)


class FamilyAdapter(ABC):
    """What differs per family. Class attributes describe the family; methods act on the bound model."""

    family: str = ""                      # the name the wrapper reports, e.g. "bert", "llama"
    lm_classes: dict[str, str] = {}       # `config.model_type` -> the transformers LM class (with its head)
    kind: str = ""                        # "masked" or "causal"
    has_token_types: bool = False         # segment embeddings: else token_type_ids must be None or all 0
    dropout_config: tuple[str, ...] = ()  # config attributes holding dropout probabilities
    dropout_attrs: tuple[str, ...] = ()   # float attributes of submodules read as dropout probabilities
    blocks_path: str = ""                 # the blocks' ModuleList below the base model, e.g. "encoder.layer"

    def __init__(self, model: nn.Module):
        self.model = model  # a plain attribute: the adapter is no module, the wrapper registers the model

    @classmethod
    def lm_class(cls, model_type: str) -> type:
        return getattr(transformers, cls.lm_classes[model_type])

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, tuple(cls.lm_class(t) for t in cls.lm_classes))

    # ---- structure ----------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The model without its head (model.bert, model.transformer, model.model, ...)."""
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.get_submodule(self.blocks_path)

    def layer_prefix(self) -> str:
        """State-dict prefix of block `l`'s weights is f"{layer_prefix()}{l}." (student init)."""
        return f"{self.model.base_model_prefix}.{self.blocks_path}."

    @classmethod
    @abstractmethod
    def head_weight_prefixes(cls, config) -> tuple[str, ...]:
        """Checkpoint tensor-name prefixes of which one must exist for the checkpoint to have an LM head;
        () when the head is the (tied) embedding matrix and needs no tensors of its own."""

    def student_config(self, config, layers: list[int]):
        """The teacher's config made into a student's keeping teacher blocks `layers` (edited in place)."""
        config.num_hidden_layers = len(layers)
        return config

    # ---- a pass ---------------------------------------------------------------------------------
    def check_token_types(self, token_type_ids: torch.Tensor | None):
        if not self.has_token_types and token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError(f"token_type_ids: a {self.family} model has no segment embeddings; expected None "
                             f"or all zeros")

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, S, D) states entering block 0."""

    @abstractmethod
    def block_context(self, attention_mask: torch.Tensor, states: torch.Tensor, cache=None,
                      padded: bool | None = None) -> dict:
        """What every block of one pass needs, built once from the (B, S) mask and the (B, q, D) states.
        `padded` (known on the CPU, or None): see `mask_args`."""

    @abstractmethod
    def run_block(self, l: int, h: torch.Tensor, ctx: dict) -> torch.Tensor:
        ...

    # ---- head -----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def head_transform(self) -> nn.Module:
        """The module between the last block and the decoder (BERT: dense+act+LN; decoders: final norm)."""

    @property
    @abstractmethod
    def decoder(self) -> nn.Linear:
        ...

    @property
    def decoder_bias(self) -> torch.Tensor | None:
        """The decoder's bias; None where it has none (GPT-2, Llama-family lm_heads)."""
        return self.decoder.bias

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.head_transform(last_hidden))
