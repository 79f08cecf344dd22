"""Where and what to intervene on: alignments, in-batch pairing, spans (docs/method.md section 1).

An alignment is a list of `(teacher blocks, student block)` pairs; each step draws one pair uniformly, a
derangement `pi` of the batch rows (row i takes its source from row pi[i]) and, per row, a span of
`k = max(1, floor(p * min(len_base, len_source)))` real tokens in the base and one in the source.
All randomness comes from one seeded `torch.Generator` so a step is reproducible.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

AlignmentPair = tuple[tuple[int, ...], int]
PRESETS = ("middle", "late", "full")


def _middle(n: int) -> int:
    return (n + 1) // 2 - 1                    # 12 -> 5 (HF hidden_states[6]), 6 -> 2, 3 -> 1, 1 -> 0


def _late(n: int) -> int:
    return max(0, math.ceil(0.75 * n) - 1)     # three quarters deep: 12 -> 8, 6 -> 4, 3 -> 2


def make_alignment(spec: str, teacher_layers: int, student_layers: int) -> list[AlignmentPair]:
    """A preset name (`middle`, `late`, `full`) or the path of a JSON file.

    JSON: a list of {"teacher": [blocks...], "student": block} objects (or [[blocks...], block] pairs).
    """
    if spec == "middle":
        pairs = [((_middle(teacher_layers),), _middle(student_layers))]
    elif spec == "late":
        pairs = [((_late(teacher_layers),), _late(student_layers))]
    elif spec == "full":
        if teacher_layers < student_layers:
            raise ValueError(f"alignment 'full' groups teacher blocks onto every student block and needs "
                             f"teacher_layers >= student_layers, got {teacher_layers} < {student_layers}")
        bounds = [round(i * teacher_layers / student_layers) for i in range(student_layers + 1)]
        pairs = [(tuple(range(bounds[s], bounds[s + 1])), s) for s in range(student_layers)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"alignment must be one of {PRESETS} or a JSON file; {spec!r} is neither")
        expected = ('expected a non-empty JSON list of {"teacher": [blocks...], "student": block} objects '
                    '(or [[blocks...], block] pairs)')
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"alignment file {spec}: not JSON ({e}); {expected}") from None
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"alignment file {spec}: {expected}")
        pairs = []
        for i, item in enumerate(raw):
            try:
                if isinstance(item, dict):
                    extra = sorted(set(item) - {"teacher", "student"})
                    if extra or set(item) != {"teacher", "student"}:
                        raise ValueError(f"keys {sorted(item)}")
                    t, s = item["teacher"], item["student"]
                else:
                    t, s = item
                t = (t,) if isinstance(t, int) else tuple(int(x) for x in t)
                pairs.append((t, int(s)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"alignment file {spec}: entry {i} ({json.dumps(item)}) is not a pair ({e}); "
                                 f"{expected}") from None
    return validate_alignment(pairs, teacher_layers, student_layers)


def validate_alignment(pairs, teacher_layers: int, student_layers: int) -> list[AlignmentPair]:
    for t, s in pairs:
        if not t:
            raise ValueError(f"alignment pair {(t, s)}: empty teacher group")
        if list(t) != list(range(t[0], t[0] + len(t))):
            raise ValueError(f"alignment pair {(t, s)}: a teacher group must be consecutive blocks")
        if not (0 <= t[0] and t[-1] < teacher_layers):
            raise ValueError(f"alignment names teacher block(s) {t}, but the teacher has blocks "
                             f"0..{teacher_layers - 1}")
        if not 0 <= s < student_layers:
            raise ValueError(f"alignment names student block {s}, but the student has blocks "
                             f"0..{student_layers - 1}")
    return [(tuple(t), s) for t, s in pairs]


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation with no fixed point (n >= 2); for n == 1, [0] (a row is its own source)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    while True:  # rejection: about e tries on average
        p = torch.randperm(n, generator=generator)
        if not (p == torch.arange(n)).any():
            return p


def pad_offsets(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) long: the columns before each row's first real token (all 0 for right padding).

    Each row's real tokens must be one block (right or left padding) of at least one token."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    am = attention_mask.long()
    lengths = am.sum(1)                                                             # (B,)
    if (lengths == 0).any():
        raise ValueError("attention_mask has a row with no real token")
    first = am.argmax(1)                                                            # (B,) first 1
    cols = torch.arange(am.shape[1], device=am.device)
    block = (cols >= first[:, None]) & (cols < (first + lengths)[:, None])        # (B, S)
    if not torch.equal(block.long(), am):
        raise ValueError("attention_mask must hold each row's real tokens in one block (right or left "
                         "padding: ones then zeros, or zeros then ones)")
    return first


def real_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real-token count per row; each row's real tokens one block (right or left padding)."""
    pad_offsets(attention_mask)
    return attention_mask.long().sum(1)


