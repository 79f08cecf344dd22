"""The training entry point (iit_fast/train.py): single process, ZeRO stages, the deepspeed launcher,
resume, export, bad input. Tiny models and a tiny corpus built in tmp_path: no download.

Every run is a subprocess (DeepSpeed initialises a process group), with a free --master_port, a timeout
and TORCH_EXTENSIONS_DIR under tmp_path (nothing is ever built: the test checks that folder stays empty).
"""
from __future__ import annotations

import json
import os
import re
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
DS = str(Path(PY).parent / "deepspeed")
WORDS = ("the a one this that some every no cat dog bird fish man woman child king queen house tree river road "
         "sees eats likes finds takes gives makes runs sleeps sings walks jumps big small red green old new "
         "quick slow happy sad and or but with in on under over near by to from of at for").split()


def tiny_assets(root: Path, hidden=32, layers=4, seed=0) -> tuple[Path, Path]:
    """A tiny BERT teacher folder (safetensors + WordPiece tokenizer) and a tiny two-split text corpus."""
    from transformers import BertTokenizer
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_bert
    teacher = root / "teacher"
    teacher.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [".", ","]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    model = tiny_bert(layers=layers, hidden=hidden, vocab=len(vocab), seed=seed, max_pos=64)
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    rng = random.Random(seed)
    corpus = root / "corpus"
    corpus.mkdir()
    def sentence():  # a little structure (word i tends to follow word i-1) so there is something to learn
        i = rng.randrange(len(WORDS))
        out = []
        for _ in range(rng.randrange(5, 13)):
            out.append(WORDS[i])
            i = (i + 1) % len(WORDS) if rng.random() < 0.7 else rng.randrange(len(WORDS))
        return " ".join(out) + " ."
    (corpus / "train.txt").write_text("\n".join(sentence() for _ in range(300)) + "\n")
    (corpus / "validation.txt").write_text("\n".join(sentence() for _ in range(40)) + "\n")
    small = root / "overfit"  # two batches of 8 sentences, seen again and again
    small.mkdir()
    (small / "train.txt").write_text("\n".join(sentence() for _ in range(16)) + "\n")
    (small / "validation.txt").write_text((corpus / "validation.txt").read_text())
    return teacher, corpus


# ---- helpers -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    teacher, corpus = tiny_assets(root)
    ds = {}
    for stage in (0, 1, 2, 3):
        ds[stage] = root / f"zero{stage}.json"
        ds[stage].write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                                         "gradient_clipping": 1.0, "steps_per_print": 10 ** 6,
                                         # threshold 0: ZeRO-3 really partitions a tiny model
                                         "zero_optimization": {"stage": stage, **(
                                             {"stage3_param_persistence_threshold": 0} if stage == 3 else {})}}))
    return {"root": root, "teacher": teacher, "corpus": corpus, "ds": ds}


def env(assets) -> dict:
    e = dict(os.environ)
    e.update(TORCH_EXTENSIONS_DIR=str(assets["root"] / "torch_extensions"), TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None), e.pop("WORLD_SIZE", None), e.pop("LOCAL_RANK", None)
    return e


def flags(assets, out: Path, stage=2, steps=6, **kw) -> list[str]:
    f = {"teacher": assets["teacher"], "corpus": assets["corpus"], "cache_dir": assets["root"] / "cache",
         "student_layers": 2, "max_length": 16, "max_steps": steps, "eval_interval": 0, "eval_sequences": 16,
         "deepspeed_config": assets["ds"][stage], "out_dir": out, "dropout": 0, "lr": 1e-3, "warmup_steps": 1,
         "plots": "false", "seed": 0, "precision": "fp32"}
    f.update(kw)
    out = []
    for k, v in f.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


