"""A teacher bigger than one device: loaded in pieces (never whole on any rank), on its own ZeRO-3 plan.

- Fast (one process): the student read from the teacher's files equals the one copied from the loaded
  teacher; the teacher's plan refuses what cannot work (offload without ZeRO-3, an optimizer, bf16 where
  the machine or the run has none, NVMe, other batch sizes) naming the file and key; `inspect_model`
  opens no weight file when asked not to.
- Two gloo ranks (slow): losses and student gradients with the teacher partitioned as it is built equal
  the replicated teacher's, for a masked (BERT, tied decoder) and a causal (Llama, untied head) teacher:
  student ZeRO-3 + teacher on the student's settings, and student ZeRO-2 + teacher on its own ZeRO-3 plan
  with its parameters offloaded to CPU. Sampled after every tensor read and as every module with
  parameters starts, no rank holds more teacher bytes than its partition + one module gathered.
- Through train.py: a bad teacher plan is one `error:` line before work; a run on a teacher cache reads no
  teacher tensor; 2 ranks (slow), student ZeRO-2 + teacher offloaded on its own plan == replicated.
- Two gloo ranks (slow): peak RSS per rank above the runtime's own (torch, DeepSpeed, transformers, the
  process group and one warm-up step: measured per rank before anything is loaded), through loading a
  16 x 1024 Llama-shaped bf16 teacher (0.55 GB) and 2 steps of a small student: sharded <= 0.6x replicated;
  while loading, at most the partition + one module.

The rank side is this file run as a script under torch.distributed.run (as tests/test_scale.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import multirank  # noqa: E402
from multirank import grad_error, save_on_rank0  # noqa: E402

LR, STEPS = 1e-2, 2
GRAD_RTOL = 1e-5  # fp32: the same arithmetic in another partitioning (test_scale.py measured <= 1.4e-7)
# the peak-RSS teacher: Llama-shaped, 16 blocks x 1024, 4096 MLP, a 8192-token vocabulary, bf16 safetensors
BIG = dict(layers=16, hidden=1024, heads=8, kv_heads=8, intermediate=4096, vocab=2048)


# ---- teachers on disk ---------------------------------------------------------------------------

def save_tiny(folder: Path, kind: str) -> Path:
    """A tiny fp32 teacher with its tokenizer: masked = BERT (decoder tied to the embeddings), causal =
    Llama (untied lm_head, GQA, attention biases)."""
    from tiny import tiny_bert, tiny_bert_tokenizer, tiny_causal_tokenizer, tiny_llama
    if kind == "masked":
        model, tok = tiny_bert(layers=4, hidden=32, vocab=97, seed=0), tiny_bert_tokenizer(97)
    else:
        model, tok = tiny_llama(layers=4, hidden=32, vocab=101, seed=0), tiny_causal_tokenizer(101)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_big_bf16(folder: Path) -> Path:
    """The peak-RSS teacher written tensor by tensor from a meta-device model (random bf16 values, norms 1):
    building it never needs more memory than the file."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny import tiny_causal_tokenizer
    cfg = LlamaConfig(vocab_size=BIG["vocab"], hidden_size=BIG["hidden"], intermediate_size=BIG["intermediate"],
                      num_hidden_layers=BIG["layers"], num_attention_heads=BIG["heads"],
                      num_key_value_heads=BIG["kv_heads"], max_position_embeddings=256, tie_word_embeddings=False,
                      dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.ones(s) if "norm" in n else 0.02 * torch.randn(s, generator=g)).bfloat16()
               for n, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(folder)
    tiny_causal_tokenizer(BIG["vocab"]).save_pretrained(folder)
    return folder


# ---- the rank side ------------------------------------------------------------------------------

def _ds(tmp: Path, stage: int, micro: int) -> dict:
    from iit_fast.engine import read_ds_config
    path = tmp / f"student_zero{stage}_rank{os.environ.get('RANK', 0)}.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": micro, "steps_per_print": 10 ** 9,
                                "zero_optimization": {"stage": stage}}))
    return read_ds_config(str(path), int(os.environ.get("WORLD_SIZE", 1)))


