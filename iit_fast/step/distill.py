"""The step's entry points: `distill_step` (the losses of one step, by `cfg.mode`), `DistillStep` (the
same as a module, for the DeepSpeed engine) and `check_pair` (teacher and student fit the losses).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DistillConfig
from ..models import IntervenableMLM
from ..sampling import InterventionPlan, StepIndex, check_plan
from .causal import fast_causal_step
from .common import weighted_total
from .index import step_index
from .masked import fast_masked_step
from .naive import naive_step


@dataclass
class StepOutput:
    loss: torch.Tensor               # scalar, carries the graph of the student
    terms: dict[str, torch.Tensor]   # each computed term, detached, fp32
    tokens: torch.Tensor             # real tokens of the base batch (a 0-dim tensor: no host sync)


def distill_step(teacher: IntervenableMLM, student: IntervenableMLM, batch: dict,
                 plan: InterventionPlan | None, cfg: DistillConfig, *, check: bool = True,
                 index: StepIndex | None = None) -> StepOutput:
    """The step's losses (`loss` carries the student's graph). `check=False` skips the plan check, for a
    caller that checked it already (`sample_plan` checks on the CPU: no device sync in the loop).
    `index`: the fast step's `step_index(batch, plan, cfg, kind)`, made on the CPU and moved with the batch
    (None: made here from the batch, which costs host syncs when the batch is on a GPU)."""
    needs_plan = cfg.uses_iit or cfg.w_mse > 0
    if check:
        check_pair(teacher, student, cfg)
        if needs_plan:
            if plan is None:
                raise ValueError(f"mode {cfg.mode!r} with these weights needs an InterventionPlan (sample_plan)")
            check_plan(plan, batch["attention_mask"], (teacher.hidden_size, student.hidden_size))
            if plan.dims != cfg.dims:  # cfg.dims is the run's; a plan drawn with other dims would win silently
                raise ValueError(f"the plan swaps dims {plan.dims}, but DistillConfig.dims is {cfg.dims}; expected "
                                 f"the plan drawn with the config's dims (sample_plan(..., cfg.dims))")
    if cfg.mode == "naive":
        terms = naive_step(teacher, student, batch, plan, cfg)
    else:
        terms = fast_step(teacher, student, batch, plan, cfg, index)
    loss = weighted_total(terms, cfg)
    return StepOutput(loss, {k: v.detach().float() for k, v in terms.items()},
                      batch["attention_mask"].sum())


class DistillStep(nn.Module):
    """The step as a module, so that a DeepSpeed engine can wrap it: `engine(batch, plan)` runs the
    engine's forward (ZeRO-3's micro-step bookkeeping and parameter hooks), then `engine.backward(loss)`.

    The student is the only submodule (what DeepSpeed trains and shards); the teacher is held outside
    the module tree, frozen: DeepSpeed never sees its parameters (a ZeRO-3 sharded teacher is its own
    engine, see engine.prepare_teacher).
    """

    def __init__(self, teacher: IntervenableMLM, student: IntervenableMLM, cfg: DistillConfig):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not registered as a submodule
        self.cfg = cfg

    @property
    def teacher(self) -> IntervenableMLM:
        return self._teacher[0]

    def forward(self, batch: dict, plan: InterventionPlan | None, index: StepIndex | None = None):
        """(loss, terms): `loss` a scalar with the student's graph; `terms` {name: detached fp32 scalar}."""
        out = distill_step(self.teacher, self.student, batch, plan, self.cfg, check=False, index=index)
        return out.loss, out.terms


def check_pair(teacher: IntervenableMLM, student: IntervenableMLM, cfg: DistillConfig):
    """Teacher and student must agree where the losses compare them."""
    if teacher.kind != student.kind:
        raise ValueError(f"teacher and student must be LMs of one kind: the teacher ({teacher.family}) is a "
                         f"{teacher.kind} LM, the student ({student.family}) a {student.kind} LM")
    cfg.logit_tokens_for(teacher.kind)  # a combination the kind does not have is an error naming the field
    if cfg.shared_vocab is None and teacher.vocab_size != student.vocab_size:
        raise ValueError(f"teacher and student vocabularies differ ({teacher.vocab_size} vs "
                         f"{student.vocab_size}): the soft-target losses need the same vocabulary; if the rows "
                         f"past one tokenizer's ids are padding, set DistillConfig.shared_vocab = len(tokenizer)")
    if cfg.shared_vocab is not None and cfg.shared_vocab > min(teacher.vocab_size, student.vocab_size):
        raise ValueError(f"DistillConfig.shared_vocab={cfg.shared_vocab} is more rows than the teacher "
                         f"({teacher.vocab_size}) or the student ({student.vocab_size}) has")
    if (cfg.w_cos or cfg.w_iit_cos) and teacher.hidden_size != student.hidden_size:
        raise ValueError(f"cos / iit_cos need equal hidden sizes, got teacher {teacher.hidden_size} and "
                         f"student {student.hidden_size}: set w_cos = w_iit_cos = 0")
    if cfg.w_mse and teacher.hidden_size != student.hidden_size and student.site_projection is None:
        raise ValueError(f"mse between widths {student.hidden_size} -> {teacher.hidden_size} needs "
                         "student.attach_site_projection(teacher.hidden_size)")
    if cfg.uses_iit and cfg.dims is not None and teacher.hidden_size != student.hidden_size:
        raise ValueError("a dims slice is applied to both models and needs equal hidden sizes")


def fast_step(teacher, student, batch, plan, cfg: DistillConfig, index: StepIndex | None = None
              ) -> dict[str, torch.Tensor]:
    """The fast (or standard) step's terms: `fast_masked_step` or `fast_causal_step` by the teacher's kind."""
    if index is None:
        index = step_index(batch, plan, cfg, teacher.kind)
    if teacher.kind == "causal":
        return fast_causal_step(teacher, student, batch, plan, cfg, index)
    return fast_masked_step(teacher, student, batch, plan, cfg, index)
