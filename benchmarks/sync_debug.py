"""The fast step on a GPU under `torch.cuda.set_sync_debug_mode` (issue 23 item 3): no host sync.

    python benchmarks/sync_debug.py            # needs CUDA; gpu.sh runs it

For a masked (BERT-shaped) and a causal (Llama-shaped) pair, padded and unpadded batches, the step's index
and plan made on the CPU and moved once (as the train loop does), one warm-up step (Triton compiles,
cuBLAS initialises), then one fast step, forward and backward, with the sync debug mode on: "warn" first,
to list every synchronizing call with its place, then "error" (the step must run through). Results:
benchmarks/results/sync-cuda.{json,md}; exit 1 if any step synchronized. The CPU twin, which counts the
same ops with a TorchDispatchMode: tests/test_sync.py.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def cases(device):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    from iit_fast.config import DistillConfig
    from iit_fast.models import IntervenableLM
    from iit_fast.models.student import init_student_from_teacher
    from tiny import tiny_batch, tiny_causal_batch

    def pair(teacher):
        teacher.config._attn_implementation = "sdpa"
        student = init_student_from_teacher(teacher, 2)
        return IntervenableLM(teacher).eval().to(device), IntervenableLM(student).train().to(device)

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=256, max_position_embeddings=128))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    for padded in (True, False):
        lengths = (60, 33, 47, 21) if padded else (60,) * 4
        yield f"bert masked {'padded' if padded else 'unpadded'}", pair(bert), tiny_batch(lengths, vocab=1000), \
            DistillConfig(w_mse=0.2, w_iit_cos=0.3)
        b = tiny_causal_batch(lengths, vocab=1000, left=True)
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        yield f"llama causal {'left-padded' if padded else 'unpadded'}", pair(llama), b, \
            DistillConfig(w_mse=0.2, w_iit_cos=0.3, logit_tokens="all")


def main() -> int:
    from benchmarks.common import machine, write_results
    from iit_fast.sampling import make_alignment, sample_plan
    from iit_fast.step import distill_step, step_index
    if not torch.cuda.is_available():
        print("sync_debug.py: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows = []
    for name, (teacher, student), batch, cfg in cases(device):
        plan = sample_plan(batch["attention_mask"], make_alignment("middle", 4, 2), torch.Generator().manual_seed(0))
        index = step_index(batch, plan, cfg, teacher.kind)               # on the CPU, with the plan

        def step(teacher=teacher, student=student, batch=batch, plan=plan, cfg=cfg, index=index):
            dev_batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = distill_step(teacher, student, dev_batch, plan.to(device), cfg, check=False,
                               index=index.to(device))
            out.loss.backward()

        step()                                                          # warm-up: compile, init
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
        error = None
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as e:
            error = str(e).splitlines()[0][:200]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        rows.append({"case": name, "syncs": len(sites), "where": ", ".join(sites) or "-",
                     "error mode": "ran through" if error is None else error})
        print(rows[-1], flush=True)
    write_results("sync-cuda", {"machine": machine()}, rows, title="The fast step under torch.cuda.set_sync_debug_mode",
                  notes="One fast step (forward + backward) per case after a warm-up; the step's index and plan made "
                        "on the CPU and moved once. 'syncs': distinct places that synchronized in 'warn' mode; "
                        "'error mode': whether the step ran through set_sync_debug_mode('error').")
    return 0 if all(r["syncs"] == 0 and r["error mode"] == "ran through" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
