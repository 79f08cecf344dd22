"""GPT-2 (`GPT2LMHeadModel`): learned absolute positions added at the embeddings, a causal mask per pass,
pre-LN blocks, a final LayerNorm (`ln_f`, our head transform) and a bias-free `lm_head` tied to `wte`."""
from __future__ import annotations

from torch import nn
from transformers.masking_utils import create_causal_mask

from .adapter import FamilyAdapter, causal_position_ids, mask_args


class GPT2Adapter(FamilyAdapter):
    family = "gpt2"
    lm_classes = {"gpt2": "GPT2LMHeadModel"}
    kind = "causal"
    has_token_types = True  # HF adds wte(token_type_ids) when they are given: so do we (pass None for plain text)
    dropout_config = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    blocks_path = "h"

    @classmethod
    def head_weight_prefixes(cls, config) -> tuple[str, ...]:
        return () if config.tie_word_embeddings else ("lm_head.",)

    def embed(self, input_ids, token_type_ids, attention_mask):
        if attention_mask is None:
            raise ValueError("attention_mask: GPT-2 numbers positions by the real tokens of the (B, S) attention "
                             "mask; expected the mask, got None")
        base = self.base
        pos = causal_position_ids(attention_mask, input_ids.shape[1])  # (B, S)
        h = base.wte(input_ids) + base.wpe(pos)                        # (B, S, D)
        if token_type_ids is not None:
            h = h + base.wte(token_type_ids)
        return base.drop(h)

    def block_context(self, attention_mask, states, cache=None, padded=None) -> dict:
        pos = causal_position_ids(attention_mask, states.shape[1])  # (B, q)
        # (B, 1, q, past + q) causal + padding mask, or None where HF would rely on sdpa's is_causal
        # (position ids only serve the builder's packed-sequence test, which reads them: not given when known)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=states, cache=cache,
                                  position_ids=pos if padded is None else None,
                                  **mask_args(attention_mask, padded, "allow_is_causal_skip"))
        return {"mask": mask, "position_ids": pos, "cache": cache}

    def run_block(self, l, h, ctx):
        out = self.blocks[l](h, ctx["cache"], ctx["mask"], use_cache=ctx["cache"] is not None,
                             position_ids=ctx["position_ids"])
        return out[0] if isinstance(out, tuple) else out

    @property
    def head_transform(self) -> nn.Module:
        return self.base.ln_f

    @property
    def decoder(self) -> nn.Linear:
        return self.model.lm_head
