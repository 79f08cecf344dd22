"""Tokenization: corpus text -> token sequences, cached (the batches of them: batches.py).

Two kinds of data, one per model kind:
- ``"masked"`` (BERT, RoBERTa, DistilBERT): paragraphs packed into ``cls p1 sep p2 sep ...`` of at most
  ``max_length`` tokens, with the tokenizer's own cls/sep ids; batches masked 80/10/10 by transformers'
  ``DataCollatorForLanguageModeling``.
- ``"causal"`` (GPT-2, Llama-family): documents streamed into sequences of exactly ``max_length`` tokens
  with EOS after every document (only the last sequence of a split is shorter); labels are the input ids
  (-100 at padding); the shift happens in the loss.

The sequences are cached on disk (arrow files under the cache, keyed by the corpus's content, the tokenizer
and the packing), and tokenised in bounded memory (PIECE_CHARS, TOKENIZE_CHARS, PACK_ROWS below).

Training and validation batches of these sequences: ``iit_fast.batches``. The corpus itself (the default
one, ``load_corpus``): ``iit_fast.corpus``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter

from .cache import DEFAULT_CACHE, publish_folder

KINDS = ("masked", "causal")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r}; expected one of {KINDS}")


# ---------------------------------------------------------------------------------------------------------
# Tokenization: paragraphs -> sequences of at most max_length tokens, in bounded memory
# ---------------------------------------------------------------------------------------------------------
#
# A fast tokenizer holds ~200 bytes per character of one call (normalised-string alignments, offsets,
# token strings): one 50 MB line tokenised in one call took 11 GB. So rows longer than PIECE_CHARS are
# first cut into pieces (a `map` over the split, kept in order, with a `part` column so that a causal
# document still gets one EOS at its end), every tokenizer call takes at most TOKENIZE_CHARS characters,
# and the causal packing streams the encoded documents PACK_ROWS rows at a time. What tokenising holds at
# once is then bounded by a map batch (1000 rows of at most PIECE_CHARS characters), whatever the corpus's
# size or its longest line.

PIECE_CHARS = 8192        # longest row tokenised as one text (~2k tokens)
TOKENIZE_CHARS = 1 << 20  # characters per tokenizer call (~200 MB of tokenizer memory at most)
PACK_ROWS = 1024          # encoded pieces read at a time by the causal packing (<= 1024 x ~2k tokens)
_WHOLE, _PIECE, _LAST = 0, 1, 2  # `part`: a whole row; a piece of a longer row; the last piece of one


def tokenizer_key(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha1(json.dumps(sorted(vocab.items())).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                         getattr(tokenizer, "do_lower_case", None)]).encode())
    return h.hexdigest()[:16]


def _frame_ids(tokenizer) -> tuple[int, int]:
    """The ids that open a masked-LM sequence and close each paragraph in it: cls/sep (BERT: [CLS]/[SEP],
    RoBERTa: <s>/</s>), else bos/eos."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    close = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if first is None or close is None:
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no cls/sep (or bos/eos) token; expected a "
                         f"masked-LM tokenizer (BERT WordPiece, RoBERTa BPE...) for kind='masked'")
    return first, close


