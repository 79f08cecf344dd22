"""Batches: token sequences (data.tokenize_corpus) -> training and validation batches.

- ``"masked"`` batches are masked 80/10/10 by transformers' ``DataCollatorForLanguageModeling``, with a
  generator per batch (``mask_tokens``); ``"causal"`` batches carry the input ids as labels (-100 at
  padding; the shift happens in the loss).
- Training batches come from a torch ``DataLoader`` (``build_train_loader``) over a distributed,
  length-grouped, resumable batch sampler: a batch, and the masks in it, are a pure function of
  (seed, epoch, batch index, rank), whatever the number of workers, so a resumed run sees exactly the
  batches of an uninterrupted one.
- Validation rows and their masks are fixed per row (``validation_batches``), so a validation figure does
  not depend on the batch size, accumulation or world size.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch import Tensor
from transformers import DataCollatorForLanguageModeling

from .data import check_kind


# ---------------------------------------------------------------------------------------------------------
# Masking and collation
# ---------------------------------------------------------------------------------------------------------

def mlm_collator(tokenizer, mlm_probability: float = 0.15) -> DataCollatorForLanguageModeling:
    """transformers' MLM collator (80% mask, 10% random, 10% kept). Its own ``seed`` is not used: it seeds
    one generator per process (seed + worker id) and draws from it batch after batch, so the masks would
    depend on the worker count and on how many batches came before. ``mask_tokens`` gives it a generator
    per batch instead."""
    if tokenizer.mask_token_id is None:
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no mask token; expected a masked-LM "
                         f"tokenizer for kind='masked'")
    if not 0.0 < mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability: {mlm_probability}; expected 0 < p <= 1")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, special_tokens_mask: Tensor, *,
                collator: DataCollatorForLanguageModeling, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT's MLM corruption through ``collator.torch_mask_tokens`` with ``generator``: each real,
    non-special token is chosen with probability ``collator.mlm_probability``; a chosen token becomes the
    mask token (80%), a random token (10%) or stays (10%). ``labels`` hold the original id at chosen
    positions and -100 elsewhere. Special tokens and padding are never chosen. Every row with at least one
    eligible token gets at least one chosen position (one drawn uniformly among the eligible ones when the
    coin flips chose none, corrupted 80/10/10 the same way): the library collator alone does not give
    this, and a row without a target would carry no MLM signal.
    Inputs (B, S); returns (masked_input_ids, labels), both (B, S) long; ``input_ids`` is not modified."""
    eligible = attention_mask.bool() & ~special_tokens_mask.bool()  # (B, S)
    collator.generator = generator  # read by torch_mask_tokens for every draw
    try:
        masked, labels = collator.torch_mask_tokens(input_ids.clone(), special_tokens_mask=~eligible)
    finally:
        collator.generator = None  # no generator left behind to be reused by a later call or pickled
    empty = (labels == -100).all(1) & eligible.any(1)  # (B,)
    if empty.any():
        # uniform among eligible positions: the argmax of random keys restricted to them
        keys = torch.rand(input_ids.shape, generator=generator).masked_fill(~eligible, -1.0)  # (B, S)
        rows = empty.nonzero().squeeze(1)  # (R,)
        cols = keys.argmax(1)[rows]  # (R,)
        original = input_ids[rows, cols]
        u = torch.rand(len(rows), generator=generator)  # (R,)
        random_ids = torch.randint(len(collator.tokenizer), (len(rows),), generator=generator,
                                   dtype=input_ids.dtype)
        p_mask, p_random = collator.mask_replace_prob, collator.random_replace_prob
        mask_id = torch.full_like(original, collator.tokenizer.mask_token_id)
        masked[rows, cols] = torch.where(u < p_mask, mask_id,
                                         torch.where(u < p_mask + p_random, random_ids, original))
        labels[rows, cols] = original
    return masked, labels


