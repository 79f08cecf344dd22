"""Fused ops of causal distillation, one folder per op (Liger-Kernel's layout): `<op>/__init__.py` the
dispatcher (says which path runs) and autograd Functions, `<op>/reference.py` the plain PyTorch ground truth,
`<op>/triton.py` the CUDA kernels, `<op>/native.cpp` the CPU kernels (built on first use by `_native.py`).
`head_loss/` also holds its chunk loop (`chunked.py`), the per-chunk inner steps (`inner.py`, `native.py`)
and the sparse top-k loss (`sparse.py`). `aot.py` compiles the Triton kernels ahead of time (no GPU)."""
from .head_loss import distill_head_loss
from .interchange import hidden_loss, interchange, interchange_hidden_loss

__all__ = ["interchange", "hidden_loss", "interchange_hidden_loss", "distill_head_loss"]
