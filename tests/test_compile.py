"""--compile (iit_fast/compile.py): the bias-in-the-GEMM linear against F.linear in fp64 (forward and backward,
odd sizes, both weight layouts, fp32 and bf16, under autocast, the fallbacks), and the fast step == the naive
step (fp32, 1e-5) with the blocks prepared (`linear`) and compiled (`blocks`, slow: inductor compiles C++),
for a masked and a causal family, with negative controls: the checks see a wrong plan, and a compiled block
reads weights changed in place (as an optimizer step changes them), not copies baked in at compile time."""
import copy

import pytest
import torch
import torch.nn.functional as F

from iit_fast.compile import FUSED_DTYPES, fuse_linears, linear, prepare_blocks
from iit_fast.config import DistillConfig
from iit_fast.sampling import make_alignment, sample_plan
from test_step import assert_same_step, run
from test_step_decoder import causal_batch, causal_pair, plan_for
from tiny import tiny_batch, tiny_pair

pytestmark = pytest.mark.skipif(torch.float32 not in FUSED_DTYPES, reason="no oneDNN in this torch build")


def _operands(dtype, transposed, M=(3, 7), K=13, N=5, contiguous=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*M, K, generator=g)                                        # (..., K)
    if not contiguous:  # a strided view of a wider tensor, as a slice of a fused QKV output is
        x = torch.randn(*M, 2 * K, generator=g)[..., ::2]
    w = torch.randn(K, N, generator=g) if transposed else torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    return [t.to(dtype).requires_grad_(True) for t in (x, w, b)]


def _reference(x, w, b, transposed):
    """fp64 F.linear of the same (rounded) operands, and its gradients for a fixed output weighting."""
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y = F.linear(x64, w64.t() if transposed else w64, b64)
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    y.backward(gy)
    return y, gy, (x64.grad, w64.grad, b64.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["nn.Linear", "Conv1D"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided_x"])
def test_linear_matches_fp64(dtype, transposed, contiguous):
    if dtype not in FUSED_DTYPES:
        pytest.skip("oneDNN has no bf16 on this CPU")
    x, w, b = _operands(dtype, transposed, contiguous=contiguous)
    y = linear(x, w, b, transposed=transposed)
    ref, gy, grads = _reference(x, w, b, transposed)
    y.backward(gy.to(dtype))
    # fp32: rounding of a 13-term sum; bf16: the output itself is rounded to 8 bits
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, **tol)
    for name, got, want in zip("xwb", (x.grad, w.grad, b.grad), grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, **tol, msg=f"gradient of {name}")
    if transposed:  # Conv1D's (in, out) weight gets its gradient in its own layout
        assert w.grad.is_contiguous()


def test_linear_takes_oneDNN_and_is_not_addmm():
    """The path is the custom op (no aten::addmm, no bias copy into the output); a wrong bias shows."""
    x, w, b = _operands(torch.float32, False, M=(64,), K=32, N=48)
    with torch.profiler.profile() as prof:
        y = linear(x, w, b)
    names = {e.name for e in prof.events()}
    assert "iit_fast::linear_bias" in names and "aten::addmm" not in names and "aten::copy_" not in names
    assert not torch.allclose(y, linear(x, w, b + 1))


def test_linear_under_autocast():
    """bf16 autocast with fp32 weights: bf16 output as F.linear's, fp32 weight gradients."""
    if torch.bfloat16 not in FUSED_DTYPES:
        pytest.skip("oneDNN has no bf16 on this CPU")
    x, w, b = _operands(torch.float32, False)
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w, b)
        y2 = F.linear(x2, w2, b2)
    assert y.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y, y2, rtol=1e-2, atol=2e-2)
    y.float().sum().backward()
    y2.float().sum().backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("case", ["fp64", "no_bias"])
def test_linear_falls_back_to_F_linear(case):
    """Where oneDNN does not apply (fp64, a linear without bias) the result is F.linear's, bit for bit."""
    x, w, b = _operands(torch.float64 if case == "fp64" else torch.float32, False)
    bias = None if case == "no_bias" else b
    assert torch.equal(linear(x, w, bias), F.linear(x, w, bias))


