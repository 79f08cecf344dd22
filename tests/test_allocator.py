"""tune_malloc keeps freed big blocks in-process, so they are not re-faulted page by page next step."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
if sys.argv[1] == "tuned":
    from iit_fast.allocator import tune_malloc
    print(tune_malloc(), file=sys.stderr)
for _ in range(10):  # warm-up: glibc settles its heap in the first few rounds
    torch.empty(16 << 20).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1)  # 64 MB, freed at once
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IIT_FAST_MALLOC")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1]), out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_stops_refaulting_big_blocks():
    default, _ = faults("default")
    tuned, said = faults("tuned")
    assert "glibc malloc, tuned" in said
    pages = 20 * (64 << 20) // 4096
    assert default > pages // 2     # glibc unmaps and re-faults every 64 MB block
    assert tuned < pages // 20      # kept in the heap: nearly no new faults


TRIM = r"""
import sys, torch
from iit_fast.allocator import release_free_memory, tune_malloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
tune_malloc()  # what the build would have met before: nothing returned to the OS
keep = [torch.ones(16 << 20) for _ in range(8)]  # 512 MB in the heap (no mmap once tuned)
del keep
before = rss()
released = release_free_memory() if sys.argv[1] == "trim" else False
print(before - rss(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_free_memory_returns_what_a_tuned_heap_kept():
    """Freed blocks a tuned glibc keeps (the teacher build's, say) go back to the OS with
    release_free_memory (malloc_trim); without it they stay resident."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IIT_FAST_MALLOC")}
    got = {m: subprocess.run([sys.executable, "-c", TRIM, m], capture_output=True, text=True, env=env,
                             check=True).stdout.split() for m in ("trim", "keep")}
    assert got["trim"][1] == "True" and int(got["trim"][0]) > 400 << 20, got
    assert int(got["keep"][0]) < 50 << 20, got
