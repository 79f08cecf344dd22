"""Activation checkpointing with IIT (issue 23 item 2): the student's blocks checkpointed in every pass with
grad, including the resumed counterfactual passes and, for causal LMs, the suffix passes over the plain
pass's cached keys/values (the cache goes in and out of each checkpointed block as explicit tensors, see
`iit_fast.models`).

- fast == naive with checkpointing on, every loss term and student gradient (fp32, 1e-5), for a masked and
  two causal families, single-block and two-block teacher groups, and equal to the step without
  checkpointing;
- checkpointing is really on: autograd saves less than half the bytes during the student's passes;
- transformers' own `gradient_checkpointing_enable()` on the student is replaced by the wrapper's (it used
  to be refused: it turns the cache off);
- negative control: a checkpointed block whose keys/values leave it detached (the gradient through the
  suffix passes' cached prefix cut, what a naive checkpoint of HF's layers does) fails the comparison;
- the flag and the DeepSpeed section turn it on; one clear error for each section option it cannot honour.
Under ZeRO-2 and ZeRO-3 on 2 ranks (slow): test_checkpointing_fast_equals_naive_under_zero below.
"""
from __future__ import annotations

import pytest
import torch

from iit_fast import activation_checkpointing, models
from iit_fast.config import DistillConfig
from iit_fast.sampling import make_alignment, sample_plan
from multirank import grad_error, run_ranks, save_on_rank0
from test_step import assert_same_step, run
from test_step_decoder import causal_batch, causal_pair, plan_for
from test_train import assets  # noqa: F401  (the main job's tiny teacher, corpus and DeepSpeed configs)
from tiny import tiny_batch, tiny_pair


def case(family: str, alignment: str = "middle"):
    if family == "bert":
        teacher, student = tiny_pair(teacher_layers=4, student_layers=2)
        batch = tiny_batch((9, 5, 7, 3))
        plan = sample_plan(batch["attention_mask"], make_alignment(alignment, 4, 2), torch.Generator().manual_seed(0))
        return teacher, student, batch, plan
    teacher, student = causal_pair(family, student_layers=3)
    batch = causal_batch(left=family == "gpt2")
    generator = torch.Generator().manual_seed(2)
    return teacher, student, batch, sample_plan(batch["attention_mask"], make_alignment(alignment, 4, 3), generator)


def both(teacher, student, batch, plan, impl, **kw):
    kw = dict(ops="reference", w_iit_cos=0.3, w_mse=0.2, suffix_groups=3) | kw
    student.activation_checkpointing = impl
    try:
        naive = run(teacher, student, batch, plan, DistillConfig(mode="naive", **kw))
        fast = run(teacher, student, batch, plan, DistillConfig(mode="fast", **kw))
    finally:
        student.activation_checkpointing = None
    return naive, fast


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("logit_tokens", ["auto", "all"])
def test_checkpointing_fast_equals_naive(family, logit_tokens):
    teacher, student, batch, plan = case(family)
    plain = both(teacher, student, batch, plan, None, logit_tokens=logit_tokens)
    naive, fast = both(teacher, student, batch, plan, "torch", logit_tokens=logit_tokens)
    assert_same_step(naive, fast)
    assert_same_step(plain[1], fast)   # and the step without checkpointing
    assert_same_step(plain[0], naive)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_checkpointing_fast_equals_naive_with_teacher_groups(family):
    teacher, student, batch, plan = case(family, alignment="full")  # teacher groups of 2 blocks too
    plain = both(teacher, student, batch, plan, None)
    naive, fast = both(teacher, student, batch, plan, "torch")
    assert_same_step(naive, fast)
    assert_same_step(plain[1], fast)


def test_checkpointing_recomputes_under_the_forward_autocast(monkeypatch):
    """A block recomputed in backward runs under the autocast of its forward (bf16 here), as its forward ran
    (DeepSpeed's reentrant checkpoint, for one, does not restore it)."""
    from iit_fast.step import distill_step
    teacher, student, batch, plan = case("bert")
    phase, recomputed = ["forward"], []
    real = student.adapter.run_block

    def recording(l, h, ctx):
        if phase[0] == "backward":
            recomputed.append(torch.is_autocast_enabled("cpu"))
        return real(l, h, ctx)

    monkeypatch.setattr(student.adapter, "run_block", recording)
    student.enable_activation_checkpointing("torch")
    try:
        out = distill_step(teacher, student, batch, plan, DistillConfig(ops="reference", student_autocast="bfloat16"))
        phase[0] = "backward"
        out.loss.backward()
    finally:
        student.activation_checkpointing = None
    assert len(recomputed) >= student.num_layers and all(recomputed), recomputed


