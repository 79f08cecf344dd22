"""Checkpoints of a training run (iit_fast/train.py): crash-safe save, verified resume.

A checkpoint is a folder `checkpoints/<tag>` (tag `step{N}`, or `step{N}.{k}` when `step{N}` exists:
no tag is ever rewritten in place) holding DeepSpeed's own files (model, optimizer, scheduler, ZeRO
partitions, the run's counters as client_state), one `rank{r}_state.pt` per rank (its data position and
RNG states: DeepSpeed keeps client_state from rank 0 only) and a `manifest.json` (every file's size and
CRC-32, the world size). `checkpoints/latest` names the committed one.

Write order (`save_checkpoint`), so that a kill at any instant leaves `latest` naming a complete folder:
  1. DeepSpeed writes into a hidden `.incomplete-<tag>` folder (save_latest=False);
  2. every rank writes its own file under a temporary name, fsyncs and renames it; barrier;
  3. rank 0 checksums and fsyncs every file, writes the manifest (temporary name, fsync, rename), fsyncs
     the folder and renames it to `<tag>`;
  4. rank 0 writes `latest` atomically (temporary file, fsync, rename, fsync of checkpoints/);
  5. optional rotation (`keep`): older tags are renamed to a hidden `.deleting-<tag>` before removal.
Hidden leftovers of a killed save are removed by the next save. A folder renamed in step 3 but not yet
named by `latest` is complete yet uncommitted: resume uses `latest`. Every rank must see the same
checkpoints/ folder (one machine, or a shared filesystem): rank 0 checksums and renames what all wrote.

Resume (`load_checkpoint`) verifies the tag `latest` names (manifest, every file's size and checksum, a
rank file for every rank); if it is damaged it falls back to the newest intact tag and says why; with
none intact it raises, naming the folder and each tag's fault. A checkpoint is reported as written by a
different number of ranks only when it is intact and its manifest says so. Then every pickle is opened
with torch.load(weights_only=True) (`check_checkpoint_safe`) before DeepSpeed's weights_only=False load.

A full disk (iit_fast/diskfull.py): before writing, rank 0 compares the space free with what the save
needs (the last checkpoint's size, or a floor from the parameter count) and every rank refuses with one line
naming the folder and both figures; a write that fails for want of space all the same removes the hidden
folder it was writing. Either way `latest` and the checkpoint it names are untouched, and the error is a
DiskFullError (an OSError).

A save that was killed between the rename of its folder and `latest` leaves a complete but uncommitted tag;
the next save (which takes the name `step{N}.1`) removes it once its own tag is committed.

`_reached(point, rank)` is called at each point of the write sequence (SAVE_POINTS, in order) and does
nothing: tests/test_checkpoint.py replaces it to kill the process there.

The Hugging Face export of the student is `iit_fast/export.py` (`export_student`).

Just over 400 lines, kept in one module: the save's write order and the resume's verification are one
protocol (the manifest and the tags one side writes are what the other checks), and read best together.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from iit_fast.diskfull import DiskFullError, disk_full_message, free_bytes, guarded_write

MANIFEST = "manifest.json"
INCOMPLETE = ".incomplete-"  # prefix of a folder being written
DELETING = ".deleting-"      # prefix of a folder being removed by rotation
SAVE_POINTS = ("after_deepspeed", "mid_rank_file", "after_rank_files", "after_manifest", "after_rename",
                "mid_latest", "mid_rotation")
_TAG = re.compile(r"step(\d+)(?:\.(\d+))?")


# ---- tags ----------------------------------------------------------------------------------------------

def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `ckpt_dir/latest` names (the last committed checkpoint), or None if there is none."""
    f = Path(ckpt_dir) / "latest"
    return f.read_text().strip() if f.is_file() else None


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """The checkpoint folders of `ckpt_dir` (intact or not), newest first: step60.1 after step60."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)]
    return sorted(tags, key=_tag_key, reverse=True)


def _tag_key(tag: str) -> tuple[int, int]:
    m = _TAG.fullmatch(tag)
    return int(m.group(1)), int(m.group(2) or 0)


def _new_tag(ckpt_dir: Path, step: int) -> str:
    tag, k = f"step{step}", 0
    while (ckpt_dir / tag).exists():  # never rewrite a tag in place: a kill mid-rewrite would lose it
        k += 1
        tag = f"step{step}.{k}"
    return tag


# ---- verification --------------------------------------------------------------------------------------

def tag_damage(tag_dir: Path, *, checksums: bool = True) -> tuple[str | None, dict | None]:
    """(why the folder is not an intact checkpoint or None, its manifest or None). Checks the manifest,
    every file it lists (size, and CRC-32 when `checksums`), and a rank file for each rank it was written
    by. Says nothing about the world size of the run that wants it (see `resume_tag`)."""
    tag_dir = Path(tag_dir)
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files, world = manifest["files"], int(manifest["world_size"])
    except FileNotFoundError:
        return f"no {MANIFEST} (a save that did not finish, or one older than manifests)", None
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})", None
    missing = [f"rank{r}_state.pt" for r in range(world) if f"rank{r}_state.pt" not in files]
    if missing:
        return f"{MANIFEST} of {world} rank(s) lists no {', '.join(missing)}", None
    for name, want in files.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing", None
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, the manifest says {want['size']} (truncated or rewritten)", None
        if checksums and _crc32(f) != want["crc32"]:
            return f"{name} has a CRC-32 other than the manifest's (corrupted)", None
    return None, manifest


def resume_tag(ckpt_dir: Path, world_size: int) -> tuple[str, str | None]:
    """(the tag to resume from, a one-line note if it is not the one `latest` names). The tag `latest`
    names if it is intact, else the newest intact tag. RuntimeError if none is intact, naming the folder
    and each tag's fault, or if the chosen checkpoint was written by another number of ranks."""
    ckpt_dir = Path(ckpt_dir)
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    want = latest_tag(ckpt_dir)
    order = ([want] if want else []) + [t for t in checkpoint_tags(ckpt_dir) if t != want]
    faults = []
    for tag in order:
        if not (ckpt_dir / tag).is_dir():
            faults.append(f"{tag}: the folder is missing")
            continue
        damage, manifest = tag_damage(ckpt_dir / tag)
        if damage:
            faults.append(f"{tag}: {damage}")
            continue
        if manifest["world_size"] != world_size:  # intact, so this really is the cause; older tags too
            raise RuntimeError(f"checkpoint {ckpt_dir / tag} was written by {manifest['world_size']} rank(s); "
                               f"this run has {world_size}: resume with {manifest['world_size']} rank(s)")
        if tag == want:
            return tag, None
        why = f"{want} is damaged ({faults[0].split(': ', 1)[1]})" if want else f"{ckpt_dir / 'latest'} is missing"
        return tag, f"checkpoint {why}; resuming from {tag}, the newest intact checkpoint"
    if not faults:
        raise RuntimeError(f"no checkpoint in {ckpt_dir}: no `latest` and no step* folder")
    raise RuntimeError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(faults))


