"""The planner (iit_fast/plan.py): its arithmetic against quantities computed independently on tiny models,
its ZeRO accounting, the largest micro-batch, and bad input. No 1B models here: the real-shape check is
benchmarks/results/planner-validation.md."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from iit_fast import cli
from iit_fast.models import IntervenableLM
from iit_fast.models.student import init_student_from_teacher
from iit_fast.plan import BLOCK_CENSUS, PlanInput, dims_of, max_micro_batch, plan


def tiny_llama(**kw):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_qwen2(**kw):
    base = dict(vocab_size=310, hidden_size=56, intermediate_size=144, num_hidden_layers=4, num_attention_heads=7,
                num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
    base.update(kw)
    return Qwen2Config(**base)


@pytest.mark.parametrize("make,cls", [(tiny_llama, LlamaForCausalLM), (tiny_qwen2, Qwen2ForCausalLM)])
@pytest.mark.parametrize("tied", [True, False])
def test_plan_parameter_bytes_equal_the_real_models(make, cls, tied):
    cfg = make(tie_word_embeddings=tied)
    torch.manual_seed(0)
    teacher = cls(cfg)
    student = init_student_from_teacher(teacher, 2)
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied tensors once)
    p = plan(PlanInput(teacher=cfg, student_layers=2, seq=32, micro_batch=2, precision="bf16-autocast"))
    assert p.parts["teacher weights"] == numel(teacher) * 2           # bf16 teacher
    assert p.parts["student weights"] == numel(student) * 4           # fp32 master weights
    assert p.parts["student grads"] == numel(student) * 4
    assert p.parts["optimizer state"] == numel(student) * 8           # AdamW: two fp32 moments
    # a different student size must change the figure (the count reads the student, not a constant)
    p3 = plan(PlanInput(teacher=cfg, student_layers=3, seq=32, micro_batch=2, precision="bf16-autocast"))
    assert p3.parts["student weights"] == numel(init_student_from_teacher(teacher, 3)) * 4 != p.parts["student weights"]


def _saved_bytes_per_token(cfg, precision: str, S: int) -> float:
    """Bytes autograd keeps for backward in one student pass of `cfg`'s blocks (a saved-tensor census: each
    storage once, parameters and the pass's input excluded), at sequence length S, batch 1."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg) if cfg.model_type == "llama" else Qwen2ForCausalLM(cfg)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    lm = IntervenableLM(model).train()
    ids = torch.randint(0, cfg.vocab_size, (1, S))
    am = torch.ones_like(ids)
    h0 = lm.embed(ids, None, am).detach().requires_grad_()
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() != h0.untyped_storage().data_ptr():
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        lm(None, am, resume_from=0, states=h0, padded=False)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["bf16-autocast", "fp32", "bf16"])
@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(hidden_size=96, intermediate_size=256,
                                                                  num_attention_heads=8, num_key_value_heads=4),
                                  tiny_qwen2])
def test_plan_block_activation_census_matches_saved_tensors(precision, make):
    """The per-block, per-token bytes of the activation model equal what autograd keeps, measured (the slope
    between two sequence lengths: the autocast weight copies are a constant per pass)."""
    cfg = make()
    d = dims_of(cfg)
    slope = (_saved_bytes_per_token(cfg, precision, 128) - _saved_bytes_per_token(cfg, precision, 64)) / 64
    cD, cI, cK, cH, c1 = BLOCK_CENSUS[precision]
    r = 2 if precision == "bf16" else 4
    # the model keeps every block's census; the first block's input (h0) is not counted above
    predicted = d.layers * (cD * d.D + cI * d.I + cK * d.K + cH * d.H + c1) - r * d.D
    assert slope == pytest.approx(predicted, rel=0.03), (slope, predicted)
    # negative control: the census of a wider MLP is not the narrower one's figure
    assert predicted != pytest.approx(d.layers * (cD * d.D + cI * 2 * d.I + cK * d.K + cH * d.H + c1) - r * d.D,
                                      rel=0.03)


