"""The teacher cache's format 2 (docs/teacher-cache.md): fixed-size rows of targets. This version reads
format-2 caches (`teacher_cache`) and writes format 3 (`cache_codec`); tests and benchmarks write format 2
to compare.

A row: ids each in b = ceil(log2 V) bits, packed little-endian into ceil(K b / 8) bytes (a row starts on a
byte, so a slice of rows is a slice of the (N, bytes) uint8 tensor); log-probs by `values`: a float dtype,
or "q<B>": B-bit codes c_j = round((top - logp_j) / step), top = the row's largest log-prob (fp32), step =
(top - smallest) / (2^B - 1) (fp16, rounded up so no code overflows), decoded as top - c_j step (at most
step / 2 off, the order kept; -inf decodes as the row's smallest finite value); rest fp16 (fp32 with
float32 values). Bytes per row: ceil(K b / 8) + (K x value bytes, or ceil(K B / 8) + 6) + (2 or 4).
"""
from __future__ import annotations

import torch

from .cache_codec import FLOAT_VALUES, bits_for, check_values


def row_bytes(k: int, bits: int) -> int:
    return (k * bits + 7) // 8


def pack_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integers in [0, 2^bits) -> (N, ceil(K bits / 8)) uint8, each row packed little-endian from its
    first bit. The bit ranges of the entries are disjoint, so summing their shifted bytes is OR-ing them."""
    n, k = x.shape
    if bits > 32:
        raise ValueError(f"bits: {bits}; expected <= 32")
    off = torch.arange(k, dtype=torch.int64) * bits                                # (K,) bit offsets
    byte, shift = off // 8, off % 8
    touched = (bits + 7 + 7) // 8                                                   # bytes one entry spans
    v = x.to(torch.int64) << shift                                                  # (N, K)
    out = torch.zeros(n, row_bytes(k, bits) + touched, dtype=torch.int64)
    for i in range(touched):
        out.scatter_add_(1, (byte + i).expand(n, k), (v >> (8 * i)) & 255)
    return out[:, :row_bytes(k, bits)].to(torch.uint8)


def unpack_rows(p: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """The inverse of `pack_rows`: (N, bytes) uint8 -> (N, K) int64."""
    n = p.shape[0]
    off = torch.arange(k, dtype=torch.int64) * bits
    byte, shift = off // 8, off % 8
    touched = (bits + 7 + 7) // 8
    src = torch.cat([p.to(torch.int64), p.new_zeros(n, touched, dtype=torch.int64)], 1)   # (N, bytes + touched)
    v = torch.zeros(n, k, dtype=torch.int64)
    for i in range(touched):
        v |= src.gather(1, (byte + i).expand(n, k)) << (8 * i)
    return (v >> shift) & ((1 << bits) - 1)


def _step16(top: torch.Tensor, bottom: torch.Tensor, levels: int) -> torch.Tensor:
    """(N,) fp16 quantisation step, rounded up from (top - bottom) / levels so that no code exceeds `levels`."""
    step = ((top - bottom) / levels).clamp_min(0)
    s16 = step.to(torch.float16)
    while bool((s16.float() < step).any()):  # round-to-nearest went down: up by one fp16 ulp (or two)
        low = s16.float() < step
        s16 = torch.where(low, (s16.float() * (1 + 2 ** -10)).to(torch.float16), s16)
    return s16


def encode(logp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor, *, values: str, id_bits: int,
           prefix: str = "") -> dict[str, torch.Tensor]:
    """Format 2 (tests and measurements; caches are read with `decode`): rows of targets (logp (N, K) fp32
    sorted largest first, ids (N, K), rest (N,)) -> the shard tensors `{prefix}logp`, `{prefix}ids`,
    `{prefix}rest` (+ `{prefix}logp_top`, `{prefix}logp_step` for q<B>)."""
    check_values(values, 2)
    logp = logp.float()
    out = {f"{prefix}ids": pack_rows(ids, id_bits),
           f"{prefix}rest": rest.float() if values == "float32" else rest.to(torch.float16)}
    if values in FLOAT_VALUES:
        out[f"{prefix}logp"] = logp.to(FLOAT_VALUES[values])
        return out
    bits = int(values[1:])
    levels = (1 << bits) - 1
    finite = torch.isfinite(logp)
    top = logp[:, 0] if logp.shape[1] else logp.new_zeros(logp.shape[0])           # (N,) sorted: the largest
    bottom = torch.where(finite, logp, float("inf")).amin(1) if logp.shape[1] else top
    bottom = torch.where(torch.isfinite(bottom), bottom, top)
    top = torch.where(torch.isfinite(top), top, 0.0)
    step = _step16(top, bottom, levels)                                             # (N,) fp16
    s = step.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    d = torch.where(finite, top.unsqueeze(1) - logp, top.unsqueeze(1) - bottom.unsqueeze(1))
    codes = (d / s).round().clamp(0, levels).to(torch.int64)                        # (N, K)
    out[f"{prefix}logp"] = pack_rows(codes, bits)
    out[f"{prefix}logp_top"] = top.float()
    out[f"{prefix}logp_step"] = step
    return out


def decode(t: dict[str, torch.Tensor], *, k: int, values: str, id_bits: int, prefix: str = ""):
    """Shard tensors (a slice of rows) -> (logp (N, K) fp32, ids (N, K) int64, rest (N,) fp32)."""
    ids = unpack_rows(t[f"{prefix}ids"], k, id_bits)
    rest = t[f"{prefix}rest"].float()
    if values in FLOAT_VALUES:
        return t[f"{prefix}logp"].float(), ids, rest
    codes = unpack_rows(t[f"{prefix}logp"], k, int(values[1:]))
    logp = t[f"{prefix}logp_top"].float().unsqueeze(1) - codes.float() * t[f"{prefix}logp_step"].float().unsqueeze(1)
    return logp, ids, rest


def names(values: str, prefix: str = "") -> tuple[str, ...]:
    """The shard tensors of one kind of targets."""
    extra = () if values in FLOAT_VALUES else ("logp_top", "logp_step")
    return tuple(prefix + n for n in ("logp", "ids", "rest") + extra)


def bytes_per_row(k: int, vocab: int, values: str) -> int:
    """Format 2's disk bytes of one row of targets (safetensors' header aside)."""
    check_values(values, 2)
    ids = row_bytes(k, bits_for(vocab))
    if values in FLOAT_VALUES:
        b = torch.finfo(FLOAT_VALUES[values]).bits // 8
        return ids + k * b + (4 if values == "float32" else 2)
    return ids + row_bytes(k, int(values[1:])) + 4 + 2 + 2


def legacy_bytes_per_row(k: int) -> int:
    """Format 1's row: fp16 log-probs, int32 ids, fp32 rest."""
    return k * (2 + 4) + 4
