"""RoBERTa (`RobertaForMaskedLM`): BERT's encoder pass; position ids from the padding, made by its embeddings;
the head is `lm_head` (dense, gelu, LayerNorm, decoder)."""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import gelu

from .bert import BertAdapter


class RobertaAdapter(BertAdapter):
    family = "roberta"
    lm_classes = {"roberta": "RobertaForMaskedLM"}

    @classmethod
    def head_weight_prefixes(cls, config) -> tuple[str, ...]:
        return ("lm_head.",)

    @property
    def head_transform(self) -> nn.Module:
        return _RobertaTransform(self.model.lm_head)

    @property
    def decoder(self) -> nn.Linear:
        return self.model.lm_head.decoder

    @property
    def decoder_bias(self) -> torch.Tensor:
        dec = self.decoder
        return dec.bias if dec.bias is not None else self.model.lm_head.bias

    def logits(self, last_hidden):
        return self.model.lm_head(last_hidden)


class _RobertaTransform(nn.Module):
    """`lm_head` up to the decoder; made on access, it owns no parameters (ZeRO-3 hooks fire on its parts)."""

    def __init__(self, lm_head):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, x):
        return self.lm_head.layer_norm(gelu(self.lm_head.dense(x)))