def launch(assets, out: Path, launcher="python", ranks=1, **kw) -> subprocess.Popen:
    """Start a training run: launcher python | deepspeed | torchrun."""
    script = str(REPO / "iit_fast" / "train.py")
    if launcher == "python":
        cmd = [PY, script]
    elif launcher == "deepspeed":
        cmd = [DS] + (["--num_gpus", str(ranks)] if ranks > 1 else []) + ["--master_port", str(free_port()), script]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), script]
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd + flags(assets, out, **kw), cwd=assets["root"], env=env(assets), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(p: subprocess.Popen, out: Path, timeout=240, rc=0) -> str:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    text = (out.parent / f"{out.name}.log").read_text()
    assert p.returncode == rc, f"exit {p.returncode}, expected {rc}:\n{text[-4000:]}"
    return text


def steps_of(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


CAUSAL_TYPES = ("gpt2", "llama", "qwen2", "mistral")


def auto_lm(out: Path):
    """transformers' Auto class for the exported student's kind."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    model_type = json.loads((out / "student" / "config.json").read_text())["model_type"]
    return AutoModelForCausalLM if model_type in CAUSAL_TYPES else AutoModelForMaskedLM


def checkpoint_student(out: Path):
    """The engine's student as saved by DeepSpeed (fp32 module states of the last checkpoint)."""
    from transformers import AutoConfig
    tag = (out / "checkpoints" / "latest").read_text().strip()
    sd = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                    weights_only=False)["module"]
    model = auto_lm(out).from_config(AutoConfig.from_pretrained(out / "student")).eval()
    missing, unexpected = model.load_state_dict({k.removeprefix("student.model."): v for k, v in sd.items()},
                                               strict=False)
    assert not unexpected and all("decoder" in k or "position_ids" in k or "vocab_projector" in k
                                  or "lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    return model


def assert_export_matches(out: Path, assets):
    """The exported folder loads in transformers and gives the logits of the engine's student."""
    from transformers import AutoTokenizer
    exported = auto_lm(out).from_pretrained(out / "student").eval()
    tok = AutoTokenizer.from_pretrained(out / "student")
    if tok.pad_token is None:  # GPT-2 style: no pad token; the mask tells padding apart
        tok.pad_token = tok.eos_token
    batch = tok(["the cat sees a dog .", "a small red bird sings in the old tree ."], padding=True,
                return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        a = exported(**batch).logits
        b = checkpoint_student(out)(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def ds_shm_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if "deepspeed" in f} if os.path.isdir("/dev/shm") else set()


# ---- bad input: clear errors, nothing overwritten ----------------------------------------------------

def test_bad_config_fields(tmp_path):
    from iit_fast.engine import read_ds_config as load_ds_config
    from iit_fast.config import make_config, parse_args
    with pytest.raises(ValueError, match="unknown config field.*'no_such_field'"):
        make_config({"no_such_field": 1})
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"max_steps": 5, "lr_shedule": "linear"}))
    with pytest.raises(ValueError, match="lr_shedule"):
        parse_args(["--config", str(run)])
    with pytest.raises(SystemExit):  # argparse: unknown flag
        parse_args(["--no_such_flag", "1"])
    with pytest.raises(ValueError, match="TrainConfig.max_steps"):
        make_config({"max_steps": -1})
    with pytest.raises(ValueError, match="DistillConfig.w_iit"):
        make_config({"w_iit": -0.5})
    with pytest.raises(ValueError, match="lr_schedule"):
        make_config({"lr_schedule": "exp"})
    run.write_text(json.dumps({"max_steps": 5, "w_iit": 0.5}))
    cfg = parse_args(["--config", str(run), "--w_iit", "0", "--dims", "0,16"])  # flags win over the file
    assert cfg.max_steps == 5 and cfg.distill.w_iit == 0 and cfg.distill.dims == (0, 16)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
                               "gradient_accumulation_steps": 2}))
    with pytest.raises(ValueError, match="train_batch_size.*train_micro_batch_size_per_gpu.*gradient_accumulation"):
        load_ds_config(str(bad), world_size=1)
    # the student configs (teacher_*.json are teacher plans, checked by tests/test_teacher_shard.py)
    names = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json") if not p.stem.startswith("teacher_"))
    assert {"zero0", "zero1", "zero2", "zero3", "zero2_bf16", "zero3_bf16", "zero2_offload"} <= set(names)
    for name in names:  # every shipped config: no DeepSpeed-built optimizer on CPU, batch fields agree
        ok = load_ds_config(f"ds_configs/{name}.json", world_size=2)
        assert ok["train_batch_size"] == 2 * ok["train_micro_batch_size_per_gpu"] * ok["gradient_accumulation_steps"]


