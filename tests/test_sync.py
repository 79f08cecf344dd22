"""No host sync in the fast step (issue 23 item 3), counted on the CPU.

A GPU runs ahead of the host; an op whose result the host must read (an item, a boolean-mask index, a
nonzero, a device-to-host copy) makes the host wait for the device, and the launch queue drains. The test
runs one fast step, forward and backward, under a `TorchDispatchMode` that records every such op
(`count_syncs`), with the step's GPU code path: the fused ops on their Triton path (run on the CPU by the
Triton interpreter, `TRITON_INTERPRET=1`, set by conftest on a machine without a GPU; what the interpreter
itself does stands for the device and is not counted), sdpa attention, and the step's index made on the
CPU with the plan (`step.step_index`), as the train loop does. Expected: 0, for a masked and a causal
family, padded and unpadded batches. Negative controls: the counter sees each kind of sync; the same step
with the attention-mask builders left to read the mask, or with a boolean-mask gather, is counted.
`benchmarks/gpu.sh` runs the step on a GPU under `torch.cuda.set_sync_debug_mode("error")`.
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iit_fast import step as step_module
from iit_fast.step import causal as step_causal, common as step_common, masked as step_masked
from iit_fast.config import DistillConfig
from iit_fast.models import IntervenableLM
from iit_fast.sampling import make_alignment, sample_plan
from iit_fast.step import distill_step, step_index
from tiny import TINY_CAUSAL, tiny_batch, tiny_causal_batch, tiny_pair

aten = torch.ops.aten
# ops whose result the host reads (their output size or value depends on the data)
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
            aten.allclose, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.masked_scatter}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # sync with a bool index
HOST_READS = ("tolist", "numpy", "cpu")  # device-to-host copies (no-ops on CPU tensors: caught here)


def _where() -> str:
    """The innermost frame of this repository that issued the op (the step, a model, an op wrapper)."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if "iit_fast" in f.filename or "transformers" in f.filename:
            return f"{f.filename.split('site-packages/')[-1].split('iit_fast/')[-1]}:{f.lineno} ({f.name})"
    return "?"


def _on_device() -> bool:
    """True inside the Triton interpreter: it emulates the device, its host reads are the kernel's own."""
    return any("triton/runtime/interpreter" in f.filename for f in traceback.extract_stack())


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        sync = packet in SYNC_OPS
        if packet in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            sync = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
        if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
            sync = kwargs.get("output_size") is None
        if sync and not _on_device():
            self.syncs.append(f"{func} at {_where()}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    """Yields the list the syncs of the block go to ("op at file:line (function)")."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def reader(name):
        def read(self, *args, **kwargs):
            if not _on_device():
                counter.syncs.append(f"Tensor.{name} at {_where()}")
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, reader(name))
        with counter:
            yield counter.syncs
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


# ---- the step, on its GPU code path ------------------------------------------------------------------

def _sdpa(model: IntervenableLM) -> IntervenableLM:
    model.model.set_attn_implementation("sdpa")  # the default of real checkpoints; its mask builders may read
    return model


def masked_case(padded: bool, logit_tokens: str, alignment: str = "middle"):
    teacher, student = tiny_pair(4, 2)
    batch = tiny_batch((9, 5, 7, 3) if padded else (9, 9, 9, 9))
    plan = sample_plan(batch["attention_mask"], make_alignment(alignment, 4, 2), torch.Generator().manual_seed(0))
    cfg = DistillConfig(w_mse=0.2, w_iit_cos=0.3, logit_tokens=logit_tokens)
    return _sdpa(teacher), _sdpa(student), batch, plan, cfg


def causal_case(family: str, padded: bool, logit_tokens: str, alignment: str = "middle"):
    teacher = IntervenableLM(TINY_CAUSAL[family](layers=4, seed=0)).eval()
    student = IntervenableLM(TINY_CAUSAL[family](layers=2, seed=1)).train()
    batch = tiny_causal_batch((9, 5, 7, 3, 8, 6) if padded else (9,) * 6, left=family == "gpt2")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    plan = sample_plan(batch["attention_mask"], make_alignment(alignment, 4, 2), torch.Generator().manual_seed(1))
    cfg = DistillConfig(w_mse=0.2, w_iit_cos=0.3, logit_tokens=logit_tokens, suffix_groups=3)
    return _sdpa(teacher), _sdpa(student), batch, plan, cfg


def step_syncs(teacher, student, batch, plan, cfg, monkeypatch) -> list[str]:
    """The syncs of one fast step (forward and backward) with the fused ops on their GPU (Triton) path."""
    for module in (step_masked, step_causal, step_common):  # where the steps and head_losses look it up
        monkeypatch.setattr(module, "_impl", lambda cfg: "triton")
    index = step_index(batch, plan, cfg, teacher.kind)           # on the CPU, next to the plan
    with count_syncs() as syncs:
        out = distill_step(teacher, student, batch, plan, cfg, check=False, index=index)
        out.loss.backward()
    return syncs


CASES = {
    "bert-masked-padded": lambda: masked_case(True, "masked"),
    "bert-all-unpadded": lambda: masked_case(False, "all"),
    "llama-affected-padded": lambda: causal_case("llama", True, "affected"),
    "llama-all-unpadded": lambda: causal_case("llama", False, "all"),
    "gpt2-all-leftpadded": lambda: causal_case("gpt2", True, "all"),
    # teacher groups of 2 blocks: the span is swapped again after the second (StepIndex.swaps)
    "bert-full-groups": lambda: masked_case(True, "masked", "full"),
    "llama-full-groups": lambda: causal_case("llama", True, "affected", "full"),
}


