"""A student initialised from its teacher: the teacher's family, a subset of its blocks, and optionally
narrower widths (`--student_config`).

Depth: the student keeps `student_layer_map(teacher layers, student layers)` of the teacher's blocks, spread
evenly and always the last (DistilBERT / DistilGPT2 style).

Widths (`student_config`: any of hidden_size, num_attention_heads, num_key_value_heads, intermediate_size;
each at most the teacher's): every tensor is the teacher's, cut to the student's shape by **plain
leading-channel slicing**: the first hidden_size channels of the residual stream (embeddings, norms, every
projection's input or output on it), the first heads (with the teacher's head size, the first
heads x head_dim rows of q/k/v and columns of the output projection), the first key/value heads, the first
intermediate_size MLP neurons. GPT-2's fused q/k/v projection is cut per part. Why this rule: it is
data-free and deterministic, the same for every family, and it gives each narrower block the function of
the teacher's block restricted to those channels, which distillation then repairs; Minitron's rule
(rank channels, heads and neurons by activation norm on a few batches, keep the top ones) would keep
better channels, at the price of a calibration pass, and is not done here. A permutation of residual
channels, heads or neurons leaves a transformer's function unchanged, so that rule is a permutation of the
teacher followed by this slicing. A narrower student has no `cos` / `iit_cos` term (they compare states of
equal width); `mse` goes through the learned site projection (`IntervenableLM.attach_site_projection`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .registry import adapter_for

WIDTH_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
STUDENT_KEYS = ("num_layers",) + WIDTH_KEYS
_INTERMEDIATE = {"distilbert": "hidden_dim", "gpt2": "n_inner"}  # else `intermediate_size`


def student_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks copied into the student: spread evenly, always the last (12 -> 6: 0,2,4,7,9,11)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student_layers must be in 1..{teacher_layers} (the teacher's), got {student_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def read_student_config(spec) -> dict:
    """`--student_config`: a dict, inline JSON (`{"hidden_size": 256}`), or the path of a JSON file; its keys
    are STUDENT_KEYS, each a positive integer. Anything else is one ValueError naming the flag."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        values = dict(spec)
    else:
        text = str(spec).strip()
        if Path(text).expanduser().is_file():
            text = Path(text).expanduser().read_text()
        elif not text.startswith(("{", "[")):
            raise ValueError(f"--student_config {spec}: neither inline JSON nor a JSON file that exists; expected "
                             f"e.g. '{{\"hidden_size\": 512}}' or a path")
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--student_config {spec}: not JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--student_config {spec}: expected a JSON object of {', '.join(STUDENT_KEYS)}")
    unknown = sorted(set(values) - set(STUDENT_KEYS))
    if unknown:
        raise ValueError(f"--student_config: unknown key(s) {unknown}; expected some of {list(STUDENT_KEYS)}")
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--student_config: {k} = {v!r}; expected a positive integer")
    return values


def teacher_widths(config, family: str) -> dict:
    """The teacher's hidden_size, heads, key/value heads, head size and intermediate size."""
    heads = config.num_attention_heads
    inter = getattr(config, _INTERMEDIATE.get(family, "intermediate_size"), None) or 4 * config.hidden_size
    return {"hidden_size": config.hidden_size, "num_attention_heads": heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads, "intermediate_size": inter}


