"""The configs: `DistillConfig` (one causal-distillation step; docs/method.md) and `TrainConfig` (the main
job: every flag of train.py is one of its fields or a DistillConfig field), and the flag parser.

Every field is checked in `__post_init__`, so a bad value fails when the config is made, naming the field;
what depends on the models (the family's kind) is checked by `logit_tokens_for` (and `step.check_pair`).

Masked and causal LMs share every field. For a causal LM (GPT-2, Llama-family; docs/method.md section 4) the
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

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser

from .ops.head_loss.divergence import KINDS as DIVERGENCES
from .ops.head_loss.divergence import Divergence, check_alpha, check_beta
from .optim import SCHEDULES

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
    # the divergence of each logit term (ops/head_loss/divergence.py), set separately for ce and iit:
    # forward_kl (KL(teacher || student), the default) | reverse_kl | jsd (jsd_beta; TRL's generalized JSD) |
    # skew_kl | skew_reverse_kl (skew_alpha; DistiLLM's) | tvd. Every one enters as T^2 * mean over tokens.
    ce_divergence: str = "forward_kl"
    iit_divergence: str = "forward_kl"
    jsd_beta: float = 0.5     # jsd, in [0, 1]: 0 = forward KL, 1 = reverse KL (TRL's GKDTrainer convention)
    skew_alpha: float = 0.1   # skew_kl / skew_reverse_kl, in [0, 1): the mixture's share of the divergence's
                              # first argument (DistiLLM's default 0.1; 0 = the plain KL)

    alignment: str = "middle"          # preset (middle | late | full) or path to a JSON file
    span_fraction: float = 0.3         # p: span length k = max(1, floor(p * min(len_base, len_source)))
    dims: tuple[int, int] | None = None  # half-open slice of the hidden dims that is swapped; None = all

    mode: str = "fast"                 # fast | naive | standard (standard = fast without the IIT terms)
    logit_tokens: str = "auto"         # where ce / iit are taken (see above): auto | all | masked | affected
    ops: str = "fused"                 # reference (plain PyTorch) | fused (Triton on CUDA, native on CPU)
    head_chunk: int | None = None      # tokens per chunk of the logit losses; None = from a memory budget
    # CPU: a decoder whose fp32 weight gradient fits this many MB has its head-loss gradients formed in the
    # forward and held to the backward (4 GEMMs a call, not 6); None = ops.head_loss.RESIDENT_GRAD_BYTES (256);
    # 0 = always recompute in the backward (nothing (V, D) held)
    head_resident_grad_mb: int | None = None
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
        if self.head_resident_grad_mb is not None and self.head_resident_grad_mb < 0:
            raise ValueError(f"DistillConfig.head_resident_grad_mb must be >= 0 (MB) or None, got "
                             f"{self.head_resident_grad_mb}")
        if self.shared_vocab is not None and self.shared_vocab < 1:
            raise ValueError(f"DistillConfig.shared_vocab must be >= 1 or None, got {self.shared_vocab}")
        if self.suffix_groups < 1:
            raise ValueError(f"DistillConfig.suffix_groups must be >= 1, got {self.suffix_groups}")
        for name in ("ce_divergence", "iit_divergence"):
            if getattr(self, name) not in DIVERGENCES:
                raise ValueError(f"DistillConfig.{name} must be one of {DIVERGENCES}, got {getattr(self, name)!r}")
        self.jsd_beta = check_beta(self.jsd_beta, "DistillConfig.jsd_beta")
        self.skew_alpha = check_alpha(self.skew_alpha, "DistillConfig.skew_alpha")

    def divergence(self, term: str) -> Divergence:
        """The divergence of the `ce` or `iit` term, with its parameter (jsd at beta 0 / 1 is forward /
        reverse KL; skew at alpha 0 the plain KL)."""
        if term not in ("ce", "iit"):
            raise ValueError(f"term must be 'ce' or 'iit', got {term!r}")
        return Divergence.of(getattr(self, f"{term}_divergence"), beta=self.jsd_beta, alpha=self.skew_alpha)

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


# ---------------------------------------------------------------------------------------------------
# the main job's config and its flags
# ---------------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    # what is distilled into what
    teacher: str | None = None        # HF folder of a supported LM (masked or causal); None = the embedded default
    student: str | None = None        # HF folder to start the student from; None = init from the teacher
    student_layers: int = 3           # blocks of a student initialised from the teacher
    # a narrower student initialised from the teacher: JSON (inline or a file) of num_layers, hidden_size,
    # num_attention_heads, num_key_value_heads, intermediate_size (iit_fast/models/student.py)
    student_config: str | None = None
    corpus: str | None = None         # load_corpus spec; None = the embedded default corpus
    text_column: str = "text"         # the column of .jsonl/.json/.parquet corpus rows that holds the text
    teacher_cache: str | None = None  # a cache of the teacher's outputs (iit-fast cache-teacher): no teacher pass
    max_length: int = 128             # tokens per sequence
    mlm_probability: float = 0.15
    # how long, how fast
    max_steps: int = 60               # optimizer steps (sized for ~10 minutes on 2 CPU cores)
    epochs: int = 0                   # > 0: train this many epochs instead of max_steps
    lr: float = 2e-4
    lr_schedule: str = "linear"       # one of optim.SCHEDULES, after a linear warmup
    warmup_steps: int = 5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    dropout: float | None = None      # override the student's dropout (0 makes runs exactly repeatable)
    max_nonfinite: int = 10           # stop after this many skipped steps (non-finite loss, or overflow)
    # bookkeeping
    eval_interval: int = 20           # steps between validations (and one at the start and the end)
    eval_sequences: int = 160         # validation sequences (fixed rows and masks: any batch shape, same figure)
    save_interval: int = 0            # steps between checkpoints; 0 = only at the end (and on SIGINT/TERM)
    log_interval: int = 1             # steps between metrics lines
    out_dir: str | None = None        # default runs/<UTC timestamp>
    resume: bool = False              # continue the run in out_dir from its latest checkpoint
    seed: int = 0
    deepspeed_config: str = "ds_configs/zero2.json"
    cache_dir: str | None = None      # where the default teacher is built / found
    num_proc: int = 1                 # tokenisation processes
    num_workers: int = 0              # DataLoader workers (batches and masks do not depend on it)
    group_by_length: bool = True      # batches of similar lengths (less padding)
    plots: bool = True
    precision: str = "auto"           # auto (bf16 where a probe finds bf16 GEMMs >= 1.3x fp32) | bf16 | fp32
    keep_checkpoints: int = 0         # keep the newest N intact checkpoints; 0 = keep all
    shard_teacher: str = "auto"       # auto | yes | no: partition the teacher under ZeRO-3 (auto: if > 1 GiB)
    teacher_deepspeed_config: str | None = None  # the teacher's own ZeRO-3 plan (ds_configs/teacher_*.json)
    activation_checkpointing: bool = False  # recompute the student's blocks in backward (activation_checkpointing.py)
    compile: str = "off"              # off | linear (bias inside the GEMM) | blocks (+ torch.compile per block): compile.py
    rank_timeout: float = 300.0       # seconds a collective waits for a rank that stopped responding
    # generated data, causal LMs only (iit_fast/generate.py; TRL GKDTrainer's lmbda and seq_kd): a share of the
    # micro-batches whose continuations the student samples from corpus prompts (on-policy), and with seq_kd
    # the teacher samples the others' (sequence-level KD); the losses are then taken on the continuations
    on_policy_fraction: float = 0.0   # lambda in [0, 1]: the share of micro-batches the student continues
    seq_kd: bool = False              # the teacher continues the micro-batches the student does not
    gen_temperature: float = 1.0      # sampling temperature of the continuations (> 0; full distribution)
    max_new_tokens: int | None = None  # continuation length (stops at EOS); None = max_length // 2
    # the step's own fields: every DistillConfig field is a flag too (not a TrainConfig field: init=False)
    distill: DistillConfig = field(default_factory=DistillConfig, init=False)

    def __post_init__(self):
        positive = ("student_layers", "max_length", "log_interval", "eval_sequences", "max_nonfinite")
        for f in positive:
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("max_steps", "epochs", "warmup_steps", "eval_interval", "save_interval", "num_proc",
                  "keep_checkpoints"):
            if getattr(self, f) < 0:
                raise ValueError(f"TrainConfig.{f} must be >= 0, got {getattr(self, f)}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("TrainConfig: set max_steps > 0 or epochs > 0")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"TrainConfig.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"TrainConfig: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, "
                             f"min_lr={self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        for name, allowed in (("lr_schedule", SCHEDULES), ("precision", PRECISIONS),
                              ("shard_teacher", ("auto", "yes", "no")), ("compile", ("off", "linear", "blocks"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.rank_timeout > 0:
            raise ValueError(f"TrainConfig.rank_timeout must be > 0 seconds, got {self.rank_timeout}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1) or None, got {self.dropout}")
        if not 0 <= self.on_policy_fraction <= 1:
            raise ValueError(f"TrainConfig.on_policy_fraction (lambda) must be in [0, 1], got {self.on_policy_fraction}")
        if not self.gen_temperature > 0:
            raise ValueError(f"TrainConfig.gen_temperature must be > 0, got {self.gen_temperature}")
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens < self.max_length:
            raise ValueError(f"TrainConfig.max_new_tokens must be in [1, max_length={self.max_length}) (the prompt "
                             f"keeps at least one token), got {self.max_new_tokens}")
        if self.generates and self.teacher_cache:
            raise ValueError(f"--teacher_cache: {'--seq_kd' if self.seq_kd else '--on_policy_fraction'} generates "
                             f"rows the teacher must score, and a cache holds its outputs on the corpus rows only; "
                             f"expected one of them, not both")

    @property
    def generates(self) -> bool:
        """Are some micro-batches generated (on-policy or seq_kd)?"""
        return self.on_policy_fraction > 0 or self.seq_kd

    @property
    def max_new_tokens_or_default(self) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_length // 2

    def to_json(self) -> dict:
        """Flat field values (TrainConfig and DistillConfig names): what train_config.json holds."""
        d = asdict(self)
        d.update(d.pop("distill"))
        return d


def make_config(values: dict) -> TrainConfig:
    """A TrainConfig from flat field values (TrainConfig and DistillConfig names); unknown names are an error."""
    tnames = {f.name for f in fields(TrainConfig) if f.init}
    dnames = set(DistillConfig.field_names())
    unknown = sorted(set(values) - tnames - dnames)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(tnames | dnames)}")
    d = {k: v for k, v in values.items() if k in dnames}
    if isinstance(d.get("dims"), list):
        d["dims"] = tuple(d["dims"])
    distill = DistillConfig(**d)  # checked first: its errors name its fields
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in tnames})
    cfg.distill = distill
    return cfg


def _dims(s: str):
    """--dims START,END (or none)."""
    return None if s.lower() == "none" else tuple(int(x) for x in s.split(","))


def flag_parser() -> HfArgumentParser:
    """transformers' HfArgumentParser over TrainConfig and DistillConfig: one flag per field, with its type,
    default and choices; `--config run.json` (below) fills any of them."""
    p = HfArgumentParser((TrainConfig, DistillConfig), description="Causal distillation (DIITO) under "
                         "DeepSpeed: every flag is a TrainConfig or DistillConfig field (iit_fast/config.py).")
    p.add_argument("--config", help="JSON file of field values (flags given on the command line win)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    for action in p._actions:  # the one field argparse cannot type from its annotation
        if action.dest == "dims":
            action.type, action.metavar = _dims, "START,END"
    return p


def read_config_file(path: str) -> dict:
    """The field values of a --config JSON file; a file that is missing or not a JSON object is refused,
    naming the file."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of field values, got {type(values).__name__}")
    return values


def parse_args(argv=None) -> TrainConfig:
    """Flags map 1:1 to TrainConfig and DistillConfig fields; unknown flags and config keys are errors.
    The values of --config are the parser's defaults, so a flag given on the command line wins."""
    p = flag_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        values = read_config_file(pre.config)
        try:
            make_config(values)  # an unknown or bad field fails here, naming the file
        except ValueError as e:
            raise ValueError(f"--config {pre.config}: {e}") from None
        p.set_defaults(**values)
    args = vars(p.parse_args(argv))
    names = {f.name for f in fields(TrainConfig) if f.init} | set(DistillConfig.field_names())
    return make_config({k: v for k, v in args.items() if k in names})