def check_checkpoint_safe(tag_dir: Path):
    """Every pickle of the checkpoint must load with weights_only=True before DeepSpeed (which loads with
    weights_only=False) may read it: so no file of the folder can run code."""
    for f in sorted(Path(tag_dir).glob("*.pt")):
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # an object that is not plain data: refuse the whole checkpoint
            raise RuntimeError(f"checkpoint file {f} is not plain data (torch.load(weights_only=True) refused "
                               f"it: {str(e).splitlines()[0]}); not loading it") from None


def _safe_globals():
    """Plain-data types DeepSpeed writes into its checkpoints besides tensors. (Imported here, each on its own:
    deepspeed is heavy, and a name missing from this DeepSpeed version is simply not allowed.)"""
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


# ---- save ----------------------------------------------------------------------------------------------

def save_checkpoint(engine, out: Path, step: int, client_state: dict, data_state: dict, rank: int, *,
                    keep: int | None = None) -> Path:
    """Save the run into `out/checkpoints/<new tag>` and commit it as `latest`; returns the tag's folder.

    A collective: every rank calls it. The ranks must share `out`'s filesystem (rank 0 checksums every
    rank's files and renames the folder). `client_state`: the run's counters (kept by DeepSpeed, from rank
    0); `data_state`: this rank's data position as a plain dict (e.g. `loader.state_dict()`); `keep`: after
    the commit, keep only the newest `keep` intact tags (and the one `latest` names); None keeps all.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if not isinstance(client_state, dict):
        raise TypeError(f"client_state: expected a dict, got {type(client_state).__name__}")
    if not isinstance(data_state, dict):
        raise TypeError(f"data_state: expected a plain dict (loader.state_dict()), got {type(data_state).__name__}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep: expected None or an int >= 1, got {keep!r}")
    ckpt = Path(out) / "checkpoints"
    choice = None
    if rank == 0:
        if not ckpt.is_dir():
            ckpt.mkdir(parents=True)
            _fsync(ckpt.parent)
        _remove_leftovers(ckpt)
        need, free = _checkpoint_bytes(engine, ckpt), free_bytes(ckpt)
        committed = latest_tag(ckpt)
        refuse = None if free is None or free >= need else disk_full_message(
            "checkpoint", ckpt / f"step{step}", need, free, _kept(ckpt, committed))
        choice = (_new_tag(ckpt, step), need, committed, refuse)
    tag, need, committed, refuse = _broadcast(choice)  # every rank refuses alike, before anything is written
    if refuse:
        raise DiskFullError(refuse, ckpt)
    tmp = ckpt / f"{INCOMPLETE}{tag}"
    after = _kept(ckpt, committed) + f"; the partial {tmp.name} was removed"
    with guarded_write("checkpoint", ckpt / tag, need=need, partial=[tmp], after=after):
        engine.save_checkpoint(str(ckpt), tag=tmp.name, client_state=dict(client_state), save_latest=False)
        _reached("after_deepspeed", rank)
        own = {"torch": torch.get_rng_state(), "python": random.getstate(), "data": data_state}
        if torch.cuda.is_available():
            own["cuda"] = torch.cuda.get_rng_state()
        part = tmp / f"rank{rank}_state.pt.part"
        torch.save(own, part)
        _fsync(part)
        _reached("mid_rank_file", rank)
        os.replace(part, tmp / f"rank{rank}_state.pt")
    _barrier()
    _reached("after_rank_files", rank)

    if rank == 0:
        with guarded_write("checkpoint", ckpt / tag, need=need, partial=[tmp, ckpt / tag, ckpt / "latest.part"],
                           after=_kept(ckpt, committed) + "; the partial checkpoint was removed"):
            _write_manifest(tmp, tag, step, _world_size())
            _reached("after_manifest", rank)
            os.rename(tmp, ckpt / tag)
            _fsync(ckpt)
            _reached("after_rename", rank)
            part = ckpt / "latest.part"
            part.write_text(tag)
            _fsync(part)
            _reached("mid_latest", rank)
            os.replace(part, ckpt / "latest")  # the commit: nothing after it is partial
        _fsync(ckpt)
        _remove_uncommitted(ckpt, committed, tag)
        if keep is not None:
            _rotate(ckpt, keep, lambda point: _reached(point, rank))
    _barrier()  # on return, the checkpoint is committed for every rank
    return ckpt / tag


def _reached(point: str, rank: int) -> None:
    """The save has reached `point` (one of SAVE_POINTS). Does nothing; tests replace it to kill the
    process there (tests/test_checkpoint.py)."""


def _checkpoint_bytes(engine, ckpt: Path) -> int:
    """About how many bytes a save writes: the size of the committed checkpoint (a run writes the same
    files each time), else a floor from the parameters: their bytes plus fp32 Adam moments (8 bytes) for
    each trainable one. ZeRO-3: the whole parameter (ds_numel), not this rank's partition."""
    tag = latest_tag(ckpt)
    if tag:
        try:
            files = json.loads((ckpt / tag / MANIFEST).read_text())["files"]
            return sum(int(f["size"]) for f in files.values())
        except (OSError, ValueError, KeyError, TypeError):
            pass
    n = 0
    for p in engine.module.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        n += numel * (p.element_size() + (8 if p.requires_grad else 0))
    return n