def student_widths(teacher_config, family: str, wanted: dict) -> dict:
    """The student's widths: `wanted`, completed from the teacher's, checked against what the family can
    build and what slicing the teacher can initialise (nothing wider than the teacher). A missing head count
    keeps the teacher's head size (heads = hidden_size / head_dim); a missing key/value head count keeps the
    teacher's query heads per key/value head."""
    t = teacher_widths(teacher_config, family)
    w = {k: v for k, v in wanted.items() if k in WIDTH_KEYS}
    if "num_key_value_heads" in w and family != "llama":
        raise ValueError(f"--student_config: num_key_value_heads does not apply to a {family} model (it has one "
                         f"key/value head per attention head); expected it only for Llama-family teachers")
    hidden = w.get("hidden_size", t["hidden_size"])
    if "num_attention_heads" not in w:
        if hidden % t["head_dim"]:
            raise ValueError(f"--student_config: hidden_size {hidden} is not a multiple of the teacher's head size "
                             f"{t['head_dim']}; give num_attention_heads too (hidden_size must be a multiple of it)")
        w["num_attention_heads"] = hidden // t["head_dim"]
    heads = w["num_attention_heads"]
    if "num_key_value_heads" not in w:
        group = t["num_attention_heads"] // t["num_key_value_heads"]
        w["num_key_value_heads"] = max(1, heads // group)
    w.setdefault("hidden_size", hidden)
    w.setdefault("intermediate_size", t["intermediate_size"])
    for k in WIDTH_KEYS:
        if w[k] > t[k]:
            raise ValueError(f"--student_config: {k} = {w[k]} is more than the teacher's {t[k]}; expected at most "
                             f"the teacher's (a student is initialised by slicing the teacher's weights)")
    if hidden % heads:
        raise ValueError(f"--student_config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                         f"expected hidden_size = heads x head size")
    if heads % w["num_key_value_heads"]:
        raise ValueError(f"--student_config: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{w['num_key_value_heads']}; expected each key/value head shared by as many query heads")
    return w


def _apply_widths(config, family: str, w: dict):
    config.hidden_size = w["hidden_size"]  # attribute_map: n_embd (GPT-2), dim (DistilBERT)
    config.num_attention_heads = w["num_attention_heads"]
    if family == "llama":
        config.num_key_value_heads = w["num_key_value_heads"]
        config.head_dim = w["hidden_size"] // w["num_attention_heads"]
    setattr(config, _INTERMEDIATE.get(family, "intermediate_size"), w["intermediate_size"])
    return config


def _slice(name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The teacher tensor `t` cut to `shape` by its leading entries along every dimension; GPT-2's fused
    q/k/v (Conv1D, (D, 3D) and (3D,)) is cut as three parts."""
    if t.shape == shape:
        return t.clone()
    if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
        parts = t.chunk(3, dim=-1)
        return torch.cat([_slice("", p, shape[:-1] + (shape[-1] // 3,)) for p in parts], dim=-1)
    if len(t.shape) != len(shape) or any(s > n for s, n in zip(shape, t.shape)):
        raise RuntimeError(f"student init: {name} has shape {tuple(t.shape)} in the teacher and "
                           f"{tuple(shape)} in the student; expected the student's to fit inside")
    return t[tuple(slice(0, s) for s in shape)].clone()


def init_student_from_teacher(teacher: nn.Module, student_layers: int, widths: dict | None = None) -> nn.Module:
    """A student of the teacher's family: the teacher's embeddings, head, final norm and a layer subset,
    at the teacher's widths, or narrower ones (`widths`: keys of WIDTH_KEYS; `student_config` in full,
    num_layers included, is read by `student_from_config`) cut from the teacher's tensors (module docstring).
    `teacher` is the HF model (e.g. `IntervenableLM.model`)."""
    adapter = adapter_for(teacher)  # also: a clear error for an unsupported model, before its config is read
    layers = student_layer_map(len(adapter.blocks), student_layers)
    config = adapter.student_config(copy.deepcopy(teacher.config), layers)
    if widths:
        family = type(adapter).family  # the adapter's: "llama" for Qwen2 and Mistral too
        config = _apply_widths(config, family, student_widths(teacher.config, family, widths))
    student = type(teacher)(config)
    prefix = adapter.layer_prefix()
    new_state = {}
    for k, v in teacher.state_dict().items():
        if k.startswith(prefix):
            idx, rest = k[len(prefix):].split(".", 1)
            if int(idx) in layers:
                new_state[f"{prefix}{layers.index(int(idx))}.{rest}"] = v
        else:
            new_state[k] = v
    target = student.state_dict()
    new_state = {k: _slice(k, v, target[k].shape) if k in target else v for k, v in new_state.items()}
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    student.tie_weights()
    # a key may be missing only because it is tied to one that was loaded (the decoder to the embeddings)
    state = student.state_dict()
    loaded = {state[k].data_ptr() for k in new_state if k in state}
    missing = [k for k in missing if state[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"student init from teacher: missing {missing}, unexpected {unexpected}")
    return student


def check_student_config(teacher: nn.Module, student_config, student_layers: int) -> int:
    """`student_config` read and checked against the teacher (its structure is enough: a model on the meta
    device will do), before any weight is read. Returns the student's number of layers."""
    values = read_student_config(student_config)
    layers = values.pop("num_layers", student_layers)
    adapter = adapter_for(teacher)
    if not 1 <= layers <= len(adapter.blocks):
        raise ValueError(f"--student_config: num_layers = {layers}; expected 1..{len(adapter.blocks)} (the "
                         f"teacher's blocks)")
    student_widths(teacher.config, type(adapter).family, values)
    return layers


def student_from_config(teacher: nn.Module, student_config, student_layers: int) -> nn.Module:
    """`init_student_from_teacher` from a `--student_config` (dict, inline JSON or a JSON file): its
    num_layers, when given, replaces `student_layers`. Errors (a key the family has not, a width wider than
    the teacher's, heads that do not divide) are raised before any model is built."""
    values = read_student_config(student_config)
    layers = values.pop("num_layers", student_layers)
    student_widths(teacher.config, type(adapter_for(teacher)).family, values)  # checked first: its errors name the flag
    return init_student_from_teacher(teacher, layers, values)
