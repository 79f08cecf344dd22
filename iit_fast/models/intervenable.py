"""IntervenableLM: run a Hugging Face masked or causal LM block by block, without hooks.

A *site* `l` is the output of transformer block `l` (HF `hidden_states[l + 1]`). One `forward` call can
- keep the states of several sites (`keep`),
- apply an intervention function at one or more sites (`interventions`: {block: fn(states) -> states}),
- stop after a given block (`stop`), or
- **resume** from block `l` given the states entering it (`resume_from=l, states=...`), i.e. the
  (possibly intervened) states of site `l - 1`.
Everything runs through module calls (embeddings, each block, the head), so DeepSpeed ZeRO-3's
parameter-gathering hooks fire as they do for the HF model's own forward.

What differs per family (blocks, embeddings, the mask / position / rotary arguments of a block, the head)
lives in one adapter per family file; `ADAPTERS` (models/registry.py) maps `config.model_type` to it. The
wrapper is family-neutral: embed (or resume), build the block context once, run blocks [start, stop).

The head is split as the fused loss needs it: `head_transform` (an ordinary module: BERT's dense + act +
LayerNorm; a decoder's final norm) and the decoder (`decoder_weight`, `decoder_bias`; `decoder_bias` is
None for the bias-free `lm_head` of GPT-2 / Llama); the step gives them to `ops.distill_head_loss` directly
(under ZeRO-3 the engine gathers them: `engine.init_engine`).

`last_hidden` is the output of the last block, before any final norm: for an encoder that is HF's
`hidden_states[-1]`; for a decoder HF's `hidden_states[-1]` is after the final norm, which we count as
the head's transform instead, so that `cos` compares what the last block wrote (the residual stream), as
it does for an encoder, and every site is a block output of the same kind.

**Activation checkpointing** (`enable_activation_checkpointing`): each block of a pass with grad runs as
one checkpointed function (its inputs kept, everything inside recomputed in backward), so a pass keeps one
(B, S, D) tensor per block instead of all of the block's activations. A block that reads or fills a
key/value cache does so through explicit inputs and outputs: the function takes the cached keys/values of
the earlier positions (B, H_kv, q0, d) and returns the block's own new ones, which the pass then appends to
the cache. So the recomputation in backward neither appends a second time (HF's layers drop the cache under
their own checkpointing for that reason) nor cuts the gradient that the counterfactual suffix passes send
through the plain pass's cached keys/values (step.counterfactual_suffix_hidden). What stays resident per
checkpointed block: its input states, plus, while a cache is in use, the keys/values the cache holds
(2 * H_kv * d per position, which the later suffix passes read anyway).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .registry import adapter_for

Intervention = Callable[[torch.Tensor], torch.Tensor]
CHECKPOINTING = ("torch",)  # torch.utils.checkpoint, non-reentrant (why not DeepSpeed's: activation_checkpointing.py)
log = logging.getLogger("iit_fast.models")


@dataclass
class PassOutput:
    last_hidden: torch.Tensor                      # (B, S, D) output of the last block run (before any final norm)
    sites: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, S, D) kept site states


class IntervenableLM(nn.Module):
    """Wraps a Hugging Face LM of a supported family so passes can be cut, intervened on and resumed.

    Attributes: `model` (the HF model), `adapter` (its family adapter), `family` (e.g. "bert", "llama"),
    `kind` ("masked" or "causal"), `site_projection` (None until `attach_site_projection`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.adapter = adapter_for(model)
        self.family = self.adapter.family
        self.kind = self.adapter.kind
        self.model = model
        self.site_projection: nn.Linear | None = None  # student -> teacher width, for the `mse` loss
        self.activation_checkpointing: str | None = None  # None, or one of CHECKPOINTING

    def enable_activation_checkpointing(self, impl: str = "torch") -> None:
        """Checkpoint every block of the passes that run with grad (see the module docstring). impl "torch":
        torch.utils.checkpoint, non-reentrant (it restores the forward's autocast and RNG state in the
        recomputation, and recomputes inside the one backward: each parameter's gradient is accumulated once)."""
        if impl not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing impl must be one of {CHECKPOINTING}, got {impl!r}")
        self.activation_checkpointing = impl

    def _adopt_hf_checkpointing(self) -> None:
        """transformers' own gradient checkpointing (`model.gradient_checkpointing_enable()`) recomputes a layer
        with its key/value cache turned off: replace it by this wrapper's, which keeps the cache working."""
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.blocks):
            # (transformers >= 5 names it activation_checkpointing_disable, the old name is deprecated)
            m = self.model
            (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
            self.activation_checkpointing = self.activation_checkpointing or "torch"
            log.warning("%s: transformers' gradient checkpointing is replaced by the wrapper's activation "
                        "checkpointing (%s): transformers' turns off the key/value cache the counterfactual passes "
                        "read", self.family, self.activation_checkpointing)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:  # the model without its head; a property, not a second registration
        return self.adapter.base

    @property
    def blocks(self) -> nn.ModuleList:
        return self.adapter.blocks

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    # ---- head --------------------------------------------------------------------------------
    @property
    def head_transform(self) -> nn.Module:
        return self.adapter.head_transform

    @property
    def decoder_weight(self) -> torch.Tensor:  # (V, D)
        return self.adapter.decoder.weight

    @property
    def decoder_bias(self) -> torch.Tensor | None:  # (V,), or None when the decoder has no bias
        return self.adapter.decoder_bias

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V) from last-block states: the HF head, as the naive step uses it."""
        return self.adapter.logits(last_hidden)

    def attach_site_projection(self, teacher_hidden: int) -> nn.Linear:
        """A learned map of site states to the teacher's width for `mse` when widths differ."""
        self.site_projection = nn.Linear(self.hidden_size, teacher_hidden)
        return self.site_projection

    def set_dropout(self, p: float) -> None:
        """Every dropout probability of the model set to `p` (config, nn.Dropout modules, and the float
        attributes some attention modules read instead), e.g. 0 for exactly repeatable training."""
        if not 0 <= p < 1:
            raise ValueError(f"p must be in [0, 1), got {p}")
        for name in self.adapter.dropout_config:
            setattr(self.model.config, name, p)
        for m in self.model.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            for name in self.adapter.dropout_attrs:
                if isinstance(getattr(m, name, None), float):
                    setattr(m, name, p)

    # ---- passes ------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, D) states entering block 0 (a causal LM takes its position ids from `attention_mask`)."""
        return self.adapter.embed(input_ids, token_type_ids, attention_mask)

    def block_context(self, attention_mask: torch.Tensor, states: torch.Tensor, cache=None,
                      padded: bool | None = None) -> dict:
        """What every block of a pass needs (mask, position ids, rotary cos/sin, cache), built once."""
        return self.adapter.block_context(attention_mask, states, cache, padded)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        *,
        keep: tuple[int, ...] | set[int] = (),
        interventions: dict[int, Intervention] | None = None,
        resume_from: int | None = None,
        states: torch.Tensor | None = None,
        stop: int | None = None,
        cache=None,
        padded: bool | None = None,
    ) -> PassOutput:
        """Run blocks [start, stop) and return the last states and the kept sites.

        start = 0 (from the embeddings of `input_ids`) or `resume_from` (from `states`, the states that
        enter block `resume_from`). `stop` defaults to the number of blocks; with an earlier stop,
        `last_hidden` is the output of block `stop - 1`.

        `cache` (causal LMs only; a transformers `DynamicCache` holding the keys/values of the first q0
        positions in every block run): `input_ids` / `states` then cover positions [q0, S) only, while
        `attention_mask` covers [0, S); the blocks append their keys/values to the cache (HF's convention).

        `padded`: whether any position of `attention_mask` is 0, when the caller knows it from the CPU batch;
        None: transformers' mask builders read the mask to decide (a host sync on a GPU).
        """
        n = self.num_layers
        stop = n if stop is None else stop
        interventions = interventions or {}
        for l in list(keep) + list(interventions):
            if not 0 <= l < n:
                raise ValueError(f"site {l} does not exist: the model has blocks 0..{n - 1}")
        past = 0 if cache is None else cache.get_seq_length()
        if resume_from is None:
            if input_ids is None:
                raise ValueError("input_ids is required unless resume_from and states are given")
            _check_mask(input_ids, attention_mask, past)
            h = self.embed(input_ids, token_type_ids, attention_mask)
            start = 0
        else:
            if states is None:
                raise ValueError("resume_from needs `states`: the states entering that block")
            if not 0 <= resume_from <= n:
                raise ValueError(f"resume_from={resume_from} out of range 0..{n}")
            expected = (states.shape[0], past + states.shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{expected} (the states' batch and sequence"
                                 + (f", after the {past} cached positions)" if past else ")"))
            h, start = states, resume_from
        ctx = self.block_context(attention_mask, h, cache, padded)
        self._adopt_hf_checkpointing()
        ckpt = _checkpoint_fn(self.activation_checkpointing) if torch.is_grad_enabled() else None
        bctx = dict(ctx, cache=None)  # each block gets its own view of the cache: a checkpoint holds no ref to it
        sites = {}
        for l in range(start, stop):
            if cache is None:
                fn = partial(self.adapter.run_block, l, ctx=bctx)
                h = fn(h) if ckpt is None else ckpt(fn, h)
            else:
                past = _cached_kv(cache, l)
                fn = partial(self._block_with_kv, l, bctx)
                h, k, v = fn(h, *past) if ckpt is None else ckpt(fn, h, *past)
                cache.update(k, v, l)  # (B, H_kv, q, d) appended after the cached positions
            if l in interventions:
                h = interventions[l](h)
            if l in keep:
                sites[l] = h
        return PassOutput(last_hidden=h, sites=sites)

    def _block_with_kv(self, l: int, ctx: dict, h: torch.Tensor, past_k=None, past_v=None):
        """Block l over cached keys/values (past_k, past_v: (B, H_kv, q0, d) or None): (h, new keys, new
        values), the keys/values of h's positions (B, H_kv, q, d) as outputs, not a side effect."""
        bc = _BlockCache(past_k, past_v)
        h = self.adapter.run_block(l, h, dict(ctx, cache=bc))
        return h, bc.new_keys, bc.new_values


class _BlockCache:
    """The cache one block call sees: the given earlier keys/values, read only. `update` (called by the
    block's attention) returns them with the new ones appended, as a DynamicCache layer does, and records the
    new ones. A fresh one per call: a recomputation in backward sees exactly what the forward saw."""

    def __init__(self, past_k: torch.Tensor | None, past_v: torch.Tensor | None):
        self.past = (past_k, past_v)
        self.new_keys = self.new_values = None

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        if self.new_keys is not None:
            raise RuntimeError("a block updated its key/value cache twice in one call")
        self.new_keys, self.new_values = key_states, value_states                  # (B, H_kv, q, d)
        past_k, past_v = self.past
        if past_k is None:
            return key_states, value_states
        return torch.cat([past_k, key_states], -2), torch.cat([past_v, value_states], -2)


def _cached_kv(cache, l: int) -> tuple:
    """(keys, values) the cache holds for block l, or () when it holds none yet."""
    if l >= len(cache.layers):
        return ()
    layer = cache.layers[l]
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return ()
    return layer.keys, layer.values


def _checkpoint_fn(impl: str | None):
    """fn(block_fn, *tensors) -> block_fn(*tensors), checkpointed; None without checkpointing."""
    if impl is None:
        return None
    return partial(checkpoint, use_reentrant=False)


IntervenableMLM = IntervenableLM  # the name from when only masked LMs were supported


def _check_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, past: int = 0):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    expected = (input_ids.shape[0], past + input_ids.shape[1])
    if attention_mask is None or tuple(attention_mask.shape) != expected:
        got = None if attention_mask is None else tuple(attention_mask.shape)
        where = f" plus the {past} cached positions" if past else ""
        raise ValueError(f"attention_mask must have the shape of input_ids{where} {expected}, got {got}")