def _batch(kind: str, rows: int, seq: int, vocab: int, seed: int) -> dict:
    """`rows` rows of `seq` real tokens: masked rows with 3 MLM targets (stand-in [MASK] id 4), causal rows
    whose labels are their ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (rows, seq), generator=g)                    # (B, S)
    am = torch.ones(rows, seq, dtype=torch.long)
    if kind == "causal":
        return {"input_ids": ids, "attention_mask": am, "labels": ids.clone()}
    labels = torch.full((rows, seq), -100, dtype=torch.long)
    for i in range(rows):
        pos = torch.randperm(seq, generator=g)[:3]
        labels[i, pos] = ids[i, pos]
        ids[i, pos] = 4
    return {"input_ids": ids, "attention_mask": am, "labels": labels,
            "token_type_ids": torch.zeros(rows, seq, dtype=torch.long)}


class Sampler:
    """The teacher's bytes on this rank (engine.local_param_bytes), sampled at each call; the largest."""

    def __init__(self):
        self.module, self.peak, self.n = None, 0, 0

    def sample(self, module):
        from iit_fast.engine import local_param_bytes
        self.peak = max(self.peak, local_param_bytes(module))
        self.n += 1

    def hook(self, *_):  # a module's forward pre-hook: the whole teacher's bytes while that module runs
        self.sample(self.module)


def _teacher_sizes(teacher) -> dict:
    """Whole-teacher bytes, and the largest module that is gathered at once (a block, the embeddings, the
    head): the allowance above a rank's partition."""
    size = lambda ps: sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in ps)  # noqa: E731
    units = [list(b.parameters()) for b in teacher.blocks]
    units += [list(m.parameters(recurse=False)) for m in teacher.model.modules() if m not in teacher.blocks]
    return {"total": size(teacher.parameters()), "unit": max(size(u) for u in units)}


def _load(spec, plan, dtype, sampler: Sampler | None):
    """The teacher on `plan`, its bytes sampled after every tensor read and around every block run."""
    from iit_fast.engine import build_teacher
    on_tensor = None if sampler is None else (lambda model, name: sampler.sample(model))
    teacher = build_teacher(spec, plan, dtype, torch.device("cpu"), on_tensor=on_tensor)
    if sampler is not None:
        sampler.module = teacher
        # every module that owns parameters, as it starts: ZeRO-3's own pre-forward hook (registered first)
        # has gathered them by then
        for m in teacher.modules():
            if next(m.parameters(recurse=False), None) is not None:
                m.register_forward_pre_hook(sampler.hook)
    return teacher


def _steps(teacher, student, kind: str, ds: dict, cfg, rows: int, seq: int, steps: int, rank: int) -> dict:
    """The student's engine around DistillStep(teacher, student); `steps` optimizer steps."""
    from iit_fast.engine import init_engine
    from iit_fast.optim import make_scheduler, param_groups
    from iit_fast.sampling import make_alignment, sample_plan
    from iit_fast.step import DistillStep
    engine = init_engine(ds, DistillStep(teacher, student, cfg), param_groups(student, 0.01), LR,
                         lambda opt: make_scheduler(opt, "constant", 0, steps))
    alignment = make_alignment("middle", teacher.num_layers, student.num_layers)
    out = {"losses": [], "terms": [], "step_times": []}
    for step in range(steps):
        t0 = time.perf_counter()
        batch = _batch(kind, rows, seq, teacher.vocab_size, seed=1000 * rank + step)
        plan = sample_plan(batch["attention_mask"], alignment, torch.Generator().manual_seed(7 * rank + step))
        loss, terms = engine(batch, plan)
        engine.backward(loss)
        if step == 0:
            from deepspeed.utils import safe_get_full_grad
            out["grads"] = {n: safe_get_full_grad(p).detach().clone().float()
                            for n, p in engine.module.student.named_parameters()}
        engine.step()
        out["losses"].append(float(loss))
        out["terms"].append({k: float(v) for k, v in terms.items()})
        out["step_times"].append(time.perf_counter() - t0)
    engine.destroy()
    return out


