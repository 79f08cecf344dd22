"""The teacher cache's compact encoding of sparse targets (docs/teacher-cache.md): what `cache_builder` writes
and `teacher_cache` reads.

A row of targets is K (id, log-prob) entries, sorted by log-prob (largest first), and the log of the mass
outside them ("rest").

FORMAT 3 (written by this version): per pair one compressed BLOCK of its base targets (and its tokens), per
(pair, plan) one block of its counterfactual targets, so a batch decodes only the pairs and plans it reads.
- log-probs by `values`:
  * "g<E>" (E in 2..12; default g8: its sparse KL error is fp16's, benchmarks/results/teacher-cache.md):
    codes c = round(-logp / 2^-E) on one fixed grid for the whole cache (an absolute error of at most
    2^-(E+1) nats per entry; -inf kept); a row stores its top code, then the gaps between its sorted codes
    (small: most fit a byte);
  * "float32" (lossless, for tests and K = V), "float16", "bfloat16": as that dtype.
- target ids: as their rank in the shard's `id_order` (the ids that occur in it, most frequent first: a
  teacher's top-k keeps to a few thousand ids, frequent ones get small numbers), in ceil(bits / 8) bytes
  before compression (`_Writer.small`: a value too big for its width is escaped to an 8-byte stream).
- a counterfactual row is coded against the base row at the same position: a K-bit mask of the base ids it
  keeps (most of them: the plan moves the distribution a little), then only its new ids; with g<E> values
  the kept entries store code(cf) - code(base) and the new ones their gaps. The decoded row holds the kept
  entries in the base row's order, then the new ones (the sparse loss does not depend on the order).
- rest: fp16 (fp32 with float32 values).
- each stream is split into byte planes and the block compressed (`compress`: lzma (default), zlib or none).
FORMAT 2 (read, no longer written): fixed-size rows, `cache_format2`.
"""
from __future__ import annotations

import lzma
import zlib

import numpy as np
import torch

FLOAT_VALUES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPRESS = ("lzma", "zlib", "none")
SENTINEL = 1 << 30          # format 3: the grid code of -inf (finite codes are below it)


def bits_for(vocab: int) -> int:
    """Bits of an id in [0, vocab): ceil(log2 vocab), at least 1."""
    return max(1, (int(vocab) - 1).bit_length())


def check_values(values: str, fmt: int = 3) -> str:
    """`values` if it names an encoding of format `fmt`, else a ValueError naming the accepted ones."""
    grid = values[:1] == "g" and values[1:].isdigit() and 2 <= int(values[1:]) <= 12
    q = values[:1] == "q" and values[1:].isdigit() and 2 <= int(values[1:]) <= 16
    if values in FLOAT_VALUES or (grid if fmt == 3 else q):
        return values
    if fmt == 3:
        old = "; q<B> is format 2's (read, not written)" if q else ""
        raise ValueError(f"values: {values!r}; expected one of {tuple(FLOAT_VALUES)} or g<E> with 2 <= E <= 12 "
                         f"(e.g. g7: log-probs on a grid of 2^-7 nats){old}")
    raise ValueError(f"values: {values!r}; expected one of {tuple(FLOAT_VALUES)} or q<B> with 2 <= B <= 16 "
                     f"(e.g. q8: 8-bit quantised log-probs)")


# ---------------------------------------------------------------------------------------------------------
# Format 3: compressed blocks (one per pair of base targets, one per (pair, plan) of counterfactual ones)
# ---------------------------------------------------------------------------------------------------------

def grid_codes(logp: torch.Tensor, e: int) -> torch.Tensor:
    """Log-probs (<= 0) -> int64 codes round(-logp 2^e) on the grid of 2^-e nats; -inf -> SENTINEL."""
    c = (-logp.double() * (1 << e)).round().clamp(0, SENTINEL - 1)
    return torch.where(torch.isneginf(logp), SENTINEL, c).long()


