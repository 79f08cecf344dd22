"""One loader for every supported family: a local Hugging Face folder -> (IntervenableLM, tokenizer).

Every check names the argument at fault and what was expected, before any weight is read: the folder,
config.json, a supported model_type, weights, LM-head weights, the tokenizer and its size and special
tokens, and the kind of LM asked for. Weights load safely (safetensors, or torch's weights_only loader
for a legacy .bin) and must cover the whole model: a tensor that the checkpoint lacks is an error, not
a silent random initialisation.

Three ways in, one set of checks (`inspect_model`, which reads config.json, the safetensors headers and the
tokenizer, never a tensor):
- `load_model`: the whole model on this process, in the dtype asked (a bf16 checkpoint read as bf16 is never
  upcast on the way) and straight onto `device`.
- `load_partitioned`: the model built inside `deepspeed.zero.Init` (each module's parameters are cut into
  ZeRO-3 partitions as soon as it is constructed) and every rank then reads *its own slice* of each tensor
  straight from the safetensors files into its partition: no rank holds a whole tensor it does not own,
  except one module's freshly constructed weights for an instant. Needs the process group.
- `init_student_from_checkpoint`: a student initialised from the teacher's blocks read from its files,
  so a teacher that is never loaded whole (partitioned, or replaced by a teacher cache) can still seed it.
"""
from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

KINDS = ("masked", "causal")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def weight_names(folder: Path) -> list[str]:
    """Tensor names stored in a checkpoint folder, read without loading tensors (safetensors header, shard
    index), or with torch.load(weights_only=True) for a legacy .bin; [] when there are no weights."""
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return list(f.keys())
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return list(json.loads((folder / index).read_text())["weight_map"])
    if (folder / "pytorch_model.bin").is_file():
        return list(torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True))
    return []


@dataclass
class ModelSpec:
    """A checked checkpoint folder, before any tensor is read: what `inspect_model` found."""
    folder: Path
    arg: str                   # the name errors give the folder (e.g. "--teacher")
    adapter: type              # its FamilyAdapter class
    lm_class: type             # e.g. BertForMaskedLM
    config: object             # the HF config
    names: list[str] = field(default_factory=list)  # tensor names in the weight files ([] when not read)

    @property
    def kind(self) -> str:
        return self.adapter.kind


def inspect_model(path, *, kind: str | None = None, tokenizer_path=None, arg: str = "path",
                  weights: bool = True):
    """(ModelSpec, tokenizer): every check `load_model` makes, reading config.json, the tokenizer and (with
    `weights`) the weight files' tensor names, never a tensor. `weights=False` opens no weight file at all
    (a run on a teacher cache: the cache's fingerprint pins the weights it was built from)."""
    from . import ADAPTERS, supported_classes
    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be None, 'masked' or 'causal', got {kind!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{arg}: {folder} does not exist; expected a local Hugging Face model folder "
                                f"(config.json + model.safetensors), e.g. the default teacher built by "
                                f"`python -m iit_fast.teacher build`")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{arg}: {folder} has no config.json; expected a Hugging Face checkpoint folder")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{arg}: {folder}/config.json is not a JSON object ({e}); expected a Hugging Face "
                         f"config") from e
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise ValueError(f"{arg}: {folder} holds a {model_type!r} model; supported model_types are "
                         f"{sorted(ADAPTERS)} ({supported_classes()})")
    if kind is not None and adapter.kind != kind:
        raise ValueError(f"{arg}: kind={kind!r} was asked, but {folder} holds a {adapter.kind} LM "
                         f"(model_type {model_type!r}); expected a {kind} LM")
    lm_class = adapter.lm_class(model_type)
    config = lm_class.config_class.from_pretrained(folder)
    names = weight_names(folder) if weights else []
    if weights and not names:
        raise FileNotFoundError(f"{arg}: {folder} has no weights; expected model.safetensors (or a shard index, "
                                f"or pytorch_model.bin)")
    head = adapter.head_weight_prefixes(config)
    if weights and head and not any(n.startswith(head) for n in names):
        hint = (f" An encoder-only model can be turned into one with `python -m iit_fast.teacher build "
                f"--encoder {folder}`" if adapter.family == "bert" else "")
        raise ValueError(f"{arg}: {folder} has no LM head weights (no {' / '.join(p + '*' for p in head)} among "
                         f"its {len(names)} tensors; architectures {config.architectures}); expected a "
                         f"{lm_class.__name__} checkpoint.{hint}")
    tok_dir = Path(tokenizer_path).expanduser() if tokenizer_path is not None else folder
    tokenizer = load_tokenizer(tok_dir, config.vocab_size, adapter.kind,
                               "tokenizer_path" if tokenizer_path is not None else arg)
    return ModelSpec(folder, arg, adapter, lm_class, config, names), tokenizer


