"""Checkpoints of a training run (iit_fast/train.py): save, safe resume, Hugging Face export.

- `save_checkpoint`: DeepSpeed's own save_checkpoint (model, optimizer, scheduler, ZeRO partitions, with
  the run's counters as client_state), plus one small file per rank with its data position and RNG states
  (DeepSpeed keeps client_state from rank 0 only).
- `load_checkpoint`: first opens every pickle of the checkpoint with torch.load(weights_only=True), so a
  file that holds anything but plain data (which DeepSpeed's weights_only=False load would run) is
  refused; then DeepSpeed's load_checkpoint, then the rank's own file.
- `export_student`: consolidated fp32 weights from any ZeRO stage (and bf16) into a standard Hugging Face
  folder (safetensors + tokenizer) that AutoModelForMaskedLM.from_pretrained loads.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    return f.read_text().strip() if f.is_file() else None


def check_checkpoint_safe(tag_dir: Path):
    """Every pickle of the checkpoint must load with weights_only=True before DeepSpeed (which loads with
    weights_only=False) may read it: so no file of the folder can run code."""
    for f in sorted(tag_dir.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # an object that is not plain data: refuse the whole checkpoint
            raise RuntimeError(f"checkpoint file {f} is not plain data (torch.load(weights_only=True) refused "
                               f"it: {str(e).splitlines()[0]}); not loading it") from None


def _safe_globals():
    """Plain-data types DeepSpeed writes into its checkpoints besides tensors."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:
        pass
    return out


def save_checkpoint(engine, out: Path, step: int, state: dict, batches, rank: int):
    """DeepSpeed's save_checkpoint (model, optimizer, scheduler, ZeRO partitions) plus, per rank, the data
    position and the RNG states (DeepSpeed keeps client_state from rank 0 only)."""
    ckpt = out / "checkpoints"
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=dict(state))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "data": batches.state_dict()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, ckpt / tag / f"rank{rank}_state.pt")
    import torch.distributed as dist
    dist.barrier()
    return ckpt / tag


def load_checkpoint(engine, out: Path, batches, rank: int) -> dict:
    ckpt = out / "checkpoints"
    tag = latest_tag(ckpt)
    tag_dir = ckpt / tag
    check_checkpoint_safe(tag_dir)
    path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    f = tag_dir / f"rank{rank}_state.pt"
    if not f.is_file():
        raise RuntimeError(f"{f} missing: the checkpoint was written by a different number of ranks")
    rng = torch.load(f, map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    batches.load_state_dict(rng["data"])
    return client


def export_student(engine, tokenizer, path: Path, rank: int):
    """The student as a Hugging Face folder: consolidated fp32 weights from any ZeRO stage + tokenizer.

    safe_get_full_fp32_param gathers the fp32 master copy (ZeRO-1/2/3, bf16); with no optimizer-side
    copy (ZeRO-0, fp32) the module's own parameter is it. A collective: every rank calls it.
    """
    from deepspeed.utils import safe_get_full_fp32_param
    hf = engine.module.model
    state = {}
    for name, p in hf.named_parameters():
        full = safe_get_full_fp32_param(p)
        if rank == 0:
            state[name] = (full if full is not None else p.detach()).float().cpu().clone()
    if rank == 0:
        fresh = type(hf)(hf.config)
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        params = {n for n, _ in fresh.named_parameters()}
        missing = [k for k in missing if k in params]
        if missing or unexpected:
            raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
        fresh.tie_weights()
        fresh.save_pretrained(path)  # safetensors
        tokenizer.save_pretrained(path)
    import torch.distributed as dist
    dist.barrier()
