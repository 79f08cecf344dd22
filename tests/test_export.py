"""iit_fast.export: a plain Hugging Face folder from a student, without DeepSpeed or a process group."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import iit_fast
from iit_fast.export import hf_model
from iit_fast.models import IntervenableLM
from tiny import TINY, TINY_CAUSAL, tiny_bert_tokenizer, tiny_causal_tokenizer

FAMILIES = [("bert", TINY["bert"], AutoModelForMaskedLM), ("roberta", TINY["roberta"], AutoModelForMaskedLM),
            ("distilbert", TINY["distilbert"], AutoModelForMaskedLM),
            ("gpt2", TINY_CAUSAL["gpt2"], AutoModelForCausalLM), ("llama", TINY_CAUSAL["llama"], AutoModelForCausalLM)]


@pytest.mark.parametrize("family,make,auto", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_export_plain_folder_loads_with_the_same_logits(tmp_path, family, make, auto):
    hf = make(layers=2)
    student = IntervenableLM(hf)
    with torch.no_grad():  # a trained-looking student: not what the constructor would give again
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = tiny_bert_tokenizer() if auto is AutoModelForMaskedLM else tiny_causal_tokenizer()
    assert not dist.is_initialized()
    out = iit_fast.export(student, tok, tmp_path / "student")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    loaded = auto.from_pretrained(out, attn_implementation="eager").eval()  # as the tiny models
    ids = torch.randint(6, 90, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, hf.eval()(input_ids=ids).logits)
    assert loaded.dtype == torch.float32


def test_export_bf16_student_writes_fp32(tmp_path):
    hf = TINY["bert"](layers=2)
    ref = {n: p.detach().clone() for n, p in hf.named_parameters()}
    hf = hf.to(torch.bfloat16)
    iit_fast.export(hf, None, tmp_path / "s")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "s")
    assert loaded.dtype == torch.float32
    for n, p in loaded.named_parameters():
        assert torch.equal(p, ref[n].to(torch.bfloat16).float()), n


def test_export_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(TypeError, match="export: expected a Hugging Face model, an IntervenableLM or a DistillStep"):
        iit_fast.export(torch.nn.Linear(2, 2), None, tmp_path / "x")
    hf = TINY["bert"](layers=2)
    with pytest.raises(RuntimeError, match="export: the weights do not fit BertForMaskedLM: missing"):
        iit_fast.export(hf, None, tmp_path / "y", state_dict={})
    assert hf_model(IntervenableLM(hf)) is hf


def test_export_needs_no_deepspeed(tmp_path):
    """In a fresh interpreter with no process group: iit_fast (with its export) imports no DeepSpeed, and the
    export needs no engine, no process group and no barrier (the training run's export_student needed all three)."""
    code = f"""
import sys
sys.path.insert(0, {str(tmp_path.parent)!r})
import iit_fast, torch.distributed as dist
assert 'deepspeed' not in sys.modules, 'import iit_fast imported deepspeed'
from transformers import GPT2Config, GPT2LMHeadModel
m = GPT2LMHeadModel(GPT2Config(vocab_size=50, bos_token_id=0, eos_token_id=0, n_embd=16, n_layer=1, n_head=2, n_positions=16))
iit_fast.export(m, None, {str(tmp_path / 'out')!r})
assert not dist.is_initialized()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "config.json").is_file()