def load_model(path, *, kind: str | None = None, tokenizer_path=None, arg: str = "path",
               dtype: torch.dtype = torch.float32, device=None):
    """(IntervenableLM in eval mode, tokenizer) from a local Hugging Face checkpoint folder.

    kind: None (any supported LM), "masked" or "causal" (an error when the folder holds the other kind).
    tokenizer_path: a folder with the tokenizer, default `path`. arg: the name errors give `path` (e.g.
    "teacher"). dtype: the parameters' dtype, each tensor converted as it is read (fp32 by default, whatever
    the checkpoint stores). device: where the parameters are created (default CPU): straight there, no
    CPU copy first.
    The tokenizer is returned as transformers loads it: a causal LM's may have no pad token (the attention mask, not the
    pad id, tells padding apart).
    """
    spec, tokenizer = inspect_model(path, kind=kind, tokenizer_path=tokenizer_path, arg=arg)
    return load_weights(spec, dtype, device), tokenizer


def load_weights(spec: ModelSpec, dtype: torch.dtype = torch.float32, device=None):
    """The whole model of a checked folder on this process (see `load_model`)."""
    from . import IntervenableLM
    folder = spec.folder
    safetensors = any(folder.glob("*.safetensors"))
    # device_map places every tensor on `device` as it is read (transformers' loader; no CPU copy first)
    where = {} if device is None or torch.device(device).type == "cpu" else {"device_map": {"": torch.device(device)}}
    with quiet_transformers():
        model, info = spec.lm_class.from_pretrained(folder, config=spec.config, dtype=dtype,
                                                    output_loading_info=True,
                                                    use_safetensors=True if safetensors else None, **where)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{spec.arg}: the checkpoint in {folder} does not fit a {spec.lm_class.__name__} of its own "
                         f"config: " + "; ".join(f"{k} {sorted(map(str, v))[:8]}" for k, v in bad.items())
                         + "; expected every tensor of the model, of its configured shape")
    return IntervenableLM(model).eval()


def load_tokenizer(tok_dir: Path, vocab_size: int, kind: str, arg: str):
    """The tokenizer in `tok_dir`, checked against the model's vocabulary and kind; errors name `arg`."""
    from transformers import AutoTokenizer
    # transformers 5 builds an empty tokenizer from a folder that has only a config.json: catch that here
    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{arg}: no tokenizer could be loaded from {tok_dir} (none of "
                                f"{', '.join(TOKENIZER_FILES)} there); expected a folder with the model's tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise FileNotFoundError(f"{arg}: no tokenizer could be loaded from {tok_dir} ({e}); expected "
                                f"a folder with tokenizer.json (or vocab.txt, vocab.json + merges.txt)") from e
    check_tokenizer(tokenizer, vocab_size, kind, str(tok_dir), arg)
    return tokenizer


