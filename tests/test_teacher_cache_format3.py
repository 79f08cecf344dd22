"""The teacher cache's format 3 (iit_fast/cache_codec.py, iit_fast/teacher_cache.py): per pair a compressed
block of its tokens and base targets, per (pair, plan) one of its counterfactual targets coded against the base
ones; log-probs on a grid of 2^-E nats or as a float dtype. Round trips (ids exact, values within their bound),
odd sizes (k not a power of 2, ids needing 15, 16, 17 bits), -inf, negative controls (a corrupt or wrong block
fails), and a format-2 cache read by this version."""
from __future__ import annotations

import hashlib
import json
import zlib

import pytest
import torch
from safetensors.torch import load_file, save

from iit_fast import cache_codec as codec
from iit_fast import cache_format2
from iit_fast.teacher_cache import RUN_FIELDS, TeacherCache
from test_teacher_cache import build, teacher_dir  # noqa: F401 (fixture)

VALUES = ("g7", "g3", "float32", "bfloat16", "float16")


def pair_targets(n, v, k, seed=0, shift=0.3):
    """Base targets of n positions and counterfactual ones at the same positions (the logits moved a little:
    most top-k ids kept, some new), each (logp (n, k) sorted largest first, ids (n, k), rest (n,))."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    out = []
    for logits in (z, z + shift * torch.randn(n, v, generator=g, dtype=torch.float64)):
        logp = torch.log_softmax(logits, -1)
        top = logp.topk(k, -1)
        rest = torch.logsumexp(logp.scatter(1, top.indices, float("-inf")), -1) if k < v else \
            torch.full((n,), float("-inf"), dtype=torch.float64)
        out.append((top.values.float(), top.indices, rest.float()))
    return out


def as_sets(logp, ids):
    """Rows as (id, value) sorted by id: a counterfactual row's order is the codec's (kept, then new)."""
    o = ids.argsort(1)
    return ids.gather(1, o), logp.gather(1, o)


def round_trip(v, k, values, compress, n=12, tokens=30):
    (bl, bi, br), (cl, ci, cr) = pair_targets(n, v, k)
    g = torch.Generator().manual_seed(1)
    inp = torch.randint(0, v, (tokens,), generator=g)
    lab = torch.where(torch.rand(tokens, generator=g) < 0.3, torch.randint(0, v, (tokens,), generator=g), -100)
    kw = dict(values=values, id_bits=codec.bits_for(v), compress=compress)
    blob = codec.encode_base_block(inp, lab, bl, bi, br, **kw)
    got_inp, got_lab, (gl, gi, gr) = codec.decode_base_block(blob, tokens=tokens, rows=n, k=k, labels=True, **kw)
    cblob = codec.encode_cf_block(cl, ci, cr, gl, gi, **kw)
    base, cf = (gl, gi, gr), codec.decode_cf_block(cblob, gl, gi, **kw)
    return (inp, lab, got_inp, got_lab), ((bl, bi, br), base), ((cl, ci, cr), cf), blob, cblob


@pytest.mark.parametrize("v", [30522, 50257, 128256])                             # ids in 15, 16, 17 bits
@pytest.mark.parametrize("k", [1, 3, 17, 64])
@pytest.mark.parametrize("values", ["g7", "float32"])
def test_blocks_round_trip_ids_exactly_in_odd_sizes(v, k, values):
    (inp, lab, got_inp, got_lab), (want, base), (cwant, cf), _, _ = round_trip(v, k, values, "lzma")
    assert codec.bits_for(v) == {30522: 15, 50257: 16, 128256: 17}[v]
    assert torch.equal(got_inp, inp) and torch.equal(got_lab, lab)
    assert torch.equal(base[1], want[1])                                          # base: the same order
    assert torch.equal(base[0], codec.quantise(want[0], values))
    ids, vals = as_sets(cf[0], cf[1])
    wids, wvals = as_sets(codec.quantise(cwant[0], values), cwant[1])
    assert torch.equal(ids, wids) and torch.equal(vals, wvals)
    assert all(len(set(r)) == k for r in cf[1].tolist())                          # distinct ids per row


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("compress", codec.COMPRESS)
def test_values_within_their_bound_and_every_compressor(values, compress):
    _, (want, base), (cwant, cf), blob, cblob = round_trip(500, 37, values, compress)
    bound = {"g7": 2.0 ** -8, "g3": 2.0 ** -4}.get(values)                        # half a grid step, absolute
    rel = {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}.get(values)
    for (lp, ids, rest), (glp, gids, grest) in ((want, base), (cwant, cf)):
        wids, wv = as_sets(lp, ids)
        gids, gv = as_sets(glp, gids)
        assert torch.equal(gids, wids)
        err = (gv - wv).abs()
        assert (err <= (bound if bound is not None else rel * wv.abs()) + 1e-7).all()
        assert torch.allclose(grest, rest, rtol=0 if values == "float32" else 2 ** -10, atol=0)
    if values.startswith("g") and compress != "none":   # smaller than format 2's fixed rows (q8, 9-bit ids)
        assert len(blob) + len(cblob) < 2 * 12 * cache_format2.bytes_per_row(37, 500, "q8")


def test_grid_keeps_minus_infinity_and_flat_rows():
    """K = V: the tail's -inf entries and rest = -inf decode exactly; a flat row stays flat."""
    (bl, bi, br), (cl, ci, cr) = pair_targets(4, 50, 50)
    bl[0, -3:] = cl[1, -2:] = float("-inf")
    bl[1] = cl[2] = -3.912
    kw = dict(values="g7", id_bits=6, compress="lzma")
    _, _, (gl, gi, gr) = codec.decode_base_block(codec.encode_base_block(torch.zeros(0), None, bl, bi, br, **kw),
                                                 tokens=0, rows=4, k=50, labels=False, **kw)
    assert torch.isneginf(gl[0, -3:]).all() and torch.isfinite(gl[0, :-3]).all() and torch.isneginf(gr).all()
    assert (gl[1] == gl[1, 0]).all()
    cf = codec.decode_cf_block(codec.encode_cf_block(cl, ci, cr, gl, gi, **kw), gl, gi, **kw)
    assert int(torch.isneginf(cf[0]).sum()) == 2 and torch.isneginf(cf[0][1]).sum() == 2
    assert (cf[0][2] == cf[0][2, 0]).all()


