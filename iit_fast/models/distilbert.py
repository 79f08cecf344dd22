"""DistilBERT (`DistilBertForMaskedLM`): BERT's encoder pass without segment embeddings; its head is four
attributes of the model (vocab_transform, activation, vocab_layer_norm, vocab_projector), not one module."""
from __future__ import annotations

from torch import nn

from .bert import BertAdapter


class DistilBertAdapter(BertAdapter):
    family = "distilbert"
    lm_classes = {"distilbert": "DistilBertForMaskedLM"}
    has_token_types = False
    dropout_config = ("dropout", "attention_dropout")
    blocks_path = "transformer.layer"

    @classmethod
    def head_weight_prefixes(cls, config) -> tuple[str, ...]:
        return ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")

    def embed(self, input_ids, token_type_ids, attention_mask):
        self.check_token_types(token_type_ids)
        return self.base.embeddings(input_ids=input_ids)  # (B, S, D)

    @property
    def head_transform(self) -> nn.Module:
        return _DistilBertTransform(self.model)

    @property
    def decoder(self) -> nn.Linear:
        return self.model.vocab_projector

    def logits(self, last_hidden):
        return self.decoder(self.head_transform(last_hidden))


class _DistilBertTransform(nn.Module):
    """The head up to the decoder; made on access, it owns no parameters (ZeRO-3 hooks fire on its parts)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        return m.vocab_layer_norm(m.activation(m.vocab_transform(x)))
