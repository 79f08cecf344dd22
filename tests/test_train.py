"""The training entry point (iit_fast/train.py): single process, ZeRO stages, the deepspeed launcher,
resume, export, bad input. Tiny models and a tiny corpus built in tmp_path: no download.

Every run is a subprocess (DeepSpeed initialises a process group), with a free --master_port, a timeout
and TORCH_EXTENSIONS_DIR under tmp_path (nothing is ever built: the test checks that folder stays empty).
"""
from __future__ import annotations

import json
import os
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
    return teacher, corpus
