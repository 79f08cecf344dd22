"""Evaluation: perplexity by hand, IIA of a copy student, the counterfactual against plain interventions,
the `iit-fast eval` / `finetune` commands on tiny local files. Tiny models only: seconds on 2 cores."""
from __future__ import annotations

import copy
import json
import math
import random
from functools import partial


import numpy as np
import pytest
import torch

from transformers import BertTokenizer

from iit_fast import cli
from iit_fast.eval import (counterfactual_hidden, identity_alignment, interchange_accuracy, lm_metrics,
                           parse_alignment, scored_positions)
from iit_fast.finetune import accuracy_macro_f1
from iit_fast.models import IntervenableMLM
from iit_fast.ops.interchange.reference import interchange_reference
from iit_fast.sampling import make_alignment, sample_plan
from tiny import tiny_batch, tiny_bert, tiny_causal_batch, tiny_gpt2, tiny_pair

WORDS = ("the a one this that cat dog bird man woman house tree sees eats likes finds big small red old "
         "and or but with in on").split()


def batches(n=3, vocab=97):
    return [tiny_batch(lengths=(9, 5, 7, 3, 8), seed=i, vocab=vocab) for i in range(n)]


# ---- perplexity ---------------------------------------------------------------------------------------

def hand_ppl(model, bs):
    nll, n, right = 0.0, 0, 0
    with torch.no_grad():
        for b in bs:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b["token_type_ids"]).logits.double()          # (B, S, V)
            logp = logits.log_softmax(-1)
            for i, j in (b["labels"] != -100).nonzero().tolist():
                t = int(b["labels"][i, j])
                nll -= float(logp[i, j, t])
                right += int(logits[i, j].argmax() == t)
                n += 1
    return math.exp(nll / n), right / n, n


def test_perplexity_is_exp_mean_token_nll():
    model = tiny_bert(layers=2)
    bs = batches(3)
    got = lm_metrics(model, bs)
    ppl, top1, n = hand_ppl(model, bs)
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert got["top1"] == pytest.approx(top1)
    assert lm_metrics(model, bs, max_batches=1)["tokens"] == hand_ppl(model, bs[:1])[2]


def test_perplexity_of_a_non_bert_masked_lm():
    from transformers import RobertaConfig, RobertaForMaskedLM
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=80, pad_token_id=0)
    model = RobertaForMaskedLM(cfg).eval()  # dropout 0.1: a pass in training mode would differ
    bs = batches(2)
    got = lm_metrics(model, bs)
    assert not model.training  # a plain HF model is wrapped in its own mode, and left in it
    assert got["perplexity"] == pytest.approx(hand_ppl(model, bs)[0], rel=1e-5)
    assert lm_metrics(model.train(), bs)["perplexity"] == pytest.approx(got["perplexity"], rel=1e-6)
    assert model.training  # evaluated without dropout, then put back in training mode


def test_scored_positions_by_hand():
    b = {"input_ids": torch.tensor([[7, 8, 9, 0], [5, 6, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0],
                                                                                                   [1, 1, 0, 0]]),
         "labels": torch.tensor([[-100, 8, -100, -100], [5, -100, -100, -100]])}
    rows, targets = scored_positions(b, "masked")
    assert rows.tolist() == [[False, True, False, False], [True, False, False, False]] and targets.tolist() == [8, 5]
    # causal: position t predicts the label at t + 1 (here the labels are all real tokens)
    causal = {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
    rows, targets = scored_positions(causal, "causal")
    assert rows.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert targets.tolist() == [8, 9, 6]
    no_labels = {k: v for k, v in causal.items() if k != "labels"}
    assert [t.tolist() for t in scored_positions(no_labels, "causal")] == [rows.tolist(), targets.tolist()]
    with pytest.raises(ValueError, match="kind must be 'masked' or 'causal'"):
        scored_positions(b, "seq2seq")
    with pytest.raises(ValueError, match="expected a 'labels' entry"):
        scored_positions(no_labels, "masked")



def hand_next_token_ppl(model, bs):
    """exp(mean NLL) of token t + 1 given tokens <= t over pairs of real positions, from HF's full logits."""
    nll, n, right = 0.0, 0, 0
    with torch.no_grad():
        for b in bs:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()  # (B, S, V)
            logp = logits.log_softmax(-1)
            for i in range(b["input_ids"].shape[0]):
                real = b["attention_mask"][i].nonzero().flatten().tolist()
                for t, u in zip(real[:-1], real[1:]):
                    target = int(b["input_ids"][i, u])
                    nll -= float(logp[i, t, target])
                    right += int(logits[i, t].argmax() == target)
                    n += 1
    return math.exp(nll / n), right / n, n


@pytest.mark.parametrize("labels", [True, False])
def test_next_token_perplexity_of_a_causal_lm(labels):
    model = tiny_gpt2(layers=2)
    bs = [tiny_causal_batch(lengths=(9, 5, 7, 3), seed=i) for i in range(2)]
    if labels:  # as the causal collator makes them: the input ids, -100 at padding
        bs = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in bs]
    got = lm_metrics(model, bs)
    ppl, top1, n = hand_next_token_ppl(model, bs)
    assert got["tokens"] == n == sum(4 + 6 + 8 + 2 for _ in bs)  # length - 1 per row
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert got["top1"] == pytest.approx(top1)

