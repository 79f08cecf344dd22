"""`iit-fast plan`: bytes per rank of one distillation step, by part, and the largest micro-batch that fits.

    iit-fast plan --teacher meta-llama/Llama-3.2-1B-folder --student_layers 4 --seq 2048 --micro_batch 8 \\
        --precision bf16-autocast --activation_checkpointing --device_memory_gb 24 --device cpu
    iit-fast plan --teacher llama8b/config.json --student llama1b/config.json --seq 4096 --zero_stage 2 \\
        --teacher_plan zero3 --world_size 8 --activation_checkpointing --device_memory_gb 80

The teacher and the student are Hugging Face configs (a model folder, or a config JSON file): the planner
never reads a weight. Parameter counts come from the model built on the meta device, so they are exact for
any family transformers knows. The activation model is the fast step's actual passes (step.fast_causal_step,
models.IntervenableLM), for the decoder families llama, qwen2 and mistral (the LLM case this is for):

- student plain pass (with grad): per block and token, what autograd keeps for backward, counted by a
  saved-tensor census of `IntervenableLM` blocks (tests/test_plan.py repeats it): with fp32 residual states
  under bf16 autocast 30.5 D + 8 I + 4 K + 4 H + 8 bytes (D hidden, I MLP width, K = key-value heads x head dim,
  H query heads); fp32 32.5 D + 16 I + 8 K + 4 H + 8; bf16 weights (DeepSpeed's bf16 mode) 21.25 D + 8 I + 4 K +
  4 H + 8. Under autocast the bf16 copies of the block matrices are kept too (2 bytes per weight, per autocast
  region that casts them: the plain pass and the counterfactual each open one).
  With activation checkpointing a block keeps its input states and, while a key/value cache is in use, its
  keys/values (2 K x 2 bytes in bf16); backward recomputes one block at a time (its full census, once).
- counterfactual (`iit`): the student's suffix passes, blocks s+1.. for the positions >= each group's q0
  (the census over those tokens, plus per block the keys/values of all S positions its attention reads:
  the cached prefix joined to the new ones); the site swap and the joined last states (3 x (B, S, D)).
  q0: "worst" (every group from position 0: what a micro-batch must fit), "expected" (the mean of the sorted
  span starts per group), or the plan's actual starts.
- teacher (no grad): its key/value cache over every block (2 K_t per token per block, in its dtype) for the
  counterfactual, the kept site, its last states and its counterfactual last states; one block's working set
  (transient: live in its forward only, before the student's activations exist).
- head loss (`ops.distill_head_loss`, recompute-in-backward design): per call the selected rows' states (the
  final norm's saved tensors, 12 D_s + 2 D_t bytes per row); transient: the chunk's logit buffers (256 MB
  budget) and, in backward, one fp32 (V, D) weight gradient per call (with iit two calls: counted as both live
  before they reach the weight, which the measured Llama rows bear out within 3-9%); on the CPU, a decoder whose fp32
  gradient fits 256 MB (--head_resident_grad_mb) has each call's gradients (dW, dh) formed in its forward and
  held to the backward instead.
- naive (the published structure): three passes per model over all positions, full (B, S, V) logits, the
  reference losses (`ops.head_loss.reference`: log-softmax and teacher probabilities in fp32 kept for
  backward), the source pass's graph below the site.

The peak: the weights, the optimizer state and the teacher's kept states are resident; the step's peak is the
largest of the teacher's forward (its block working set), the start of backward (every saved activation, the
decoder's gradient, and the larger of the head losses' backward buffers and a block's backward working set:
the head losses' backward runs before the blocks') and its end (every gradient, and a tied embedding's dense
gradient before it is added to the decoder's): the blocks' gradients land as their activations are freed, so
the two do not add.

Weights, gradients and optimizer state follow ZeRO's accounting (Rajbhandari et al. 2020): fp32 weights 4 + 4
(grads) + 8 (AdamW moments); DeepSpeed bf16 mode 2 + 2 + 12 (fp32 master + moments), the optimizer part
divided by the world size from stage 1, the gradients from stage 2, the weights at stage 3. The teacher:
replicated (its dtype's bytes), ZeRO-3 sharded (1/world, plus two gathered blocks in flight), or ZeRO-3 with
CPU offload (only the gathered blocks on the device).

What it does not model: the process itself (interpreter, libraries, CUDA context; `runtime` of
benchmarks/llm_shapes.py), allocator fragmentation (on a GPU pass --usable_fraction), communication buffers.
Validated against measured peaks in benchmarks/results/planner-validation.md.

Over 400 lines with this docstring, which is the cost model's statement; the code is that one model and its
subcommand.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .sampling import _middle

MODELLED = ("llama", "qwen2", "mistral")
PRECISIONS = ("fp32", "bf16-autocast", "bf16")   # bf16 = DeepSpeed's bf16 mode (bf16 weights, fp32 master)
TEACHER_PLANS = ("replicated", "zero3", "zero3-offload")
MODES = ("fast", "naive", "standard")
HEAD_CHUNK_BUDGET = 256 * 2**20                    # ops.head_loss.chunked.DEFAULT_MEMORY_BUDGET
RESIDENT_GRAD_BYTES = 256 * 2**20                  # ops.head_loss.RESIDENT_GRAD_BYTES
GiB = 2**30

# bytes per token per block kept for backward: (D, I, K, H, 1) coefficients, by how the student computes
BLOCK_CENSUS = {"bf16-autocast": (30.5, 8, 4, 4, 8), "fp32": (32.5, 16, 8, 4, 8), "bf16": (21.25, 8, 4, 4, 8)}


def load_config(src):
    """A transformers config from a model folder, a config JSON file, a dict or a config object."""
    if isinstance(src, PretrainedConfig):
        return src
    if isinstance(src, dict):
        d = dict(src)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    p = Path(src)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{src}: a model folder needs a config.json")
        return AutoConfig.from_pretrained(p)
    if p.is_file():
        d = json.loads(p.read_text())
        if "model_type" not in d:
            raise ValueError(f"{src}: a config JSON needs model_type")
        return load_config(d)
    raise FileNotFoundError(f"{src}: neither a model folder nor a config JSON file")


@dataclass
class Dims:
    """What the activation model reads of a config (and its parameter counts, from the meta-device model)."""
    model_type: str
    layers: int
    D: int
    I: int
    H: int
    K: int            # key-value width: kv heads x head dim
    V: int
    positions: int
    params: int       # every parameter, tied ones once
    block_params: int  # one block's parameters
    block_matrices: int  # one block's 2-D weights (what autocast casts)
    tied: bool = False   # the decoder is the embedding matrix


def dims_of(config, layers: int | None = None) -> Dims:
    """Dims of `config`, optionally cut to its first `layers` blocks (a student made of the teacher's layers
    has the same shapes per block)."""
    mt = config.model_type
    if mt not in MODELLED:
        raise ValueError(f"the planner models the decoder families {MODELLED}; model_type {mt!r} is not modelled")
    if layers is not None:
        config = copy.deepcopy(config)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:layers]
        config.num_hidden_layers = layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p for p in model.parameters()}
    block = model.model.layers[0]
    H = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // H
    return Dims(mt, config.num_hidden_layers, config.hidden_size, config.intermediate_size, H,
                getattr(config, "num_key_value_heads", H) * hd, config.vocab_size,
                getattr(config, "max_position_embeddings", 0) or 0,
                sum(p.numel() for p in params.values()), sum(p.numel() for p in block.parameters()),
                sum(p.numel() for p in block.parameters() if p.dim() == 2),
                model.get_input_embeddings().weight is model.get_output_embeddings().weight)


@dataclass
class PlanInput:
    teacher: object                   # config, folder or config JSON path
    student: object = None            # config / folder / JSON; None: the teacher's layers (student_layers)
    student_layers: int | None = None
    seq: int = 1024
    micro_batch: int = 1
    mode: str = "fast"
    precision: str = "bf16-autocast"
    zero_stage: int = 0
    teacher_plan: str = "replicated"
    world_size: int = 1
    activation_checkpointing: bool = False
    optimizer: bool = True            # AdamW state resident
    shared_vocab: int | None = None
    device: str = "cuda"
    q0: object = "worst"              # "worst" | "expected" | the plan's base starts (list of B ints)
    span_fraction: float = 0.3
    suffix_groups: int = 4
    student_site: int | None = None   # default: alignment "middle"
    teacher_site: int | None = None
    head_resident_grad_bytes: int | None = None   # DistillConfig.head_resident_grad_mb in bytes (None: the op's)


@dataclass
class Plan:
    parts: dict[str, int] = field(default_factory=dict)     # bytes per rank
    detail: dict[str, str] = field(default_factory=dict)
    head_grad: int = 0       # the decoder's gradient: the first one backward makes (the head loss's)
    embed_grad: int = 0      # a tied embedding's dense gradient, the last one, before it joins the weight's

    @property
    def total(self) -> int:
        """The step's peak: resident parts + the larger of backward's start and its end (module docstring)."""
        pa = self.parts
        resident = sum(pa.get(k, 0) for k in ("teacher weights", "student weights", "optimizer state",
                                              "teacher activations"))
        # backward: the head losses' backward first (their buffers and the decoder's gradient), then the blocks
        # one at a time (the working set); the two phases do not overlap
        start = (pa.get("student activations", 0) + pa.get("counterfactual passes", 0) + self.head_grad
                 + max(pa.get("head-loss buffers", 0), pa.get("backward working set", 0)))
        end = pa.get("student grads", 0) + max(pa.get("backward working set", 0), self.embed_grad)
        return resident + max(start, end, pa.get("teacher working set", 0))


def _suffix_tokens(inp: PlanInput, B: int, S: int) -> tuple[int, list[tuple[int, int]]]:
    """(query tokens of the counterfactual suffix passes, [(rows, q0)] per group)."""
    k = max(1, round(inp.span_fraction * S))
    if isinstance(inp.q0, (list, tuple)):
        starts = sorted(int(b) for b in inp.q0)
        if len(starts) != B:
            raise ValueError(f"q0: {len(starts)} base starts for a micro-batch of {B}")
    elif inp.q0 == "worst":
        starts = [0] * B
    elif inp.q0 == "expected":  # the i-th of B sorted uniform starts on [0, S - k]
        starts = [round((S - k) * (i + 1) / (B + 1)) for i in range(B)]
    else:
        raise ValueError(f"q0 must be 'worst', 'expected' or a list of base starts, got {inp.q0!r}")
    n = min(inp.suffix_groups, B)
    bounds = [round(i * B / n) for i in range(n + 1)]
    groups = [(bounds[i + 1] - bounds[i], starts[bounds[i]]) for i in range(n)]
    return sum(r * (S - q0) for r, q0 in groups), groups


def plan(inp: PlanInput) -> Plan:
    """The bytes per rank of one step, by part (see the module docstring)."""
    if inp.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {inp.mode!r}")
    if inp.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {inp.precision!r}")
    if inp.teacher_plan not in TEACHER_PLANS:
        raise ValueError(f"teacher_plan must be one of {TEACHER_PLANS}, got {inp.teacher_plan!r}")
    if inp.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {inp.zero_stage}")
    if inp.micro_batch < 1 or inp.world_size < 1 or inp.seq < 2:
        raise ValueError(f"micro_batch and world_size must be >= 1 and seq >= 2, got {inp.micro_batch}, "
                         f"{inp.world_size}, {inp.seq}")
    tcfg = load_config(inp.teacher)
    t = dims_of(tcfg)
    if inp.student is not None:
        s = dims_of(load_config(inp.student))
    else:
        if not inp.student_layers or not 1 <= inp.student_layers <= t.layers:
            raise ValueError(f"student_layers must be in 1..{t.layers} (the teacher's blocks) when no student "
                             f"config is given, got {inp.student_layers}")
        s = dims_of(tcfg, inp.student_layers)
    for name, d in (("teacher", t), ("student", s)):
        if d.positions and inp.seq > d.positions:
            raise ValueError(f"seq {inp.seq} is more than the {name}'s positions (max_position_embeddings "
                             f"{d.positions})")
    B, S, W = inp.micro_batch, inp.seq, inp.world_size
    N = B * S
    V = inp.shared_vocab or s.V
    p = Plan()
    iit = inp.mode != "standard"

    # ---- weights, gradients, optimizer (ZeRO's accounting) ----
    tb = 4 if inp.precision == "fp32" else 2                       # teacher weights: bf16 unless fp32
    gathered = 2 * t.block_params * tb                             # two blocks in flight under ZeRO-3
    p.parts["teacher weights"] = {"replicated": t.params * tb, "zero3": math.ceil(t.params / W) * tb + gathered,
                                  "zero3-offload": gathered}[inp.teacher_plan]
    if inp.precision == "bf16":
        w, g, o = 2, 2, 12
    else:
        w, g, o = 4, 4, 8
    Z = inp.zero_stage
    p.parts["student weights"] = s.params * w // (W if Z >= 3 else 1)
    p.parts["student grads"] = s.params * g // (W if Z >= 2 else 1)
    p.head_grad = s.V * s.D * g // (W if Z >= 2 else 1)
    p.embed_grad = p.head_grad if s.tied else 0
    p.parts["optimizer state"] = (s.params * o // (W if Z >= 1 else 1)) if inp.optimizer else 0

    # ---- activations ----
    cD, cI, cK, cH, c1 = BLOCK_CENSUS[inp.precision]
    per_tok = cD * s.D + cI * s.I + cK * s.K + cH * s.H + c1       # one block, one token, kept for backward
    a = 4 if inp.precision == "fp32" else 2                        # bytes of the student's activations
    r = 2 if inp.precision == "bf16" else 4                        # bytes of the residual stream
    casts = 2 * s.block_matrices if inp.precision == "bf16-autocast" else 0   # autocast copies per block
    s_site = inp.student_site if inp.student_site is not None else _middle(s.layers)
    suffix_blocks = s.layers - s_site - 1
    ck = inp.activation_checkpointing
    kv_tok = 2 * s.K * a                                           # one block's keys + values, per position
    if inp.mode == "naive":
        _naive(p, inp, s, t, B, S, V, per_tok, casts, s_site, r, tb, ck, kv_tok)
        return p
    if ck:   # block inputs (+ cached keys/values for the counterfactual); one block recomputed in backward
        plain = s.layers * N * (r * s.D + (kv_tok if iit else 0))
        recompute = N * per_tok + casts
    else:
        plain = s.layers * (N * per_tok + casts)
        recompute = 0
    p.parts["student activations"] = plain + N * 3 * r * s.D       # + the last states and the final norm's
    if iit:
        q_tok, groups = _suffix_tokens(inp, B, S)
        joined_kv = sum(rows * S for rows, _ in groups) * kv_tok   # each group's blocks read all S keys/values
        if ck:
            cf = suffix_blocks * (q_tok * r * s.D + sum(rows * q0 for rows, q0 in groups) * kv_tok)
        else:
            cf = suffix_blocks * (q_tok * per_tok + joined_kv) + (casts * suffix_blocks)
        p.parts["counterfactual passes"] = cf + 3 * N * r * s.D   # swap, joined parts, last states
        p.detail["counterfactual"] = (f"suffix groups (rows, q0): {groups}; {q_tok} query tokens over "
                                      f"{suffix_blocks} student blocks")
    else:
        p.parts["counterfactual passes"] = 0
    # teacher, no grad: key/value cache of every block + kept site, last and counterfactual last states
    p.parts["teacher activations"] = ((t.layers * N * 2 * t.K * tb if iit else 0)
                                      + (3 if iit else 1) * N * t.D * tb)
    p.parts["teacher working set"] = N * (3 * t.I + 4 * t.D) * tb       # one block's, in the forward only
    # head loss: rows kept per call (final-norm saved tensors + teacher states), chunk buffers, backward's dW
    calls_rows = N * (2 if iit else 1)
    chunk = min(HEAD_CHUNK_BUDGET, N * V * 4 * 4)                 # chunked.default_chunk_size's buffers
    # CPU, a decoder whose fp32 gradient fits the op's RESIDENT_GRAD_BYTES: every call forms its gradients (dW,
    # dh) in its forward and holds them to the backward, instead of the backward's one transient dW
    budget = RESIDENT_GRAD_BYTES if inp.head_resident_grad_bytes is None else inp.head_resident_grad_bytes
    if inp.device == "cpu" and V * s.D * 4 <= budget:
        grads = (2 if iit else 1) * (V * s.D * 4 + N * s.D * 4)
        p.detail["head loss"] = (f"gradients formed in the forward, held to the backward (a CPU decoder under "
                                 f"{budget / 2**20:g} MB)")
    else:
        grads = V * s.D * 4
        # with iit, two calls each return a (V, D) decoder gradient; counted as both live before they reach the
        # weight's .grad (the measured Llama fast rows: 0.94-1.09x the planner with it, 0.85 without)
        p.head_grad *= 2 if iit else 1
    p.parts["head-loss buffers"] = calls_rows * (12 * s.D + 2 * t.D) + chunk + grads
    p.parts["backward working set"] = recompute + N * 4 * s.D * 2 + N * s.I * a * 2
    return p


def _naive(p: Plan, inp, s, t, B, S, V, per_tok, casts, s_site, r, tb, ck, kv_tok):
    """The naive step: three passes per model, full logits, the reference losses (see the module docstring)."""
    N = B * S
    if ck:
        per_pass = s.layers * N * r * s.D
        recompute = N * per_tok + casts
        casts_all = 0
    else:
        per_pass = s.layers * N * per_tok
        recompute = 0
        casts_all = s.layers * casts + (2 * V * s.D if casts else 0)   # one autocast region: cast once
    below = (s_site + 1) / s.layers
    p.parts["student activations"] = per_pass + casts_all + N * 3 * r * s.D
    p.parts["counterfactual passes"] = per_pass * (1 + below) + 2 * N * 3 * r * s.D
    # teacher: base and counterfactual logits kept through the losses (its dtype), one more in flight
    p.parts["teacher activations"] = 3 * N * V * tb + 3 * N * t.D * tb
    p.parts["teacher working set"] = N * (3 * t.I + 4 * t.D) * tb
    # live at the last loss (iit): the four logits tensors in 2 bytes (z_t, z_s, z_cf_t, z_cf_s: naive_step's
    # locals), kept for backward by ce and mlm (student log-softmax + teacher probabilities, CE log-softmax: 12
    # bytes), and the iit loss's fp32 temporaries (log_p_s, log_p_t, p_t, the difference, the product: 20 bytes)
    p.parts["head-loss buffers"] = N * V * (4 * 2 + 12 + 5 * 4)
    p.parts["backward working set"] = recompute + N * 4 * s.D * 2 + N * s.I * 2 * 2


def max_micro_batch(inp: PlanInput, device_bytes: float, limit: int = 4096) -> tuple[int, Plan | None]:
    """The largest micro-batch whose plan fits `device_bytes` (0 and None when even 1 does not)."""
    best, best_plan = 0, None
    lo, hi = 1, 1
    while hi <= limit:
        pl = plan(dataclasses.replace(inp, micro_batch=hi))
        if pl.total > device_bytes:
            break
        best, best_plan, lo = hi, pl, hi
        hi *= 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:           # best fits at lo, not at hi
        mid = (lo + hi) // 2
        pl = plan(dataclasses.replace(inp, micro_batch=mid))
        if pl.total <= device_bytes:
            best, best_plan, lo = mid, pl, mid
        else:
            hi = mid
    return best, best_plan


def format_plan(pl: Plan, inp: PlanInput, device_gb: float | None = None, fit: tuple | None = None) -> str:
    lines = [f"{'part':24s} {'GiB per rank':>12s}"]
    for k, v in pl.parts.items():
        lines.append(f"{k:24s} {v / GiB:12.2f}")
    lines.append(f"{'peak':24s} {pl.total / GiB:12.2f}   (grads replace freed activations: not the sum)")
    for k, v in pl.detail.items():
        lines.append(f"{k}: {v}")
    if device_gb is not None and fit is not None:
        b, _ = fit
        lines.append(f"largest micro-batch within {device_gb:g} GB: {b}" if b else
                     f"micro-batch 1 does not fit {device_gb:g} GB")
    return "\n".join(lines)


# ---- the subcommand ----------------------------------------------------------------------------------------

def add_arguments(ap) -> None:
    ap.add_argument("--teacher", required=True, help="teacher: a model folder or a config JSON file")
    ap.add_argument("--student", default=None, help="student: a model folder or config JSON (default: "
                    "--student_layers of the teacher's)")
    ap.add_argument("--student_layers", type=int, default=None)
    ap.add_argument("--seq", type=int, required=True, help="sequence length (max_length)")
    ap.add_argument("--micro_batch", type=int, default=1)
    ap.add_argument("--mode", default="fast", choices=MODES)
    ap.add_argument("--precision", default="bf16", choices=PRECISIONS,
                    help="bf16 = DeepSpeed's bf16 mode; bf16-autocast = fp32 weights under bf16 autocast")
    ap.add_argument("--zero_stage", type=int, default=0)
    ap.add_argument("--teacher_plan", default="replicated", choices=TEACHER_PLANS)
    ap.add_argument("--world_size", type=int, default=1)
    ap.add_argument("--activation_checkpointing", action="store_true")
    ap.add_argument("--no_optimizer", action="store_true", help="leave out the AdamW state")
    ap.add_argument("--shared_vocab", type=int, default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="where the step runs: on the CPU the head loss may hold its gradients (see below)")
    ap.add_argument("--head_resident_grad_mb", type=int, default=None,
                    help="train.py's flag of that name: on the CPU, a decoder whose fp32 gradient fits this "
                         "budget holds its gradients from forward to backward (default: the op's 256 MB)")
    ap.add_argument("--q0", default="worst", choices=["worst", "expected"],
                    help="the counterfactual suffix's start: worst case (what must fit) or expected")
    ap.add_argument("--device_memory_gb", type=float, default=None, help="print the largest micro-batch that fits")
    ap.add_argument("--usable_fraction", type=float, default=0.9,
                    help="fraction of --device_memory_gb for tensors (the rest: context, fragmentation)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args) -> None:
    inp = PlanInput(teacher=args.teacher, student=args.student, student_layers=args.student_layers, seq=args.seq,
                    micro_batch=args.micro_batch, mode=args.mode, precision=args.precision,
                    zero_stage=args.zero_stage, teacher_plan=args.teacher_plan, world_size=args.world_size,
                    activation_checkpointing=args.activation_checkpointing, optimizer=not args.no_optimizer,
                    shared_vocab=args.shared_vocab, q0=args.q0, device=args.device,
                    head_resident_grad_bytes=None if args.head_resident_grad_mb is None
                    else args.head_resident_grad_mb * 2**20)
    pl = plan(inp)
    fit = None
    if args.device_memory_gb is not None:
        if not 0 < args.usable_fraction <= 1:
            raise ValueError(f"--usable_fraction must be in (0, 1], got {args.usable_fraction}")
        fit = max_micro_batch(inp, args.device_memory_gb * 1e9 * args.usable_fraction)
    if args.json:
        print(json.dumps({"parts_bytes": pl.parts, "peak_bytes": pl.total, "detail": pl.detail,
                          "max_micro_batch": None if fit is None else fit[0]}, indent=1))
    else:
        print(format_plan(pl, inp, args.device_memory_gb, fit))


def fit_warning(teacher, student, cfg, ds: dict, micro_batch: int, world_size: int, device) -> str | None:
    """One `warning:` line when the planner puts this run's step above the device's memory (None when it fits,
    or when the family is not modelled: the planner covers llama, qwen2, mistral). train.py calls it before
    any work; it is a warning, not a refusal (the planner is a model, validated to ~15%)."""
    if teacher.config.model_type not in MODELLED or student.config.model_type not in MODELLED:
        return None
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    d = cfg.distill
    inp = PlanInput(teacher=teacher.config, student=student.config, seq=cfg.max_length, micro_batch=micro_batch,
                    mode=d.mode if d.uses_iit or d.mode == "naive" else "standard",
                    precision="bf16" if bf16 else "fp32", zero_stage=stage,
                    teacher_plan="zero3" if getattr(cfg, "teacher_deepspeed_config", None) else "replicated",
                    world_size=world_size, activation_checkpointing=bool(getattr(cfg, "activation_checkpointing",
                                                                                 False)),
                    shared_vocab=d.shared_vocab, q0="worst", device=torch.device(device).type,
                    head_resident_grad_bytes=None if d.head_resident_grad_mb is None
                    else d.head_resident_grad_mb * 2**20)
    try:
        pl = plan(inp)
    except ValueError:       # a combination the planner does not model: no claim
        return None
    except Exception as e:   # an advisory figure must not stop a run; say that it is missing
        return f"warning: the planner could not plan this run ({type(e).__name__}: {e})"
    device = torch.device(device)
    if device.type == "cuda":
        have, what = torch.cuda.get_device_properties(device).total_memory, f"{device} memory"
    else:
        have, what = psutil.virtual_memory().total, "this machine's memory"
    if pl.total <= have:
        return None
    b, _ = max_micro_batch(inp, have)
    big = sorted(pl.parts.items(), key=lambda kv: -kv[1])[:3]
    return (f"warning: the planner puts micro-batch {micro_batch} x {cfg.max_length} tokens at "
            f"{pl.total / GiB:.1f} GiB per rank ({', '.join(f'{k} {v / GiB:.1f}' for k, v in big)}), more than "
            f"{what} ({have / GiB:.1f} GiB); " + (f"micro-batch {b} fits" if b else "micro-batch 1 does not fit")
            + (", --activation_checkpointing true lowers it" if not inp.activation_checkpointing else "")
            + " (iit-fast plan prints the parts)")
