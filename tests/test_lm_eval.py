"""`iit-fast eval --lm-eval`: lm-evaluation-harness on a causal student, offline, with a local YAML task.

The harness's accuracy on a small multiple-choice task is checked against the same figure computed here
directly from the model's log-probabilities (sum of log p(choice tokens | context), argmax over choices):
two independent computations of one number."""
import json
import os

import pytest
import torch

from iit_fast import eval as ev
from tiny import tiny_bert, tiny_bert_tokenizer, tiny_causal_tokenizer, tiny_gpt2

pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install -e .[dev])")

TASK = """task: toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model, tok = tiny_gpt2(max_pos=128, seed=3), tiny_causal_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        ids = torch.randint(6, 101, (6,), generator=g).tolist()
        rows.append({"ctx": " ".join(f"w{j - 6}" for j in ids[:3]),
                     "choices": [f"w{ids[3] - 6}", f"w{ids[4] - 6} w{ids[5] - 6}"], "gold": i % 2})
    (root / "tasks").mkdir()
    (root / "tasks" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks" / "toy.yaml").write_text(TASK.format(data=root / "tasks" / "data.jsonl"))
    return root, model, tok, rows


def direct_accuracy(model, tok, rows) -> float:
    """The harness's multiple-choice accuracy, computed by hand: the choice with the largest summed
    log-probability of its tokens after the context (joined by one space) wins."""
    hits = 0
    with torch.no_grad():
        for r in rows:
            ctx = tok(r["ctx"]).input_ids
            scores = []
            for c in r["choices"]:
                cont = tok(c).input_ids
                logp = model(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]   # (len, V)
                scores.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
            hits += int(max(range(len(scores)), key=scores.__getitem__) == r["gold"])
    return hits / len(rows)


def test_lm_eval_local_task_matches_direct_scoring(toy, monkeypatch):
    root, model, tok, rows = toy
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    res = ev.lm_eval_harness(str(root / "model"), ["toy_choice"], include_path=str(root / "tasks"), batch_size=4)
    expected = direct_accuracy(model, tok, rows)
    assert 0 < expected < 1  # both answers occur: a wrong scorer cannot match by luck of a constant
    assert res["toy_choice"]["acc"] == pytest.approx(expected, abs=1e-9)
    # negative control: the other answer key gives the complementary accuracy, not the same one
    flipped = [dict(r, gold=1 - r["gold"]) for r in rows]
    assert direct_accuracy(model, tok, flipped) == pytest.approx(1 - expected)


def test_lm_eval_refuses_masked_lm_and_unknown_task(toy, tmp_path):
    root = toy[0]
    bert = tmp_path / "bert"
    tiny_bert().save_pretrained(bert)
    tiny_bert_tokenizer().save_pretrained(bert)
    with pytest.raises(ValueError, match="--lm-eval: .* holds a masked LM"):
        ev.evaluate(str(bert), lm_eval_tasks=["toy_choice"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['no_such_task'\]"):
        ev.lm_eval_harness(str(root / "model"), ["no_such_task"], include_path=str(root / "tasks"))