def test_checkpointing_fused_ops_fast_equals_naive():
    teacher, student, batch, plan = case("llama")
    naive, fast = both(teacher, student, batch, plan, "torch", ops="fused")
    assert_same_step(naive, fast, rtol=1e-4)  # the fused ops against the references: test_step's tolerance


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while fn runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_checkpointing_saves_less_for_backward(family):
    teacher, student, batch, plan = case(family)
    from iit_fast.step import distill_step
    cfg = DistillConfig(ops="reference", w_ce=0, w_mlm=0, w_iit=0, w_cos=0.5, w_iit_cos=0.5)  # no logit work

    def step():
        distill_step(teacher, student, batch, plan, cfg)

    off = _saved_bytes(step)
    student.enable_activation_checkpointing("torch")
    on = _saved_bytes(step)
    student.activation_checkpointing = None
    assert on < 0.5 * off, (on, off)


def test_checkpointing_replaces_transformers_gradient_checkpointing():
    """transformers' own checkpointing turns the key/value cache off (the suffix passes need it): the wrapper
    takes it over, and the step equals the naive one."""
    teacher, student = causal_pair("llama")
    batch = causal_batch()
    plan = plan_for(batch, "middle", 0)
    reference = both(teacher, student, batch, plan, None)[1]
    getattr(student.model, "activation_checkpointing_enable", student.model.gradient_checkpointing_enable)()
    kw = dict(ops="reference", w_iit_cos=0.3, w_mse=0.2, suffix_groups=3)
    fast = run(teacher, student, batch, plan, DistillConfig(mode="fast", **kw))
    assert student.activation_checkpointing == "torch"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in student.blocks)
    assert_same_step(reference, fast)


def test_checkpointing_with_detached_keys_values_fails(monkeypatch):
    """Negative control: keys/values that leave the checkpointed block detached (so the gradient of the suffix
    passes no longer reaches the plain pass through its cached prefix) must fail the comparison."""
    teacher, student, batch, plan = case("llama")
    naive, fast = both(teacher, student, batch, plan, "torch")
    assert_same_step(naive, fast)
    real = models.IntervenableLM._block_with_kv

    def detached(self, *args, **kw):
        h, k, v = real(self, *args, **kw)
        return h, k.detach(), v.detach()

    monkeypatch.setattr(models.IntervenableLM, "_block_with_kv", detached)
    naive, wrong = both(teacher, student, batch, plan, "torch")
    with pytest.raises(AssertionError, match="gradient of"):
        assert_same_step(naive, wrong)