def _seed_of(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _pad_rows(seqs: list[list[int]], pad_id: int, pad_to_multiple_of: int) -> tuple[Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask), both (B, S) long, S the longest row rounded up to a
    multiple of ``pad_to_multiple_of``."""
    longest = max(len(s) for s in seqs)
    m = pad_to_multiple_of
    S = -(-longest // m) * m if m > 1 else longest
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)  # (B, S)
    am = torch.zeros(len(seqs), S, dtype=torch.long)  # (B, S)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        am[i, :len(s)] = 1
    return ids, am


class Collate:
    """Rows -> one batch dict. ``masked``: input_ids (masked), attention_mask, labels (-100 except MLM
    targets), token_type_ids (zeros). ``causal``: input_ids, attention_mask, labels (= input_ids, -100 at
    padding; the shift to next-token targets happens in the loss). All (B, S) long, right-padded.

    A tokenizer without a pad token (GPT-2) pads with EOS here only; the labels come from the attention
    mask, not from comparing ids with the pad id, so the EOS between documents stays a target (the library
    collator's ``mlm=False`` path would turn every EOS into -100 with pad = eos, so it is not used)."""

    def __init__(self, tokenizer, *, kind: str = "masked", mlm_probability: float = 0.15,
                 pad_to_multiple_of: int = 8):
        check_kind(kind)
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of: {pad_to_multiple_of}; expected >= 1")
        self.kind, self.pad_to_multiple_of = kind, pad_to_multiple_of
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"tokenizer: {type(tokenizer).__name__} has neither a pad nor an eos token; "
                             f"expected one of them to pad batches")
        self.pad_id = pad
        if kind == "masked":
            self.collator = mlm_collator(tokenizer, mlm_probability)
            self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def __call__(self, seqs: list[list[int]], generator: torch.Generator | None) -> dict[str, Tensor]:
        ids, am = _pad_rows(seqs, self.pad_id, self.pad_to_multiple_of)
        if self.kind == "causal":
            return {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}
        special = torch.isin(ids, self.special_ids)
        masked, labels = mask_tokens(ids, am, special, collator=self.collator, generator=generator)
        return {"input_ids": masked, "attention_mask": am, "labels": labels, "token_type_ids": torch.zeros_like(ids)}


# ---------------------------------------------------------------------------------------------------------
# Training batches: resumable sampler + DataLoader
# ---------------------------------------------------------------------------------------------------------

class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of row indices over a split, sharded over ranks and resumable.

    Order: each epoch, the rows are permuted by a generator seeded from (seed, epoch) (or kept in order
    when ``shuffle`` is False); with ``group_by_length``, windows of 50 batches' worth of rows are sorted
    by length and cut into batches, and the batches are shuffled again, so a batch holds rows of similar
    length and padding is small. Batch ``j`` of the epoch goes to rank ``j % world_size``; every rank gets
    the same number of batches.

    Hand-written rather than torch's DistributedSampler + BatchSampler: those shard rows (not length-
    grouped batches), pad the last shard with repeated rows, and cannot start mid-epoch. Iterating yields,
    for each batch of the rest of the current epoch, a list of ``(epoch, batch index, row)``: the batch's
    identity travels with its rows to the worker that collates it, so its masks can be seeded from it.
    """

    def __init__(self, lengths: Tensor, batch_size: int, *, seed: int, shuffle: bool = True,
                 group_by_length: bool = True, drop_last: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size}; expected >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank}; expected 0 <= rank < world_size={world_size}")
        self.lengths = lengths  # (N,)
        self.n = len(lengths)
        if self.n == 0:
            raise ValueError("tokenized_split: no sequences; expected a non-empty tokenized split")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_by_length, self.drop_last = group_by_length, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.batch_index = 0  # the next batch of self.epoch to hand out
        self._cached: tuple[int, list[Tensor]] | None = None
        if len(self) == 0:
            raise ValueError(f"batch_size: {batch_size} x world_size {world_size} is more than the "
                             f"{self.n} sequences of the split (drop_last={drop_last}); expected fewer")

    def epoch_batches(self, epoch: int) -> list[Tensor]:
        """This rank's batches of ``epoch``, each a (B,) tensor of row indices."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        n, B = self.n, self.batch_size
        g = torch.Generator().manual_seed(_seed_of(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.drop_last:
            order = order[: (n // B) * B]
        if self.group_by_length:
            window = B * 50
            chunks = []
            for i in range(0, len(order), window):
                w = order[i:i + window]
                w = w[torch.argsort(self.lengths[w], descending=True, stable=True)]
                chunks += list(w.split(B))
            batches = chunks
            if self.shuffle:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        else:
            batches = list(order.split(B))
        if self.drop_last:
            batches = [b for b in batches if len(b) == B]
        if self.world_size > 1:  # every rank the same count: the last few batches may go unused
            per_rank = len(batches) // self.world_size
            batches = batches[self.rank::self.world_size][:per_rank]
        self._cached = (epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        # the position is read once, when the DataLoader starts pulling (workers prefetch ahead of what
        # the consumer has taken; the consumer, not this generator, advances batch_index)
        epoch, start = self.epoch, self.batch_index
        batches = self.epoch_batches(epoch)
        for j in range(start, len(batches)):
            yield [(epoch, j, row) for row in batches[j].tolist()]

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "batch_index": int(self.batch_index)}

    def load_state_dict(self, state: dict) -> None:
        epoch, j = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= j <= len(self.epoch_batches(epoch)):
            raise ValueError(f"state: epoch {epoch}, batch_index {j}; expected epoch >= 0 and 0 <= batch_index "
                             f"<= {len(self.epoch_batches(max(epoch, 0)))} (batches per epoch on this rank)")
        self.epoch, self.batch_index = epoch, j


class _Rows(torch.utils.data.Dataset):
    """The sequences of a tokenized split, fetched a batch at a time from the arrow table (memory stays flat
    for large corpora), collated into a batch whose masks are seeded by (seed, epoch, batch index, rank)."""

    def __init__(self, tokenized_split, collate: Collate, seed: int, rank: int):
        self.data = tokenized_split.select_columns(["input_ids"]).with_format(None)
        self.collate, self.seed, self.rank = collate, seed, rank

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> dict[str, Tensor]:
        epoch, j, _ = keys[0]
        seqs = self.data[[row for _, _, row in keys]]["input_ids"]
        g = torch.Generator().manual_seed(_seed_of(self.seed, epoch, j, self.rank))
        return self.collate(seqs, g)


def _batch_is_collated(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch  # _Rows.__getitems__ already returns the whole batch


class Batches:
    """Training batches through a torch DataLoader over a ``LengthGroupedBatchSampler``; resumable.

    Iterating runs the rest of the current epoch, then moves to the next one; a batch counts as consumed
    once handed out, so ``state_dict()`` saved after a step resumes at the next batch. ``len()`` is the
    number of batches per epoch on this rank."""

    def __init__(self, tokenized_split, collate: Collate, sampler: LengthGroupedBatchSampler, *, seed: int,
                 num_workers: int = 0, pin_memory: bool | None = None):
        if num_workers < 0:
            raise ValueError(f"num_workers: {num_workers}; expected >= 0")
        self.sampler = sampler
        self.rows = _Rows(tokenized_split, collate, seed, sampler.rank)
        self.loader = torch.utils.data.DataLoader(
            self.rows, batch_sampler=sampler, collate_fn=_batch_is_collated, num_workers=num_workers,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            persistent_workers=num_workers > 0)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        s = self.sampler
        epoch = s.epoch
        for batch in self.loader:
            s.batch_index += 1  # consumed once handed out: a state saved after this step resumes after it
            yield batch
        s.epoch, s.batch_index = epoch + 1, 0

    def forever(self) -> Iterator[dict[str, Tensor]]:
        """Batches across epochs without end (for step-counted training)."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def _lengths(tokenized_split) -> Tensor:
    lengths = tokenized_split["length"] if "length" in tokenized_split.column_names else \
        [len(x) for x in tokenized_split["input_ids"]]
    return torch.tensor(list(lengths), dtype=torch.long)  # (N,)


def build_train_loader(tokenized_split, tokenizer, batch_size: int, *, kind: str = "masked", seed: int,
                       rank: int = 0, world_size: int = 1, shuffle: bool = True, group_by_length: bool = True,
                       drop_last: bool = True, mlm_probability: float = 0.15, num_workers: int = 0,
                       pad_to_multiple_of: int = 8, pin_memory: bool | None = None) -> Batches:
    """Training batches over a tokenized split (``input_ids``, ``length``): length-grouped, sharded over
    ranks (same count per rank), masked (kind "masked") with generators seeded by (seed, epoch, batch
    index, rank), collated in ``num_workers`` DataLoader workers (persistent; pinned memory when CUDA is
    there, unless ``pin_memory`` says otherwise). The batches do not depend on ``num_workers``."""
    collate = Collate(tokenizer, kind=kind, mlm_probability=mlm_probability, pad_to_multiple_of=pad_to_multiple_of)
    sampler = LengthGroupedBatchSampler(_lengths(tokenized_split), batch_size, seed=seed, shuffle=shuffle,
                                        group_by_length=group_by_length, drop_last=drop_last, rank=rank,
                                        world_size=world_size)
    return Batches(tokenized_split, collate, sampler, seed=seed, num_workers=num_workers, pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------------------
# Validation batches: fixed rows, masks fixed per row
# ---------------------------------------------------------------------------------------------------------

def validation_batches(tokenized_split, tokenizer, batch_size: int, *, n_sequences: int | None = None,
                       seed: int, kind: str = "masked", mlm_probability: float = 0.15,
                       pad_to_multiple_of: int = 8) -> list[dict[str, Tensor]]:
    """The first ``n_sequences`` sequences of the split (all when None), in order, in batches of
    ``batch_size`` (the last one shorter). Row ``i`` is masked (kind "masked") by a generator seeded from
    (seed, i) over its own tokens, so which positions are targets, and how they are corrupted, does not
    depend on the batch size: the same model gets the same perplexity for any micro-batch, accumulation
    or world size. Batch ``b`` holds rows ``b * batch_size ...``; layout as in ``Collate``."""
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size}; expected >= 1")
    n = len(tokenized_split)
    if n == 0:
        raise ValueError("tokenized_split: no sequences; expected a non-empty tokenized split")
    if n_sequences is not None and not 1 <= n_sequences <= n:
        raise ValueError(f"n_sequences: {n_sequences}; expected 1 <= n_sequences <= {n} (sequences in the split)")
    n = n if n_sequences is None else n_sequences
    collate = Collate(tokenizer, kind=kind, mlm_probability=mlm_probability, pad_to_multiple_of=1)
    seqs = tokenized_split.select_columns(["input_ids"]).with_format(None)[:n]["input_ids"]
    rows = [collate([s], torch.Generator().manual_seed(_seed_of(seed, i))) for i, s in enumerate(seqs)]
    out = []
    for b in range(0, n, batch_size):
        part = rows[b:b + batch_size]
        S = max(r["input_ids"].shape[1] for r in part)
        S = -(-S // pad_to_multiple_of) * pad_to_multiple_of
        fill = {"input_ids": collate.pad_id, "attention_mask": 0, "labels": -100, "token_type_ids": 0}
        out.append({k: torch.cat([torch.nn.functional.pad(r[k], (0, S - r[k].shape[1]), value=fill[k])
                                  for r in part]) for k in part[0]})  # (B, S) each
    return out
