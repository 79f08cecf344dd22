"""On-policy (--on_policy_fraction) and sequence-level (--seq_kd) data for causal LMs (iit_fast/generate.py).

- Rows: a generated row's attention mask, labels and loss mask (prompt out of every loss, EOS in, padding
  after it), hand-made sequences with known answers; the source of a micro-batch (lambda's share, the same
  on every rank); sampling seeded by its key and leaving the run's RNG alone.
- The step on generated rows: fast == naive with the loss mask (ce, iit, mlm on the continuation only), a
  mask that keeps every position equals today's step exactly, and a negative control (the mask changes ce).
- The main job: bad input is one `error:` line before work; lambda = 0 is today's run bit for bit; a run with
  lambda = 0.5 and seq_kd, killed and resumed, equals the uninterrupted one; 2 ranks under ZeRO-3 (student
  and teacher partitioned, gathered for generation) equal 2 ranks under ZeRO-2 (slow).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iit_fast.config import DistillConfig  # noqa: E402
from iit_fast.generate import continuation_batch, prompt_length, sample, source_of  # noqa: E402
from iit_fast.models import IntervenableLM  # noqa: E402
from test_step import assert_same_step, run  # noqa: E402
from test_step_decoder import causal_pair, plan_for  # noqa: E402
from test_train import assets, decoder_teachers, finish, flags, launch, run_main, steps_of  # noqa: E402,F401

EOS, PAD = 5, 0


# ---- rows ---------------------------------------------------------------------------------------------

def test_on_policy_rows_masks_and_labels():
    """Prompt of 3; continuations: EOS in the middle, none, EOS first, EOS last. The row is real up to and
    including its first EOS; the loss positions are those whose next token was generated (from P - 1 on);
    seq_kd labels the continuation, on-policy labels nothing; the prompt is in no loss."""
    P = 3
    seqs = torch.tensor([[11, 12, 13, 21, EOS, 22, 23],     # EOS at column 4: real 0..4
                         [11, 12, 13, 21, 22, 23, 24],      # no EOS: all real
                         [11, 12, 13, EOS, 9, 9, 9],        # EOS first: real 0..3
                         [11, 12, 13, 21, 22, 23, EOS]])    # EOS last
    ends = [5, 7, 4, 7]
    for seq_kd in (True, False):
        b = continuation_batch(seqs, P, EOS, PAD, labels_from_continuation=seq_kd)
        for i, end in enumerate(ends):
            assert b["attention_mask"][i].tolist() == [1] * end + [0] * (7 - end)
            assert b["input_ids"][i, :end].tolist() == seqs[i, :end].tolist()
            assert (b["input_ids"][i, end:] == PAD).all()
            want = [-100] * P + seqs[i, P:end].tolist() + [-100] * (7 - end) if seq_kd else [-100] * 7
            assert b["labels"][i].tolist() == want
            assert b["loss_mask"][i].tolist() == [False] * (P - 1) + [True] * (end - P) + [False] * (7 - end + 1)
    am = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    assert prompt_length(am, max_length=8, max_new_tokens=4) == 4      # max_length - N
    assert prompt_length(am, max_length=8, max_new_tokens=1) == 6      # the shortest row
    assert prompt_length(torch.tensor([[1, 0, 0]]), max_length=3, max_new_tokens=2) == 1


def test_on_policy_source_share_and_same_on_every_rank():
    """lambda's share of micro-batches goes to the student; seq_kd gives the rest to the teacher; the key has
    no rank (ZeRO-3 gathers collectively); lambda 0 without seq_kd never generates."""
    keys = [(s, d) for s in range(200) for d in range(4)]
    for lam in (0.0, 0.25, 1.0):
        for seq_kd in (False, True):
            src = [source_of(7, s, d, lam, seq_kd) for s, d in keys]
            share = src.count("student") / len(src)
            assert abs(share - lam) < 0.06, (lam, share)
            assert set(src) <= ({"student", "teacher"} if seq_kd else {"student", "corpus"})
            if seq_kd:
                assert src.count("teacher") == len(src) - src.count("student")
    assert {source_of(7, s, d, 0.0, False) for s, d in keys} == {"corpus"}
    assert [source_of(1, s, 0, 0.5, False) for s in range(50)] != [source_of(2, s, 0, 0.5, False) for s in range(50)]


def test_on_policy_sampling_is_seeded_and_leaves_the_run_rng_alone():
    teacher, student = causal_pair("gpt2")
    prompt = torch.randint(6, 101, (4, 6), generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=8, temperature=1.0, eos_id=EOS, pad_id=PAD)
    a, b, c = (sample(student, prompt, seed=s, **kw) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)            # the run's stream (dropout, ...) is untouched
    assert student.training                                     # eval for the call only
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :6], prompt) and 6 < a.shape[1] <= 14
    # a very cold temperature samples the argmax (greedy decoding of the same model)
    cold = sample(teacher, prompt, seed=9, **{**kw, "temperature": 1e-4})
    greedy = teacher.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(cold, greedy)


# ---- the step on generated rows ---------------------------------------------------------------------

def generated_batch(student, seq_kd: bool, seed=0):
    prompt = torch.randint(6, 101, (6, 5), generator=torch.Generator().manual_seed(seed))
    seqs = sample(student, prompt, max_new_tokens=9, temperature=1.0, eos_id=EOS, pad_id=PAD, seed=seed)
    return continuation_batch(seqs, 5, EOS, PAD, labels_from_continuation=seq_kd)


@pytest.mark.parametrize("seq_kd", [True, False])
@pytest.mark.parametrize("logit_tokens", ["affected", "all"])
def test_on_policy_fast_step_equals_naive_on_generated_rows(seq_kd, logit_tokens):
    teacher, student = causal_pair("gpt2")
    batch = generated_batch(student, seq_kd)
    assert batch["loss_mask"].any() and (~batch["loss_mask"] & batch["attention_mask"].bool()).any()
    plan = plan_for(batch, "full", 1)
    kw = dict(ops="reference", w_iit_cos=0.3, w_mse=0.2, logit_tokens=logit_tokens)
    naive = run(teacher, student, batch, plan, DistillConfig(mode="naive", **kw))
    fast = run(teacher, student, batch, plan, DistillConfig(mode="fast", **kw))
    assert_same_step(naive, fast)
    assert (naive[0].terms["mlm"] > 0) == seq_kd  # no LM target in the student's own samples


def test_on_policy_loss_mask_of_every_position_is_todays_step_and_the_mask_counts():
    """A loss mask that keeps every position gives today's step bit for bit (what lambda = 0 runs); the
    generated rows' mask changes ce (negative control: the mask is read)."""
    teacher, student = causal_pair("llama")
    batch = generated_batch(student, True, seed=1)
    plan = plan_for(batch, "middle", 2)
    cfg = DistillConfig(mode="fast", ops="fused")
    today = {k: v for k, v in batch.items() if k != "loss_mask"}
    whole = dict(today, loss_mask=torch.ones_like(batch["loss_mask"]))
    a, b = run(teacher, student, today, plan, cfg), run(teacher, student, whole, plan, cfg)
    assert all(torch.equal(a[0].terms[k], b[0].terms[k]) for k in a[0].terms) and torch.equal(a[0].loss, b[0].loss)
    assert all(torch.equal(a[1][n], b[1][n]) for n in a[1])
    masked = run(teacher, student, batch, plan, cfg)
    assert not torch.allclose(masked[0].terms["ce"], a[0].terms["ce"], rtol=1e-3)