def test_checkpointing_flag_and_deepspeed_section():
    student = models.IntervenableLM(tiny_pair(4, 2)[1].model)
    assert not activation_checkpointing.requested(False, {})
    assert activation_checkpointing.requested(True, {})
    assert activation_checkpointing.requested(False, {"activation_checkpointing": {"number_checkpoints": 4}})
    assert activation_checkpointing.enable(student, False, {}) is None and student.activation_checkpointing is None
    line = activation_checkpointing.enable(student, False, {"activation_checkpointing": {}})
    assert "torch.utils.checkpoint" in line and "DeepSpeed config" in line
    assert student.activation_checkpointing == "torch"
    for key in ("partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                "synchronize_checkpoint_boundary", "profile"):
        with pytest.raises(ValueError, match=rf"^--deepspeed_config: activation_checkpointing\.{key} .*; expected "
                                             r"false \(or leave it out\)$"):
            activation_checkpointing.check_ds_section({"activation_checkpointing": {key: True}})
    with pytest.raises(ValueError, match="activation checkpointing impl must be one of"):
        student.enable_activation_checkpointing("deepspeed")


# ---- ZeRO-2 and ZeRO-3 on 2 ranks (gloo, CPU): the engine as train.py builds it ---------------------------

RUNS = [(2, "flag"), (3, "flag"), (3, "section")]  # (ZeRO stage, asked by the flag or by the DeepSpeed section)


def _rank_case(family: str, rank: int):
    """This rank's models (the same on every rank) and its own batch and plan."""
    teacher, student, _, _ = case(family)
    if family == "bert":
        batch = tiny_batch((9, 5, 7, 3), seed=10 + rank)
        plan = sample_plan(batch["attention_mask"], make_alignment("full", 4, 2),
                           torch.Generator().manual_seed(20 + rank))
    else:
        batch = causal_batch(lengths=(9, 5, 7, 3, 8, 6)[rank:] + (9, 5, 7, 3, 8, 6)[:rank])
        plan = sample_plan(batch["attention_mask"], make_alignment("middle", 4, 3),
                           torch.Generator().manual_seed(20 + rank))
    return teacher, student, batch, plan


def worker_zero(out):
    """Per family, stage and implementation: one fast and one naive micro-step through the DeepSpeed engine,
    checkpointing on; the terms and the reduced full gradients. Plus the negative control (detached keys/values)."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from iit_fast.engine import init_distributed, init_engine, prepare_teacher, read_ds_config
    from iit_fast.optim import make_scheduler, param_groups
    from iit_fast.step import DistillStep
    rank, world, _ = init_distributed(120)
    out = Path(out)
    results = {}
    runs = [(f, s, i, m) for f in ("bert", "llama") for s, i in RUNS for m in ("naive", "fast")]
    runs.append(("llama", 3, "flag", "fast-detached"))
    only = __import__("os").environ.get("CKPT_ZERO_RUNS")  # e.g. "bert/3/torch": a subset, for a look by hand
    runs = [r for r in runs if not only or "/".join(map(str, r)).startswith(only)]
    for family, stage, impl, mode in runs:
        print(f"rank {rank}: {family} ZeRO-{stage} {impl} {mode}", flush=True)
        zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
        ds = {"train_micro_batch_size_per_gpu": 4 if family == "bert" else 6, "gradient_accumulation_steps": 1,
              "steps_per_print": 10 ** 9, "zero_optimization": zero}
        if impl == "section":
            ds["activation_checkpointing"] = {}
        path = out.parent / f"ds_{family}_{stage}_{impl}_{mode}_rank{rank}.json"
        path.write_text(json.dumps(ds))
        ds = read_ds_config(str(path), world)
        teacher, student, batch, plan = _rank_case(family, rank)
        assert activation_checkpointing.enable(student, impl == "flag", ds)
        cfg = DistillConfig(mode=mode.split("-")[0], ops="reference", w_iit_cos=0.3, w_mse=0.2, suffix_groups=3)
        teacher = prepare_teacher(teacher, ds, False)
        engine = init_engine(ds, DistillStep(teacher, student, cfg), param_groups(student, 0.01), 1e-3,
                             lambda opt: make_scheduler(opt, "constant", 0, 1))
        real = models.IntervenableLM._block_with_kv
        if mode == "fast-detached":
            def detached(self, *args, **kw):
                h, k, v = real(self, *args, **kw)
                return h, k.detach(), v.detach()
            models.IntervenableLM._block_with_kv = detached
        try:
            loss, terms = engine(batch, plan)
            engine.backward(loss)
        finally:
            models.IntervenableLM._block_with_kv = real
        grads = {n: safe_get_full_grad(p).detach().clone().float()
                 for n, p in engine.module.student.named_parameters()}
        results[f"{family}/{stage}/{impl}/{mode}"] = {"terms": {k: float(v) for k, v in terms.items()},
                                                     "grads": grads}
        engine.destroy()
        dist.barrier()
    save_on_rank0(results, out)


@pytest.mark.slow
def test_checkpointing_fast_equals_naive_under_zero(tmp_path):
    """ZeRO-2 and ZeRO-3, 2 gloo ranks, a masked and a causal family, checkpointing asked by the flag or by the
    DeepSpeed config's section:
    the fast step's terms and reduced gradients equal the naive step's (fp32, 1e-5); detached keys/values
    (the negative control) do not."""
    from pathlib import Path
    out = run_ranks(__file__, tmp_path, 2, tmp_path / "zero.pt", timeout=1200,
                    env={"PYTHONPATH": str(Path(__file__).parent)})
    for rank, res in enumerate(torch.load(out, weights_only=False)):
        for family in ("bert", "llama"):
            for stage, impl in RUNS:
                naive, fast = (res[f"{family}/{stage}/{impl}/{m}"] for m in ("naive", "fast"))
                assert naive["terms"].keys() == fast["terms"].keys() >= {"ce", "iit", "iit_cos", "mse"}
                for k, v in naive["terms"].items():
                    assert abs(fast["terms"][k] - v) <= 1e-5 * abs(v), (rank, family, stage, impl, k)
                err = grad_error(fast["grads"], naive["grads"])
                assert err <= 1e-5, f"{family} ZeRO-{stage} {impl}: gradient differs by {err:.2e}"
        wrong = grad_error(res["llama/3/flag/fast-detached"]["grads"], res["llama/3/flag/naive"]["grads"])
        assert wrong > 1e-3, f"detached keys/values should change the gradient, changed it by {wrong:.2e}"


if __name__ == "__main__":  # a rank of test_checkpointing_fast_equals_naive_under_zero
    worker_zero(__import__("sys").argv[1])


# ---- the main job -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_checkpointing_main_job_runs(tmp_path, assets):
    """train.py with --activation_checkpointing on a Llama-style teacher under ZeRO-3 (the causal fast step with
    its suffix passes, the index made on the CPU), and a BERT one asked by the DeepSpeed section: they train,
    and say that checkpointing is on and why."""
    import json
    from pathlib import Path

    from test_train import decoder_teachers, finish, launch, steps_of
    llama = decoder_teachers(tmp_path)["llama"]
    section = tmp_path / "zero2_ckpt.json"
    section.write_text(json.dumps(dict(json.loads(Path(assets["ds"][2]).read_text()),
                                       activation_checkpointing={})))
    runs = {"flag": launch(assets, tmp_path / "run_flag", steps=2, teacher=llama, eval_sequences=8, stage=3,
                           activation_checkpointing=True),
            "section": launch(assets, tmp_path / "run_section", steps=2, eval_sequences=8, deepspeed_config=section)}
    for name, p in runs.items():
        out = tmp_path / f"run_{name}"
        text = finish(p, out, timeout=600)
        assert "activation checkpointing of the student's" in text, text[-2000:]
        assert ("--activation_checkpointing" if name == "flag" else "DeepSpeed config's") in text
        assert [r["step"] for r in steps_of(out)] == [1, 2], text[-2000:]
