"""Activation checkpointing of the student's blocks for the main job, from the flag and the DeepSpeed config
(the mechanism itself is `IntervenableLM.enable_activation_checkpointing`).

- `--activation_checkpointing true`, or a DeepSpeed config with an `activation_checkpointing` section (the
  section is a request for checkpointing: DeepSpeed only acts on it when the model calls a checkpoint
  function): every student block of every pass with grad is checkpointed with torch.utils.checkpoint,
  non-reentrant.
- Not DeepSpeed's own checkpoint functions: its reentrant `checkpoint` runs one backward per checkpointed call,
  so a block that several passes ran (plain, counterfactual) has its gradients reduced once per pass (ZeRO-3
  asserts on it), and it recomputes outside the forward's autocast; its `non_reentrant_checkpoint` saves
  the parameters themselves, which ZeRO-3 has released by backward (a 0-element weight in the gradient of a
  Llama MLP, measured on 2 ranks). So the section's options that only those functions implement are refused,
  one line, before any work (`check_ds_section`): `partition_activations` and
  `contiguous_memory_optimization` (they split checkpoints across model-parallel ranks; this job has none),
  `cpu_checkpointing`, `synchronize_checkpoint_boundary`, `profile`. `number_checkpoints` only sizes the
  contiguous buffer: accepted, without effect.

Every pass of the step with grad is checkpointed: the student's plain pass, its resumed counterfactual
pass(es) and, for causal LMs, the suffix passes that read the plain pass's keys/values. The teacher runs
without grad: nothing of it is saved, nothing to checkpoint.
"""
from __future__ import annotations

import logging

log = logging.getLogger("iit_fast.activation_checkpointing")

SECTION = "activation_checkpointing"
_REFUSED = {
    "partition_activations": "splits checkpoints across model-parallel ranks, and this job has no model parallelism",
    "contiguous_memory_optimization": "packs partitioned checkpoints (model parallelism), which this job has not",
    "cpu_checkpointing": "belongs to DeepSpeed's checkpoint functions, which this job does not use (the module "
                         "docstring of iit_fast/activation_checkpointing.py says why)",
    "synchronize_checkpoint_boundary": "belongs to DeepSpeed's checkpoint functions, which this job does not use",
    "profile": "belongs to DeepSpeed's checkpoint functions, which this job does not use",
}


def check_ds_section(ds: dict, where: str = "--deepspeed_config") -> None:
    """A ValueError naming the key, for an `activation_checkpointing` section this job cannot honour."""
    section = ds.get(SECTION)
    if section is None:
        return
    if not isinstance(section, dict):
        raise ValueError(f"{where}: {SECTION} must be an object of DeepSpeed's activation checkpointing "
                         f"settings, got {section!r}")
    for key, why in _REFUSED.items():
        if section.get(key):
            raise ValueError(f"{where}: {SECTION}.{key} {why}; expected false (or leave it out)")


def requested(flag: bool, ds: dict) -> bool:
    """Checkpointing on: the flag, or the DeepSpeed config's section."""
    return bool(flag) or ds.get(SECTION) is not None


def enable(student, flag: bool, ds: dict) -> str | None:
    """Turn checkpointing on for `student` (an IntervenableLM) when asked; a line saying so, or None (off)."""
    check_ds_section(ds)
    if not requested(flag, ds):
        return None
    student.enable_activation_checkpointing("torch")
    why = "--activation_checkpointing" if flag else f"the DeepSpeed config's {SECTION} section"
    line = (f"activation checkpointing of the student's {student.num_layers} blocks in every pass with grad: "
            f"torch.utils.checkpoint, non-reentrant ({why})")
    log.info(line)
    return line
