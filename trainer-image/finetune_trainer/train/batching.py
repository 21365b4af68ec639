"""Micro-batches in a deterministic order, so a resumed run sees exactly the batches it had not seen.

Micro-batch m of the whole run lives in epoch m // per_epoch at position m % per_epoch of that epoch's
seeded permutation; nothing is consumed from an iterator, so resuming at step s is just m = s * accum.
With packing, rows are concatenated into sequences of up to max_seq_length; position ids restart per
row and the attention mask is left out, which makes transformers build a block-diagonal causal mask
(no attention across rows).

Padding-free (CUDA, training.paddingFree; see varlen_attention): a micro-batch is one [1, T] row, every
sequence back to back with `cu_seqlens` marking where each starts; only a tail pads T to a bucket.
Packing then only decides how many rows a micro-batch holds (up to batch_size x max_seq_length tokens).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from ..data import IGNORE

MIN_BUCKET = 64


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    tokens: int  # non-padding tokens
    label_tokens: int  # tokens that carry loss (after the causal shift)
    cu_seqlens: torch.Tensor | None = None  # padding-free: where each sequence starts, and T at the end
    max_seqlen: int | None = None  # padding-free: the longest a sequence may be (fixed, so no recompiles)

    def model_inputs(self, device) -> dict:
        def to(t: torch.Tensor) -> torch.Tensor:
            # A copy from pageable memory waits for the GPU to finish all queued work first; from pinned
            # memory it queues behind it, so the host goes on launching the step's kernels meanwhile.
            if torch.device(device).type == "cuda":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)

        out = {"input_ids": to(self.input_ids), "labels": to(self.labels)}
        if self.attention_mask is not None:
            out["attention_mask"] = to(self.attention_mask)
        if self.position_ids is not None:
            out["position_ids"] = to(self.position_ids)
        if self.cu_seqlens is not None:
            from .varlen_attention import CU_SEQLENS, MAX_SEQLEN, SEQ_LENGTHS

            cu = to(self.cu_seqlens)
            torch._dynamo.maybe_mark_dynamic(cu, 0)  # the sequence count changes every step: one graph for all
            out[CU_SEQLENS], out[MAX_SEQLEN] = cu, self.max_seqlen
            out[SEQ_LENGTHS] = self.cu_seqlens[1:] - self.cu_seqlens[:-1]  # stays in host memory
        return out


class Batches:
    def __init__(self, rows: list[dict], batch_size: int, max_seq_length: int, pad_id: int, seed: int,
                 packing: bool = False, bucket: bool = False, padding_free: bool = False):
        self.rows = rows
        self.batch_size = batch_size
        self.max_len = max_seq_length
        self.pad_id = pad_id
        self.seed = seed
        self.packing = packing
        # Compiled kernels (Unsloth's torch.compile regions) recompile for every new sequence length,
        # at a minute or more each: pad widths up to a few power-of-two buckets instead.
        self.bucket = bucket
        self.padding_free = padding_free
        # A unit is one sequence: one row, or several packed rows. Packing happens once (in a seeded
        # order) so every epoch has the same number of micro-batches; epochs shuffle the units.
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        self.units = self._pack(order) if packing else [[i] for i in sorted(order)]
        self.per_epoch = -(-len(self.units) // batch_size)
        self._epoch_cache: dict[int, list[list[list[int]]]] = {}
        self._flat_tokens: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None

    def _epoch(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self._epoch_cache:
            units = list(self.units)
            random.Random(self.seed + 1 + epoch).shuffle(units)
            self._epoch_cache = {epoch: [units[i:i + self.batch_size] for i in range(0, len(units), self.batch_size)]}
        return self._epoch_cache[epoch]

    def _pack(self, order: list[int]) -> list[list[int]]:
        sequences, current, used = [], [], 0
        for i in order:
            n = len(self.rows[i]["input_ids"])
            if current and used + n > self.max_len:
                sequences.append(current)
                current, used = [], 0
            current.append(i)
            used += n
        if current:
            sequences.append(current)
        return sequences

    def epoch_of(self, micro: int) -> float:
        return micro / self.per_epoch

    def units_of(self, micro: int) -> list[list[int]]:
        """Micro-batch `micro`'s units (each a list of row indices), in the order it lays them out."""
        return self._epoch(micro // self.per_epoch)[micro % self.per_epoch]

    def rows_of(self, micro: int) -> list[int]:
        """Micro-batch `micro`'s row indices, in the order its tokens come."""
        return [i for unit in self.units_of(micro) for i in unit]

    def get(self, micro: int) -> Batch:
        units = self.units_of(micro)
        if self.padding_free:
            return self._flat(self.rows_of(micro), len(units))
        seqs = [self._sequence(u) for u in units]
        width = max(len(ids) for ids, _, _ in seqs)
        if self.bucket:
            width = min(self.max_len, max(MIN_BUCKET, 1 << (width - 1).bit_length()))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        pos = torch.arange(width).repeat(len(seqs), 1)  # padding is its own "row" when packed
        for b, (s_ids, s_labels, s_pos) in enumerate(seqs):
            n = len(s_ids)
            ids[b, :n] = s_ids
            labels[b, :n] = s_labels
            mask[b, :n] = 1
            pos[b, :n] = s_pos
            pos[b, n:] -= n
        tokens = int(mask.sum())
        label_tokens = int((labels[:, 1:] != IGNORE).sum())
        if self.packing:
            return Batch(ids, labels, None, pos, tokens, label_tokens)
        return Batch(ids, labels, mask, None, tokens, label_tokens)

    def _tokens(self):
        """Every row's ids and labels as two flat tensors and where each row starts: a micro-batch is then
        a few slices and one torch.cat, not Python lists of every token (building those lists each step
        took long enough for the GPU to run dry between steps: docs/benchmarks.md)."""
        if self._flat_tokens is None:
            lengths = [len(row["input_ids"]) for row in self.rows]
            starts = [0, *itertools.accumulate(lengths)]
            ids = torch.tensor(list(itertools.chain.from_iterable(row["input_ids"] for row in self.rows)),
                               dtype=torch.long)
            labels = torch.tensor(list(itertools.chain.from_iterable(row["labels"] for row in self.rows)),
                                  dtype=torch.long)
            if len(labels) != len(ids):
                raise ValueError("every row needs as many labels as input_ids")
            # a row's first token is never predicted from the previous row
            labels[[a for a, n in zip(starts[:-1], lengths, strict=True) if n]] = IGNORE
            self._flat_tokens = ids, labels, starts
        return self._flat_tokens

    def _sequence(self, unit: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unit's rows back to back: ids, labels, and position ids restarting at each row."""
        ids, labels, starts = self._tokens()
        spans = [(starts[i], starts[i + 1]) for i in unit]
        lengths = torch.tensor([b - a for a, b in spans])
        first = torch.cumsum(lengths, 0) - lengths  # where each row starts inside the unit
        pos = torch.arange(int(lengths.sum())) - torch.repeat_interleave(first, lengths)
        return (torch.cat([ids[a:b] for a, b in spans]), torch.cat([labels[a:b] for a, b in spans]), pos)

    def _flat(self, rows: list[int], units: int) -> Batch:
        ids, labels, pos = self._sequence(rows)
        lengths = [len(self.rows[i]["input_ids"]) for i in rows]
        starts = [0, *itertools.accumulate(lengths)]
        tokens, longest = starts[-1], max(lengths)
        width = tokens
        if self.bucket:  # a few power-of-two totals, capped at what the micro-batch can hold
            cap = -(-units * self.max_len // MIN_BUCKET) * MIN_BUCKET
            width = max(tokens, min(cap, max(MIN_BUCKET, 1 << (tokens - 1).bit_length())))
        max_seqlen = max(self.max_len, longest)
        tail = []
        while starts[-1] < width:  # the tail: its own sequences, none longer than max_seqlen, no loss
            tail.append(min(width - starts[-1], max_seqlen))
            starts.append(starts[-1] + tail[-1])
        if tail:
            ids = torch.cat([ids, torch.full((width - tokens,), self.pad_id, dtype=torch.long)])
            labels = torch.cat([labels, torch.full((width - tokens,), IGNORE, dtype=torch.long)])
            pos = torch.cat([pos, *(torch.arange(n) for n in tail)])
        return Batch(ids[None], labels[None], None, pos[None], tokens, int((labels[1:] != IGNORE).sum()),
                     torch.tensor(starts, dtype=torch.int32), max_seqlen)
