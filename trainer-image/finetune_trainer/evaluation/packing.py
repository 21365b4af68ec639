"""Plan ``llama_decode`` batches for log-likelihood scoring: many sequences per call, shared prefixes once.

Pure functions, no llama.cpp: the model class turns a :class:`Batch` into a ``llama_batch``.

A *sequence* is one distinct input (the tokens a request feeds the model) with the first position
whose logits it scores; requests with the same input (the choices of a one-token multiple-choice
question) share a sequence. Sequences are taken in sorted order, so neighbours share their longest
common prefix, and each batch is laid out as a token trie: a token common to several sequences
(the few-shot prefix, the question, the common start of two answers) is decoded once and belongs
to all of them (``seq_id`` lists every sequence through it), which llama.cpp's unified KV cache
supports. Logits are asked for only where some sequence through a token scores that position: the
output layer (262,144 rows for Gemma 3) costs more than the rest of a small model.

llama.cpp's rules this layout keeps: every sequence's positions are consecutive from 0 and
increase in batch order; the tokens of one sequence belong to nested sets of sequences (a trie
path); the KV cache is cleared between batches, so no sequence starts with stale cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Seq:
    """One distinct model input: ``tokens`` fed at positions 0.., logits wanted from ``first`` on."""

    tokens: tuple[int, ...]
    first: int


@dataclass
class Batch:
    """One ``llama_decode`` call.

    ``token[i]`` at ``pos[i]`` belongs to sequences ``seq_ids[i]`` (batch-local ids 0..n_seqs-1);
    ``output[i]`` asks for its logits. ``rows[s][p]`` is the logits row (index among the output
    tokens, in batch order) of batch sequence ``s`` at position ``p``, for every scored position.
    ``members[s]`` is the index of batch sequence ``s`` in the list given to :func:`plan`.
    """

    token: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seq_ids: list[list[int]] = field(default_factory=list)
    output: list[bool] = field(default_factory=list)
    members: list[int] = field(default_factory=list)
    rows: list[dict[int, int]] = field(default_factory=list)
    n_outputs: int = 0

    def __len__(self) -> int:
        return len(self.token)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan(seqs: Sequence[Seq], max_tokens: int, max_outputs: int, max_seqs: int) -> list[Batch]:
    """Batches covering ``seqs`` in the given order (sort them first for prefix sharing).

    A batch holds at most ``max_tokens`` tokens, ``max_outputs`` logits rows and ``max_seqs``
    sequences; one sequence longer than the budgets gets a batch of its own (the caller sizes the
    context for the longest input).
    """
    if max_tokens < 1 or max_outputs < 1 or max_seqs < 1:
        raise ValueError("batch budgets must be positive")
    batches: list[Batch] = []
    batch = Batch()
    path: list[int] = []  # batch indices of the previous sequence's tokens, by position
    prev: tuple[int, ...] = ()
    for index, seq in enumerate(seqs):
        if not seq.tokens or not 0 <= seq.first < len(seq.tokens):
            raise ValueError(f"sequence {index}: first scored position {seq.first} outside {len(seq.tokens)} tokens")
        shared = common_prefix(prev, seq.tokens) if batch.members else 0
        new_tokens = len(seq.tokens) - shared
        new_outputs = sum(1 for p in range(seq.first, shared) if not batch.output[path[p]]) + (
            len(seq.tokens) - max(shared, seq.first))
        if batch.members and (len(batch) + new_tokens > max_tokens or batch.n_outputs + new_outputs > max_outputs
                              or len(batch.members) >= max_seqs):
            batches.append(batch)
            batch, path, shared = Batch(), [], 0
        s = len(batch.members)
        batch.members.append(index)
        for p in range(shared):  # the trie path this sequence shares with the previous one
            i = path[p]
            batch.seq_ids[i].append(s)
            if p >= seq.first and not batch.output[i]:
                batch.output[i] = True
                batch.n_outputs += 1
        del path[shared:]
        for p in range(shared, len(seq.tokens)):
            path.append(len(batch.token))
            batch.token.append(seq.tokens[p])
            batch.pos.append(p)
            batch.seq_ids.append([s])
            batch.output.append(p >= seq.first)
            batch.n_outputs += p >= seq.first
        batch.rows.append({})
        prev = seq.tokens
    # Row numbers are the output tokens' ranks in batch order; an earlier sequence's rows shift when
    # a shared token gains an output later, so they are numbered once each batch is complete.
    if batch.members:
        batches.append(batch)
    for b in batches:
        _number_rows(b, [seqs[m] for m in b.members])
    return batches


def _number_rows(batch: Batch, seqs: Sequence[Seq]) -> None:
    """Fill ``batch.rows`` and ``n_outputs`` from the finished layout."""
    rank: dict[int, int] = {}
    for i, out in enumerate(batch.output):
        if out:
            rank[i] = len(rank)
    batch.n_outputs = len(rank)
    # Walk each sequence's path again: its tokens are, by position, the last batch token of that
    # position that carries the sequence's id.
    where: list[dict[int, int]] = [{} for _ in seqs]
    for i, ids in enumerate(batch.seq_ids):
        for s in ids:
            where[s][batch.pos[i]] = i
    for s, seq in enumerate(seqs):
        batch.rows[s] = {p: rank[where[s][p]] for p in range(seq.first, len(seq.tokens))}
