"""Test setup. TRITON_INTERPRET must be set before anything imports a Triton kernel: on a machine
with no GPU the Triton kernels can only run in the interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def head_loss_recompute(monkeypatch):
    """distill_head_loss with its backward recomputing the logits (nothing (V, D) held), the path of LLM-size
    decoders; the tiny test decoders would otherwise get their gradients formed in the forward (tested in
    test_ops_head_loss_eager.py)."""
    import iit_fast.ops.head_loss as head_loss
    monkeypatch.setattr(head_loss, "RESIDENT_GRAD_BYTES", 0)
