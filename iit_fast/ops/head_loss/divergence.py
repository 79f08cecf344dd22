"""The divergences of the logit losses (`ce`, `iit`): which one, its parameter, its math, its fp64 reference
and its torch per-element terms (the chunked torch step and the sparse top-k step use these; the native C++
and Triton steps write the same formulas in their own languages).

Per row (a token), temperature T, student p = softmax(z_s / T), teacher q = softmax(z_t / T), a = z_s / T,
u_v = log(p_v / q_v) (taken from the logits, (a_s - a_t) - (lse_s - lse_t): finite even where p or q underflows):

    forward_kl          KL(q || p)                                     (the default; Hinton's KD)
    reverse_kl          KL(p || q)                                     (MiniLLM)
    jsd (beta)          beta KL(q || M) + (1 - beta) KL(p || M),  M = beta q + (1 - beta) p
                        (TRL's GKDTrainer.generalized_jsd_loss; its ends are special-cased there and here:
                        beta = 0 IS forward_kl, beta = 1 IS reverse_kl; the formula itself tends to 0 at both)
    skew_kl (alpha)     KL(q || alpha q + (1 - alpha) p)               (DistiLLM's SKL; alpha = 0: forward_kl)
    skew_reverse_kl     KL(p || alpha p + (1 - alpha) q)               (DistiLLM's SRKL; alpha = 0: reverse_kl)
    tvd                 1/2 sum_v |p_v - q_v|                          (DistillKit)

Every divergence enters the loss as T^2 * (weighted mean over tokens of D), like the KL (the T^2 keeps the
gradient's scale across temperatures). Ranges: beta in [0, 1], alpha in [0, 1) (alpha = 1 makes the mixture the
student itself, D = 0 for every student).

Gradient (Liger-style, by hand). For any D(p) with g_v = dD/dp_v, since dp_w/da_v = p_w ([v = w] - p_v):

    dD/da_v = p_v (g_v - S),   S = sum_w p_w g_w,    and  dce/dz_s = w_row * T^2 * (1/T) * dD/da

(a constant added to every g_v cancels in g_v - S). Per divergence, with lm = log(M / p), lq = log(M / q):

    forward_kl       g = -q/p              S = -1          dD/da = p - q          (no S needed: 3 passes)
    reverse_kl       g = u                 S = D
    jsd              g = -(1 - beta) lm    S = (1 - beta) KL(p || M)
    skew_kl          g = -(1 - alpha) q/M  S = sum p g
    skew_reverse_kl  g = -lm - alpha p/M   S = D - alpha sum_v p_v^2 / M_v      (M = alpha p + (1 - alpha) q)
    tvd              g = sign(u) / 2       S = sum p g

Every divergence but forward_kl needs S before its gradient, so the fused steps take a 4th pass: pass 3
computes D, S and stores A_v = g_row p_v g_v (+ the MLM part) over the teacher logits and B_v = g_row p_v over
the student logits; pass 4 writes dz_v = A_v - S B_v. No [tokens, vocab] tensor beyond the chunk's two.

Precision (no error floor where the student ~= the teacher). Every D is summed from non-negative terms, as
the forward KL is (`kl_term(P', P, x) = P (e^x - 1 - x)` with P' = P e^x, its series for |x| < 1):

    KL(P || R) = sum_v P_v (e^x_v - 1 - x_v),  x_v = log(R_v / P_v)     (sum_v P = sum_v R = 1 add the "-1"s)

and the log-ratios come from u without forming a ratio of two rounded probabilities:

    mixlog(lam, x) = log((1 - lam) + lam e^x) = log1p(lam expm1(x))               x <= 0
                                              = x + log1p((1 - lam) expm1(-x))    x > 0   (no overflow)
    jsd:   lm = log(M/p) = mixlog(beta, -u),        log(M/q) = lm + u
    skew:  lq = log(M/q) = mixlog(1 - alpha, u),    q/M = e^-lq
    srkl:  lm = log(M/p) = mixlog(1 - alpha, -u),   p/M = e^-lm

Sparse top-k targets (`sparse.py`): the divergence is taken between the (K + 1)-bucket distributions (the K
ids and one "rest" bucket holding all other ids' mass, p_rest summed directly), with the same formulas and
dD/da_v = p_v (g_b(v) - S) for v in bucket b(v): a lower bound of the full-vocabulary D (data processing),
exact when K = V. A bucket empty on one side (q_b = 0 or p_b = 0, e.g. the rest bucket when K = V) takes the
limit of its term (`_ZERO_SIDE`); reverse_kl is infinite where the teacher's bucket is empty and the student's
is not (as the divergence is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
CODES = {k: i for i, k in enumerate(KINDS)}   # the kind as the native and Triton steps take it


@dataclass(frozen=True)
class Divergence:
    """A divergence of the logit losses and its parameter (beta for jsd, alpha for the skew ones; else 0).

    Build with `Divergence.of(name, beta=..., alpha=...)`: it checks the range and resolves the ends (jsd at
    beta 0 / 1 is forward_kl / reverse_kl; skew at alpha 0 is its plain KL), so the steps only see interior
    parameters."""
    kind: str = "forward_kl"
    param: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"divergence must be one of {KINDS}, got {self.kind!r}")
        p = float(self.param)
        if self.kind == "jsd" and not 0.0 < p < 1.0:
            raise ValueError(f"Divergence('jsd', beta): beta must be in (0, 1) here (0 and 1 resolve to "
                             f"forward_kl / reverse_kl in Divergence.of), got {self.param!r}")
        if self.kind in ("skew_kl", "skew_reverse_kl") and not 0.0 < p < 1.0:
            raise ValueError(f"Divergence({self.kind!r}, alpha): alpha must be in (0, 1) here (0 resolves to "
                             f"the plain KL in Divergence.of), got {self.param!r}")
        if self.kind in ("forward_kl", "reverse_kl", "tvd") and p != 0.0:
            raise ValueError(f"Divergence({self.kind!r}) takes no parameter, got {self.param!r}")

    @classmethod
    def of(cls, kind: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1) -> "Divergence":
        """The divergence `kind` with its parameter; beta outside [0, 1] or alpha outside [0, 1) is a
        ValueError naming it."""
        if kind not in KINDS:
            raise ValueError(f"divergence must be one of {KINDS}, got {kind!r}")
        if kind == "jsd":
            b = check_beta(beta)
            return cls("forward_kl") if b == 0.0 else cls("reverse_kl") if b == 1.0 else cls("jsd", b)
        if kind in ("skew_kl", "skew_reverse_kl"):
            a = check_alpha(alpha)
            if a == 0.0:
                return cls("forward_kl" if kind == "skew_kl" else "reverse_kl")
            return cls(kind, a)
        return cls(kind)

    @property
    def code(self) -> int:
        return CODES[self.kind]

    @property
    def is_forward_kl(self) -> bool:
        return self.kind == "forward_kl"

    def __str__(self) -> str:
        if self.kind == "jsd":
            return f"jsd(beta={self.param:g})"
        if self.kind.startswith("skew"):
            return f"{self.kind}(alpha={self.param:g})"
        return self.kind


FORWARD_KL = Divergence()


def check_beta(beta, name: str = "beta") -> float:
    """beta of jsd as a float in [0, 1]; else a ValueError naming `name`."""
    b = _real(beta, name)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta!r}")
    return b


def check_alpha(alpha, name: str = "alpha") -> float:
    """alpha of skew_kl / skew_reverse_kl as a float in [0, 1); else a ValueError naming `name`."""
    a = _real(alpha, name)
    if not 0.0 <= a < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (0 = the plain KL; at 1 the divergence is 0 for every "
                         f"student), got {alpha!r}")
    return a


def _real(x, name: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {x!r}") from None


def as_divergence(div) -> Divergence:
    """None -> forward_kl; a name -> Divergence.of(name) (default beta / alpha); a Divergence as is."""
    if div is None:
        return FORWARD_KL
    if isinstance(div, Divergence):
        return div
    if isinstance(div, str):
        return Divergence.of(div)
    raise TypeError(f"divergence must be a Divergence, a name in {KINDS} or None, got {div!r}")


# ----------------------------------------------------------------------------------------------------
# The ground truth: textbook formulas on log-probabilities, autograd (fp64 in, fp64 out)
# ----------------------------------------------------------------------------------------------------

def divergence_reference(div: Divergence, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row D (...,) from student / teacher log-probabilities (..., V), no tricks (autograd's gradient).

    The mixtures' logs by logsumexp, as TRL writes its generalized JSD."""
    p, q = log_p.exp(), log_q.exp()
    k, c = div.kind, div.param

    def kl(log_a, log_b):  # KL(a || b), 0 log 0 = 0
        return torch.where(log_a > -math.inf, log_a.exp() * (log_a - log_b), 0.0).sum(-1)

    def mix(w_a, log_a, log_b):  # log(w_a a + (1 - w_a) b)
        return torch.logsumexp(torch.stack([log_a + math.log(w_a), log_b + math.log1p(-w_a)]), 0)

    if k == "forward_kl":
        return kl(log_q, log_p)
    if k == "reverse_kl":
        return kl(log_p, log_q)
    if k == "jsd":
        log_m = mix(c, log_q, log_p)
        return c * kl(log_q, log_m) + (1 - c) * kl(log_p, log_m)
    if k == "skew_kl":
        return kl(log_q, mix(c, log_q, log_p))
    if k == "skew_reverse_kl":
        return kl(log_p, mix(c, log_p, log_q))
    return 0.5 * (p - q).abs().sum(-1)