def worker_equal(out: Path):
    """Per kind: replicated vs partitioned (student ZeRO-3, the student's settings) and replicated vs
    offloaded (student ZeRO-2, ds_configs/teacher_zero3_offload.json); teacher bytes sampled."""
    import torch.distributed as dist
    from iit_fast.config import DistillConfig
    from iit_fast.engine import init_distributed, read_teacher_ds_config, teacher_plan
    from iit_fast.models import IntervenableLM
    from iit_fast.models.load import inspect_model, meta_model
    from iit_fast.models.partitioned import init_student_from_checkpoint
    rank, world, _ = init_distributed(300)
    tmp = out.parent
    results = {}
    for kind in ("masked", "causal"):
        folder = tmp / f"teacher-{kind}"
        if rank == 0:
            save_tiny(folder, kind)
        dist.barrier()
        spec, _ = inspect_model(folder, arg="--teacher")
        hidden = meta_model(spec).hidden_size
        for stage, variant in ((3, "replicated"), (3, "sharded"), (2, "replicated"), (2, "offload")):
            ds = _ds(tmp, stage, 4)
            own = (read_teacher_ds_config(str(REPO / "ds_configs/teacher_zero3_offload.json"), ds, "float32")
                   if variant == "offload" else None)
            plan, why = teacher_plan(ds, own, "no" if variant == "replicated" else "yes", 0, hidden, torch.float32)
            assert (plan is None) == (variant == "replicated"), why
            sampler = Sampler() if plan is not None else None
            torch.manual_seed(0)
            student = IntervenableLM(init_student_from_checkpoint(spec, 2)).train()
            teacher = _load(spec, plan, torch.float32, sampler)
            res = _steps(teacher, student, kind, ds, DistillConfig(), 4, 12, STEPS, rank)
            res["sizes"] = _teacher_sizes(teacher)
            if sampler is not None:
                res.update(peak=sampler.peak, samples=sampler.n, why=why,
                           offload=plan["zero_optimization"].get("offload_param", {}).get("device"))
            results[f"{kind}/zero{stage}/{variant}"] = res
            del teacher
            dist.barrier()
    save_on_rank0(results, out)


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the process started) in MiB, from /proc/self/status."""
    fields = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def small_student(spec, seed: int = 0):
    """A 2-block, 256-wide Llama student of the teacher's vocabulary: the small-student, big-teacher case
    (cos / iit_cos off: the widths differ)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from iit_fast.models import IntervenableLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=spec.config.vocab_size, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return IntervenableLM(LlamaForCausalLM(cfg)).train()


def rss_run(out: Path, variant: str, folder: str, steps: int = 2, rows: int = 2, seq: int = 16) -> dict:
    """One teacher setting in this process (VmHWM is per process): RSS before anything is loaded (the
    runtime: torch, DeepSpeed, transformers, the process group), peak while loading the teacher, peak during
    `steps` steps of a small student (ZeRO-2); teacher bytes sampled at every tensor read and block run.
    variant: replicated | sharded (ds_configs/teacher_zero3.json) | offload (teacher_zero3_offload.json)."""
    import gc
    import torch.distributed as dist
    from iit_fast.config import DistillConfig
    from iit_fast.engine import init_distributed, read_teacher_ds_config, teacher_plan
    from iit_fast.models.load import inspect_model, meta_model
    rank, world, _ = init_distributed(600)
    spec, _ = inspect_model(folder, arg="--teacher")
    hidden = meta_model(spec).hidden_size
    ds = _ds(out.parent, 2, rows)
    own = {"replicated": None, "sharded": "teacher_zero3.json", "offload": "teacher_zero3_offload.json"}[variant]
    own = None if own is None else read_teacher_ds_config(str(REPO / "ds_configs" / own), ds, "bfloat16")
    plan, why = teacher_plan(ds, own, "no" if variant == "replicated" else "auto", 0, hidden, torch.bfloat16)
    warm_up(out.parent / f"warm-{rank}", ds)
    gc.collect()
    dist.barrier()
    base, _ = _rss_mb()
    sampler = Sampler()
    t0 = time.perf_counter()
    teacher = _load(spec, plan, torch.bfloat16, sampler if plan is not None else None)
    load_s = time.perf_counter() - t0
    _, load_peak = _rss_mb()
    sizes = _teacher_sizes(teacher)
    student = small_student(spec)
    cfg = DistillConfig(teacher_dtype="bfloat16", w_cos=0.0, w_iit_cos=0.0)
    res = _steps(teacher, student, "causal", ds, cfg, rows, seq, steps, rank)
    _, step_peak = _rss_mb()
    r = {"variant": variant, "rank": rank, "ranks": world, "plan": why, "base_MB": base, "load_peak_MB": load_peak,
         "step_peak_MB": step_peak, "teacher_MB": sizes["total"] / 2 ** 20, "unit_MB": sizes["unit"] / 2 ** 20,
         "sampled_teacher_MB": (sampler.peak if plan is not None else sizes["total"]) / 2 ** 20,
         "samples": sampler.n, "load_s": load_s, "step_times": res["step_times"], "losses": res["losses"]}
    gathered = [None] * world
    dist.all_gather_object(gathered, r)
    return gathered if rank == 0 else None


