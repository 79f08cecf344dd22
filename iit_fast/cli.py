"""`iit-fast`: one command line for the project's tools.

    iit-fast eval --model runs/X/student [--teacher T --alignment middle] [--max-batches 20] [--output r.json]
    iit-fast finetune --model runs/X/student --task seq --train-file train.csv --validation-file dev.csv
    iit-fast finetune --model runs/X/student --task seq --dataset glue:sst2
    iit-fast finetune --model runs/X/student --task token --train-file train.jsonl --validation-file dev.jsonl
    iit-fast cache-teacher --teacher T --max_length 128 --top_k 64 --plans 4 --hidden --out cache/T-k64
    iit-fast plan --teacher T --student_layers 4 --seq 2048 --micro_batch 8 --device_memory_gb 80

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args)`; a new
subcommand is one more line in SUBCOMMANDS (the module is imported only when its subcommand runs).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# name -> (module with add_arguments / run, one-line help)
SUBCOMMANDS = {
    "eval": ("iit_fast.eval", "validation perplexity (masked or next-token), top-1, and IIA / counterfactual KL "
                              "against a teacher"),
    "finetune": ("iit_fast.finetune", "downstream fine-tuning (sequence or token classification) with Trainer"),
    "cache-teacher": ("iit_fast.cache_builder", "run the teacher once over a corpus, store its outputs to distil from"),
    "plan": ("iit_fast.plan", "bytes per rank of a step by part, and the largest micro-batch that fits a device"),
}


def print_json(result: dict, output: str | None = None) -> None:
    """Print a subcommand's result as JSON, and write it to `output` when given."""
    from pathlib import Path
    text = json.dumps(result, indent=1)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    print(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iit-fast", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(_module=module)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        importlib.import_module(args._module).run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