@dataclass
class InterventionPlan:
    """Everything random about one step's intervention. Tensors live on the batch's device."""
    teacher_layers: tuple[int, ...]  # the teacher group: swapped after each of these blocks
    student_layer: int               # the student block whose output is swapped
    pi: torch.Tensor                 # (B,) long: source row of each base row
    base_start: torch.Tensor         # (B,) long
    source_start: torch.Tensor       # (B,) long
    span_len: torch.Tensor           # (B,) long, >= 1
    dims: tuple[int, int] | None = None

    def to(self, device) -> "InterventionPlan":
        """The plan on `device`: its four (B,) tensors in one copy."""
        pi, bs, ss, k = _move([self.pi, self.base_start, self.source_start, self.span_len], device)
        return InterventionPlan(self.teacher_layers, self.student_layer, pi, bs, ss, k, self.dims)


def _move(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Integer/bool tensors to `device` as one host-to-device copy (pinned for CUDA: it does not wait), each
    back in its own shape and dtype. Tensors already there are returned as they are."""
    device = torch.device(device)
    if not tensors or all(t.device == device for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])                # (sum numel,)
    if device.type == "cuda" and flat.device.type == "cpu":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=device.type != "cpu")  # a non-blocking copy to the host may be unfinished
    parts = flat.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors)]


@dataclass
class StepIndex:
    """Where a fast step reads its states for the logit losses, made on the CPU from the CPU batch and plan
    (`step.step_index`) and moved to the device with one copy: with it the step gathers rows by known indices
    and never indexes by a boolean mask or reads a device value (no host sync).

    heads: name -> (rows, kd_mask, labels) of one head-loss call: rows (N,) long, the flat positions b * S + t
        of the states it reads; kd_mask (N,) bool, the rows in its KL mean (None: all); labels (N,) long or None.
    scales: name -> a token-count fraction weighting a term (a Python number: nothing to read on the device).
    groups: the causal counterfactual suffix passes, [(rows (G,) long, or None for every row in order, q0)].
    swaps: where a teacher group of several blocks re-swaps after its later blocks, without reading the plan
        on the host: [(rows, positions, source rows, source positions)], each (K,) long, K = the swapped
        tokens: one entry for the whole batch (masked LMs), or one per suffix group (causal LMs, rows local
        to the group, positions from its q0). Empty when the group has one block.
    padded: whether any position of the batch is padding (the attention-mask builders need not read it).
    """
    padded: bool
    heads: dict[str, tuple] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    groups: list[tuple[torch.Tensor | None, int]] = field(default_factory=list)
    swaps: list[tuple[torch.Tensor, ...]] = field(default_factory=list)

    def to(self, device) -> "StepIndex":
        slots = [(n, i) for n, h in self.heads.items() for i, t in enumerate(h) if t is not None]
        slots += [("group", g) for g, (rows, _) in enumerate(self.groups) if rows is not None]
        slots += [("swap", (w, i)) for w, sw in enumerate(self.swaps) for i in range(len(sw))]

        def get(n, i):
            return self.groups[i][0] if n == "group" else self.swaps[i[0]][i[1]] if n == "swap" else self.heads[n][i]

        moved = dict(zip(slots, _move([get(n, i) for n, i in slots], device)))
        heads = {n: tuple(moved.get((n, i)) for i in range(len(h))) for n, h in self.heads.items()}
        groups = [(moved.get(("group", g)), q0) for g, (_, q0) in enumerate(self.groups)]
        swaps = [tuple(moved[("swap", (w, i))] for i in range(len(sw))) for w, sw in enumerate(self.swaps)]
        return StepIndex(self.padded, heads, dict(self.scales), groups, swaps)


def sample_spans(lengths: torch.Tensor, pi: torch.Tensor, p: float, generator: torch.Generator):
    """Per row: span length k and starts in the base and in its source, inside real tokens only."""
    src_len = lengths[pi]
    k = torch.clamp((p * torch.minimum(lengths, src_len).double()).floor().long(), min=1)
    u = torch.rand(lengths.numel(), generator=generator, dtype=torch.float64)
    v = torch.rand(lengths.numel(), generator=generator, dtype=torch.float64)
    base_start = (u * (lengths - k + 1).double()).floor().long()
    source_start = (v * (src_len - k + 1).double()).floor().long()
    return k, base_start, source_start


def sample_plan(attention_mask: torch.Tensor, alignment: list[AlignmentPair], generator: torch.Generator,
                span_fraction: float = 0.3, dims: tuple[int, int] | None = None) -> InterventionPlan:
    """Draw one step's alignment pair, pairing and spans for a right- or left-padded batch: the draws are
    over each row's real tokens (the same for either padding); the starts are columns of the batch."""
    offsets = pad_offsets(attention_mask).cpu()                 # left padding: starts move right by it
    lengths = attention_mask.long().sum(1).cpu()
    which = int(torch.randint(len(alignment), (1,), generator=generator))
    teacher_layers, student_layer = alignment[which]
    if lengths.numel() == 1:
        warnings.warn("sample_plan: a batch of one row is its own source, so the interchange swaps a span with "
                      "itself and the IIT terms equal the plain ones; use batches of 2 or more rows", stacklevel=2)
    pi = derangement(lengths.numel(), generator)
    k, bs, ss = sample_spans(lengths, pi, span_fraction, generator)
    plan = InterventionPlan(tuple(teacher_layers), student_layer, pi, bs + offsets, ss + offsets[pi], k, dims)
    check_plan(plan, attention_mask)
    return plan.to(attention_mask.device)


def check_plan(plan: InterventionPlan, attention_mask: torch.Tensor, hidden_sizes: tuple[int, ...] = ()):
    """Spans inside each row's real tokens, pairing in range, dims inside every model's width."""
    offsets = pad_offsets(attention_mask).to(plan.pi.device)
    lengths = attention_mask.long().sum(1).to(plan.pi.device)
    B = lengths.numel()
    for name in ("pi", "base_start", "source_start", "span_len"):
        t = getattr(plan, name)
        if t.shape != (B,):
            raise ValueError(f"plan.{name} must have shape ({B},), got {tuple(t.shape)}")
    if ((plan.pi < 0) | (plan.pi >= B)).any():
        raise ValueError(f"plan.pi must index rows 0..{B - 1}")
    if (plan.span_len < 1).any():
        raise ValueError("plan.span_len must be >= 1")
    base, source = plan.base_start - offsets, plan.source_start - offsets[plan.pi]  # positions among real tokens
    if (base < 0).any() or (base + plan.span_len > lengths).any():
        raise ValueError("a span is longer than its base sequence's real tokens (plan.base_start + span_len "
                         "> length)")
    if (source < 0).any() or (source + plan.span_len > lengths[plan.pi]).any():
        raise ValueError("a span is longer than its source sequence's real tokens (plan.source_start + "
                         "span_len > length of row pi[i])")
    if plan.dims is not None:
        for d in hidden_sizes:
            if plan.dims[1] > d:
                raise ValueError(f"dims {plan.dims} reach past a hidden size of {d}")