def divergence_loss_reference(div: Divergence, z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor | None,
                              temperature: float) -> torch.Tensor:
    """T^2 * masked mean over tokens of D(student, teacher) from logits z_* (..., V); autograd; 0 when no
    token counts. Computed in z's dtype promoted to at least fp32."""
    T = float(temperature)
    dtype = torch.promote_types(torch.promote_types(z_s.dtype, torch.float32), z_t.dtype)
    per_token = divergence_reference(div, F.log_softmax(z_s.to(dtype) / T, -1), F.log_softmax(z_t.to(dtype) / T, -1))
    if mask is None:
        return T * T * per_token.mean() if per_token.numel() else per_token.sum()
    m = mask.to(per_token.dtype)
    return T * T * (per_token * m).sum() / m.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------
# The fused math in torch: per-element terms and gradient factors (the chunked and sparse steps)
# ----------------------------------------------------------------------------------------------------

_SERIES = tuple(1.0 / math.factorial(k) for k in range(13, 1, -1))  # e^x - 1 - x = sum_{k>=2} x^k / k!


def kl_terms(p_x: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p (e^x - 1 - x) per element, p_x = p e^x given: the series for |x| < 1 (Horner to k = 13), else
    p_x - p (1 + x). Never negative; the terms of KL(p || p_x) = sum_v p (e^x - 1 - x) (x = log(p_x / p))."""
    h = torch.full_like(x, _SERIES[0])
    for c in _SERIES[1:]:
        h = h * x + c
    return torch.where(x.abs() < 1, p * (h * x * x), p_x - p * (1 + x))


def mixlog(lam: float, x: torch.Tensor) -> torch.Tensor:
    """log((1 - lam) + lam e^x) without overflow, accurate near x = 0 (lam in (0, 1))."""
    lam_x = torch.where(x <= 0, x.new_tensor(lam), x.new_tensor(1.0 - lam))     # two python floats: fp32
    return torch.log1p(lam_x * torch.expm1(-x.abs())) + x.clamp_min(0)


def divergence_terms(div: Divergence, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor):
    """(terms, g, s_terms), each (C, X): D = terms.sum(1) with every term >= 0, g the gradient factor of the
    module docstring and S = s_terms.sum(1), so that dD/da = p (g - S). p, q: (C, X) distributions; u: (C, X)
    finite log(p / q). Not for forward_kl (whose step keeps its own code)."""
    k, c = div.kind, div.param
    if k == "reverse_kl":
        terms = kl_terms(q, p, -u)                                   # KL(p || q)
        return terms, u, terms
    if k == "jsd":
        lm = mixlog(c, -u)                                           # log(M / p)
        m = c * q + (1 - c) * p
        kp = kl_terms(m, p, lm)                                      # KL(p || M)
        return c * kl_terms(m, q, lm + u) + (1 - c) * kp, -(1 - c) * lm, (1 - c) * kp
    if k == "skew_kl":
        lq = mixlog(1 - c, u)                                        # log(M / q), M = c q + (1 - c) p
        g = -(1 - c) * torch.exp(-lq)
        return kl_terms(c * q + (1 - c) * p, q, lq), g, p * g
    if k == "skew_reverse_kl":
        lm = mixlog(1 - c, -u)                                       # log(M / p), M = c p + (1 - c) q
        terms = kl_terms(c * p + (1 - c) * q, p, lm)
        r = torch.exp(-lm)                                           # p / M
        return terms, -lm - c * r, terms - c * p * r
    if k == "tvd":
        g = 0.5 * torch.sign(u)
        return 0.5 * (p - q).abs(), g, p * g
    raise ValueError(f"divergence_terms: {div} has its own code path")


def divergence_rows(div: Divergence, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor):
    """(D (C,), dD/da (C, X)) for a divergence other than forward_kl, from p, q, u (C, X) (see
    `divergence_terms`)."""
    terms, g, s_terms = divergence_terms(div, p, q, u)
    return terms.sum(1), p * (g - s_terms.sum(1, keepdim=True))


def _zero_side(div: Divergence, p: torch.Tensor, q: torch.Tensor):
    """(term, g) where one side's bucket is empty: the limits of `divergence_terms` at p = 0 (q > 0) and at
    q = 0 (p > 0); both empty: 0. g does not matter where p = 0 (it is multiplied by p)."""
    k, c = div.kind, div.param
    p0, q0 = p == 0, q == 0
    zero = torch.zeros_like(p)
    if k == "reverse_kl":
        t_p0, t_q0, g_q0 = q, torch.full_like(p, math.inf), zero
    elif k == "jsd":
        t_p0, t_q0, g_q0 = -c * math.log(c) * q, -(1 - c) * math.log1p(-c) * p, zero - (1 - c) * math.log1p(-c)
    elif k == "skew_kl":
        t_p0, t_q0, g_q0 = (c - 1 - math.log(c)) * q, (1 - c) * p, zero
    elif k == "skew_reverse_kl":
        t_p0, t_q0, g_q0 = (1 - c) * q, (c - 1 - math.log(c)) * p, zero - math.log(c) - 1
    else:  # tvd
        t_p0, t_q0, g_q0 = 0.5 * q, 0.5 * p, zero + 0.5
    term = torch.where(p0 & q0, 0.0, torch.where(p0, t_p0, t_q0))
    g = torch.where(p0, 0.0, g_q0)
    return term, g


def bucket_divergence_rows(div: Divergence, p: torch.Tensor, q: torch.Tensor, log_p: torch.Tensor,
                           log_q: torch.Tensor):
    """(D (C,), G (C, X)) over bucket distributions p, q (C, X) with their logs (-inf allowed), for a
    divergence other than forward_kl: dD/da_v = p_v G_b(v) for v in bucket b. Empty buckets take their
    limits (`_zero_side`)."""
    both = (p > 0) & (q > 0)
    u = torch.where(both, log_p - log_q, 0.0)
    terms, g, _ = divergence_terms(div, p, q, u)
    t_zero, g_zero = _zero_side(div, p, q)
    terms, g = torch.where(both, terms, t_zero), torch.where(both, g, g_zero)
    s = (p * g).sum(1, keepdim=True)
    return terms.sum(1), g - s
