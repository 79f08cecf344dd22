"""Intervenable masked LMs: run a Hugging Face BERT/RoBERTa block by block, without hooks.

A *site* `l` is the output of transformer block `l` (HF `hidden_states[l + 1]`). One `forward` call can
- keep the states of several sites (`keep`),
- apply an intervention function at one or more sites (`interventions`: {block: fn(states) -> states}),
- stop after a given block (`stop`), or
- **resume** from block `l` given the states entering it (`resume_from=l, states=...`), i.e. the
  (possibly intervened) states of site `l - 1`.
Everything runs through module calls (embeddings, each block, the head), so DeepSpeed ZeRO-3's
parameter-gathering hooks fire as they do for the HF model's own forward.

The head is split as the fused loss needs it: `head_transform` (dense + act + LayerNorm, an ordinary
module) and the decoder (`decoder_weight`, `decoder_bias`: tied to the word embeddings). `lm_loss` is a
submodule whose forward computes the distillation head losses from transformed states.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

Intervention = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PassOutput:
    last_hidden: torch.Tensor                      # (B, S, D) output of the last block
    sites: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, S, D) kept site states


def _family(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    if prefix == "bert" and hasattr(model, "cls"):
        return "bert"
    if prefix == "roberta" and hasattr(model, "lm_head"):
        return "roberta"
    if prefix == "distilbert" and hasattr(model, "vocab_projector"):
        return "distilbert"
    raise TypeError(
        f"model must be a BertForMaskedLM-, RobertaForMaskedLM- or DistilBertForMaskedLM-shaped model (an "
        f"encoder with an MLM head), got {type(model).__name__}")


class DistillHeadLoss(nn.Module):
    """Decoder + distillation losses on transformed states, as one module call (see `ops.distill_head_loss`).

    It owns no parameters of its own: the decoder's weight and bias belong to the model (tied to the
    word embeddings). Under ZeRO-3 the trainer registers them as external parameters of this module.
    """

    def __init__(self, owner: "IntervenableMLM"):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, hidden, teacher_hidden, teacher_weight, teacher_bias, labels, kd_mask,
                temperature: float, impl: str = "auto", chunk_size: int | None = None):
        from .ops import distill_head_loss
        owner = self._owner[0]
        return distill_head_loss(hidden, teacher_hidden, owner.decoder_weight, owner.decoder_bias,
                                 teacher_weight, teacher_bias, labels, kd_mask, temperature,
                                 chunk_size=chunk_size, impl=impl)


class IntervenableMLM(nn.Module):
    """Wraps a `BertForMaskedLM` (or RoBERTa, DistilBERT) so passes can be cut, intervened on and resumed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.family = _family(model)
        self.model = model
        self.lm_loss = DistillHeadLoss(self)
        self.site_projection: nn.Linear | None = None  # student -> teacher width, for the `mse` loss

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:  # the encoder (model.bert / .roberta / .distilbert); a property, not a second registration
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.transformer.layer if self.family == "distilbert" else self.base.encoder.layer

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
        if self.family == "bert":
            return self.model.cls.predictions.transform
        if self.family == "distilbert":
            return _DistilBertTransform(self.model)
        return _RobertaTransform(self.model.lm_head)

    @property
    def decoder_weight(self) -> torch.Tensor:  # (V, D)
        return self._decoder().weight

    @property
    def decoder_bias(self) -> torch.Tensor:  # (V,)
        dec = self._decoder()
        return dec.bias if dec.bias is not None else self._head().bias

    def _head(self):
        return self.model.cls.predictions if self.family == "bert" else self.model.lm_head

    def _decoder(self) -> nn.Linear:
        return self.model.vocab_projector if self.family == "distilbert" else self._head().decoder

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V): the HF head, as the naive step uses it."""
        if self.family == "distilbert":  # its head is four attributes of the model, not one module
            return self.model.vocab_projector(self.head_transform(last_hidden))
        return self._head()(last_hidden)

    def attach_site_projection(self, teacher_hidden: int) -> nn.Linear:
        """A learned map of site states to the teacher's width for `mse` when widths differ."""
        self.site_projection = nn.Linear(self.hidden_size, teacher_hidden)
        return self.site_projection

    # ---- passes ------------------------------------------------------------------------------
    def attention_bias(self, attention_mask: torch.Tensor, states: torch.Tensor):
        """The mask the blocks take (4D additive/bool mask, or None when nothing is padded)."""
        from transformers.masking_utils import create_bidirectional_mask
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=states,
                                         attention_mask=attention_mask)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.family == "distilbert":  # no segment embeddings
            return self.base.embeddings(input_ids=input_ids)  # (B, S, D)
        return self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, S, D)

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
    ) -> PassOutput:
        """Run blocks [start, stop) and return the last states and the kept sites.

        start = 0 (from the embeddings of `input_ids`) or `resume_from` (from `states`, the states that
        enter block `resume_from`). `stop` defaults to the number of blocks; with an earlier stop,
        `last_hidden` is the output of block `stop - 1`.
        """
        n = self.num_layers
        stop = n if stop is None else stop
        interventions = interventions or {}
        for l in list(keep) + list(interventions):
            if not 0 <= l < n:
                raise ValueError(f"site {l} does not exist: the model has blocks 0..{n - 1}")
        if resume_from is None:
            if input_ids is None:
                raise ValueError("input_ids is required unless resume_from and states are given")
            _check_mask(input_ids, attention_mask)
            h = self.embed(input_ids, token_type_ids)
            start = 0
        else:
            if states is None:
                raise ValueError("resume_from needs `states`: the states entering that block")
            if not 0 <= resume_from <= n:
                raise ValueError(f"resume_from={resume_from} out of range 0..{n}")
            if attention_mask.shape != states.shape[:2]:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{tuple(states.shape[:2])} (the states' batch and sequence)")
            h, start = states, resume_from
        bias = self.attention_bias(attention_mask, h)
        sites = {}
        for l in range(start, stop):
            out = self.blocks[l](h, bias)
            h = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
            if l in interventions:
                h = interventions[l](h)
            if l in keep:
                sites[l] = h
        return PassOutput(last_hidden=h, sites=sites)


class _RobertaTransform(nn.Module):
    def __init__(self, lm_head):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, x):
        from transformers.activations import gelu
        return self.lm_head.layer_norm(gelu(self.lm_head.dense(x)))