def run_main(argv, capsys) -> tuple[int, str]:
    """train.main in-process: (exit code, stderr)."""
    from iit_fast.train import main
    capsys.readouterr()  # drop what came before (e.g. the test's own save_pretrained progress)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def test_missing_teacher_and_used_out_dir(tmp_path, assets, capsys):
    code, err = run_main(["--teacher", tmp_path / "nope", "--out_dir", tmp_path / "o"], capsys)
    assert code == 2 and re.search("--teacher .*not a Hugging Face model folder", err)
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("precious\n")
    code, err = run_main(flags(assets, used), capsys)
    assert code == 2 and re.search("holds files that are not a run.*nothing was overwritten: choose another", err)
    code, err = run_main(flags(assets, used) + ["--resume"], capsys)
    assert code == 2 and re.search("holds files that are not a run.*nothing was overwritten: choose another", err)
    assert (used / "metrics.jsonl").read_text() == "precious\n" and len(list(used.iterdir())) == 1
    assert not (tmp_path / "o").exists()


def _bad_inputs(root: Path, assets) -> dict:
    """name -> (extra flags, what the error line must say). Each is wrong in one way."""
    from transformers import AutoTokenizer, BertModel, BertTokenizer
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_bert
    cases = {}
    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    words = [w for w, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    headless = root / "headless"  # an encoder without an MLM head
    BertModel(tiny_bert(vocab=len(words)).config).save_pretrained(headless)
    tok.save_pretrained(headless)
    cases["no MLM head"] = (["--teacher", headless], "no LM head weights")
    small = root / "small_vocab"  # a student whose vocabulary is one token short
    tiny_bert(layers=2, vocab=len(words) - 1).save_pretrained(small)
    BertTokenizer(vocab={w: i for i, w in enumerate(words[:-1])}, do_lower_case=True).save_pretrained(small)
    cases["smaller student vocabulary"] = (["--student", small], "--student")
    align = root / "align.json"
    align.write_text(json.dumps([{"teachr": [1], "student": 0}]))
    cases["misspelled alignment key"] = (["--alignment", align], f"alignment file {align}.*teachr")
    cases["max_length above positions"] = (["--max_length", 100], "--max_length 100 .* positions")
    ds = root / "ds_typo.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_acumulation_steps": 2}))
    cases["misspelled DeepSpeed key"] = (["--deepspeed_config", ds], "gradient_acumulation_steps.*did you mean "
                                                                    "'gradient_accumulation_steps'")
    zero = root / "ds_zero_typo.json"
    zero.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stagee": 2}}))
    cases["misspelled zero key"] = (["--deepspeed_config", zero], "zero_optimization.*stagee")
    notjson = root / "ds.json"
    notjson.write_text("{stage: 2")
    cases["DeepSpeed config not JSON"] = (["--deepspeed_config", notjson], "not JSON")
    fp16 = root / "ds_fp16.json"
    fp16.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "fp16": {"enabled": True}}))
    if not torch.cuda.is_available():
        cases["fp16 on CPU"] = (["--deepspeed_config", fp16], "fp16 .*no GPU.*bf16")
    binary = root / "binary"
    binary.mkdir()
    (binary / "train.txt").write_bytes(bytes(range(256)) * 64)
    (binary / "validation.txt").write_text("the cat sees a dog .\n")
    cases["binary corpus"] = (["--corpus", binary], "train.txt")
    causal = decoder_teachers(root / "decoders")["gpt2"]  # a causal LM as the student of a masked LM
    cases["causal student of a masked teacher"] = (["--student", causal], "--student: kind='masked' was asked.*causal")
    empty = root / "empty"
    empty.mkdir()
    (empty / "train.txt").write_text("")
    (empty / "validation.txt").write_text("")
    cases["empty corpus"] = (["--corpus", empty], "empty|no text")
    return cases


