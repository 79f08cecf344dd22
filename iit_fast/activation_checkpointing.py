"""Activation checkpointing of the student's blocks for the main job: which implementation, from the flag and
the DeepSpeed config (the mechanism itself is `IntervenableLM.enable_activation_checkpointing`).

- `--activation_checkpointing true` alone: torch.utils.checkpoint, non-reentrant ("torch").
- A DeepSpeed config with an `activation_checkpointing` section (with or without the flag): DeepSpeed's own
  `deepspeed.checkpointing.non_reentrant_checkpoint` ("deepspeed"), configured from that section
  (`cpu_checkpointing` keeps the checkpointed block inputs in host memory; `synchronize_checkpoint_boundary`,
  `profile` as DeepSpeed documents them). Its reentrant `checkpoint` is not used: it runs one backward per
  checkpointed call, and a block that several passes ran would have its gradients reduced once per pass.
  The section is a request for checkpointing: DeepSpeed only reads it when the model calls
  its checkpoint function, which this one does for every student block.
- `partition_activations` and `contiguous_memory_optimization` split the checkpoints across model-parallel
  ranks; this job has no model parallelism (each rank holds whole sequences): refused, one line, before
  any work (`check_ds_section`).

Every pass of the step with grad is checkpointed: the student's plain pass, its resumed counterfactual
pass(es) and, for causal LMs, the suffix passes that read the plain pass's keys/values. The teacher runs
without grad: nothing of it is saved, nothing to checkpoint.
"""
from __future__ import annotations

import logging

log = logging.getLogger("iit_fast.activation_checkpointing")

SECTION = "activation_checkpointing"
_MODEL_PARALLEL_ONLY = ("partition_activations", "contiguous_memory_optimization")


def check_ds_section(ds: dict, where: str = "--deepspeed_config") -> None:
    """A ValueError naming the key, for an `activation_checkpointing` section this job cannot honour."""
    section = ds.get(SECTION)
    if section is None:
        return
    if not isinstance(section, dict):
        raise ValueError(f"{where}: {SECTION} must be an object of DeepSpeed's activation checkpointing "
                         f"settings, got {section!r}")
    for key in _MODEL_PARALLEL_ONLY:
        if section.get(key):
            raise ValueError(f"{where}: {SECTION}.{key} splits checkpoints across model-parallel ranks, and this "
                             f"job has no model parallelism; expected false (or leave it out)")


def implementation(flag: bool, ds: dict) -> str | None:
    """"deepspeed" (the config has the section), "torch" (the flag alone) or None (off)."""
    if ds.get(SECTION) is not None:
        return "deepspeed"
    return "torch" if flag else None


def enable(student, flag: bool, ds: dict) -> str | None:
    """Turn checkpointing on for `student` (an IntervenableLM) as the flag and the config ask; returns the
    implementation (None: off), after configuring DeepSpeed's from the section. Says which one runs."""
    check_ds_section(ds)
    impl = implementation(flag, ds)
    if impl is None:
        return None
    if impl == "deepspeed":
        import deepspeed
        deepspeed.checkpointing.configure(None, deepspeed_config=ds)
        why = f"the DeepSpeed config's {SECTION} section"
    else:
        why = "--activation_checkpointing"
    student.enable_activation_checkpointing(impl)
    log.info("activation checkpointing of the student's %d blocks: %s (%s)", student.num_layers,
             "deepspeed.checkpointing" if impl == "deepspeed" else "torch.utils.checkpoint, non-reentrant", why)
    return impl
