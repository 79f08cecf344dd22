"""The main job with a student from a config and a corpus whose text is in another column: --student_config,
--text_column, and their bad input (one `error:` line, exit 2, before any work)."""
from __future__ import annotations

import json
import re

from test_train import assets, finish, flags, launch, run_main  # noqa: F401 (fixture)


def _jsonl_corpus(assets, folder):
    """The tiny corpus's sentences as .jsonl rows {"body": ..., "id": ...}."""
    folder.mkdir()
    for split in ("train", "validation"):
        lines = (assets["corpus"] / f"{split}.txt").read_text().splitlines()
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"body": l, "id": i}) + "\n"
                                                       for i, l in enumerate(lines)))
    return folder


def test_student_config_and_text_column_train_and_export(tmp_path, assets):
    from transformers import AutoModelForMaskedLM
    corpus = _jsonl_corpus(assets, tmp_path / "jsonl")
    out = tmp_path / "run"
    spec = json.dumps({"num_layers": 2, "hidden_size": 16, "intermediate_size": 24})
    text = finish(launch(assets, out, steps=3, corpus=corpus, text_column="body", student_config=spec,
                         w_cos=0, student_layers=3), out)
    assert "Traceback" not in text
    cfg = json.loads((out / "student" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]) == \
        (2, 16, 2, 24)
    AutoModelForMaskedLM.from_pretrained(out / "student")
    assert json.loads((out / "train_config.json").read_text())["student_layers"] == 2  # num_layers wins


def test_text_column_missing_and_student_config_bad_fail_before_work(tmp_path, assets, capsys):
    corpus = _jsonl_corpus(assets, tmp_path / "jsonl")
    cases = [
        (dict(corpus=corpus, text_column="content"),
         r"error: corpus: .*train\.jsonl has columns \['body', 'id'\]; expected a column named 'content' "
         r"\(choose another with --text_column\)"),
        (dict(student_config='{"hidden_size": 64}'), r"error: --student_config: hidden_size = 64 is more than "
                                                     r"the teacher's 32"),
        (dict(student_config='{"heads": 2}'), r"error: --student_config: unknown key\(s\) \['heads'\]"),
        (dict(student_config='{"hidden_size": 16}', student=assets["teacher"]),
         r"error: --student_config: a student from a config is initialised from the teacher"),
        (dict(student_config='{"hidden_size": 16}'), r"error: cos / iit_cos need equal hidden sizes"),
    ]
    for i, (kw, msg) in enumerate(cases):
        out = tmp_path / f"o{i}"
        code, err = run_main(flags(assets, out, **kw), capsys)
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(lines) == 1 and re.search(msg, lines[0]), err[-2000:]
        assert not out.exists() or not any(out.iterdir())