# ---- the main job -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_teacher(assets):
    return decoder_teachers(assets["root"] / "decoders")["gpt2"]


def test_on_policy_and_seq_kd_bad_input_fails_before_work(tmp_path, assets, gpt2_teacher, capsys):
    cases = {
        "lambda": (dict(teacher=gpt2_teacher, on_policy_fraction=1.5), "on_policy_fraction.*must be in \\[0, 1\\]"),
        "negative": (dict(teacher=gpt2_teacher, on_policy_fraction=-0.1), "on_policy_fraction.*must be in \\[0, 1\\]"),
        "masked": (dict(on_policy_fraction=0.5), "--on_policy_fraction: generated continuations need a causal LM "
                                                 "teacher.*bert.*masked LM"),
        "masked_seq_kd": (dict(seq_kd=True), "--seq_kd: generated continuations need a causal LM teacher"),
        "cache": (dict(teacher=gpt2_teacher, seq_kd=True, teacher_cache=tmp_path / "nocache"),
                  "--teacher_cache: --seq_kd generates rows the teacher must score"),
        "temperature": (dict(teacher=gpt2_teacher, on_policy_fraction=0.5, gen_temperature=0),
                        "gen_temperature must be > 0"),
        "new_tokens": (dict(teacher=gpt2_teacher, on_policy_fraction=0.5, max_new_tokens=16),
                       "max_new_tokens must be in \\[1, max_length=16\\)"),
    }
    import re
    for name, (kw, want) in cases.items():
        out = tmp_path / name
        code, err = run_main(flags(assets, out, **kw), capsys)
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(lines) == 1 and re.search(want, lines[0]), (name, err[-2000:])
        assert not out.exists(), name