def cut_text(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters that join back to it. Each cut is made
    just before a space (or newline) in the second half of the window, so that a byte-level BPE (GPT-2,
    Llama 3, Qwen) tokenises the word after the cut (" word") as it would in place; a window without
    whitespace there (e.g. base64) is cut hard."""
    pieces, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        cut = max(text.rfind(" ", start + limit // 2, end + 1), text.rfind("\n", start + limit // 2, end + 1))
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _cut_rows(batch, limit: int):
    texts, parts = [], []
    for t in batch["text"]:
        pieces = cut_text(t or "", limit)
        texts += pieces
        parts += [_WHOLE] if len(pieces) == 1 else [_PIECE] * (len(pieces) - 1) + [_LAST]
    return {"text": texts, "part": parts}


def _longest_row(ds) -> int:
    """The longest text of a split in characters, read a few thousand rows at a time (arrow compute)."""
    longest = 0
    for table in ds.select_columns(["text"]).with_format("arrow").iter(batch_size=8192):
        m = pc.max(pc.utf8_length(table.column("text"))).as_py()
        longest = max(longest, m or 0)
    return longest


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens), in tokenizer calls of at most TOKENIZE_CHARS characters."""
    out: list[list[int]] = []
    i = 0
    while i < len(texts):
        j, chars = i + 1, len(texts[i])
        while j < len(texts) and chars + len(texts[j]) <= TOKENIZE_CHARS:
            chars += len(texts[j])
            j += 1
        out += tokenizer(texts[i:j], add_special_tokens=False, truncation=False, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]
        i = j
    return out


def _pack(batch, tokenizer, max_length: int):
    """Consecutive paragraphs packed greedily into ``cls p1 sep p2 sep ...`` of <= max_length tokens; a
    paragraph longer than a whole sequence is cut into max_length - 2 token pieces (a last piece shorter
    than 8 tokens is dropped). A row cut by `cut_text` counts as that many paragraphs."""
    cls, sep = _frame_ids(tokenizer)
    room = max_length - 2
    enc = _encode(tokenizer, batch["text"])
    out: list[list[int]] = []
    cur: list[int] = []
    for ids in enc:
        pieces = [ids[i:i + room] for i in range(0, len(ids), room)] if len(ids) > room else [ids]
        for piece in pieces:
            if not piece or (len(pieces) > 1 and len(piece) < 8):
                continue
            if cur and len(cur) + len(piece) + 1 <= max_length:
                cur += piece + [sep]
            else:
                if cur:
                    out.append(cur)
                cur = [cls] + piece + [sep]
    if cur:
        out.append(cur)
    return {"input_ids": out, "length": [len(x) for x in out]}


def _encode_documents(batch, tokenizer):
    """Each document's ids followed by EOS: the stream that ``_pack_causal`` cuts into sequences. A
    document cut into pieces (column ``part``) gets its EOS after its last piece only."""
    eos = tokenizer.eos_token_id
    parts = batch["part"] if "part" in batch else [_WHOLE] * len(batch["text"])
    out = []
    for ids, part in zip(_encode(tokenizer, batch["text"]), parts):
        if part == _LAST or (part == _WHOLE and ids):
            ids = ids + [eos]
        if ids:
            out.append(ids)
    return {"input_ids": out}


def _write_sequences(writer, stream: np.ndarray, max_length: int) -> None:
    """``stream`` (N,) int64 cut every ``max_length`` tokens into rows (input_ids, length)."""
    offsets = np.append(np.arange(0, len(stream), max_length), len(stream)).astype(np.int32)  # (rows + 1,)
    writer.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(stream)),
                                 "length": pa.array(np.diff(offsets).astype(np.int64))}))


def _pack_causal(documents, max_length: int, path: Path):
    """The documents' ids (with their EOS) concatenated in order and cut every ``max_length`` tokens: every
    sequence is full except the last. Streamed: PACK_ROWS documents are read at a time and what does not
    fill a sequence is carried to the next read, so no read boundary leaves a short sequence behind and
    memory does not grow with the split. Written to the arrow file ``path``."""
    carry = np.zeros(0, dtype=np.int64)
    tokens = 0
    writer = ArrowWriter(path=str(path))
    for table in documents.with_format("arrow").iter(batch_size=PACK_ROWS):
        flat = pc.list_flatten(table.column("input_ids"))
        stream = np.concatenate([carry] + [c.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                                           for c in flat.chunks])  # (carried + new,)
        tokens += len(stream) - len(carry)
        full = len(stream) // max_length * max_length
        if full:
            _write_sequences(writer, stream[:full], max_length)
        carry = stream[full:]
    if len(carry) or tokens == 0:
        _write_sequences(writer, carry, max_length)
    writer.finalize()
    return datasets.Dataset.from_file(str(path))


