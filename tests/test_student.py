"""A student from a config (`--student_config`): the teacher's family with chosen layers and narrower widths,
initialised by leading-channel slicing of the teacher (iit_fast/models/student.py), for every family."""
from __future__ import annotations

import json

import pytest
import torch

from iit_fast.models import IntervenableLM
from iit_fast.models.student import (init_student_from_teacher, read_student_config, student_from_config,
                                     student_layer_map, teacher_widths)
from tiny import TINY, TINY_CAUSAL

MAKERS = {**TINY, **TINY_CAUSAL}
FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama", "qwen2"]
INTER = {"distilbert": "hidden_dim", "gpt2": "n_inner"}


def teacher_of(family):
    return MAKERS[family](layers=4, hidden=32, heads=4)


def _mlp_neurons(family, model, layer):
    """(input-side weight and bias with one row / column per neuron, output-side weight) of a block's MLP,
    each with the neuron dimension named: what zeroing a neuron touches."""
    if family in ("bert", "roberta"):
        b = model.base_model.encoder.layer[layer]
        return [(b.intermediate.dense.weight, 0), (b.intermediate.dense.bias, 0), (b.output.dense.weight, 1)]
    if family == "distilbert":
        b = model.distilbert.transformer.layer[layer].ffn
        return [(b.lin1.weight, 0), (b.lin1.bias, 0), (b.lin2.weight, 1)]
    if family == "gpt2":
        b = model.transformer.h[layer].mlp  # Conv1D: weight (in, out)
        return [(b.c_fc.weight, 1), (b.c_fc.bias, 0), (b.c_proj.weight, 0)]
    b = model.model.layers[layer].mlp
    return [(b.gate_proj.weight, 0), (b.up_proj.weight, 0), (b.down_proj.weight, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_student_config_narrower_mlp_computes_the_teacher_without_those_neurons(family):
    """The slicing keeps the first intermediate_size neurons of every MLP, consistently on both sides (the
    input projection's rows, the output projection's columns): a teacher whose other neurons are zeroed and
    its student of all 4 layers with only the kept neurons give the same logits."""
    teacher = teacher_of(family)
    keep = 24 if family != "gpt2" else 40
    with torch.no_grad():
        for l in range(4):
            for w, dim in _mlp_neurons(family, teacher, l):
                w.narrow(dim, keep, w.shape[dim] - keep).zero_()
    student = student_from_config(teacher, {"num_layers": 4, "intermediate_size": keep}, 2)
    assert getattr(student.config, INTER.get(family, "intermediate_size")) == keep
    ids = torch.randint(6, 90, (2, 9))
    with torch.no_grad():
        assert torch.allclose(student.eval()(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)
    # negative control: zero another set of neurons of the teacher, and the student no longer matches it
    with torch.no_grad():
        for w, dim in _mlp_neurons(family, teacher, 0):
            w.narrow(dim, 0, 4).zero_()
        assert not torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_student_config_narrower_everything_builds_runs_and_is_sliced(family):
    teacher = teacher_of(family)
    spec = {"num_layers": 2, "hidden_size": 16, "intermediate_size": 20}
    student = student_from_config(teacher, json.dumps(spec), 3)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (2, 16, 2)  # the teacher's head size 8 kept
    if family in ("llama", "qwen2"):
        assert c.num_key_value_heads == 1 and c.head_dim == 8  # 2 query heads per key/value head, as the teacher
    s, t = student.state_dict(), teacher.state_dict()
    layers = student_layer_map(4, 2)  # [0, 3]
    for name, v in s.items():
        src = name
        for prefix in ("encoder.layer.", "transformer.layer.", "transformer.h.", "model.layers."):
            if prefix in name:
                head, rest = name.split(prefix, 1)
                i, rest = rest.split(".", 1)
                src = f"{head}{prefix}{layers[int(i)]}.{rest}"
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            parts = [p[..., :16] if p.dim() == 1 else p[:16, :16] for p in t[src].chunk(3, dim=-1)]
            assert torch.equal(v, torch.cat(parts, dim=-1)), name
            continue
        assert torch.equal(v, t[src][tuple(slice(0, n) for n in v.shape)]), name
    lm = IntervenableLM(student)
    ids = torch.randint(6, 90, (2, 7))
    out = lm(ids, torch.ones_like(ids), keep=(0, 1))
    assert out.last_hidden.shape == (2, 7, 16) and torch.isfinite(lm.logits(out.last_hidden)).all()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_student_config_at_the_teachers_widths_is_the_plain_layer_subset(family):
    teacher = teacher_of(family)
    a = init_student_from_teacher(teacher, 2).state_dict()
    w = teacher_widths(teacher.config, teacher.config.model_type if family != "llama" else "llama")
    b = student_from_config(teacher, {k: w[k] for k in ("hidden_size", "intermediate_size")}, 2).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_student_config_the_family_cannot_build_is_one_clear_error(tmp_path):
    bert, llama = teacher_of("bert"), teacher_of("llama")
    cases = [
        (bert, {"hidden": 16}, r"--student_config: unknown key\(s\) \['hidden'\]; expected some of"),
        (bert, {"hidden_size": 64}, r"--student_config: hidden_size = 64 is more than the teacher's 32"),
        (bert, {"num_key_value_heads": 2}, r"--student_config: num_key_value_heads does not apply to a bert model"),
        (bert, {"hidden_size": 20}, r"--student_config: hidden_size 20 is not a multiple of the teacher's head size 8"),
        (bert, {"hidden_size": 30, "num_attention_heads": 4}, r"--student_config: hidden_size 30 is not a multiple "
                                                             r"of num_attention_heads 4"),
        (llama, {"num_attention_heads": 3, "num_key_value_heads": 2, "hidden_size": 24},
         r"--student_config: num_attention_heads 3 is not a multiple of num_key_value_heads 2"),
        (bert, {"num_layers": 0}, r"--student_config: num_layers = 0; expected a positive integer"),
        (bert, "{not json", r"--student_config \{not json: not JSON"),
        (bert, str(tmp_path / "missing.json"), r"--student_config .*missing\.json: neither inline JSON nor a JSON file"),
        (bert, "[1, 2]", r"--student_config \[1, 2\]: expected a JSON object"),
    ]
    for teacher, spec, msg in cases:
        with pytest.raises(ValueError, match=msg):
            student_from_config(teacher, spec, 2)
    with pytest.raises(ValueError, match="student_layers must be in 1..4"):
        student_from_config(bert, {"num_layers": 5}, 2)
    (tmp_path / "s.json").write_text('{"hidden_size": 16}')
    assert read_student_config(str(tmp_path / "s.json")) == {"hidden_size": 16}