def warm_up(folder: Path, ds: dict):
    """One step of a tiny Llama pair under the run's engine: the code the steps use (kernels, libraries,
    DeepSpeed's buffers) is loaded before the baseline is taken, so that the baseline is the runtime's own."""
    import torch.distributed as dist
    from iit_fast.config import DistillConfig
    from iit_fast.models import IntervenableLM
    from tiny import tiny_llama
    teacher = IntervenableLM(tiny_llama(layers=2, hidden=32, vocab=101, seed=1).to(torch.bfloat16)).eval()
    teacher.requires_grad_(False)
    student = IntervenableLM(tiny_llama(layers=2, hidden=16, vocab=101, seed=2)).train()
    cfg = DistillConfig(teacher_dtype="bfloat16", w_cos=0.0, w_iit_cos=0.0)
    _steps(teacher, student, "causal", ds, cfg, ds["train_micro_batch_size_per_gpu"], 16, 1, dist.get_rank())


def worker_rss(out: Path, variant: str, folder: str):
    rows = rss_run(out, variant, folder)
    if rows is not None:
        out.write_text(json.dumps(rows))


# ---- the test side ------------------------------------------------------------------------------

# glibc with a fixed mmap threshold (128 KiB): every freed block of that size or more goes back to the OS, so
# RSS follows the live memory (by default glibc raises the threshold as blocks are freed and keeps them)
RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_ranks(tmp: Path, ranks: int, out: Path, *args, timeout=900, env=None) -> Path:
    """Run this file's worker on `ranks` gloo ranks (multirank.run_ranks); its result file `out`."""
    return multirank.run_ranks(__file__, tmp, ranks, out, *args, timeout=timeout, env=env)


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_shard_student_from_checkpoint_equals_from_teacher(tmp_path, kind):
    """The student read from the teacher's files (only its tensors) is the one copied from the teacher."""
    from iit_fast.models import load_model
    from iit_fast.models.student import init_student_from_teacher
    from iit_fast.models.load import inspect_model
    from iit_fast.models.partitioned import init_student_from_checkpoint
    folder = save_tiny(tmp_path / "t", kind)
    teacher, _ = load_model(folder)
    ref = init_student_from_teacher(teacher.model, 2).state_dict()
    new = init_student_from_checkpoint(inspect_model(folder)[0], 2).state_dict()
    assert ref.keys() == new.keys()
    for k in ref:
        assert new[k].dtype == ref[k].dtype and torch.equal(new[k], ref[k]), k
    # a negative control: another layer subset differs
    other = init_student_from_checkpoint(inspect_model(folder)[0], 3).state_dict()
    assert any(not torch.equal(other[k], ref[k]) for k in ref if k in other and other[k].shape == ref[k].shape)


