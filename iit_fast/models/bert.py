"""BERT (`BertForMaskedLM`): the encoder pass that RoBERTa and DistilBERT reuse, and BERT's MLM head."""
from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .adapter import FamilyAdapter, mask_args


class BertAdapter(FamilyAdapter):
    family = "bert"
    lm_classes = {"bert": "BertForMaskedLM"}
    kind = "masked"
    has_token_types = True
    dropout_config = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    blocks_path = "encoder.layer"

    @classmethod
    def head_weight_prefixes(cls, config) -> tuple[str, ...]:
        return ("cls.predictions.", "bert.cls.predictions.")

    def embed(self, input_ids, token_type_ids, attention_mask):
        return self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, S, D)

    def block_context(self, attention_mask, states, cache=None, padded=None) -> dict:
        if cache is not None:
            raise ValueError(f"cache: a {self.family} model is a bidirectional encoder, every position sees every "
                             f"other, so there are no reusable keys/values; expected None")
        # (B, 1, S, S) additive/bool mask, or None when nothing is padded (as the HF encoder builds it)
        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=states,
                                         **mask_args(attention_mask, padded, "allow_is_bidirectional_skip"))
        return {"mask": mask}

    def run_block(self, l, h, ctx):
        out = self.blocks[l](h, ctx["mask"])
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple

    @property
    def head_transform(self) -> nn.Module:
        return self.model.cls.predictions.transform

    @property
    def decoder(self) -> nn.Linear:
        return self.model.cls.predictions.decoder

    @property
    def decoder_bias(self) -> torch.Tensor:
        dec = self.decoder
        return dec.bias if dec.bias is not None else self.model.cls.predictions.bias

    def logits(self, last_hidden):
        return self.model.cls.predictions(last_hidden)