def _content_key(ds, split: str) -> bytes:
    """What identifies a split's texts for the cache key. An arrow-backed dataset (load_dataset, map,
    select...) has a deterministic fingerprint that follows its files and every transform: that, without
    reading the text. An in-memory dataset's fingerprint is random, so its text buffers are hashed."""
    if "text" not in ds.column_names:
        raise ValueError(f"corpus: the {split} split has columns {ds.column_names}; expected 'text'")
    if ds.cache_files:
        return f"{split}|{ds._fingerprint}".encode()  # no public accessor; datasets' own cache uses it
    h = hashlib.sha1(split.encode())
    col = ds.with_format("arrow")["text"]
    for chunk in col.chunks if hasattr(col, "chunks") else [col]:
        for buf in chunk.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.digest()


def tokenize_corpus(dataset_dict, tokenizer, max_length: int = 128, num_proc: int = 2, cache_dir=None, *,
                    kind: str = "masked"):
    """Token sequences (columns ``input_ids``, ``length``) for every split, made with ``datasets.map`` over
    ``num_proc`` processes and saved under ``cache_dir/tokenized/<key>`` (the key covers the texts, the
    tokenizer's vocabulary and special ids, max_length and kind), so a second call loads the arrow files.
    Memory is bounded whatever the corpus or its longest line (see PIECE_CHARS above).

    kind "masked": paragraphs packed into ``cls p1 sep p2 sep ...`` of at most ``max_length`` tokens.
    kind "causal": documents followed by EOS, streamed into sequences of exactly ``max_length`` tokens
    (the last one of a split shorter)."""
    check_kind(kind)
    if max_length < 8:
        raise ValueError(f"max_length: {max_length}; expected at least 8")
    if kind == "masked":
        _frame_ids(tokenizer)
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no mask token; expected a masked-LM "
                             f"tokenizer for kind='masked' (or kind='causal' for a decoder)")
        key = f"{tokenizer_key(tokenizer)}|{max_length}|v2"  # v2: rows cut at PIECE_CHARS
    else:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no eos token; expected one for "
                             f"kind='causal' (it separates the packed documents)")
        key = f"{tokenizer_key(tokenizer)}|{max_length}|causal|eos={tokenizer.eos_token_id}|v2"
    h = hashlib.sha1(f"{key}|{PIECE_CHARS}".encode())
    for split in sorted(dataset_dict):
        h.update(_content_key(dataset_dict[split], split))
    folder = Path(cache_dir or DEFAULT_CACHE) / "tokenized" / h.hexdigest()[:20]
    if (folder / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(folder))
    work = folder.with_name(folder.name + f".work{os.getpid()}")  # intermediate arrow files, removed below
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        out = {}
        for split, ds in dataset_dict.items():
            ds = ds.select_columns(["text"])
            procs = max(1, min(num_proc, len(ds) // 2000))
            common = {"batched": True, "num_proc": procs if procs > 1 else None, "load_from_cache_file": False}
            if _longest_row(ds) > PIECE_CHARS:
                ds = ds.map(_cut_rows, batch_size=64, writer_batch_size=64, fn_kwargs={"limit": PIECE_CHARS},
                            cache_file_name=str(work / f"{split}-pieces.arrow"), desc=f"cut long rows {split}",
                            **common)
            fn, kwargs = (_pack, {"tokenizer": tokenizer, "max_length": max_length}) if kind == "masked" else \
                (_encode_documents, {"tokenizer": tokenizer})
            mapped = ds.map(fn, batch_size=1000, remove_columns=ds.column_names, fn_kwargs=kwargs,
                            cache_file_name=str(work / f"{split}-tokens.arrow"), desc=f"tokenize {split}",
                            **common)
            out[split] = mapped if kind == "masked" else \
                _pack_causal(mapped, max_length, work / f"{split}-packed.arrow")
            if len(out[split]) == 0 or out[split][0]["length"] == 0:
                raise ValueError(f"corpus: the {split} split tokenizes to no sequence; expected some text")
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.DatasetDict(out).save_to_disk(str(tmp))
        publish_folder(tmp, folder, replace=not (folder / "dataset_dict.json").is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(folder))