def test_negative_controls_a_corrupt_or_misread_block_fails():
    """The round trip's comparison can fail: a block decoded against the wrong base rows gives other ids; a
    flipped byte in an uncompressed block gives other values or a layout error; in an lzma block, an error."""
    (bl, bi, br), (cl, ci, cr) = pair_targets(12, 500, 17)
    kw = dict(values="g7", id_bits=9, compress="none")
    cblob = codec.encode_cf_block(cl, ci, cr, bl, bi, **kw)
    wrong = codec.decode_cf_block(cblob, bl.roll(1, 0), bi.roll(1, 0), **kw)      # other positions' base rows
    assert not torch.equal(as_sets(wrong[0], wrong[1])[0], as_sets(cl, ci)[0])
    bad = bytearray(cblob)
    bad[len(bad) // 2] ^= 0x10
    try:
        got = codec.decode_cf_block(bytes(bad), bl, bi, **kw)
        assert not (torch.equal(got[1], codec.decode_cf_block(cblob, bl, bi, **kw)[1])
                    and torch.equal(got[0], codec.decode_cf_block(cblob, bl, bi, **kw)[0]))
    except codec.BlockError:
        pass
    z = bytearray(codec.encode_cf_block(cl, ci, cr, bl, bi, **{**kw, "compress": "lzma"}))
    z[len(z) // 2] ^= 0xFF
    with pytest.raises(ValueError):
        out = codec.decode_cf_block(bytes(z), bl, bi, **{**kw, "compress": "lzma"})
        assert torch.equal(out[1], codec.decode_cf_block(cblob, bl, bi, **kw)[1])   # else: a wrong decode
        raise codec.BlockError("decoded the same")  # lzma decoded a corrupt block to the same: not a failure
    with pytest.raises(ValueError, match="rows must be sorted"):
        codec.encode_cf_block(cl.flip(1), ci.flip(1), cr, bl, bi, **kw)


def test_a_corrupt_block_in_a_cache_is_an_error_naming_the_pair(tmp_path, teacher_dir):
    """Past the shard's CRC (as if it collided): the block's layout check names the pair."""
    build(teacher_dir, tmp_path / "c", top_k=8, values="g7", hidden=False, compress="none")
    cache = TeacherCache.open(tmp_path / "c")
    good = cache.read_pair(1, 0)
    cache.verify_shard = lambda i: None                                           # the CRC bypassed
    cache._handles.clear()
    path = tmp_path / "c" / "shard-00000.safetensors"
    t = load_file(path)
    bo = t["block_offsets"]
    t["blocks"] = t["blocks"].clone()
    t["blocks"][int(bo[1]):int(bo[2])] = 255                                      # pair 1's base block
    path.write_bytes(save(t, metadata={"fingerprint_hash": cache.meta["fingerprint_hash"]}))
    cache._small.clear()
    with pytest.raises(ValueError, match=r"pair 1's block .*rebuild it"):
        got = cache.read_pair(1, 0)
        assert torch.equal(got["base"][1], good["base"][1])
        raise AssertionError("a corrupt block decoded to the intact targets")


def test_format_2_cache_is_still_read(tmp_path, teacher_dir):
    """A format-2 shard (fixed-size rows: packed ids, float32 values, cache_format2.encode) holding the same
    targets: this version reads it to the same pairs as the format-3 cache."""
    build(teacher_dir, tmp_path / "c", top_k=8, values="float32", hidden=False)
    new = TeacherCache.open(tmp_path / "c")
    reads = {(p, m): new.read_pair(p, m) for p in range(new.num_pairs) for m in range(new.plans)}
    for i in range(new.num_shards):
        pairs = range(i * new.shard_pairs, min((i + 1) * new.shard_pairs, new.num_pairs))
        small = {k: v for k, v in new._shard(i)[1].items() if k not in ("block_offsets", "id_order")}
        t = dict(small, input_ids=torch.cat([x for p in pairs for x in reads[p, 0]["input_ids"]]).int(),
                 labels=torch.cat([x for p in pairs for x in reads[p, 0]["labels"]]).int())
        for prefix, key, ms in (("", "base", [0]), ("cf_", "cf", range(new.plans))):
            rows = [torch.cat([reads[p, m][key][j] for m in ms for p in pairs]) for j in range(3)]
            t.update(cache_format2.encode(*rows, values="float32", id_bits=new.id_bits, prefix=prefix))
        data = save(t, metadata={"fingerprint_hash": new.meta["fingerprint_hash"]})
        (tmp_path / "c" / f"shard-{i:05d}.safetensors").write_bytes(data)
        man = json.loads((tmp_path / "c" / f"shard-{i:05d}.json").read_text())
        man.update(format=2, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), crc32=zlib.crc32(data))
        (tmp_path / "c" / f"shard-{i:05d}.json").write_text(json.dumps(man))
    head = tmp_path / "c" / "cache.json"
    meta = json.loads(head.read_text())
    meta["fingerprint"]["format"] = 2
    del meta["fingerprint"]["compress"]
    head.write_text(json.dumps(meta))
    run = {k: new.fingerprint[k] for k in RUN_FIELDS}                              # a run of this version
    assert "format" not in run
    old = TeacherCache.open(tmp_path / "c", expect=run, verify="full")
    assert old.format == 2
    for (p, m), want in reads.items():
        got = old.read_pair(p, m)
        for key in ("base", "cf"):
            assert all(torch.equal(a, b) for a, b in zip(got[key], want[key]))
        assert all(torch.equal(a, b) for a, b in zip(got["labels"], want["labels"]))