HEAD_LOSS = "ops/head_loss/"  # the fused head loss's own syncs, also counted on their own below


@pytest.mark.parametrize("case", list(CASES))
def test_fast_step_has_no_sync(case, monkeypatch):
    syncs = step_syncs(*CASES[case](), monkeypatch)
    assert syncs == [], "\n".join(syncs)


@pytest.mark.parametrize("case", ["bert-masked-padded", "llama-all-unpadded", "llama-affected-padded"])
def test_head_loss_has_no_sync(case, monkeypatch):
    # on its device path the head loss zeroes the rows that count for nothing instead of reading which they
    # are (ops/head_loss/chunked.py HeadLossRows); "affected" passes a kd_mask, the others none
    syncs = [s for s in step_syncs(*CASES[case](), monkeypatch) if HEAD_LOSS in s]
    assert syncs == [], "\n".join(syncs)


def test_head_loss_rows_sync_on_the_host_path_only():
    # the fused head loss's row selection: on its device path (triton) rows that count for neither loss are
    # zeroed, not dropped (dropping reads the mask on the host); the CPU paths drop them (a host read is free
    # there) -- the counter sees that read: this test's negative control
    from iit_fast.ops.head_loss.chunked import HeadLossRows
    y = torch.tensor([3, -100, -100, 5])
    kd = torch.tensor([True, False, True, False])
    with count_syncs() as syncs:
        rows = HeadLossRows(4, y, kd, torch.float32, torch.device("cpu"), on_host=False)
    assert syncs == [] and rows.idx is None and rows.zero.tolist() == [False, True, False, False]
    with count_syncs() as syncs:
        rows = HeadLossRows(4, y, kd, torch.float32, torch.device("cpu"), on_host=True)
    assert syncs and rows.idx.tolist() == [0, 2, 3]


# ---- negative controls ---------------------------------------------------------------------------------

def test_sync_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    probes = {
        "item": lambda: float(x.sum()),
        "bool": lambda: bool((x > 2).any()),
        "nonzero": lambda: x.nonzero(),
        "boolean index": lambda: x[x > 2],
        "boolean assignment": lambda: x.clone().__setitem__(x > 2, 0.0),
        "masked_select": lambda: x.masked_select(x > 2),
        "repeat_interleave": lambda: torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3])),
        "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(),
    }
    for name, probe in probes.items():
        with count_syncs() as syncs:
            probe()
        assert len(syncs) >= 1, name
    with count_syncs() as syncs:  # and no false alarm on gathers of known size
        x.index_select(0, torch.tensor([1, 3]))
        x[torch.tensor([1, 3])]
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)
    assert syncs == []


def test_a_step_whose_mask_builders_read_the_mask_is_counted(monkeypatch):
    """Negative control: the index says nothing about padding (None), so transformers' sdpa mask builders
    read the mask (`mask.all()`) to decide whether to skip it: counted, in each pass."""
    teacher, student, batch, plan, cfg = causal_case("llama", True, "affected")
    real = step_module.step_index

    def unknown_padding(*args):
        index = real(*args)
        index.padded = None
        return index

    monkeypatch.setattr(step_module, "step_index", unknown_padding)
    for module in (step_masked, step_causal, step_common):  # where the steps and head_losses look it up
        monkeypatch.setattr(module, "_impl", lambda cfg: "triton")
    index = step_module.step_index(batch, plan, cfg, teacher.kind)
    with count_syncs() as syncs:
        distill_step(teacher, student, batch, plan, cfg, check=False, index=index).loss.backward()
    assert [s for s in syncs if "masking_utils" in s], syncs   # (the head loss's own are counted apart)


def test_a_step_with_a_boolean_gather_is_counted(monkeypatch):
    """Negative control: the states gathered by a boolean mask (the step before the index) are counted."""
    def by_mask(h, rows):
        mask = torch.zeros(h.shape[0] * h.shape[1], dtype=torch.bool)
        mask[rows] = True
        return h.reshape(-1, h.shape[-1])[mask]

    monkeypatch.setattr(step_masked, "_rows", by_mask)
    syncs = step_syncs(*masked_case(True, "masked"), monkeypatch)
    assert any("step/masked.py" in s and "aten.index" in s for s in syncs), syncs


def test_step_index_and_plan_move_in_one_copy():
    """The index and the plan go to the device as one host-to-device copy each, every tensor back in its
    shape and dtype ("meta" stands in for the device: the copy is counted, not run)."""
    teacher, student, batch, plan, cfg = causal_case("llama", True, "all", "full")
    index = step_index(batch, plan, cfg, teacher.kind)
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket in (aten._to_copy, aten.copy_) and kwargs.get("device") == torch.device("meta"):
                copies.append(func)
            return func(*args, **kwargs)

    with Copies():
        moved, moved_plan = index.to("meta"), plan.to("meta")
    assert len(copies) == 2, copies
    assert index.groups and index.swaps and index.scales
    for name, head in index.heads.items():
        for a, b in zip(head, moved.heads[name]):
            assert (a is None) == (b is None) and (a is None or (a.shape == b.shape and a.dtype == b.dtype))
    assert [q0 for _, q0 in moved.groups] == [q0 for _, q0 in index.groups]
    assert all(a.shape == b.shape for sa, sb in zip(index.swaps, moved.swaps) for a, b in zip(sa, sb))
    assert moved_plan.pi.device.type == "meta" and moved_plan.pi.shape == plan.pi.shape