def grid_logp(codes: torch.Tensor, e: int) -> torch.Tensor:
    """The inverse of `grid_codes` (fp32: exact for codes below 2^24)."""
    return torch.where(codes >= SENTINEL, float("-inf"), codes.double() * -(2.0 ** -e)).float()


def quantise(logp: torch.Tensor, values: str) -> torch.Tensor:
    """The log-probs as a format-3 reader returns them (for measuring an encoding's error)."""
    if values in FLOAT_VALUES:
        return logp.to(FLOAT_VALUES[values]).float()
    e = int(values[1:])
    return grid_logp(grid_codes(logp, e), e)


def _zig(d: torch.Tensor) -> torch.Tensor:
    return (d << 1) ^ (d >> 63)                                                   # signed -> 0, 1, 2, ...


def _unzig(z: torch.Tensor) -> torch.Tensor:
    return (z >> 1) ^ -(z & 1)


STATS: dict | None = None  # set to {} to count each stream's bytes, raw and compressed alone (benchmarks)


class _Writer:
    """A block's streams, each split into byte planes (lowest first): compressors find the mostly-zero high
    bytes of small numbers as runs."""

    def __init__(self, kind: str):
        self.kind, self.parts = kind, []                                          # [(stream name, bytes)]

    def planes(self, x: torch.Tensor, width: int, name: str) -> None:
        x = np.asarray(x.reshape(-1).numpy(), dtype="<u8")
        self.parts.append((name, np.ascontiguousarray(x.view(np.uint8).reshape(-1, 8)[:, :width].T).tobytes()))

    def small(self, x: torch.Tensor, width: int, name: str) -> None:
        """Non-negative integers in `width` bytes; those >= 2^(8 width) - 1 escaped to an 8-byte stream."""
        x = x.reshape(-1).long()
        esc = (1 << 8 * width) - 1
        big = x >= esc
        self.planes(torch.where(big, esc, x), width, name)
        self.planes(x[big], 8, name + " (escapes)")

    def floats(self, x: torch.Tensor, name: str) -> None:
        view = {2: torch.int16, 4: torch.int32}[x.element_size()]
        self.planes(x.contiguous().view(view).long() & ((1 << 8 * x.element_size()) - 1), x.element_size(), name)

    def bits(self, mask: torch.Tensor, name: str) -> None:
        self.parts.append((name, np.packbits(mask.numpy().astype(np.uint8), axis=1).tobytes()))

    def block(self, compress: str) -> bytes:
        if STATS is not None:
            for name, part in self.parts:
                raw, alone = STATS.get((self.kind, name), (0, 0))
                STATS[self.kind, name] = (raw + len(part), alone + len(_Writer.compress(part, compress)))
        return _Writer.compress(b"".join(p for _, p in self.parts), compress)

    @staticmethod
    def compress(payload: bytes, compress: str) -> bytes:
        if compress == "lzma":
            return lzma.compress(payload, format=lzma.FORMAT_RAW, filters=_LZMA)
        if compress == "zlib":
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            return c.compress(payload) + c.flush()
        return payload


_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 22}]


class BlockError(ValueError):
    """A block does not decode to the layout its counts say (corrupt, or written by another version)."""