def test_plan_zero_stages_divide_what_zero_partitions():
    base = PlanInput(teacher=tiny_llama(), student_layers=2, seq=64, micro_batch=2, precision="bf16", world_size=8)
    parts = {z: plan(dataclasses.replace(base, zero_stage=z)).parts for z in range(4)}
    P = parts[0]["student weights"] // 2
    assert parts[0]["optimizer state"] == 12 * P and parts[1]["optimizer state"] == 12 * P // 8
    assert parts[1]["student grads"] == 2 * P and parts[2]["student grads"] == 2 * P // 8
    assert parts[2]["student weights"] == 2 * P and parts[3]["student weights"] == 2 * P // 8
    rep = plan(base).parts["teacher weights"]
    z3 = plan(dataclasses.replace(base, teacher_plan="zero3")).parts["teacher weights"]
    off = plan(dataclasses.replace(base, teacher_plan="zero3-offload")).parts["teacher weights"]
    assert off < z3 < rep


def test_plan_checkpointing_and_fast_mode_cost_less_activation_memory():
    base = PlanInput(teacher=tiny_llama(num_hidden_layers=8), student_layers=4, seq=256, micro_batch=8,
                     optimizer=False)
    acts = lambda p: p.total - sum(p.parts[k] for k in ("teacher weights", "student weights"))  # noqa: E731
    fast, naive = plan(base), plan(dataclasses.replace(base, mode="naive"))
    ck = plan(dataclasses.replace(base, activation_checkpointing=True))
    assert acts(fast) < acts(naive)
    assert ck.parts["student activations"] < fast.parts["student activations"]
    worst, expected = plan(base), plan(dataclasses.replace(base, q0="expected"))
    assert expected.parts["counterfactual passes"] < worst.parts["counterfactual passes"]


def test_plan_max_micro_batch_is_the_largest_that_fits():
    base = PlanInput(teacher=tiny_llama(), student_layers=2, seq=128, micro_batch=1)
    budget = plan(dataclasses.replace(base, micro_batch=37)).total + 1
    b, p = max_micro_batch(base, budget)
    assert b == 37 and p.total <= budget
    assert plan(dataclasses.replace(base, micro_batch=38)).total > budget
    assert max_micro_batch(base, 1)[0] == 0


def test_plan_bad_input_is_one_error_naming_it():
    with pytest.raises(ValueError, match="positions"):
        plan(PlanInput(teacher=tiny_llama(), student_layers=2, seq=512))          # 256 positions
    with pytest.raises(ValueError, match="not modelled"):
        plan(PlanInput(teacher=BertConfig(), student_layers=2, seq=64))
    with pytest.raises(ValueError, match="student_layers"):
        plan(PlanInput(teacher=tiny_llama(), student_layers=9, seq=64))
    with pytest.raises(ValueError, match="zero_stage"):
        plan(PlanInput(teacher=tiny_llama(), student_layers=2, seq=64, zero_stage=4))


