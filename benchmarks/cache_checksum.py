"""What the teacher cache's per-shard checksum costs (iit_fast/teacher_cache.py, `TeacherCache.verify_shard`:
one pass over a shard's bytes on a process's first read of it).

    python benchmarks/cache_checksum.py [--shard-mib 128] [--repeats 5]

A shard of `--shard-mib` random bytes (the default cache's shards: 256 pairs x ~100 tokens x 2,717 bytes per
token at k = 64 with hidden states, about 130 MiB) is checked by `verify_shard` with a CRC-32 manifest (what
a build writes now) and with a SHA-256 one (older manifests, and `verify --full`). The file is in the page
cache (warm: the cost of the checksum itself, not of the disk; a cold read costs the disk's time, which the
training's own reads of the shard then save). Writes benchmarks/results/cache-checksum.{json,md}.

The cost relative to training: the cached CPU step reads 1,012 tokens/s (benchmarks/results/teacher-cache.md,
minilm, k = 64 + hidden), i.e. 2.7 MB/s of cache, so the CRC of a shard is a fraction of the time training
on that shard takes: printed below. The check runs once per shard and process, so later epochs pay nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, write_results  # noqa: E402
from iit_fast.teacher_cache import TeacherCache  # noqa: E402

CACHED_TOKENS_PER_S = 1012.26       # benchmarks/results/teacher-cache.json: cached step, minilm, k=64 + hidden
BYTES_PER_TOKEN = 2716.94           # the same file: k=64 + hidden


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard-mib", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        data = os.urandom(a.shard_mib << 20)
        (folder / "shard-00000.safetensors").write_bytes(data)
        cache = SimpleNamespace(folder=folder)
        rows = []
        for kind, man in (("CRC-32 (a build's manifest)", {"crc32": zlib.crc32(data)}),
                          ("SHA-256 (older manifests, verify --full)", {"sha256": hashlib.sha256(data).hexdigest()})):
            (folder / "shard-00000.json").write_text(json.dumps(man))
            TeacherCache.verify_shard(cache, 0)  # warm the page cache
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                TeacherCache.verify_shard(cache, 0)
                times.append(time.perf_counter() - t0)
            t = sorted(times)[len(times) // 2]
            train_s = len(data) / BYTES_PER_TOKEN / CACHED_TOKENS_PER_S
            rows.append({"check": kind, "shard MiB": a.shard_mib, "seconds (median)": round(t, 4),
                         "GB/s": round(len(data) / t / 1e9, 2), "s per GB": round(1e9 / (len(data) / t), 3),
                         "% of training on the shard (CPU)": round(100 * t / train_s, 3)})
    notes = ("The machine was shared with other jobs while this ran (timings are contended; the two checks ran "
             "alternately in one process). The shard was in the page cache. `% of training on the shard`: the "
             f"check's time over the time the cached CPU step takes to consume the shard ({CACHED_TOKENS_PER_S:,.0f} "
             f"tokens/s x {BYTES_PER_TOKEN:,.0f} bytes/token, benchmarks/results/teacher-cache.md); once per shard "
             "and process, nothing in later epochs. An upper bound: the check was timed on a loaded machine, the "
             "training rate on a quiet one.")
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
    notes += f" CPU {'with' if amx else 'without'} AMX."
    write_results("cache-checksum", {"machine": machine(), "args": vars(a)}, rows,
                  title="Teacher cache: the cost of the per-shard checksum", notes=notes)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
