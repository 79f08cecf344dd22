"""One config dataclass for a causal-distillation step (DESIGN.md sections 1 and 2).

Every field is checked in `__post_init__`, so a bad value fails when the config is made, naming the field;
what depends on the models (the family's kind) is checked by `logit_tokens_for` (and `step.check_pair`).

Masked and causal LMs share every field. For a causal LM (GPT-2, Llama-family; DESIGN.md section 7) the
terms read: `ce` is T^2 KL between next-token distributions (the logits at position t predict token t + 1)
at every real position with a real next token; `w_mlm` weighs the decoder counterpart of the MLM loss,
the student's next-token cross-entropy on the shifted labels (the name is kept, so that one config and one
set of flags serve both kinds); `cos` / `mse` as for masked LMs; `iit` / `iit_cos` on the counterfactual
pass at the positions `logit_tokens` names.

`logit_tokens` (where the KL terms are taken; "auto" picks per kind):
- masked LMs: "all" real tokens (the default) or only the "masked" ones (the MLM targets);
- causal LMs: "all" real positions (the published style) or only the positions the swap can change,
  "affected" (the default): those >= the row's base-span start b. In a causal model nothing before b
  changes, in any block, so at t < b the counterfactual KL *is* the plain `ce` KL at t. With "all", `iit` therefore adds
  w_iit times the ce KL of the positions before the span (they are counted twice, once in each term, and
  weigh more than the rest) and its mean is diluted by positions that carry no intervention signal (about
  a third of them on average); "affected" measures only what the intervention can change, and skips the
  logits before b. With "affected", `iit_cos` is also taken at positions >= b only.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

MODES = ("fast", "naive", "standard")
LOGIT_TOKENS = ("auto", "all", "masked", "affected")
LOGIT_TOKENS_BY_KIND = {"masked": ("all", "masked"), "causal": ("all", "affected")}
DEFAULT_LOGIT_TOKENS = {"masked": "all", "causal": "affected"}  # see the module docstring
OPS = ("reference", "fused")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DistillConfig:
    # Loss weights (the published recipe). Standard distillation is the same run with w_iit = 0.
    w_ce: float = 0.25       # T^2 KL(teacher || student) on soft targets
    w_mlm: float = 0.25      # cross-entropy on the MLM targets (causal LMs: next-token CE, shifted labels)
    w_cos: float = 0.25      # 1 - cos on last hidden states
    w_iit: float = 0.25      # T^2 KL on the counterfactual outputs
    w_iit_cos: float = 0.0   # 1 - cos on the counterfactual last hidden states
    w_mse: float = 0.0       # hidden-state MSE at the aligned sites (plain pass)
    temperature: float = 2.0

    alignment: str = "middle"          # preset (middle | late | full) or path to a JSON file
    span_fraction: float = 0.3         # p: span length k = max(1, floor(p * min(len_base, len_source)))
    dims: tuple[int, int] | None = None  # half-open slice of the hidden dims that is swapped; None = all

    mode: str = "fast"                 # fast | naive | standard (standard = fast without the IIT terms)
    logit_tokens: str = "auto"         # where ce / iit are taken (see above): auto | all | masked | affected
    ops: str = "fused"                 # reference (plain PyTorch) | fused (Triton on CUDA, native on CPU)
    head_chunk: int | None = None      # tokens per chunk of the logit losses; None = from a memory budget
    # vocabulary rows the logit losses compare: len(tokenizer) when teacher and student pad their embedding
    # matrices to different sizes (e.g. 152064 vs 151936 rows over one tokenizer); None = the models'
    # vocabulary, which must then be the same size
    shared_vocab: int | None = None
    # causal LMs: the counterfactual passes compute positions >= q0 only, over the plain pass's keys/values
    # before q0; the rows, sorted by base-span start, are cut into at most this many groups with one q0 each
    # (the group's earliest start). 1 = one q0 for the batch (its minimum start, which for a large batch is
    # near 0, so almost nothing is saved); more groups save more positions at the cost of more, smaller passes.
    suffix_groups: int = 4

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
        if self.shared_vocab is not None and self.shared_vocab < 1:
            raise ValueError(f"DistillConfig.shared_vocab must be >= 1 or None, got {self.shared_vocab}")
        if self.suffix_groups < 1:
            raise ValueError(f"DistillConfig.suffix_groups must be >= 1, got {self.suffix_groups}")

    def logit_tokens_for(self, kind: str) -> str:
        """`logit_tokens` for a model of `kind` ("masked" or "causal"): "auto" resolved, a combination that
        does not exist for that kind refused, naming the field."""
        if kind not in LOGIT_TOKENS_BY_KIND:
            raise ValueError(f"kind must be one of {tuple(LOGIT_TOKENS_BY_KIND)}, got {kind!r}")
        if self.logit_tokens == "auto":
            return DEFAULT_LOGIT_TOKENS[kind]
        if self.logit_tokens not in LOGIT_TOKENS_BY_KIND[kind]:
            raise ValueError(f"DistillConfig.logit_tokens={self.logit_tokens!r} does not apply to a {kind} LM; "
                             f"expected one of {('auto',) + LOGIT_TOKENS_BY_KIND[kind]}")
        return self.logit_tokens

    @property
    def uses_iit(self) -> bool:
        """Does this step need the counterfactual passes at all?"""
        return self.mode != "standard" and (self.w_iit > 0 or self.w_iit_cos > 0)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