def test_bad_input_fails_before_work(tmp_path, assets, capsys):
    """Everything checkable from the arguments and folders fails before the out_dir is written and before
    a process group forms: one `error:` line, no traceback, exit 2; the same command can then be rerun."""
    for name, (extra, expected) in _bad_inputs(tmp_path, assets).items():
        out = tmp_path / f"out_{len(name)}_{name[:5].replace(' ', '_')}"
        code, err = run_main(flags(assets, out) + extra, capsys)
        lines = [l for l in err.split("\n") if l.strip() and "\r" not in l]  # progress bars aside
        assert code == 2, (name, code, err)
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, (name, err)
        assert re.search(expected, lines[0]), (name, lines[0])
        assert not out.exists(), f"{name}: a failed start wrote {out}"


# ---- runs ------------------------------------------------------------------------------------------

def other_family_teachers(root: Path) -> dict[str, Path]:
    """Tiny RoBERTa (byte-level BPE, <s> </s> <mask>) and DistilBERT (WordPiece) teacher folders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BertTokenizer, RobertaTokenizerFast
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_distilbert, tiny_roberta
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                      ("<s>", bpe.token_to_id("<s>")))
    rtok = RobertaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    out = {"roberta": root / "roberta", "distilbert": root / "distilbert"}
    tiny_roberta(vocab=len(rtok)).save_pretrained(out["roberta"])
    rtok.save_pretrained(out["roberta"])
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [".", ","]
    tiny_distilbert(vocab=len(vocab)).save_pretrained(out["distilbert"])
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(out["distilbert"])
    return out


def decoder_teachers(root: Path) -> dict[str, Path]:
    """Tiny GPT-2 and Llama-style (GQA, SwiGLU, RoPE, untied head) teacher folders with a word-level
    tokenizer over the test corpus (<|endoftext|> as bos/eos, no pad token, as GPT-2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_gpt2, tiny_llama
    words = ["<|endoftext|>", "[UNK]"] + WORDS + [".", ","]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    out = {"gpt2": root / "gpt2", "llama": root / "llama"}
    g = tiny_gpt2(vocab=len(words), max_pos=64)
    g.config.bos_token_id = g.config.eos_token_id = 0
    g.save_pretrained(out["gpt2"])
    tiny_llama(vocab=len(words) + 3, max_pos=64).save_pretrained(out["llama"])  # 3 padding rows past the tokenizer
    for f in out.values():
        tok.save_pretrained(f)
    return out


def test_decoder_teachers_run_the_main_job(tmp_path, assets):
    """A causal-LM teacher (GPT-2, Llama-style) decides the objective: packed causal-LM data, next-token
    losses, a student initialised from the teacher's layers; the export loads in AutoModelForCausalLM with
    the engine's logits."""
    teachers = decoder_teachers(tmp_path)
    runs = {f: launch(assets, tmp_path / f"run_{f}", steps=2, teacher=t, eval_sequences=8,
                      stage=3 if f == "llama" else 2)  # and a decoder under ZeRO-3
            for f, t in teachers.items()}
    for family, p in runs.items():
        out = tmp_path / f"run_{family}"
        text = finish(p, out)
        rows = steps_of(out)
        assert [r["step"] for r in rows] == [1, 2], text[-2000:]
        assert all(math_finite(r[k]) for r in rows for k in ("loss", "ce", "mlm", "cos", "iit")), rows
        assert json.loads((out / "student" / "config.json").read_text())["model_type"] == family
        if family == "gpt2":
            assert_export_matches(out, assets)
        else:  # ZeRO-3 partitions the checkpoint's weights: the export is gathered; it loads and runs
            exported = auto_lm(out).from_pretrained(out / "student").eval()
            with torch.no_grad():
                assert torch.isfinite(exported(torch.tensor([[2, 3, 4, 5]])).logits).all()


def test_roberta_and_distilbert_teachers_run_the_main_job(tmp_path, assets):
    """Any supported masked-LM family is a teacher: the data pipeline reads its special tokens from the
    tokenizer; 2 steps run, and the exported student loads in transformers with the engine's logits."""
    teachers = other_family_teachers(tmp_path)
    runs = {f: launch(assets, tmp_path / f"run_{f}", steps=2, teacher=t) for f, t in teachers.items()}
    for family, p in runs.items():
        out = tmp_path / f"run_{family}"
        text = finish(p, out)
        assert [r["step"] for r in steps_of(out)] == [1, 2], text[-2000:]
        assert json.loads((out / "student" / "config.json").read_text())["model_type"] == family
        assert_export_matches(out, assets)


def test_precision_auto_picks_bf16_where_it_pays(tmp_path, assets):
    """--precision auto runs bf16 (DeepSpeed's bf16 mode, fp32 master weights, teacher in bf16) where a probe
    finds bf16 GEMMs faster, fp32 otherwise, and says which it chose and why; --precision forces either."""
    auto = launch(assets, tmp_path / "auto", steps=2, precision="auto", stage=0)
    bf16 = launch(assets, tmp_path / "bf16", steps=2, precision="bf16", stage=0)
    fp32 = launch(assets, tmp_path / "fp32", steps=2, precision="fp32", stage=0)
    text = {k: finish(p, tmp_path / k) for k, p in (("auto", auto), ("bf16", bf16), ("fp32", fp32))}
    assert "precision: fp32 (--precision fp32)" in text["fp32"] and ", bf16 |" not in text["fp32"]
    assert "precision: bf16, fp32 master weights" in text["bf16"] and ", bf16 |" in text["bf16"]
    line = next(l for l in text["auto"].splitlines() if l.startswith("precision: "))
    assert re.search(r"GEMM measured [0-9.]+x the fp32 one here|neither avx512_bf16 nor amx_bf16", line), line
    chose_bf16 = line.startswith("precision: bf16")
    assert (", bf16 |" in text["auto"]) == chose_bf16
    for k in ("auto", "bf16"):
        assert all(math_finite(r["loss"]) for r in steps_of(tmp_path / k))
        saved = json.loads((tmp_path / k / "train_config.json").read_text())
        assert saved["teacher_dtype"] == ("bfloat16" if k == "bf16" or chose_bf16 else "float32")


def test_teacher_cache_runs_without_a_teacher_pass(tmp_path, assets, capsys):
    """`iit-fast cache-teacher` once, then train.py --teacher_cache: the main job runs from the cache (no
    teacher validation, no teacher pass), resumes its data position, and a cache built for another
    max_length is refused before any work, naming the field."""
    from iit_fast.cli import main as cli
    cache = tmp_path / "cache16"
    common = ["--teacher", str(assets["teacher"]), "--corpus", str(assets["corpus"]), "--top_k", "8",
              "--plans", "2", "--hidden", "--student_layers", "2", "--cache_dir", str(assets["root"] / "cache"),
              "--no_progress"]
    # the first 48 rows only: a run trains on the rows its cache holds
    assert cli(["cache-teacher", "--max_length", "16", "--max_examples", "48", "--out", str(cache)] + common) == 0
    out = tmp_path / "cached"
    text = finish(launch(assets, out, steps=3, teacher_cache=cache), out)
    rows = steps_of(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math_finite(r[k]) for r in rows
                                                          for k in ("loss", "ce", "mlm", "cos", "iit"))
    assert "teacher" not in next(l for l in text.splitlines() if l.startswith("validation at step 0"))
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("teacher_val_perplexity" in r for r in records)
    code, err = run_main(flags(assets, tmp_path / "other", max_length=24, teacher_cache=cache), capsys)
    assert code == 2 and "another max_length" in err and not (tmp_path / "other").exists()


def test_monitor_resume_rules_and_validation_independent_of_batch_shape(tmp_path, assets, capsys):
    """DeepSpeed's CSV monitor gets the loss terms; the same model gets the same validation perplexity
    with micro-batch 4 or 8 and accumulation 1 or 2; --resume refuses a changed schedule and a finished run
    saves nothing."""
    ds = tmp_path / "ds_csv.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                              "steps_per_print": 10 ** 6, "zero_optimization": {"stage": 1},
                              "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"),
                                              "job_name": "job"}}))
    a = launch(assets, tmp_path / "a", steps=2, deepspeed_config=ds)
    b = launch(assets, tmp_path / "b", steps=2)  # micro-batch 8, accumulation 1
    finish(a, tmp_path / "a"), finish(b, tmp_path / "b")
    csvs = {f.name for f in (tmp_path / "csv").rglob("*.csv")}
    assert {"iit_fast_loss.csv", "iit_fast_iit.csv", "iit_fast_val_perplexity.csv"} <= csvs, csvs
    rows = (next((tmp_path / "csv").rglob("iit_fast_loss.csv")).read_text().splitlines())
    assert len(rows) == 1 + 2  # a header, steps 1 and 2
    val = {k: [json.loads(l) for l in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in "ab"}
    first = {k: next(r for r in v if "teacher_val_perplexity" in r) for k, v in val.items()}
    assert first["a"]["teacher_val_perplexity"] == pytest.approx(first["b"]["teacher_val_perplexity"], rel=1e-6)
    # resume: a changed schedule is refused; the finished run has nothing to do and writes nothing
    code, err = run_main(flags(assets, tmp_path / "b", steps=4, resume=True), capsys)
    assert code == 2 and "max_steps: 2 -> 4" in err and "same run" in err
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "b" / "checkpoints").iterdir())
    text = finish(launch(assets, tmp_path / "b", steps=2, resume=True), tmp_path / "b")
    assert "is complete" in text
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "b" / "checkpoints").iterdir()) == before