class _Reader:
    def __init__(self, blob: bytes, compress: str):
        try:
            if compress == "lzma":
                blob = lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=_LZMA)
            elif compress == "zlib":
                blob = zlib.decompress(blob, -15)
        except (lzma.LZMAError, zlib.error) as e:
            raise BlockError(f"does not decompress ({e})") from None
        self.buf, self.pos = blob, 0

    def planes(self, n: int, width: int) -> torch.Tensor:
        end = self.pos + n * width
        if end > len(self.buf):
            raise BlockError(f"is {len(self.buf)} bytes, shorter than its layout")
        b = np.frombuffer(self.buf, np.uint8, n * width, self.pos).reshape(width, n).astype(np.int64)
        self.pos = end
        x = b[0].copy()
        for i in range(1, width):
            x |= b[i] << (8 * i)
        return torch.from_numpy(x)

    def small(self, n: int, width: int) -> torch.Tensor:
        x = self.planes(n, width)
        big = x == (1 << 8 * width) - 1
        x[big] = self.planes(int(big.sum()), 8)
        return x

    def floats(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        size = torch.finfo(dtype).bits // 8
        x = self.planes(n, size).to({2: torch.int16, 4: torch.int32}[size])
        return x.view(dtype).float()

    def bits(self, n: int, k: int) -> torch.Tensor:
        nb = (k + 7) // 8
        end = self.pos + n * nb
        if end > len(self.buf):
            raise BlockError(f"is {len(self.buf)} bytes, shorter than its layout")
        b = np.frombuffer(self.buf, np.uint8, n * nb, self.pos).reshape(n, nb)
        self.pos = end
        return torch.from_numpy(np.unpackbits(b, axis=1, count=k).astype(bool))

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise BlockError(f"is {len(self.buf)} bytes, its layout {self.pos}")


def _id_width(id_bits: int) -> int:
    return (id_bits + 7) // 8


def _rest_dtype(values: str) -> torch.dtype:
    return torch.float32 if values == "float32" else torch.float16


def _sorted_codes(logp: torch.Tensor, e: int) -> torch.Tensor:
    c = grid_codes(logp, e)
    if c.shape[1] > 1 and bool((c[:, 1:] < c[:, :-1]).any()):
        raise ValueError("logp: rows must be sorted by log-prob, largest first (as topk returns them)")
    return c


def encode_base_block(input_ids: torch.Tensor, labels: torch.Tensor | None, logp: torch.Tensor, ids: torch.Tensor,
                      rest: torch.Tensor, *, values: str, id_bits: int, compress: str, target_bits: int | None = None
                      ) -> bytes:
    """One pair's tokens (t,) (+ labels (t,), -100 where unscored) and base targets (logp (n, K) sorted largest
    first, ids (n, K) in [0, 2^target_bits), rest (n,)) -> a block. id_bits: the tokens' (the vocabulary's)."""
    w, out = _id_width(id_bits), _Writer("base")
    out.small(input_ids, w, "input ids")
    if labels is not None:
        out.small(torch.where(labels < 0, 0, labels.long() + 1), w, "labels")     # -100 (unscored) -> 0
    out.small(ids, _id_width(target_bits or id_bits), "ids")
    if values in FLOAT_VALUES:
        out.floats(logp.to(FLOAT_VALUES[values]), "values")
    else:
        c = _sorted_codes(logp, int(values[1:]))                                  # (n, K) non-decreasing
        out.small(c[:, 0], 2, "row tops")                                         # the top: ~ -logp 2^e
        out.small(c[:, 1:] - c[:, :-1], 1, "value gaps")
    out.floats(rest.to(_rest_dtype(values)), "rest")
    return out.block(compress)


def decode_base_block(blob: bytes, *, tokens: int, rows: int, k: int, labels: bool, values: str, id_bits: int,
                      compress: str, target_bits: int | None = None):
    """The inverse of `encode_base_block`: (input_ids (t,) long, labels (t,) long or None, (logp (n, K) fp32,
    ids (n, K) long, rest (n,) fp32))."""
    w, r = _id_width(id_bits), _Reader(blob, compress)
    input_ids = r.small(tokens, w)
    lab = r.small(tokens, w) - 1 if labels else None
    if lab is not None:
        lab[lab < 0] = -100
    ids = r.small(rows * k, _id_width(target_bits or id_bits)).view(rows, k)
    if values in FLOAT_VALUES:
        logp = r.floats(rows * k, FLOAT_VALUES[values]).view(rows, k)
    else:
        top = r.small(rows, 2)
        gaps = r.small(rows * (k - 1), 1).view(rows, k - 1)
        logp = grid_logp(torch.cat([top[:, None], gaps], 1).cumsum(1), int(values[1:]))
    rest = r.floats(rows, _rest_dtype(values))
    r.done()
    return input_ids, lab, (logp, ids, rest)


def _membership(base_ids: torch.Tensor, ids: torch.Tensor):
    """Per row, which base entries the counterfactual row keeps (c, K), which of its entries are new (c, K),
    and for each kept base entry the index of the same id in the counterfactual row (flat, row-major)."""
    c, k = ids.shape
    row = torch.arange(c, dtype=torch.int64)[:, None] << 32
    bk, ck = row | base_ids.long(), row | ids.long()                             # (c, K) distinct keys
    order = ck.reshape(-1).argsort()
    sk = ck.reshape(-1)[order]
    pos = torch.searchsorted(sk, bk.reshape(-1)).clamp_max(max(sk.numel() - 1, 0))
    kept = (sk[pos] == bk.reshape(-1)).view(c, k) if sk.numel() else torch.zeros(c, k, dtype=torch.bool)
    new = ~torch.isin(ck, bk)
    return kept, new, order[pos.view(c, k)[kept]] if sk.numel() else pos[:0]


def encode_cf_block(logp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor, base_logp: torch.Tensor,
                    base_ids: torch.Tensor, *, values: str, id_bits: int, compress: str, target_bits: int | None = None
                    ) -> bytes:
    """Counterfactual targets (logp (c, K) sorted largest first, ids, rest (c,)) coded against the base
    targets at the same positions (base_logp, base_ids (c, K): the values a reader decodes) -> a block."""
    out = _Writer("cf")
    kept, new, at = _membership(base_ids, ids)
    out.bits(kept, "kept mask")
    out.small(ids[new], _id_width(target_bits or id_bits), "new ids")
    if values in FLOAT_VALUES:
        v = logp.to(FLOAT_VALUES[values])
        out.floats(torch.cat([v.reshape(-1)[at], v[new]]), "values")              # the decoded order, row by row
    else:
        e = int(values[1:])
        cc, bc = _sorted_codes(logp, e), grid_codes(base_logp, e)                 # (c, K)
        out.small(_zig(cc.reshape(-1)[at] - bc[kept]), 1, "kept deltas")          # kept: cf code - base code
        cn, nn = cc[new], new.sum(1)                                              # new: in cf order, per row
        first = torch.cat([torch.zeros(1, dtype=torch.long), nn.cumsum(0)[:-1]])[nn > 0]
        d = torch.cat([cn[:1], cn[1:] - cn[:-1]]) if cn.numel() else cn
        d[first] = _zig(cn[first] - bc[nn > 0, 0])                                # a row's first: vs its base top
        out.small(d, 1, "new values")
    out.floats(rest.to(_rest_dtype(values)), "rest")
    return out.block(compress)


def decode_cf_block(blob: bytes, base_logp: torch.Tensor, base_ids: torch.Tensor, *, values: str, id_bits: int,
                    compress: str, target_bits: int | None = None):
    """The inverse of `encode_cf_block`, given the decoded base targets at the same positions: (logp (c, K)
    fp32, ids (c, K) long, rest (c,) fp32), each row's kept entries in the base order, then its new ones."""
    c, k = base_ids.shape
    r = _Reader(blob, compress)
    kept = r.bits(c, k)                                                           # (c, K) base entries kept
    s = kept.sum(1, keepdim=True)                                                 # (c, 1)
    perm = (~kept).to(torch.uint8).argsort(dim=1, stable=True)                        # kept columns first, in order
    tail = torch.arange(k) >= s                                                   # (c, K) the new entries' slots
    ids = base_ids.long().gather(1, perm)
    ids[tail] = r.small(int(tail.sum()), _id_width(target_bits or id_bits))
    if values in FLOAT_VALUES:
        v = r.floats(c * k, FLOAT_VALUES[values])
        logp = torch.empty(c, k)
        logp[~tail], logp[tail] = v[:c * k - int(tail.sum())], v[c * k - int(tail.sum()):]
    else:
        e = int(values[1:])
        bc = _exact_codes(base_logp, e)                                           # (c, K)
        head = ~tail
        codes = bc.gather(1, perm)
        codes[head] += _unzig(r.small(int(head.sum()), 1))                        # kept: base code + delta
        d = torch.zeros(c, k, dtype=torch.long)
        d[tail] = r.small(int(tail.sum()), 1)
        first = tail & (torch.arange(k) == s)                                     # a row's first new entry
        d[first] = _unzig(d[first]) + bc[first.any(1), 0]
        codes[tail] = d.cumsum(1)[tail]                                           # the zeros before add nothing
        logp = grid_logp(codes, e)
    rest = r.floats(c, _rest_dtype(values))
    r.done()
    return logp, ids, rest


def _exact_codes(logp: torch.Tensor, e: int) -> torch.Tensor:
    """`grid_codes` of log-probs on the grid already (decoded ones): exact, without rounding."""
    x = (-logp * float(1 << e)).clamp_max(SENTINEL)
    return x.long()


def cf_base_rows(kd: torch.Tensor, n_cf: torch.Tensor) -> torch.Tensor:
    """The base rows (index into a pair's base targets) of a pair's counterfactual rows: kd (3,) the pair's
    loss-position offsets (row 0 from kd[0], row 1 from kd[1], end kd[2]), n_cf (2,) its counterfactual rows
    per row: each row's last n_cf (masked: all of them; causal: those >= the span start)."""
    return torch.cat([torch.arange(int(kd[i + 1]) - int(n_cf[i]), int(kd[i + 1])) for i in range(2)]) - int(kd[0])


def encode_shard(input_ids, labels, base, cf, offsets, kd_offsets, cf_offsets, *, plans: int, values: str,
                 id_bits: int, compress: str) -> dict[str, torch.Tensor]:
    """A shard's targets as format-3 blocks. input_ids, labels (T,) (labels None: causal), base (logp (N, K),
    ids, rest (N,)), cf (the same, (C, K)), offsets (R+1,) into T, kd_offsets (R+1,) into N, cf_offsets
    (M R + 1,) into C over (plan, row). Returns blocks (bytes,) uint8: pair j's base block, then (plan m, pair
    j)'s counterfactual block at index P + m P + j of block_offsets (P + M P + 1,); id_order (U,) int32: the
    target ids that occur, most frequent first (blocks hold an id's rank in it: smaller numbers)."""
    R = offsets.numel() - 1
    P = R // 2
    counts = torch.bincount(torch.cat([base[1].reshape(-1), cf[1].reshape(-1)]).long(), minlength=1 << id_bits)
    order = counts.argsort(descending=True, stable=True)[:int((counts > 0).sum())]
    rank = torch.full((counts.numel(),), -1, dtype=torch.long)
    rank[order] = torch.arange(order.numel())
    tb = bits_for(order.numel())
    kw = dict(values=values, id_bits=id_bits, compress=compress)
    blocks, base_dec = [], []
    for j in range(P):
        a, b = int(offsets[2 * j]), int(offsets[2 * j + 2])
        ka, kb = int(kd_offsets[2 * j]), int(kd_offsets[2 * j + 2])
        blocks.append(encode_base_block(input_ids[a:b], None if labels is None else labels[a:b], base[0][ka:kb],
                                        rank[base[1][ka:kb].long()], base[2][ka:kb], target_bits=tb, **kw))
        base_dec.append(quantise(base[0][ka:kb], values))                         # as the reader will have it
    for m in range(plans):
        for j in range(P):
            c = cf_offsets[m * R + 2 * j:m * R + 2 * j + 3]
            rows = cf_base_rows(kd_offsets[2 * j:2 * j + 3], c[1:] - c[:-1])
            ka, a, b = int(kd_offsets[2 * j]), int(c[0]), int(c[2])
            blocks.append(encode_cf_block(cf[0][a:b], rank[cf[1][a:b].long()], cf[2][a:b], base_dec[j][rows],
                                          rank[base[1][ka:][rows].long()], target_bits=tb, **kw))
    sizes = torch.tensor([0] + [len(x) for x in blocks])
    data = b"".join(blocks)
    data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return {"blocks": data, "block_offsets": sizes.cumsum(0), "id_order": order.int()}