class _DistilBertTransform(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        return m.vocab_layer_norm(m.activation(m.vocab_transform(x)))


def _check_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if attention_mask is None or attention_mask.shape != input_ids.shape:
        got = None if attention_mask is None else tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")


# ---- student initialisation -------------------------------------------------------------------

def student_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks copied into the student: spread evenly, always the last (12 -> 6: 0,2,4,7,9,11)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student_layers must be in 1..{teacher_layers} (the teacher's), got {student_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def init_student_from_teacher(teacher: nn.Module, student_layers: int) -> nn.Module:
    """A student of the same family and width: the teacher's embeddings, MLM head and a layer subset."""
    stack = "transformer" if _family(teacher) == "distilbert" else "encoder"  # also: a clear error first
    layers = student_layer_map(teacher.config.num_hidden_layers, student_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = student_layers
    student = type(teacher)(config)
    state = teacher.state_dict()
    prefix = f"{teacher.base_model_prefix}.{stack}.layer."
    new_state = {}
    for k, v in state.items():
        if k.startswith(prefix):
            idx, rest = k[len(prefix):].split(".", 1)
            if int(idx) in layers:
                new_state[f"{prefix}{layers.index(int(idx))}.{rest}"] = v.clone()
        else:
            new_state[k] = v.clone()
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    missing = [k for k in missing if not k.endswith(("decoder.weight", "vocab_projector.weight"))]  # tied
    if missing or unexpected:
        raise RuntimeError(f"student init from teacher: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    return student
