"""Reading a checkpoint in pieces: safetensors headers, byte ranges, ZeRO-3 partitions.

- `safetensors_index` / `TensorReader`: where each tensor lies in the files (headers only) and a reader of
  element ranges (one pread each, nothing mapped);
- `checkpoint_keys`: the model's parameters matched to the stored tensors, checked (names and shapes);
- `load_partitioned`: the model built inside `deepspeed.zero.Init`, each rank reading only its own slice of
  every tensor (models/load.py's docstring says how it stands beside `load_model`);
- `init_student_from_checkpoint`: the student `init_student_from_teacher` gives, read from the teacher's files.
"""
from __future__ import annotations

import copy
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import initialization as hf_init

from .intervenable import IntervenableLM
from .load import ModelSpec, meta_model, quiet_transformers
from .registry import adapter_for
from .student import student_layer_map


# safetensors' dtype names (the format's header spec) -> torch
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file: its bytes are [offset, offset + numel * itemsize)."""
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of element 0 in `file`

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def safetensors_index(folder: Path, arg: str = "path") -> dict[str, StoredTensor]:
    """Every tensor of a safetensors checkpoint (one file or a shard index), from the files' headers only
    (8 bytes of header length, then a JSON header: {name: {dtype, shape, data_offsets}})."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        raise ValueError(f"{arg}: {folder} holds no safetensors weights; loading in pieces reads safetensors "
                         f"(a legacy .bin is one pickle: re-save it with `save_pretrained`, which writes safetensors)")
    out = {}
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{arg}: {path.name}: tensor {name} has dtype {meta['dtype']}; expected one of "
                                 f"{sorted(_ST_DTYPES)}")
            out[name] = StoredTensor(path, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                     8 + n + meta["data_offsets"][0])
    return out


class TensorReader:
    """Reads element ranges of stored tensors with one pread each (no mmap: only the bytes asked for are
    read, and nothing of the file stays mapped into this process)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def read(self, t: StoredTensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, in its stored dtype: (stop - start,)."""
        stop = t.numel if stop is None else stop
        item = torch.empty((), dtype=t.dtype).element_size()
        if t.file not in self._fds:
            self._fds[t.file] = os.open(t.file, os.O_RDONLY)
        data = bytearray(os.pread(self._fds[t.file], (stop - start) * item, t.offset + start * item))
        if len(data) != (stop - start) * item:
            raise ValueError(f"{t.file.name}: truncated (a tensor's bytes end past the end of the file)")
        return torch.frombuffer(data, dtype=t.dtype) if data else torch.empty(0, dtype=t.dtype)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _aliases(name: str, prefix: str) -> list[str]:
    """Names a model tensor may have in a checkpoint: its own, with or without the base model's prefix, and
    the old LayerNorm names (gamma / beta)."""
    out = [name, name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}"]
    for a in list(out):
        if a.endswith("LayerNorm.weight"):
            out.append(a[:-len("weight")] + "gamma")
        elif a.endswith("LayerNorm.bias"):
            out.append(a[:-len("bias")] + "beta")
    return out


def checkpoint_keys(spec: ModelSpec, model, index: dict[str, StoredTensor]) -> dict[str, str]:
    """{the model's parameter name (first name of a tied group): its tensor's name in the checkpoint},
    checked: every parameter found (a tied one under any of its names), of its shape. `model` may be on the
    meta device or partitioned by ZeRO-3 (then the shape is `ds_shape`)."""
    groups: dict[int, list[str]] = {}
    params = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
        params.setdefault(id(p), p)
    prefix = getattr(model, "base_model_prefix", "")
    keys, missing, wrong = {}, [], []
    for pid, names in groups.items():
        key = next((a for n in names for a in _aliases(n, prefix) if a in index), None)
        if key is None:
            missing.append(names[0])
            continue
        shape = tuple(getattr(params[pid], "ds_shape", params[pid].shape))
        if index[key].shape != shape:
            wrong.append(f"{key} {list(index[key].shape)} (expected {list(shape)})")
        keys[names[0]] = key
    if missing or wrong:
        raise ValueError(f"{spec.arg}: the checkpoint in {spec.folder} does not fit a {spec.lm_class.__name__} of its "
                         f"own config: " + "; ".join(f"{k} {v[:8]}" for k, v in
                                                     (("missing", missing), ("mismatched", wrong)) if v)
                         + "; expected every tensor of the model, of its configured shape")
    return keys