# ---- IIA ------------------------------------------------------------------------------------------------

def test_iia_is_one_for_a_copy_with_the_identity_alignment():
    teacher = IntervenableMLM(tiny_bert(layers=4)).eval()
    student = IntervenableMLM(copy.deepcopy(teacher.model)).train()  # eval() is set inside
    res = interchange_accuracy(teacher, student, batches(4), identity_alignment(4), plans_per_batch=3)
    assert res["iia"] == 1.0
    assert abs(res["cf_kl"]) < 1e-6
    assert res["plans"] == 12 and len(res["per_pair"]) > 1
    assert student.training  # the mode is put back



def test_iia_is_one_for_a_causal_copy_and_below_for_another_model():
    teacher = IntervenableMLM(tiny_gpt2(layers=4)).eval()
    student = IntervenableMLM(copy.deepcopy(teacher.model))
    bs = [tiny_causal_batch(lengths=(9, 5, 7, 3), seed=i) for i in range(3)]
    res = interchange_accuracy(teacher, student, bs, identity_alignment(4), plans_per_batch=2)
    assert res["iia"] == 1.0 and abs(res["cf_kl"]) < 1e-6
    assert res["tokens"] == 3 * 2 * (8 + 4 + 6 + 2)  # every real position followed by a real one
    other = IntervenableMLM(tiny_gpt2(layers=2, seed=1)).eval()
    res = interchange_accuracy(teacher, other, bs, make_alignment("full", 4, 2))
    assert res["iia"] < 1.0 and res["cf_kl"] > 0
    with pytest.raises(ValueError, match="student: a masked LM cannot be compared with a causal teacher"):
        interchange_accuracy(teacher, IntervenableMLM(tiny_bert(layers=4, vocab=101)), bs, identity_alignment(4))

def hand_iia(teacher, student, bs, alignment, seed):
    """IIA and mean counterfactual KL(teacher || student) by plain interventions: the plans drawn as
    `interchange_accuracy` draws them (one generator, one plan per batch), each model's counterfactual from a
    full pass that swaps the source rows' plain states in after each aligned block, argmax agreement and KL
    over the labelled tokens, in fp64."""
    teacher.eval(), student.eval()
    g = torch.Generator().manual_seed(seed)
    agree, kl, n = 0, 0.0, 0
    with torch.no_grad():
        for b in bs:
            plan = sample_plan(b["attention_mask"], alignment, g)
            z = []
            for model, layers in ((teacher, plan.teacher_layers), (student, (plan.student_layer,))):
                args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
                plain = model(*args, keep=set(layers))
                swap = {l: partial(interchange_reference, pi=plan.pi, base_start=plan.base_start,
                                   source_start=plan.source_start, span_len=plan.span_len, dims=None,
                                   source=plain.sites[l]) for l in layers}
                h = model(*args, interventions=swap).last_hidden                            # (B, S, D)
                z.append(model.logits(h[b["labels"] != -100]).double())                     # (M, V)
            z_t, z_s = z
            agree += int((z_t.argmax(-1) == z_s.argmax(-1)).sum())
            kl += float((z_t.softmax(-1) * (z_t.log_softmax(-1) - z_s.log_softmax(-1))).sum())
            n += z_t.shape[0]
    return agree / n, kl / n


