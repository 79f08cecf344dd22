"""The teacher cache's format 2 (iit_fast/cache_format2.py, iit_fast/teacher_cache.py; read, no longer
written: tests/test_teacher_cache_format3.py tests the format this version writes): ids bit-packed in
ceil(log2 V) bits, log-probs quantised (q<B>) or as a float dtype, the rest mass kept; a format-1 cache is
refused with a message saying to rebuild; the rows are drawn across the whole corpus."""
from __future__ import annotations

import json

import pytest
import torch

from iit_fast import cache_codec, cache_format2 as codec
from iit_fast.teacher_cache import TeacherCache, select_rows
from test_teacher_cache import build, corpus, teacher_dir  # noqa: F401 (fixture)


@pytest.mark.parametrize("vocab", [2, 97, 30522, 50257, 128256, 1 << 20])
@pytest.mark.parametrize("k", [1, 3, 17, 64])
def test_ids_round_trip_in_the_fewest_bits(vocab, k):
    bits = cache_codec.bits_for(vocab)
    assert (1 << bits) >= vocab > (1 << (bits - 1)) or vocab == 2 and bits == 1
    ids = torch.randint(0, vocab, (11, k), generator=torch.Generator().manual_seed(vocab + k))
    ids[0] = vocab - 1                                                            # the largest id
    packed = codec.pack_rows(ids, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (11, (k * bits + 7) // 8)
    assert torch.equal(codec.unpack_rows(packed, k, bits), ids)
    # a slice of rows is the rows' ids (each row starts on a byte)
    assert torch.equal(codec.unpack_rows(packed[4:7], k, bits), ids[4:7])
    bits_for = cache_codec.bits_for
    assert bits_for(128256) == 17 and bits_for(30522) == 15 and bits_for(50257) == 16


def targets(n=40, v=500, k=64, seed=0, scale=3.0):
    z = torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    logp = torch.log_softmax(z, -1)
    top = logp.topk(k, -1)
    rest = torch.logsumexp(logp.scatter(1, top.indices, float("-inf")), -1)
    return top.values.float(), top.indices, rest.float()


@pytest.mark.parametrize("values,bound", [("q8", None), ("q4", None), ("q12", None), ("float16", 2 ** -11),
                                          ("bfloat16", 2 ** -8), ("float32", 0.0)])
def test_values_decode_within_their_bound_and_ids_exactly(values, bound):
    logp, ids, rest = targets()
    enc = codec.encode(logp, ids, rest, values=values, id_bits=cache_codec.bits_for(500))
    assert set(enc) == set(codec.names(values))
    got, got_ids, got_rest = codec.decode(enc, k=64, values=values, id_bits=cache_codec.bits_for(500))
    assert torch.equal(got_ids, ids)
    err = (got - logp).abs()
    if values.startswith("q"):
        step = enc["logp_step"].float()
        assert (err <= step[:, None] / 2 + 1e-6).all()                         # half a step, the order kept
        assert (step >= (logp[:, 0] - logp[:, -1]) / ((1 << int(values[1:])) - 1)).all()
        assert (got[:, :-1] >= got[:, 1:]).all()
    else:
        assert (err <= bound * logp.abs() + 1e-30).all()
    assert torch.allclose(got_rest, rest, rtol=2 ** -10 if values != "float32" else 0, atol=0)
    # the bytes the codec says a row takes are the bytes it wrote
    assert sum(t.numel() * t.element_size() for t in enc.values()) == 40 * codec.bytes_per_row(64, 500, values)


def test_negative_control_a_coarser_code_is_worse():
    logp, ids, rest = targets()
    err = {}
    for v in ("q4", "q8", "q12"):
        got = codec.decode(codec.encode(logp, ids, rest, values=v, id_bits=9), k=64, values=v, id_bits=9)[0]
        err[v] = (got - logp).abs().max().item()
    assert err["q4"] > err["q8"] > err["q12"] > 0


def test_minus_infinity_and_flat_rows():
    logp = torch.tensor([[-0.1, -2.0, float("-inf")], [-1.0986, -1.0986, -1.0986]])
    ids, rest = torch.tensor([[0, 1, 2], [2, 1, 0]]), torch.tensor([float("-inf"), float("-inf")])
    got, _, r = codec.decode(codec.encode(logp, ids, rest, values="q8", id_bits=2), k=3, values="q8", id_bits=2)
    assert torch.isfinite(got).all() and got[0, 2] == pytest.approx(-2.0, abs=1e-2)   # the smallest finite
    assert torch.allclose(got[1], logp[1], atol=1e-3) and torch.isinf(r).all()


def test_bad_values_name_the_choices():
    for bad in ("q1", "q17", "int8", "q"):
        with pytest.raises(ValueError, match=r"values: .*expected one of .*q<B> with 2 <= B <= 16"):
            cache_codec.check_values(bad, 2)
    for bad in ("g1", "g13", "int8", "g"):
        with pytest.raises(ValueError, match=r"values: .*expected one of .*g<E> with 2 <= E <= 12"):
            cache_codec.check_values(bad)
    with pytest.raises(ValueError, match=r"q<B> is format 2's \(read, not written\)"):
        cache_codec.check_values("q8")


def test_format_1_cache_is_refused_with_a_rebuild_message(tmp_path, teacher_dir):
    build(teacher_dir, tmp_path / "c", top_k=8)
    head = tmp_path / "c" / "cache.json"
    meta = json.loads(head.read_text())
    meta["fingerprint"]["format"] = 1
    head.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"format 1 \(fp16 values, int32 ids, the corpus's first rows\); this "
                                         r"version reads formats 2 and 3: rebuild it with `iit-fast cache-teacher`"):
        TeacherCache.open(tmp_path / "c")


def test_rows_are_drawn_across_the_corpus(tmp_path, teacher_dir):
    """--max_examples n of a corpus of N rows: a sample spread over all N (seeded by (N, n)), not the
    first n; all rows when n >= N. The cache holds exactly those rows."""
    rows = select_rows(1000, 100)
    assert rows.numel() == 100 and torch.equal(rows, rows.sort().values) and rows.unique().numel() == 100
    assert rows.max() > 800 and rows.min() < 200                                # across, not the first 100
    assert torch.equal(rows, select_rows(1000, 100)) and not torch.equal(rows, select_rows(1000, 101)[:100])
    assert torch.equal(select_rows(10, 20), torch.arange(10))
    build(teacher_dir, tmp_path / "c", ds=corpus(40), max_examples=8, top_k=8)
    cache = TeacherCache.open(tmp_path / "c")
    held = sorted(int(x) for i in range(cache.num_shards) for x in cache._shard(i)[1]["example"])
    assert held == select_rows(40, 8).tolist() and held != list(range(8))