def test_single_rank_deepspeed_overfits_and_exports(tmp_path, assets):
    """Plain `deepspeed train.py` (one rank, no --num_gpus): the loss goes down on a small overfit case
    (two batches seen again and again, high lr; the student fits the teacher: ce + cos + iit, the mlm
    term logged but weighted 0, since a random tiny teacher and the true tokens pull apart); outputs,
    plots and the HF export are right."""
    shm = ds_shm_files()
    out = tmp_path / "overfit"
    p = launch(assets, out, launcher="deepspeed", steps=20, lr=3e-3, corpus=assets["root"] / "overfit", warmup_steps=2, lr_schedule="constant",
               eval_interval=10, plots="true", save_interval=10, w_mlm=0)
    text = finish(p, out)
    rows = steps_of(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for k in ("loss", "ce", "cos", "iit", "lr", "grad_norm", "tokens_per_s", "memory_mb"):
        assert all(r[k] is not None and r[k] == r[k] for r in rows), k
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.2 * first, (first, last)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_perplexity" in r] == [0, 10, 20]
    assert [r["step"] for r in records if "teacher_val_perplexity" in r] == [0]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "val.png").stat().st_size > 1000
    assert "val perplexity" in text and "tokens/s (median)" in text  # the summary table
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step10", "step20"]
    assert_export_matches(out, assets)
    assert ds_shm_files() == shm, "a run left DeepSpeed buffers in /dev/shm"
    # torch's extension cache holds exactly the project's native ops (built for the fused step), nothing of
    # DeepSpeed's (its CPU shm all-reduce op is switched off, else it would compile C++ at launch)
    from iit_fast.ops._native import LIBRARIES
    assert sorted(p.name for p in (assets["root"] / "torch_extensions").iterdir()) == sorted(LIBRARIES)