def test_iia_of_a_different_student_and_seeding():
    # a perturbed student; one decoder-bias offset added to both models, so that the argmaxes are neither
    # all equal nor all different (with a random tiny model's near-uniform logits they never agree)
    teacher, student = tiny_pair(4, 2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        offset = 0.3 * torch.randn(teacher.decoder_bias.shape, generator=g)
        teacher.decoder_bias.add_(offset), student.decoder_bias.add_(offset)
    al = make_alignment("full", 4, 2)
    a = interchange_accuracy(teacher, student, batches(3), al, seed=1)
    b = interchange_accuracy(teacher, student, batches(3), al, seed=1)
    assert a == b
    iia, cf_kl = hand_iia(teacher, student, batches(3), al, seed=1)
    assert 0 < iia < 1   # the case tells agreement from disagreement
    assert a["iia"] == pytest.approx(iia, abs=1e-12) and a["cf_kl"] == pytest.approx(cf_kl, rel=1e-4)


def test_counterfactual_equals_plain_interventions_on_a_full_pass():
    """A teacher group {1, 2}: resuming after the swap == one full pass that swaps after blocks 1 and 2."""
    teacher = IntervenableMLM(tiny_bert(layers=4)).eval()
    b = tiny_batch(lengths=(9, 5, 7, 3))
    plan = sample_plan(b["attention_mask"], [((1, 2), 0)], torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = counterfactual_hidden(teacher, b, (1, 2), plan)
        plain = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], keep={1, 2})
        swap = {l: partial(interchange_reference, pi=plan.pi, base_start=plan.base_start,
                           source_start=plan.source_start, span_len=plan.span_len, dims=None,
                           source=plain.sites[l]) for l in (1, 2)}
        want = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], interventions=swap).last_hidden
        real = b["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[real], plain.last_hidden[real])  # the swap changed something


def test_parse_alignment():
    assert parse_alignment("identity", 3, 3) == [((0,), 0), ((1,), 1), ((2,), 2)]
    assert parse_alignment("[[[2, 3], 1]]", 4, 2) == [((2, 3), 1)]
    assert parse_alignment("middle", 4, 2) == make_alignment("middle", 4, 2)
    with pytest.raises(ValueError, match="equal depths"):
        parse_alignment("identity", 4, 2)


# ---- the commands on tiny local files -------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [".", ","]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)  # a fast tokenizer
    model = tiny_bert(layers=3, vocab=len(vocab), max_pos=64)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    sent = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 10)))  # noqa: E731
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(sent() for _ in range(60)) + "\n")
    (corpus / "validation.txt").write_text("\n".join(sent() for _ in range(40)) + "\n")
    return {"root": root, "model": model_dir, "corpus": corpus, "sent": sent, "rng": rng}


