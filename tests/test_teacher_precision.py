"""The teacher builder's precision (iit_fast/teacher.py --precision): train.py's decision by default, said in
its output and metrics.json; bf16 trains under autocast (other weights than fp32's), fp32 weights either way."""
import json

import pytest
import torch

from iit_fast import precision as P
from iit_fast import teacher as T
from test_teacher import tiny_corpus


def _build(tmp_path, corpus, precision, name):
    return T.build_gpt2_teacher(out_dir=tmp_path / name, cache_dir=tmp_path / "cache", corpus=str(corpus), steps=4,
                                vocab_size=300, layers=1, hidden=32, heads=4, batch_size=4, max_length=16,
                                eval_batches=1, progress=False, precision=precision)


def test_teacher_build_precision(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file
    corpus = tiny_corpus(tmp_path)
    fp32, bf16 = _build(tmp_path, corpus, "fp32", "fp32"), _build(tmp_path, corpus, "bf16", "bf16")
    m32, m16 = (json.loads((d / "metrics.json").read_text()) for d in (fp32, bf16))
    assert (m32["precision"], m32["precision_reason"]) == ("fp32", "--precision fp32")
    assert (m16["precision"], m16["precision_reason"]) == ("bf16", "--precision bf16")
    w32, w16 = (load_file(d / "model.safetensors") for d in (fp32, bf16))
    assert all(t.dtype == torch.float32 for t in w16.values())            # fp32 weights, bf16 compute
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)               # bf16 did train differently
    # auto: the decision of precision.resolve (train.py's), stated on stdout by the CLI
    monkeypatch.setattr(P, "native_bf16", lambda: (False, "a stub: no fast bf16 here"))
    T.main(["build", "--family", "gpt2", "--out-dir", str(tmp_path / "auto"), "--cache-dir", str(tmp_path / "cache"),
            "--corpus", str(corpus), "--steps", "2", "--vocab-size", "300", "--layers", "1", "--hidden", "32",
            "--heads", "4", "--batch-size", "4", "--max-length", "16", "--eval-batches", "1"])
    assert "precision: fp32 (a stub: no fast bf16 here)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        T.main(["build", "--precision", "fp16"])