def _kill_after(p, out: Path, n: int):
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (out / "metrics.jsonl").exists() and len(steps_of(out)) >= n:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)


def test_on_policy_zero_is_today_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path, assets, gpt2_teacher):
    steps, gen = 8, dict(on_policy_fraction=0.5, seq_kd=True, max_new_tokens=6, gen_temperature=1.0)
    runs = {"today": launch(assets, tmp_path / "today", steps=3, teacher=gpt2_teacher),
            "zero": launch(assets, tmp_path / "zero", steps=3, teacher=gpt2_teacher, on_policy_fraction=0.0),
            "full": launch(assets, tmp_path / "full", steps=steps, teacher=gpt2_teacher, **gen)}
    cut = tmp_path / "cut"
    p = launch(assets, cut, steps=steps, teacher=gpt2_teacher, **gen)
    _kill_after(p, cut, 3)
    text = finish(p, cut, rc=128 + signal.SIGTERM)
    stopped = len(steps_of(cut))
    assert "SIGTERM: saved" in text and 3 <= stopped < steps
    finish(launch(assets, cut, steps=steps, teacher=gpt2_teacher, resume=True, **gen), cut)
    for name, p in runs.items():
        finish(p, tmp_path / name)
    today, zero = steps_of(tmp_path / "today"), steps_of(tmp_path / "zero")
    keys = ("loss", "ce", "mlm", "cos", "iit", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in today] == [[r[k] for k in keys] for r in zero]  # bit for bit
    assert "on_policy" not in zero[0]
    a, b = steps_of(cut), steps_of(tmp_path / "full")
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    on = [r["on_policy"] for r in b]  # one micro-batch per step: the student's (1) or the teacher's (0)
    assert 0 < sum(on) < steps and [r["seq_kd"] for r in b] == [1 - x for x in on]
    for k in keys:
        torch.testing.assert_close(torch.tensor([r[k] for r in a]), torch.tensor([r[k] for r in b]), rtol=1e-5,
                                   atol=1e-7, msg=f"{k} after resuming at step {stopped}")
    assert [r["on_policy"] for r in a] == on


@pytest.mark.slow
def test_on_policy_two_ranks_zero3_equals_zero2(tmp_path, assets, gpt2_teacher):
    """Two gloo ranks: student ZeRO-3 with the teacher partitioned on its settings (both gathered whole for
    generation, hooks off, then back) gives the losses of ZeRO-2 with a replicated teacher, step for step, with
    on-policy and seq_kd micro-batches: the same continuations were sampled from the same weights."""
    gen = dict(on_policy_fraction=0.5, seq_kd=True, max_new_tokens=6, teacher=gpt2_teacher, steps=4)
    z3 = launch(assets, tmp_path / "z3", launcher="deepspeed", ranks=2, stage=3, shard_teacher="yes", **gen)
    z2 = launch(assets, tmp_path / "z2", launcher="deepspeed", ranks=2, stage=2, **gen)
    t3 = finish(z3, tmp_path / "z3", timeout=400)
    finish(z2, tmp_path / "z2", timeout=400)
    assert "ZeRO-3" in t3 and "teacher: ZeRO-3 partitioned" in t3
    a, b = steps_of(tmp_path / "z3"), steps_of(tmp_path / "z2")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and 0 < sum(r["on_policy"] for r in a) < 4
    for k in ("loss", "ce", "mlm", "cos", "iit"):
        torch.testing.assert_close(torch.tensor([r[k] for r in a]), torch.tensor([r[k] for r in b]), rtol=1e-5,
                                   atol=1e-6, msg=k)