def check_tokenizer(tokenizer, vocab_size: int, kind: str, where: str, arg: str) -> None:
    """A masked LM needs exactly its vocabulary and [CLS]/[SEP]/[MASK]/[PAD]-like tokens; a causal LM's
    embedding may have extra (padding) rows, so its tokenizer may be smaller, never larger."""
    n = len(tokenizer)
    if kind == "masked" and n != vocab_size:
        raise ValueError(f"{arg}: the tokenizer at {where} has {n} tokens but the model's vocab_size is "
                         f"{vocab_size}; expected the tokenizer the model was trained with")
    if kind == "causal" and n > vocab_size:
        raise ValueError(f"{arg}: the tokenizer at {where} has {n} tokens, more than the model's vocab_size "
                         f"{vocab_size}; expected at most {vocab_size} (the tokenizer the model was trained with)")
    if kind == "masked":
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"{arg}: the tokenizer at {where} has no {name[:-9]} token; a masked LM needs "
                                 f"a BERT-style tokenizer with [CLS], [SEP], [MASK] and [PAD] (or <s>, </s>, "
                                 f"<mask>, <pad>)")


_SPECIAL = ("pad_token_id", "mask_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id",
            "unk_token_id")


def check_same_tokenizer(tok_a, tok_b, name_a: str = "teacher", name_b: str = "student") -> None:
    """A ValueError naming both when two tokenizers differ in size, vocabulary or special token ids
    (a teacher and its student must score the same tokens)."""
    if len(tok_a) != len(tok_b):
        raise ValueError(f"{name_a} and {name_b} have different tokenizers: {len(tok_a)} vs {len(tok_b)} tokens; "
                         f"expected the same tokenizer")
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:5]
        raise ValueError(f"{name_a} and {name_b} have different vocabularies (e.g. {diff}); expected the same "
                         f"tokenizer")
    for name in _SPECIAL:
        a, b = getattr(tok_a, name, None), getattr(tok_b, name, None)
        if a != b:
            raise ValueError(f"{name_a} and {name_b} tokenizers differ in {name[:-3]}: {a} vs {b}; expected the "
                             f"same special tokens")


# ---- reading tensors in pieces: safetensors headers, byte ranges, ZeRO-3 partitions ------------------

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
        import os
        stop = t.numel if stop is None else stop
        item = torch.empty((), dtype=t.dtype).element_size()
        if t.file not in self._fds:
            self._fds[t.file] = os.open(t.file, os.O_RDONLY)
        data = bytearray(os.pread(self._fds[t.file], (stop - start) * item, t.offset + start * item))
        if len(data) != (stop - start) * item:
            raise ValueError(f"{t.file.name}: truncated (a tensor's bytes end past the end of the file)")
        return torch.frombuffer(data, dtype=t.dtype) if data else torch.empty(0, dtype=t.dtype)

    def close(self):
        import os
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


def meta_model(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """The IntervenableLM of a checked folder with no storage (on the meta device): its sizes, blocks and
    config, for the checks made before any weight is read."""
    from . import IntervenableLM
    with torch.device("meta"), quiet_transformers():
        model = spec.lm_class._from_config(spec.config, dtype=dtype)
    return IntervenableLM(model.eval())


def load_partitioned(spec: ModelSpec, ds_config: dict, dtype: torch.dtype, on_tensor=None):
    """The IntervenableLM of a checked folder, ZeRO-3 partitioned across the process group as it is built.

    Built inside `deepspeed.zero.Init(ds_config, dtype)` (its `offload_param` device decides where the
    partitions live: the accelerator, or CPU), with transformers' weight initialisation switched off (every
    value comes from the checkpoint); then each rank reads its own slice of every tensor from the files
    (bytes [rank * part, (rank + 1) * part) of the flattened tensor, converted to `dtype`) into its partition.
    `on_tensor(model, name)` is called after each parameter is filled (tests sample the memory there).
    The parameters then belong to ZeRO-3: an engine without optimizer (engine.init_teacher_engine) gathers them
    block by block as the model runs."""
    import deepspeed
    import torch.distributed as dist
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from . import IntervenableLM
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
    import copy
    from . import adapter_for
    from .student import student_layer_map
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
