"""Llama, Qwen2 and Mistral (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`): one adapter.

They share the block: RMSNorm, rotary position embeddings (cos/sin from the model's own rotary module,
once per pass), grouped-query attention, SwiGLU MLP; a final RMSNorm (`norm`, our head transform) and a
bias-free `lm_head` (tied or not). They differ in the attention mask per block: Qwen2 names a type per
layer (`config.layer_types`: full or sliding-window attention), Mistral uses a sliding window everywhere
when `config.sliding_window` is set, Llama is full causal attention.
"""
from __future__ import annotations

from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .adapter import FamilyAdapter, causal_position_ids, mask_args

FULL, SLIDING = "full_attention", "sliding_attention"


class LlamaAdapter(FamilyAdapter):
    family = "llama"
    lm_classes = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    kind = "causal"
    has_token_types = False
    dropout_config = ("attention_dropout",)
    blocks_path = "layers"
    dropout_attrs = ("attention_dropout",)  # the attention modules read a float, not an nn.Dropout

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.family = model.config.model_type  # "llama", "qwen2" or "mistral"

    @classmethod
    def head_weight_prefixes(cls, config) -> tuple[str, ...]:
        return () if config.tie_word_embeddings else ("lm_head.",)

    def student_config(self, config, layers):
        if getattr(config, "layer_types", None) is not None:  # Qwen2: one attention type per kept layer
            config.layer_types = [config.layer_types[i] for i in layers]
        return super().student_config(config, layers)

    def layer_type(self, l: int) -> str:
        config = self.model.config
        types = getattr(config, "layer_types", None)
        if types is not None:
            return types[l]
        return SLIDING if getattr(config, "sliding_window", None) is not None else FULL

    def embed(self, input_ids, token_type_ids, attention_mask):
        self.check_token_types(token_type_ids)
        return self.base.embed_tokens(input_ids)  # (B, S, D)

    def block_context(self, attention_mask, states, cache=None, padded=None) -> dict:
        make = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}
        pos = causal_position_ids(attention_mask, states.shape[1])  # (B, q)
        # per attention type: (B, 1, q, past + q) causal + padding (+ window) mask, or None (sdpa's is_causal)
        # (position ids only serve the builders' packed-sequence test, which reads them: not given when known)
        masks = {t: make[t](config=self.model.config, inputs_embeds=states, cache=cache,
                            position_ids=pos if padded is None else None,
                            **mask_args(attention_mask, padded, "allow_is_causal_skip"))
                 for t in {self.layer_type(l) for l in range(len(self.blocks))}}
        cos_sin = self.base.rotary_emb(states, pos)  # 2 x (B, q, head_dim)
        return {"masks": masks, "position_ids": pos, "position_embeddings": cos_sin, "cache": cache}

    def run_block(self, l, h, ctx):
        out = self.blocks[l](h, attention_mask=ctx["masks"][self.layer_type(l)], position_ids=ctx["position_ids"],
                             cache=ctx["cache"], use_cache=ctx["cache"] is not None,
                             position_embeddings=ctx["position_embeddings"])
        return out[0] if isinstance(out, tuple) else out

    @property
    def head_transform(self) -> nn.Module:
        return self.base.norm

    @property
    def decoder(self) -> nn.Linear:
        return self.model.lm_head