def test_shard_load_model_keeps_the_checkpoint_dtype(tmp_path):
    """A bf16 checkpoint loaded as bf16 is never upcast: load_model builds it in bf16 directly (the peak
    tensor dtype seen while loading is bf16), and its values are the stored ones."""
    from safetensors.torch import load_file
    from iit_fast.models import load_model
    from tiny import tiny_causal_tokenizer, tiny_llama
    folder = tmp_path / "bf16"
    tiny_llama(layers=2, hidden=32, vocab=101).to(torch.bfloat16).save_pretrained(folder)
    tiny_causal_tokenizer(101).save_pretrained(folder)
    stored = load_file(str(folder / "model.safetensors"))
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dtypes(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() >= 32 * 32:
                self.seen.add(out.dtype)
            return out
    with Dtypes() as mode:
        teacher, _ = load_model(folder, dtype=torch.bfloat16)
    assert torch.float32 not in mode.seen and torch.bfloat16 in mode.seen, mode.seen
    for n, p in teacher.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, stored[n]), n
    # control: asking fp32 upcasts (the dispatch mode sees fp32 tensors)
    Dtypes.seen = set()
    with Dtypes() as mode:
        load_model(folder, dtype=torch.float32)
    assert torch.float32 in mode.seen


def test_shard_inspect_without_weights_opens_no_weight_file(tmp_path, monkeypatch):
    """inspect_model(weights=False) (a run on a teacher cache) reads config and tokenizer only: every way
    of reading a weight file fails here, and it still succeeds."""
    import builtins
    import safetensors
    from iit_fast.models import load as load_lib
    folder = save_tiny(tmp_path / "t", "causal")
    weights = str(folder / "model.safetensors")
    opened = []
    real_open = builtins.open

    def guarded_open(file, *a, **k):
        if str(file) == weights:
            opened.append(file)
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: opened.append(a) or 1 / 0)
    monkeypatch.setattr(load_lib, "weight_names", lambda *a, **k: opened.append(a) or 1 / 0)
    spec, tok = load_lib.inspect_model(folder, arg="--teacher", weights=False)
    assert spec.kind == "causal" and len(tok) == 101 and not opened
    with pytest.raises(ZeroDivisionError):  # control: with weights, the guarded readers are reached
        load_lib.inspect_model(folder, arg="--teacher")


def _write(tmp: Path, cfg: dict, name="teacher.json") -> str:
    p = tmp / name
    p.write_text(json.dumps(cfg))
    return str(p)