def test_zero_stages_match_single_process(tmp_path, assets):
    """ZeRO-1/2/3 (and torchrun) give the losses of ZeRO-0 single-process at steps 1 and 2 (the second
    step sees the first optimizer update); the non-finite guard skips, counts and stops."""
    runs = {0: launch(assets, tmp_path / "z0", stage=0, steps=2),
            1: launch(assets, tmp_path / "z1", launcher="torchrun", stage=1, steps=2),
            2: launch(assets, tmp_path / "z2", stage=2, steps=2),
            3: launch(assets, tmp_path / "z3", stage=3, steps=2)}
    nan = launch(assets, tmp_path / "nan", stage=2, steps=20, lr=1e30, warmup_steps=0, lr_schedule="constant",
                 max_nonfinite=2, w_cos=0)
    losses = {}
    for stage, p in runs.items():
        finish(p, tmp_path / f"z{stage}")
        losses[stage] = [r["loss"] for r in steps_of(tmp_path / f"z{stage}")]
    for stage in (1, 2, 3):
        torch.testing.assert_close(torch.tensor(losses[stage]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6,
                                   msg=f"ZeRO-{stage} {losses[stage]} vs single-process {losses[0]}")
    from transformers import AutoModelForMaskedLM
    exported = {s: AutoModelForMaskedLM.from_pretrained(tmp_path / f"z{s}" / "student") for s in (0, 3)}
    for (n, a), (_, b) in zip(exported[0].state_dict().items(), exported[3].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)  # consolidated ZeRO-3 export
    text = finish(nan, tmp_path / "nan", rc=1)
    assert "non-finite" in text and "max_nonfinite=2" in text and "Traceback" not in text
    saved = re.search(r"the last good state is saved in (\S+)\.", text)
    assert saved and Path(saved.group(1)).is_dir(), text[-1500:]  # the stop says where the last good state is


def test_kill_and_resume_equals_uninterrupted(tmp_path, assets, capsys):
    """SIGTERM saves a checkpoint at the next step boundary; --resume then gives the losses of a run that
    was never interrupted (same seed, dropout off), step for step."""
    steps = 24
    full = launch(assets, tmp_path / "full", steps=steps)
    cut = tmp_path / "cut"
    p = launch(assets, cut, steps=steps)
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if (cut / "metrics.jsonl").exists() and len(steps_of(cut)) >= 3:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    text = finish(p, cut, rc=128 + signal.SIGTERM)
    assert "SIGTERM: saved" in text
    stopped = len(steps_of(cut))
    assert 3 <= stopped < steps
    finish(launch(assets, cut, steps=steps, resume=True), cut)
    finish(full, tmp_path / "full")
    a, b = steps_of(cut), steps_of(tmp_path / "full")
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    for k in ("loss", "ce", "mlm", "cos", "iit", "lr"):
        torch.testing.assert_close(torch.tensor([r[k] for r in a]), torch.tensor([r[k] for r in b]), rtol=1e-5,
                                   atol=1e-7, msg=f"{k} after resuming at step {stopped}")
    # a changed config is refused on --resume, and nothing is touched
    before = (cut / "metrics.jsonl").read_text()
    code, err = run_main(flags(assets, cut, steps=steps, resume=True, lr=5e-4), capsys)
    assert code == 2 and re.search("config differs.*lr: 0.001 -> 0.0005", err)
    assert (cut / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_zero2(tmp_path, assets):
    """`deepspeed --num_gpus 2 train.py --deepspeed_config zero2`: two gloo ranks on CPU, a few steps;
    nothing built, nothing left in /dev/shm, the export equals the engine's student; the teacher's
    validation perplexity is the one rank's (validation does not depend on the world size)."""
    shm = ds_shm_files()
    out = tmp_path / "two"
    one = launch(assets, tmp_path / "one", steps=1)
    text = finish(launch(assets, out, launcher="deepspeed", ranks=2, stage=2, steps=4, eval_interval=2), out)
    finish(one, tmp_path / "one")
    teacher_val = {k: next(json.loads(l)["teacher_val_perplexity"] for l in (tmp_path / k / "metrics.jsonl")
                           .read_text().splitlines() if "teacher_val_perplexity" in l) for k in ("one", "two")}
    assert teacher_val["two"] == pytest.approx(teacher_val["one"], rel=1e-6), teacher_val
    assert "2 rank(s) on cpu, ZeRO-2" in text
    rows = steps_of(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math_finite(r["loss"]) for r in rows)
    ckpt = out / "checkpoints" / "step4"
    assert {"rank0_state.pt", "rank1_state.pt"} <= {f.name for f in ckpt.iterdir()}
    assert_export_matches(out, assets)
    assert ds_shm_files() == shm


def math_finite(x) -> bool:
    return x == x and abs(x) != float("inf")