def test_fuse_linears_keeps_the_block():
    """A BERT block with its linears replaced gives the same output (fp32) and the same state dict."""
    teacher, _ = tiny_pair()
    blk = teacher.blocks[0]
    fused = copy.deepcopy(blk)
    assert fuse_linears(fused) == 6  # q, k, v, attention output, intermediate, output
    h = torch.randn(3, 9, 32)                                                  # (B, S, D)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731  (transformers 4.x: a tuple)
    torch.testing.assert_close(first(fused(h, None)), first(blk(h, None)), rtol=1e-5, atol=1e-6)
    assert fused.state_dict().keys() == blk.state_dict().keys()


def test_prepare_blocks_refuses_bad_mode():
    teacher, _ = tiny_pair()
    with pytest.raises(ValueError, match="compile mode must be one of"):
        prepare_blocks(teacher, "everything")


# ---- the step: fast == naive with the blocks prepared ----------------------------------------------------

def _pair(family):
    if family == "bert":
        teacher, student = tiny_pair(teacher_layers=4, student_layers=2)
        batch = tiny_batch((9, 5, 7, 3))
        plan = lambda seed: sample_plan(batch["attention_mask"], make_alignment("middle", 4, 2),  # noqa: E731
                                        torch.Generator().manual_seed(seed))
        return teacher, student, batch, plan
    teacher, student = causal_pair(family)
    batch = causal_batch()
    return teacher, student, batch, lambda seed: plan_for(batch, "middle", seed)


# prepared vs plain blocks: the same math, other kernels (inductor fuses LayerNorm's reductions; oneDNN's GEMM
# sums in another order): ~1e-7 apart in the states, which the small KL terms (~1e-2, a difference of ~5-sized
# cross-entropies) carry as ~1e-5 of themselves; fast vs naive, both prepared alike, stay at 1e-5
PLAIN_RTOL = 1e-4


def _check_fast_equals_naive(family, mode):
    teacher, student, batch, plan_of = _pair(family)
    eager_t, eager_s = copy.deepcopy(teacher), copy.deepcopy(student)
    for lm in (teacher, student):
        assert prepare_blocks(lm, mode).startswith(f"compile: {mode}")
    kw = dict(ops="reference", w_iit_cos=0.3, w_mse=0.2)
    for seed in range(2):
        plan = plan_of(seed)
        naive = run(teacher, student, batch, plan, DistillConfig(mode="naive", **kw))
        fast = run(teacher, student, batch, plan, DistillConfig(mode="fast", **kw))
        assert all(v > 0 for v in naive[0].terms.values())
        assert_same_step(naive, fast)
        # and the prepared blocks compute what the plain ones do
        assert_same_step(run(eager_t, eager_s, batch, plan, DistillConfig(mode="fast", **kw)), fast, PLAIN_RTOL)
    # negative control 1: the check sees a different plan
    other = run(teacher, student, batch, plan_of(5), DistillConfig(mode="naive", **kw))
    with pytest.raises(AssertionError):
        assert_same_step(other, fast)
    # negative control 2: weights changed in place (an optimizer step) reach the prepared blocks
    with torch.no_grad():
        for lm in (student, eager_s):
            for p in lm.blocks[-1].parameters():
                p.mul_(1.5)
    after = run(teacher, student, batch, plan, DistillConfig(mode="fast", **kw))
    with pytest.raises(AssertionError):
        assert_same_step(after, fast, PLAIN_RTOL)
    assert_same_step(run(eager_t, eager_s, batch, plan, DistillConfig(mode="fast", **kw)), after, PLAIN_RTOL)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_fast_equals_naive_linear(family):
    _check_fast_equals_naive(family, "linear")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # inductor compiles ~10 graphs of C++ (~1 min each on 2 busy cores)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_fast_equals_naive_compiled(family):
    """The same with torch.compile of every block (masked: padded rows, a mask; causal: the suffix passes
    over cached keys/values, several shapes); the blocks did run compiled code."""
    from torch._dynamo.utils import counters
    counters.clear()
    _check_fast_equals_naive(family, "blocks")
    assert counters["stats"]["unique_graphs"] > 0
