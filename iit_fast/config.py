"""One config dataclass for a causal-distillation step (DESIGN.md sections 1 and 2).

Every field is checked in `__post_init__`, so a bad value fails when the config is made, naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

MODES = ("fast", "naive", "standard")
LOGIT_TOKENS = ("all", "masked")
OPS = ("reference", "fused")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DistillConfig:
    # Loss weights (the published recipe). Standard distillation is the same run with w_iit = 0.
    w_ce: float = 0.25       # T^2 KL(teacher || student) on soft targets
    w_mlm: float = 0.25      # cross-entropy on the MLM targets
    w_cos: float = 0.25      # 1 - cos on last hidden states
    w_iit: float = 0.25      # T^2 KL on the counterfactual outputs
    w_iit_cos: float = 0.0   # 1 - cos on the counterfactual last hidden states
    w_mse: float = 0.0       # hidden-state MSE at the aligned sites (plain pass)
    temperature: float = 2.0

    alignment: str = "middle"          # preset (middle | late | full) or path to a JSON file
    span_fraction: float = 0.3         # p: span length k = max(1, floor(p * min(len_base, len_source)))
    dims: tuple[int, int] | None = None  # half-open slice of the hidden dims that is swapped; None = all

    mode: str = "fast"                 # fast | naive | standard (standard = fast without the IIT terms)
    logit_tokens: str = "all"          # where ce / iit are taken: all real tokens, or masked tokens only
    ops: str = "fused"                 # reference (plain PyTorch) | fused (Triton on CUDA, native on CPU)
    head_chunk: int | None = None      # tokens per chunk of the logit losses; None = from a memory budget

    teacher_dtype: str = "float32"     # the frozen teacher may run in bfloat16
    student_autocast: str = "float32"  # autocast dtype of the student's passes (losses stay fp32)

    def __post_init__(self):
        for f in ("w_ce", "w_mlm", "w_cos", "w_iit", "w_iit_cos", "w_mse"):
            if getattr(self, f) < 0:
                raise ValueError(f"DistillConfig.{f} must be >= 0, got {getattr(self, f)}")
        if not self.temperature > 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
        if not 0 < self.span_fraction <= 1:
            raise ValueError(f"DistillConfig.span_fraction must be in (0, 1], got {self.span_fraction}")
        if self.dims is not None:
            d0, d1 = self.dims
            if not 0 <= d0 < d1:
                raise ValueError(f"DistillConfig.dims must be (start, end) with 0 <= start < end, got {self.dims}")
            self.dims = (int(d0), int(d1))
        for name, allowed in (("mode", MODES), ("logit_tokens", LOGIT_TOKENS), ("ops", OPS),
                              ("teacher_dtype", DTYPES), ("student_autocast", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DistillConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.head_chunk is not None and self.head_chunk < 1:
            raise ValueError(f"DistillConfig.head_chunk must be >= 1 or None, got {self.head_chunk}")

    @property
    def uses_iit(self) -> bool:
        """Does this step need the counterfactual passes at all?"""
        return self.mode != "standard" and (self.w_iit > 0 or self.w_iit_cos > 0)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
