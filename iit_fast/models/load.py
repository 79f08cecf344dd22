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
- `load_partitioned` (models/partitioned.py): the model built inside `deepspeed.zero.Init` (each module's
  parameters are cut into ZeRO-3 partitions as soon as it is constructed) and every rank then reads *its own
  slice* of each tensor straight from the safetensors files into its partition: no rank holds a whole tensor
  it does not own, except one module's freshly constructed weights for an instant. Needs the process group.
- `init_student_from_checkpoint` (models/partitioned.py): a student initialised from the teacher's blocks read
  from its files, so a teacher that is never loaded whole (partitioned, or replaced by a teacher cache) can
  still seed it.
`meta_model` gives the model of a checked folder with no storage, for the checks made before any weight is read.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from .intervenable import IntervenableLM
from .registry import ADAPTERS, supported_classes

KINDS = ("masked", "causal")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


@contextlib.contextmanager
def quiet_transformers():
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


def meta_model(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """The IntervenableLM of a checked folder with no storage (on the meta device): its sizes, blocks and
    config, for the checks made before any weight is read."""
    with torch.device("meta"), quiet_transformers():
        model = spec.lm_class._from_config(spec.config, dtype=dtype)
    return IntervenableLM(model.eval())
