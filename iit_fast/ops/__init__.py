"""Fused ops of causal distillation. Each has a plain PyTorch reference (`reference.py`), a Triton path
(CUDA), a native C++ path (CPU) and a dispatcher that says which path runs."""
from .head_loss import distill_head_loss
from .interchange import hidden_loss, interchange, interchange_hidden_loss

__all__ = ["interchange", "hidden_loss", "interchange_hidden_loss", "distill_head_loss"]
