"""The student as a standard Hugging Face folder: fp32 weights (safetensors), config and tokenizer, which
`AutoModelForMaskedLM` / `AutoModelForCausalLM.from_pretrained` load with no iit_fast installed.

    import iit_fast
    iit_fast.export(student, tokenizer, "my-student")  # plain: no DeepSpeed, no process group

`export_student(engine, tokenizer, path, rank)` is the training run's: it gathers the fp32 master weights
from any ZeRO stage (a collective every rank calls) and rank 0 writes them through `export`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from .models import IntervenableLM


def hf_model(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside `model`: itself when it is one, an IntervenableLM's `.model`, or a
    DistillStep's student's."""
    if isinstance(model, PreTrainedModel):
        return model
    if isinstance(model, IntervenableLM):
        return model.model
    if isinstance(getattr(model, "student", None), IntervenableLM):  # step.DistillStep (engine.module)
        return model.student.model
    raise TypeError(f"export: expected a Hugging Face model, an IntervenableLM or a DistillStep, got "
                    f"{type(model).__name__}")


def export(student: nn.Module, tokenizer, path, *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `student` (an IntervenableLM, a Hugging Face model or a DistillStep) to the folder `path`:
    config + fp32 weights (safetensors) + `tokenizer`'s files (None: no tokenizer files). The weights are
    `state_dict` when given (name -> tensor, the model's parameter names: e.g. gathered from ZeRO shards),
    else the model's own parameters; either way they are loaded into a fresh fp32 model of the same class,
    so the folder never depends on how the student was trained (bf16, ZeRO-3 placeholders). Returns `path`."""
    hf = hf_model(student)
    if state_dict is None:
        state_dict = {n: p.detach().float().cpu() for n, p in hf.named_parameters()}
    fresh = type(hf)(hf.config).float()
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False)
    params = {n for n, _ in fresh.named_parameters()}
    missing = [k for k in missing if k in params]  # buffers (position ids...) are rebuilt by the constructor
    if missing or unexpected:
        raise RuntimeError(f"export: the weights do not fit {type(hf).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    fresh.tie_weights()
    path = Path(path)
    fresh.save_pretrained(path)  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def export_student(engine, tokenizer, path: Path, rank: int) -> None:
    """The training run's export: the student's consolidated fp32 weights from any ZeRO stage (and bf16),
    written by rank 0 through `export`. A collective: every rank calls it.

    safe_get_full_fp32_param gathers the fp32 master copy (ZeRO-1/2/3, bf16); with no optimizer-side copy
    (ZeRO-0, fp32) the module's own parameter is it."""
    from deepspeed.utils import safe_get_full_fp32_param  # lazy: only a training run has an engine
    hf = hf_model(engine.module)  # engine.module is the step (step.DistillStep); its student is trained
    state = {}
    for name, p in hf.named_parameters():
        full = safe_get_full_fp32_param(p)
        if rank == 0:
            state[name] = (full if full is not None else p.detach()).float().cpu().clone()
    if rank == 0:
        export(hf, tokenizer, path, state_dict=state)
    if dist.is_initialized():
        dist.barrier()