def _kept(ckpt: Path, committed: str | None) -> str:
    return (f"; the last good checkpoint {ckpt / committed} is kept" if committed
            else "; no checkpoint was saved before")


def _remove_uncommitted(ckpt: Path, committed: str | None, tag: str):
    """Tags newer than the one `latest` named before this save, other than this save's own: folders of a
    save killed between its rename and `latest` (complete, never committed: resume never used them). Only
    when that committed tag is still there, so a resume that fell back past a damaged `latest` keeps all."""
    if committed is None or tag_damage(ckpt / committed, checksums=False)[0] is not None:
        return
    for t in checkpoint_tags(ckpt):
        if t != tag and _tag_key(t) > _tag_key(committed):
            trash = ckpt / f"{DELETING}{t}"
            os.rename(ckpt / t, trash)
            _fsync(ckpt)
            shutil.rmtree(trash)


def _write_manifest(tag_dir: Path, tag: str, step: int, world: int):
    """Size and CRC-32 of every file under tag_dir (read once, fsynced on the way), then the manifest
    itself, atomically. Rank 0 reads every rank's files: the filesystem is shared."""
    files = {}
    for f in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
        _fsync(f)
        files[f.relative_to(tag_dir).as_posix()] = {"size": f.stat().st_size, "crc32": _crc32(f)}
    for d in [tag_dir] + [p for p in tag_dir.rglob("*") if p.is_dir()]:
        _fsync(d)  # the renames of the rank files, and DeepSpeed's entries
    part = tag_dir / f"{MANIFEST}.part"
    part.write_text(json.dumps({"format": 1, "tag": tag, "step": step, "world_size": world, "files": files},
                               indent=1))
    _fsync(part)
    os.replace(part, tag_dir / MANIFEST)
    _fsync(tag_dir)


