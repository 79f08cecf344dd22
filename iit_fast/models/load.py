"""One loader for every supported family: a local Hugging Face folder -> (IntervenableLM, tokenizer).

Every check names the argument at fault and what was expected, before any weight is read: the folder,
config.json, a supported model_type, weights, LM-head weights, the tokenizer and its size and special
tokens, and the kind of LM asked for. Weights load safely (safetensors, or torch's weights_only loader
for a legacy .bin) and must cover the whole model: a tensor that the checkpoint lacks is an error, not
a silent random initialisation.
"""
from __future__ import annotations

import contextlib
import json
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


def load_model(path, *, kind: str | None = None, tokenizer_path=None, arg: str = "path",
               dtype: torch.dtype = torch.float32):
    """(IntervenableLM in eval mode, tokenizer) from a local Hugging Face checkpoint folder.

    kind: None (any supported LM), "masked" or "causal" (an error when the folder holds the other kind).
    tokenizer_path: a folder with the tokenizer, default `path`. arg: the name errors give `path` (e.g.
    "teacher"). dtype: the parameters' dtype (fp32 by default, whatever the checkpoint stores).
    The tokenizer is returned as transformers loads it: a causal LM's may have no pad token (the attention mask, not the
    pad id, tells padding apart).
    """
    from . import ADAPTERS, IntervenableLM, supported_classes
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
    names = weight_names(folder)
    if not names:
        raise FileNotFoundError(f"{arg}: {folder} has no weights; expected model.safetensors (or a shard index, "
                                f"or pytorch_model.bin)")
    head = adapter.head_weight_prefixes(config)
    if head and not any(n.startswith(head) for n in names):
        hint = (f" An encoder-only model can be turned into one with `python -m iit_fast.teacher build "
                f"--encoder {folder}`" if adapter.family == "bert" else "")
        raise ValueError(f"{arg}: {folder} has no LM head weights (no {' / '.join(p + '*' for p in head)} among "
                         f"its {len(names)} tensors; architectures {config.architectures}); expected a "
                         f"{lm_class.__name__} checkpoint.{hint}")
    tok_dir = Path(tokenizer_path).expanduser() if tokenizer_path is not None else folder
    tokenizer = load_tokenizer(tok_dir, config.vocab_size, adapter.kind,
                               "tokenizer_path" if tokenizer_path is not None else arg)
    safetensors = any(folder.glob("*.safetensors"))
    with quiet_transformers():
        model, info = lm_class.from_pretrained(folder, config=config, dtype=dtype, output_loading_info=True,
                                               use_safetensors=True if safetensors else None)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{arg}: the checkpoint in {folder} does not fit a {lm_class.__name__} of its own config: "
                         + "; ".join(f"{k} {sorted(map(str, v))[:8]}" for k, v in bad.items())
                         + "; expected every tensor of the model, of its configured shape")
    return IntervenableLM(model).eval(), tokenizer


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