def test_shard_teacher_plan_bad_input_names_the_key(tmp_path, monkeypatch):
    from iit_fast import engine
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "zero_optimization": {"stage": 2}}
    read = lambda cfg, dtype="float32": engine.read_teacher_ds_config(_write(tmp_path, cfg), ds, dtype)  # noqa: E731
    ok = read({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    assert ok["zero_optimization"]["offload_param"]["device"] == "cpu"
    cases = [
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs zero_optimization.stage 3"),
        ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}, "'optimizer' section"),
        ({"zero_optimization": {"stage": 3}, "scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
        ({"zero_optimization": {"stage": 1}}, "expected zero_optimization.stage 3"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}}, "'nvme'"),
        ({"zero_optimization": {"stage": 3, "stage3_bogus": 1}}, "zero_optimization"),
        ({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu = 8"),
        ({"zero_optimisation": {"stage": 3}}, "did you mean 'zero_optimization'"),
        ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, "bf16.enabled is True, but the teacher runs in float32"),
    ]
    for cfg, needle in cases:
        with pytest.raises(ValueError, match=None) as e:
            read(cfg)
        assert needle in str(e.value) and "--teacher_deepspeed_config" in str(e.value), (cfg, str(e.value))
    # bf16 on a machine without bf16
    monkeypatch.setattr(engine, "has_native_bf16", lambda: (False, "the CPU has neither avx512_bf16 nor amx_bf16"))
    with pytest.raises(ValueError, match="this machine has no bf16"):
        read({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, "bfloat16")
    with pytest.raises(FileNotFoundError, match="--teacher_deepspeed_config"):
        engine.read_teacher_ds_config(str(tmp_path / "absent.json"), ds, "float32")
    # the plan: a partitioned teacher on the student's settings needs a ZeRO-3 student, unless it has its own
    with pytest.raises(ValueError, match="--shard_teacher yes.*ZeRO-2.*--teacher_deepspeed_config"):
        engine.teacher_plan(ds, None, "yes", 0, 32, torch.float32)
    with pytest.raises(ValueError, match="--shard_teacher no contradicts"):
        engine.teacher_plan(ds, ok, "no", 0, 32, torch.float32)
    plan, why = engine.teacher_plan(ds, ok, "auto", 0, 32, torch.float32)
    assert plan["zero_optimization"]["stage"] == 3 and "offloaded to CPU" in why and "optimizer" not in plan
    assert plan["train_micro_batch_size_per_gpu"] == 4 and plan["bf16"] == {"enabled": False}
    assert engine.teacher_plan(ds, None, "auto", 2 ** 31, 32, torch.float32)[0] is None  # ZeRO-2: replicated
    z3 = {**ds, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert engine.teacher_plan(z3, None, "auto", 2 ** 20, 32, torch.float32)[0] is None  # small: replicated
    big, _ = engine.teacher_plan(z3, None, "auto", 2 ** 31, 32, torch.bfloat16)
    assert "offload_optimizer" not in big["zero_optimization"] and big["bf16"] == {"enabled": True}


def test_shard_shipped_teacher_configs_pass_the_checks():
    from iit_fast.engine import read_teacher_ds_config
    ds = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "train_batch_size": 16}
    for name in ("teacher_zero3.json", "teacher_zero3_offload.json"):
        read_teacher_ds_config(f"ds_configs/{name}", ds, "float32")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_shard_and_offload_teacher_equal_replicated_two_ranks(tmp_path):
    """Masked and causal teachers, 2 ranks: partitioned as built (student ZeRO-3) and offloaded to CPU on
    its own plan (student ZeRO-2) give the replicated teacher's losses and student gradients; no rank ever
    holds more of the teacher than its partition + one module + the prefetch bucket."""
    ranks = torch.load(run_ranks(tmp_path, 2, tmp_path / "equal.pt", "equal"), weights_only=False)
    for rank, res in enumerate(ranks):
        for kind in ("masked", "causal"):
            for stage, variant in ((3, "sharded"), (2, "offload")):
                rep, sh = res[f"{kind}/zero{stage}/replicated"], res[f"{kind}/zero{stage}/{variant}"]
                where = (rank, kind, variant)
                assert len(sh["losses"]) == STEPS and sh["terms"][0].keys() == rep["terms"][0].keys()
                for s in range(STEPS):
                    for k, v in rep["terms"][s].items():
                        assert abs(sh["terms"][s][k] - v) <= 1e-5 * abs(v) + 1e-7, (where, s, k, sh["terms"][s][k], v)
                assert grad_error(sh["grads"], rep["grads"]) <= GRAD_RTOL, where
                assert rep["losses"][1] != rep["losses"][0]  # the student moved: two different steps compared
                # never whole: partition (1/2) + one module gathered + prefetch (0.9 hidden^2 elements, fp32)
                total, unit = sh["sizes"]["total"], sh["sizes"]["unit"]
                allowance = total / 2 + unit + 0.9 * 32 * 32 * 4
                assert sh["samples"] > 20 and sh["peak"] <= allowance, (where, sh["peak"], total, unit)
                assert sh["peak"] < 0.9 * total, (where, sh["peak"], total)  # and really not the whole teacher
            assert res[f"{kind}/zero2/offload"]["offload"] == "cpu"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_shard_peak_rss_two_ranks(tmp_path):
    """0.55 GB bf16 Llama-shaped teacher, 2 ranks, a small student (2 x 256) under ZeRO-2: peak RSS above
    the runtime's own through loading and 2 steps, sharded <= 0.6x replicated on every rank (measured 0.58-0.59);
    while loading, the partition + one module; the sampled teacher bytes never exceed the partition + one module."""
    folder = save_big_bf16(tmp_path / "big")
    assert (folder / "model.safetensors").stat().st_size >= 0.5e9
    rows = {}
    for variant in ("replicated", "sharded"):
        out = tmp_path / f"rss-{variant}.json"
        rows[variant] = json.loads(run_ranks(tmp_path, 2, out, "rss", variant, folder, env=RSS_ENV).read_text())
    for rank in range(2):
        rep, sh = rows["replicated"][rank], rows["sharded"][rank]
        # the peak through load and steps (a replicated bf16 teacher is a lazily mapped file until the first
        # step touches it, so its load alone shows only the runtime's own cost)
        r, s = rep["step_peak_MB"] - rep["base_MB"], sh["step_peak_MB"] - sh["base_MB"]
        assert s <= 0.6 * r, (rank, s, r, rep, sh)
        # while loading: the partition + one module + what the replicated load costs besides the teacher
        load = sh["load_peak_MB"] - sh["base_MB"]
        assert load <= sh["teacher_MB"] / 2 + sh["unit_MB"] + (rep["load_peak_MB"] - rep["base_MB"]), (rank, load, sh)
        assert sh["samples"] > 2 * BIG["layers"]
        assert sh["sampled_teacher_MB"] <= sh["teacher_MB"] / 2 + sh["unit_MB"] + 0.9 * BIG["hidden"] ** 2 * 2 / 2 ** 20, sh
        assert rep["losses"] == pytest.approx(sh["losses"], rel=2e-2)  # bf16 teacher: the same run, another layout


# ---- through train.py ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from test_train import tiny_assets
    root = tmp_path_factory.mktemp("shard_train")
    teacher, corpus = tiny_assets(root)
    ds = {}
    for stage in (2, 3):
        ds[stage] = root / f"zero{stage}.json"
        ds[stage].write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10 ** 6,
                                         "zero_optimization": {"stage": stage}}))
    return {"root": root, "teacher": teacher, "corpus": corpus, "ds": ds}