def test_cli_eval_copy_student(assets, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--model", str(assets["model"]), "--teacher", str(assets["model"]), "--alignment",
                   "identity", "--corpus", str(assets["corpus"]), "--cache-dir", str(tmp_path / "cache"),
                   "--batch-size", "8", "--max-length", "32", "--max-batches", "3", "--output", str(out),
                   "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["iia"]["iia"] == 1.0 and abs(res["iia"]["cf_kl"]) < 1e-6
    assert res["lm"]["perplexity"] == pytest.approx(res["teacher_lm"]["perplexity"])
    assert res["lm"]["tokens"] > 0 and json.loads(capsys.readouterr().out)["iia"]["iia"] == 1.0



def test_cli_eval_causal_copy_student(assets, tmp_path):
    from iit_fast.teacher import train_bpe_tokenizer
    tok = train_bpe_tokenizer((assets["corpus"] / "train.txt").read_text().splitlines(), vocab_size=300)
    folder = tmp_path / "gpt2"
    tiny_gpt2(layers=3, vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "r.json"
    assert cli.main(["eval", "--model", str(folder), "--teacher", str(folder), "--alignment", "identity", "--corpus",
                     str(assets["corpus"]), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4",
                     "--max-length", "16", "--max-batches", "2", "--output", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "causal" and res["iia"]["iia"] == 1.0 and abs(res["iia"]["cf_kl"]) < 1e-6
    assert res["lm"]["perplexity"] == pytest.approx(res["teacher_lm"]["perplexity"])
    assert res["lm"]["tokens"] == 2 * 4 * 15  # packed: full rows of 16 tokens, 15 next-token targets each

def test_cli_eval_errors(assets, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path), "--no-progress"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_accuracy_macro_f1_by_hand():
    pred = np.array([0, 1, 1, 2, 0, -5])
    gold = np.array([0, 1, 2, 2, 1, -100])  # the last is ignored
    m = accuracy_macro_f1(pred, gold, 4)    # class 3 absent from both: not counted
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp1 fp1 fn1 -> 1/2; class 2: tp1 fp0 fn1 -> 2/3
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert m["n"] == 5


@pytest.fixture
def evaluated(monkeypatch):
    """The models `finetune` evaluates, in order (transformers' Trainer.evaluate wrapped to keep them)."""
    from transformers import Trainer
    kept, evaluate = [], Trainer.evaluate

    def keep(self, *args, **kwargs):
        kept.append(self.model)
        return evaluate(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "evaluate", keep)
    return kept


def hand_seq_metrics(model, model_dir, texts, labels, names):
    """Accuracy and macro F1 of one plain forward pass per text; a label's id is its place in `names` (the
    training labels, sorted)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():
        pred = [int(model(**tok(t, truncation=True, max_length=32, return_tensors="pt")).logits.argmax(-1))
                for t in texts]
    return accuracy_macro_f1(np.array(pred), np.array([names.index(l) for l in labels]), len(names))


def hand_token_metrics(model, model_dir, rows, names):
    """Per word, the prediction at its first sub-token (one plain forward pass per sentence)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    pred, gold = [], []
    model.eval()
    with torch.no_grad():
        for r in rows:
            enc = tok(r["tokens"], is_split_into_words=True, truncation=True, max_length=32, return_tensors="pt")
            logits = model(**enc).logits[0]                                               # (S, labels)
            first = {}
            for pos, w in enumerate(enc.word_ids()):
                if w is not None and w not in first:
                    first[w] = pos
            pred += [int(logits[first[w]].argmax()) for w in range(len(r["tokens"]))]
            gold += [names.index(t) for t in r["tags"]]
    return accuracy_macro_f1(np.array(pred), np.array(gold), len(names))


def test_finetune_sequence_and_token_classification(assets, tmp_path, evaluated):
    rng, sent = assets["rng"], assets["sent"]
    rows = []
    for _ in range(48):
        s = sent()
        rows.append({"text": s, "label": "animal" if ("cat" in s.split() or "dog" in s.split()) else "other"})
    import csv
    for name, part in (("train.csv", rows[:32]), ("dev.csv", rows[32:])):
        with open(tmp_path / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, ["text", "label"])
            w.writeheader(), w.writerows(part)
    pairs = [{"sentence1": sent(), "sentence2": sent(), "label": rng.randrange(3)} for _ in range(24)]
    for name, part in (("ptrain.jsonl", pairs[:16]), ("pdev.jsonl", pairs[16:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    toks = []
    for _ in range(40):
        words = sent().split()
        toks.append({"tokens": words, "tags": ["N" if w in ("cat", "dog", "bird", "man", "woman", "house", "tree")
                                               else "V" if w in ("sees", "eats", "likes", "finds") else "O"
                                               for w in words]})
    for name, part in (("ttrain.jsonl", toks[:30]), ("tdev.jsonl", toks[30:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))

    base = ["--model", str(assets["model"]), "--max-steps", "2", "--batch-size", "8", "--max-length", "32",
            "--no-progress"]
    out = tmp_path / "seq.json"
    assert cli.main(["finetune", "--task", "seq", "--train-file", str(tmp_path / "train.csv"), "--validation-file",
                     str(tmp_path / "dev.csv"), "--output", str(out)] + base) == 0
    seq = json.loads(out.read_text())
    assert seq["num_labels"] == 2 and seq["validation_examples"] == 16
    assert seq["evaluated_labels"] == 16 and math.isfinite(seq["train_loss"])
    want = hand_seq_metrics(evaluated[-1], assets["model"], [r["text"] for r in rows[32:]],
                            [r["label"] for r in rows[32:]], sorted({r["label"] for r in rows[:32]}))
    assert (seq["accuracy"], seq["macro_f1"]) == pytest.approx((want["accuracy"], want["macro_f1"]))
    assert cli.main(["finetune", "--task", "seq", "--train-file", str(tmp_path / "ptrain.jsonl"),
                     "--validation-file", str(tmp_path / "pdev.jsonl"), "--output", str(out)] + base) == 0
    assert json.loads(out.read_text())["num_labels"] == 3
    assert cli.main(["finetune", "--task", "token", "--train-file", str(tmp_path / "ttrain.jsonl"),
                     "--validation-file", str(tmp_path / "tdev.jsonl"), "--output", str(out)] + base) == 0
    tok = json.loads(out.read_text())
    n_words = sum(len(r["tokens"]) for r in toks[30:])
    assert tok["num_labels"] == 3 and tok["evaluated_labels"] == n_words  # one label per word
    want = hand_token_metrics(evaluated[-1], assets["model"], toks[30:], sorted({t for r in toks[:30] for t in r["tags"]}))
    assert want["n"] == n_words
    assert (tok["accuracy"], tok["macro_f1"]) == pytest.approx((want["accuracy"], want["macro_f1"]))
    assert cli.main(["finetune", "--task", "token", "--train-file", str(tmp_path / "train.csv"),
                     "--validation-file", str(tmp_path / "dev.csv")] + base) == 2  # no tokens/tags columns


def test_source_task_is_balanced_labelled_disjoint_and_reused(assets, tmp_path, evaluated):
    from iit_fast.corpus_build import Source
    from iit_fast.finetune import build_source_task, finetune
    rng = random.Random(3)
    sources = []
    for name, topic in (("pets", "cat dog"), ("homes", "house tree")):
        f = tmp_path / f"{name}.txt"
        pars = [f"The {topic} story number {i} is {' '.join(rng.choice(WORDS) for _ in range(9))}."
                for i in range(14)]
        f.write_text("\n\n".join(pars + pars[:2]))  # two duplicates, dropped
        sources.append(Source(name, "text", globs=[str(f)]))
    tr, va = build_source_task(tmp_path / "task", per_class_train=8, per_class_validation=4, sources=sources,
                               progress=False)
    train = [json.loads(l) for l in tr.read_text().splitlines()]
    val = [json.loads(l) for l in va.read_text().splitlines()]
    assert sorted(r["label"] for r in train) == ["homes"] * 8 + ["pets"] * 8
    assert sorted(r["label"] for r in val) == ["homes"] * 4 + ["pets"] * 4
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    assert all(("cat dog" in r["text"]) == (r["label"] == "pets") for r in train + val)
    meta = json.loads((tmp_path / "task" / "task.json").read_text())
    assert meta["paragraphs_per_source"] == {"pets": 14, "homes": 14}
    mtime = tr.stat().st_mtime_ns
    assert build_source_task(tmp_path / "task", per_class_train=8, per_class_validation=4, sources=sources,
                             progress=False) == (tr, va) and tr.stat().st_mtime_ns == mtime  # reused
    with pytest.raises(ValueError, match="'pets' has 14 paragraphs, expected at least 15"):
        build_source_task(tmp_path / "task2", per_class_train=11, per_class_validation=4, sources=sources,
                          progress=False)
    res = finetune(str(assets["model"]), "seq", tr, va, max_steps=2, batch_size=8, max_length=32, progress=False)
    assert res["num_labels"] == 2 and res["validation_examples"] == 8
    want = hand_seq_metrics(evaluated[-1], assets["model"], [r["text"] for r in val], [r["label"] for r in val],
                            ["homes", "pets"])
    assert res["accuracy"] == pytest.approx(want["accuracy"]) and res["macro_f1"] == pytest.approx(want["macro_f1"])