def test_on_policy_sample_quality_reverse_kl_is_zero_for_the_teacher_itself():
    """sample_quality's KL(s || t) per token: exactly 0 when the student is the teacher (same model scores its
    own samples), positive for a student moved away from it; seeded: the same figure twice."""
    from iit_fast.generate import sample_quality
    teacher, student = causal_pair("gpt2")
    batches = [generated_batch(teacher, True, seed=s) for s in (0, 1)]  # rows of 5 + <= 9 tokens: prompts of 4
    kw = dict(prompt_len=4, max_new_tokens=6, eos_id=EOS, pad_id=PAD, seed=0)
    same = sample_quality(teacher, teacher, batches, **kw)
    assert same["reverse_kl_per_token"] == 0 and same["scored_tokens"] > 0
    a, b = sample_quality(student, teacher, batches, **kw), sample_quality(student, teacher, batches, **kw)
    assert a == b and a["reverse_kl_per_token"] > 0.05 and student.training


def test_on_policy_train_time_of_the_sweep_ignores_pauses_and_weighs_both_kinds_of_step():
    from benchmarks.objectives import train_time_of

    def steps(seconds, generated):  # train.py's records: cumulative tokens, the step's tokens/s
        out, tokens = [], 0
        for s, g in zip(seconds, generated):
            tokens += 1000
            out.append({"tokens": tokens, "tokens_per_s": 1000 / s, "on_policy": float(g)})
        return out
    # 6 corpus steps of 1 s (one paused to 60 s), 3 generated steps of 3 s: 6 * 1 + 3 * 3 = 15 s
    recs = steps([1, 1, 60, 1, 1, 1, 3, 3, 3], [0] * 6 + [1] * 3)
    assert train_time_of(recs) == pytest.approx(15.0)
    # negative control: one median over both kinds (the corpus steps' 1 s here) would say 9 s
    assert train_time_of([{**r, "on_policy": 0.0} for r in recs]) == pytest.approx(9.0)


def test_on_policy_sweep_takes_recorded_runs_only_for_the_same_command_and_teacher(tmp_path):
    import argparse

    from benchmarks.objectives import as_recorded, recorded_runs, train_command
    a = argparse.Namespace(teacher=Path.home() / "teacher", student_layers=3, max_length=128, steps=500,
                           eval_interval=0, train_eval_sequences=32, runs_dir=tmp_path / "runs", alignment="middle",
                           lr=2e-4, warmup_steps=5, precision="auto", gen_temperature=1.0, save_interval=50,
                           eval_batches=8, eval_batch_size=32, quality_batches=2)
    ds = a.runs_dir / "ds-micro16.json"
    teacher_eval, init_eval = {"perplexity": 226.65179025989752}, {"mlm": {"perplexity": 279.28}}
    run = {"mode": "onpolicy+iit", "seed": 1, "eval": {"mlm": {"perplexity": 200.0}},
           "command": as_recorded(train_command(a, "onpolicy+iit", 1, ds)) + " --resume true"}
    unevaluated = {"mode": "fkl", "seed": 0, "command": as_recorded(train_command(a, "fkl", 0, ds))}
    results = {"teacher_eval": teacher_eval, "init_eval": init_eval, "runs": [run, unevaluated],
               "args": {k: str(getattr(a, k)) for k in ("eval_batches", "eval_batch_size", "quality_batches",
                                                        "max_length")}}
    assert " ~/teacher " in run["command"]                           # recorded without this machine's home
    taken, why = recorded_runs(results, a, ds, teacher_eval, init_eval)
    assert list(taken) == [("onpolicy+iit", 1)] and why == ""          # a resumed run counts; no eval, no run
    # negative controls: another teacher (one ulp of perplexity), another lr, another judge
    other = {"perplexity": 226.65179025989755}
    assert recorded_runs(results, a, ds, other, init_eval)[0] == {}
    assert "teacher" in recorded_runs(results, a, ds, other, init_eval)[1]
    assert recorded_runs(results, argparse.Namespace(**{**vars(a), "lr": 3e-4}), ds, teacher_eval, init_eval)[0] == {}
    judged_otherwise = argparse.Namespace(**{**vars(a), "eval_batches": 4})
    assert "eval_batches" in recorded_runs(results, judged_otherwise, ds, teacher_eval, init_eval)[1]