def test_shard_bad_teacher_plan_is_one_error_line_before_work(tmp_path, assets, capsys):
    """A teacher plan that cannot work stops train.py with one `error:` line, exit 2, nothing written."""
    from test_train import flags, run_main
    plans = {"optimizer": ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}, "'optimizer' section"),
             "offload": ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
                         "offload_param needs zero_optimization.stage 3"),
             "bf16": ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
                      "bf16.enabled is True, but the teacher runs in float32")}
    for name, (plan, needle) in plans.items():
        out = tmp_path / name
        code, err = run_main(flags(assets, out, teacher_deepspeed_config=_write(tmp_path, plan, f"{name}.json")), capsys)
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 2 and needle in err and "--teacher_deepspeed_config" in err, err
        assert sum(l.startswith("error:") for l in lines) == 1 and not out.exists(), err
    # a partitioned teacher on the student's settings needs a ZeRO-3 student: refused before work too
    code, err = run_main(flags(assets, tmp_path / "z2", shard_teacher="yes"), capsys)
    assert code == 2 and "--shard_teacher yes" in err and "ZeRO-2" in err and not (tmp_path / "z2").exists(), err


def test_shard_teacher_cache_reads_no_teacher_tensor(tmp_path, assets, monkeypatch):
    """With --teacher_cache (and a --student), preparing the run reads the teacher's config and tokenizer,
    and its weight files only through the cache fingerprint's hash: every tensor reader (safetensors,
    torch.load, transformers' loader, our own pread reader and header index) fails on the teacher's files,
    and every Python-level open of them comes from teacher_fingerprint. Control: without the cache the
    same guards are hit."""
    import builtins
    import inspect
    import safetensors
    import safetensors.torch
    from iit_fast import prepare as prepare_lib
    from iit_fast.cli import main as cli
    from iit_fast.models import load_model
    from iit_fast.models.student import init_student_from_teacher
    from iit_fast.models import load as load_lib, partitioned as partitioned_lib
    teacher_dir = Path(assets["teacher"])
    student_dir = tmp_path / "student"
    whole, tok = load_model(teacher_dir)
    init_student_from_teacher(whole.model, 2).save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    cache = tmp_path / "cache16"
    assert cli(["cache-teacher", "--teacher", str(teacher_dir), "--corpus", str(assets["corpus"]), "--top_k", "8",
                "--plans", "2", "--hidden", "--student_layers", "2", "--cache_dir", str(assets["root"] / "cache"),
                "--no_progress", "--max_length", "16", "--max_examples", "48", "--out", str(cache)]) == 0
    weights = {str(p.resolve()) for p in teacher_dir.iterdir() if p.suffix in (".safetensors", ".bin")}
    assert weights
    touched = []

    def is_teacher(path) -> bool:
        return str(Path(str(path)).resolve()) in weights or str(Path(str(path)).resolve()) == str(teacher_dir.resolve())

    def guard(real, what):
        def wrapped(path, *a, **k):
            if is_teacher(path):
                touched.append(what)
                raise AssertionError(f"{what} read the teacher's weights")
            return real(path, *a, **k)
        return wrapped
    import transformers.modeling_utils as mu
    monkeypatch.setattr(safetensors, "safe_open", guard(safetensors.safe_open, "safe_open"))
    monkeypatch.setattr(mu, "safe_open", guard(mu.safe_open, "transformers safe_open"))
    monkeypatch.setattr(safetensors.torch, "load_file", guard(safetensors.torch.load_file, "load_file"))
    monkeypatch.setattr(torch, "load", guard(torch.load, "torch.load"))
    monkeypatch.setattr(partitioned_lib, "safetensors_index", guard(partitioned_lib.safetensors_index,
                                                                    "safetensors_index"))
    monkeypatch.setattr(load_lib, "weight_names", guard(load_lib.weight_names, "weight_names"))
    cls = type(whole.model)
    real_from_pretrained = cls.from_pretrained.__func__
    monkeypatch.setattr(cls, "from_pretrained", classmethod(
        lambda c, path, *a, **k: guard(lambda p: real_from_pretrained(c, p, *a, **k), "from_pretrained")(path)))
    opens = []
    real_open = builtins.open

    def audited_open(file, *a, **k):
        if isinstance(file, (str, Path)) and is_teacher(file):
            opens.append([f.function for f in inspect.stack()[1:4]])
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", audited_open)
    from test_train import flags
    from iit_fast import cache_fingerprint
    cache_fingerprint._teacher_hashes.clear()  # the build above hashed the teacher in this process: hash it again
    argv = [str(a) for a in flags(assets, tmp_path / "run", student=student_dir, teacher_cache=cache)]
    cfg, ds, _ = prepare_lib.check_inputs(argv)
    teacher, student, tokenizer, tokenized, alignment, cache_obj, load = prepare_lib.prepare(cfg, ds)
    assert cache_obj is not None and load.plan is None and "not loaded" in load.why
    assert next(teacher.parameters()).device.type == "meta"  # sizes only
    assert not touched, touched
    assert opens and all("teacher_fingerprint" in stack for stack in opens), opens
    # control: the same preparation without the cache reaches the guarded readers
    argv = [str(a) for a in flags(assets, tmp_path / "run2", student=student_dir, shard_teacher="no")]
    cfg, ds, _ = prepare_lib.check_inputs(argv)
    with pytest.raises(AssertionError, match="read the teacher's weights"):
        prepare_lib.prepare(cfg, ds)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_offload_teacher_train_two_ranks_equals_replicated(tmp_path, assets):
    """train.py on 2 ranks, student ZeRO-2: the teacher on its own plan (ZeRO-3, parameters offloaded to CPU)
    gives the replicated teacher's losses, step by step (fp32, dropout 0)."""
    from test_train import finish, launch, steps_of
    runs = {}
    for name, extra in (("replicated", {}),
                        ("offload", {"teacher_deepspeed_config": REPO / "ds_configs/teacher_zero3_offload.json"})):
        out = tmp_path / name
        text = finish(launch(assets, out, launcher="deepspeed", ranks=2, stage=2, steps=4, **extra), out, timeout=850)
        runs[name] = steps_of(out)
        if name == "offload":
            assert "teacher: ZeRO-3 partitioned across ranks, parameters offloaded to CPU" in text, text[-3000:]
        else:
            assert "teacher: replicated" in text, text[-3000:]
    rep, off = runs["replicated"], runs["offload"]
    assert [r["step"] for r in rep] == [r["step"] for r in off] == [1, 2, 3, 4]
    for a, b in zip(rep, off):
        for k in ("loss", "ce", "mlm", "cos", "iit"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (a["step"], k, a[k], b[k])
    assert rep[0]["loss"] != rep[-1]["loss"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_path, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "equal":
        worker_equal(out_path)
    elif mode == "rss":
        worker_rss(out_path, sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