def load_partitioned(spec: ModelSpec, ds_config: dict, dtype: torch.dtype, on_tensor=None):
    """The IntervenableLM of a checked folder, ZeRO-3 partitioned across the process group as it is built.

    Built inside `deepspeed.zero.Init(ds_config, dtype)` (its `offload_param` device decides where the
    partitions live: the accelerator, or CPU), with transformers' weight initialisation switched off (every
    value comes from the checkpoint); then each rank reads its own slice of every tensor from the files
    (bytes [rank * part, (rank + 1) * part) of the flattened tensor, converted to `dtype`) into its partition.
    `on_tensor(model, name)` is called after each parameter is filled (tests sample the memory there).
    The parameters then belong to ZeRO-3: an engine without optimizer (engine.init_teacher_engine) gathers them
    block by block as the model runs."""
    import deepspeed  # lazy: heavy, and only this ZeRO-3 path needs it
    from transformers.integrations.deepspeed import prevent_arange_dtype_change  # lazy: goes with deepspeed
    index = safetensors_index(spec.folder, spec.arg)
    # zero.Init takes the dtype from the config's bf16 / fp16 sections (its `dtype` argument is ignored on an
    # accelerator without fp16, e.g. the CPU, in DeepSpeed 0.16-0.19: it then picks bf16)
    ds_config = {**ds_config, "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    # as transformers' own ZeRO-3 construction (PreTrainedModel.get_init_context), less the weight init it
    # then runs by gathering every module: here every value is read from the checkpoint instead
    with quiet_transformers(), hf_init.no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = spec.lm_class._from_config(spec.config, dtype=dtype)
    model.tie_weights()
    keys = checkpoint_keys(spec, model, index)
    reader = TensorReader()
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                part = p.ds_tensor                                                     # (ceil(numel / world),)
                n = part.numel()
                start = n * dist.get_rank(group=p.ds_process_group)
                stop = min(start + n, p.ds_numel)
                got = max(stop - start, 0)
                if got:
                    part[:got].copy_(reader.read(index[keys[name]], start, stop))   # converted to part's dtype
                part[got:].zero_()  # the padding of the last partition
                if on_tensor is not None:
                    on_tensor(model, name)
            # buffers are not partitioned: each rank reads the (small) stored ones whole
            persistent = set(model.state_dict(keep_vars=True)) - {n for n, _ in model.named_parameters(
                remove_duplicate=False)}
            for name, b in model.named_buffers():
                key = next((a for a in _aliases(name, model.base_model_prefix) if a in index), None)
                if name in persistent and key is not None:
                    b.copy_(reader.read(index[key]).view(b.shape))
    finally:
        reader.close()
    return IntervenableLM(model.eval())


def init_student_from_checkpoint(spec: ModelSpec, student_layers: int, index: dict | None = None):
    """The HF student model `init_student_from_teacher(teacher, student_layers)` gives (same layers, same
    values, fp32), read from the teacher's files: only the tensors the student copies are read."""
    index = index or safetensors_index(spec.folder, spec.arg)
    shape_of = meta_model(spec).model  # the teacher's structure, no storage
    adapter = adapter_for(shape_of)
    layers = student_layer_map(len(adapter.blocks), student_layers)
    config = adapter.student_config(copy.deepcopy(shape_of.config), layers)
    with quiet_transformers():
        student = spec.lm_class._from_config(config, dtype=torch.float32)
    keys = checkpoint_keys(spec, shape_of, index)  # teacher parameter name -> stored name (checked)
    by_alias = {a: stored for name, stored in keys.items() for a in _aliases(name, shape_of.base_model_prefix)}
    prefix = adapter.layer_prefix()
    reader = TensorReader()
    new_state = {}
    try:
        for k, v in student.state_dict().items():
            t_name = k
            if k.startswith(prefix):
                idx, rest = k[len(prefix):].split(".", 1)
                t_name = f"{prefix}{layers[int(idx)]}.{rest}"
            stored = by_alias.get(t_name) or next((a for a in _aliases(t_name, shape_of.base_model_prefix)
                                                   if a in index), None)
            if stored is not None:
                new_state[k] = reader.read(index[stored]).view(index[stored].shape).to(v.dtype)
    finally:
        reader.close()
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    student.tie_weights()
    # a key may be missing only because it is tied to one that was loaded (the decoder to the embeddings), or
    # a buffer the model computes itself (position ids)
    state = student.state_dict()
    loaded = {state[k].data_ptr() for k in new_state if k in state}
    params = {n for n, _ in student.named_parameters(remove_duplicate=False)}
    missing = [k for k in missing if k in params and state[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"{spec.arg}: a student cannot be initialised from {spec.folder}: missing {missing}, "
                         f"unexpected {unexpected}")
    return student