def test_plan_cli_prints_the_parts_and_the_fit(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_llama().to_dict()))
    assert cli.main(["plan", "--teacher", str(path), "--student_layers", "2", "--seq", "128", "--micro_batch", "4",
                     "--device_memory_gb", "0.05", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    parts = out["parts_bytes"]
    resident = sum(parts[k] for k in ("teacher weights", "student weights", "optimizer state", "teacher activations"))
    assert resident + parts["student grads"] <= out["peak_bytes"] <= sum(parts.values()) + parts["student weights"]
    assert out["max_micro_batch"] >= 1
    assert cli.main(["plan", "--teacher", str(path), "--student_layers", "2", "--seq", "4096"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "positions" in err[0]


def test_plan_fit_warning_names_the_figure_only_when_the_step_does_not_fit():
    from types import SimpleNamespace

    from iit_fast.config import DistillConfig
    from iit_fast.plan import fit_warning
    teacher = SimpleNamespace(config=tiny_llama())
    student = SimpleNamespace(config=tiny_llama(num_hidden_layers=2))
    cfg = SimpleNamespace(max_length=128, distill=DistillConfig(), activation_checkpointing=False,
                          teacher_deepspeed_config=None)
    ds = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 0}}
    assert fit_warning(teacher, student, cfg, ds, 8, 1, "cpu") is None           # a few MB
    line = fit_warning(teacher, student, cfg, ds, 2_000_000, 1, "cpu")           # ~TBs of activations
    assert line.startswith("warning: the planner puts micro-batch 2000000") and "GiB" in line
    assert "\n" not in line and "fits" in line
    bert = SimpleNamespace(config=BertConfig())
    assert fit_warning(bert, bert, cfg, ds, 2_000_000, 1, "cpu") is None          # not modelled: no claim


def test_plan_head_loss_gradients_held_on_cpu_for_small_decoders():
    """The planner follows distill_head_loss's choice: on the CPU a decoder whose fp32 gradient fits the op's
    RESIDENT_GRAD_BYTES has each call's gradients held from forward to backward (2 calls with IIT); a GPU,
    or a decoder over the budget, holds one transient dW."""
    import iit_fast.ops.head_loss as head_loss
    import iit_fast.plan as plan_module
    assert plan_module.RESIDENT_GRAD_BYTES == head_loss.RESIDENT_GRAD_BYTES
    small = tiny_llama()
    V, D, N = small.vocab_size, small.hidden_size, 2 * 32
    base = PlanInput(teacher=small, student_layers=2, seq=32, micro_batch=2, precision="bf16-autocast")
    gpu, cpu = plan(base), plan(dataclasses.replace(base, device="cpu"))
    held = cpu.parts["head-loss buffers"] - gpu.parts["head-loss buffers"]
    assert held == 2 * (V * D * 4 + N * D * 4) - V * D * 4
    big = dataclasses.replace(base, teacher=tiny_llama(vocab_size=128256, hidden_size=2048 // 4 * 4))
    assert plan(dataclasses.replace(big, device="cpu")).parts["head-loss buffers"] == plan(big).parts["head-loss buffers"]
    # --head_resident_grad_mb reaches the planner: 0 never holds, a budget over the decoder's gradient holds
    assert plan(dataclasses.replace(base, device="cpu", head_resident_grad_bytes=0)).parts["head-loss buffers"] \
        == gpu.parts["head-loss buffers"]
    held_big = plan(dataclasses.replace(big, device="cpu", head_resident_grad_bytes=2 * 2**30))
    assert held_big.parts["head-loss buffers"] > plan(big).parts["head-loss buffers"] + 128256 * 2048 * 4


def test_plan_backward_phases_and_the_decoder_gradients():
    """The peak's phases: a tied decoder adds its embedding's dense gradient to the end of backward (an untied
    one does not); with iit, two head-loss calls each return a (V, D) gradient (both live before they reach the
    weight), without it one; the teacher's block working set is a part of its own, not a resident one."""
    V, D = 300, 64
    g = V * D * 4
    base = PlanInput(teacher=tiny_llama(), student_layers=2, seq=64, micro_batch=2, precision="fp32",
                     optimizer=False)
    assert dims_of(tiny_llama()).tied and not dims_of(tiny_llama(tie_word_embeddings=False)).tied
    tied, untied = plan(base), plan(dataclasses.replace(base, teacher=tiny_llama(tie_word_embeddings=False)))
    assert tied.embed_grad == g and untied.embed_grad == 0
    assert tied.head_grad == 2 * g
    assert plan(dataclasses.replace(base, mode="standard")).head_grad == g
    assert tied.parts["teacher working set"] > 0
    pa = tied.parts
    resident = pa["teacher weights"] + pa["student weights"] + pa["optimizer state"] + pa["teacher activations"]
    start = (pa["student activations"] + pa["counterfactual passes"] + tied.head_grad
             + max(pa["head-loss buffers"], pa["backward working set"]))
    end = pa["student grads"] + max(pa["backward working set"], tied.embed_grad)
    assert tied.total == resident + max(start, end, pa["teacher working set"])