def _rotate(ckpt: Path, keep: int, reached):
    """Remove every tag (damaged ones too) but the newest `keep` intact ones and the one `latest` names;
    called only once the new tag is committed. Each is first renamed to a hidden folder (atomic), so a
    kill mid-removal never leaves a half tag that looks real. Intact here: manifest and sizes (checksums
    would read every checkpoint at every save)."""
    tags = checkpoint_tags(ckpt)
    intact = [t for t in tags if tag_damage(ckpt / t, checksums=False)[0] is None]
    kept = set(intact[:keep]) | {latest_tag(ckpt)}
    for tag in tags:
        if tag in kept:
            continue
        trash = ckpt / f"{DELETING}{tag}"
        os.rename(ckpt / tag, trash)
        _fsync(ckpt)
        reached("mid_rotation")
        shutil.rmtree(trash)


def _remove_leftovers(ckpt: Path):
    """Hidden folders of a save or a rotation that was killed: never a checkpoint, safe to remove."""
    for p in ckpt.iterdir():
        if p.is_dir() and (p.name.startswith(INCOMPLETE) or p.name.startswith(DELETING)):
            shutil.rmtree(p)
    for name in ("latest.part",):
        (ckpt / name).unlink(missing_ok=True)


# ---- load ----------------------------------------------------------------------------------------------

def load_checkpoint(engine, out: Path, rank: int, *, world_size: int) -> tuple[dict, dict, str, str | None]:
    """Resume the engine and this rank's RNG states from the newest intact checkpoint of `out`.

    A collective: every rank calls it. Rank 0 picks and verifies the tag (`resume_tag`) and checks its
    pickles (`check_checkpoint_safe`), the others follow its choice (shared filesystem). Returns
    (client_state, data_state of this rank, tag, note): note is a one-line message when `latest` was
    damaged and an older tag was used (print it), else None.
    """
    if not isinstance(world_size, int) or world_size != _world_size():
        raise ValueError(f"world_size: expected this run's number of ranks, {_world_size()}; got {world_size!r}")
    ckpt = Path(out) / "checkpoints"
    choice = None
    if rank == 0:
        try:
            tag, note = resume_tag(ckpt, world_size)
            check_checkpoint_safe(ckpt / tag)
            choice = (tag, note, None)
        except (RuntimeError, OSError) as e:  # every rank raises it, none waits for rank 0 forever
            choice = (None, None, str(e))
    tag, note, error = _broadcast(choice)
    if error:
        raise RuntimeError(error)
    path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt / tag}")
    own = torch.load(ckpt / tag / f"rank{rank}_state.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(own["torch"])
    random.setstate(own["python"])
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])
    return client, own["data"], tag, note


# ---- small helpers -------------------------------------------------------------------------------------

def _crc32(f: Path) -> int:
    crc = 0
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync(path: Path):
    """Flush a file's data or a folder's entries (renames) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
