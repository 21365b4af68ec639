"""The batch planner of the in-process llama.cpp model (evaluation/packing.py): pure, no model.

Checked against llama.cpp's rules for a batch (src/llama-batch.cpp): each sequence's positions are
0..n-1, increasing in batch order; the sets of sequences a sequence's tokens belong to are nested;
and against what the scoring needs: every scored position of every sequence maps to the logits row
of the token that sequence has at that position, shared tokens are decoded once, and budgets hold.
"""

from __future__ import annotations

import random

import pytest

from finetune_trainer.evaluation.packing import Seq, plan


def _check(batches, seqs, max_tokens, max_outputs, max_seqs):
    covered = []
    for b in batches:
        assert len(b.members) <= max_seqs
        assert len(b) <= max_tokens or len(b.members) == 1
        assert b.n_outputs == sum(b.output) and (b.n_outputs <= max_outputs or len(b.members) == 1)
        out_rank = {i: r for r, i in enumerate(i for i, o in enumerate(b.output) if o)}
        for s, m in enumerate(b.members):
            seq = seqs[m]
            mine = [i for i, ids in enumerate(b.seq_ids) if s in ids]
            assert [b.pos[i] for i in mine] == list(range(len(seq.tokens)))  # consecutive, increasing
            assert [b.token[i] for i in mine] == list(seq.tokens)
            for a, c in zip(mine, mine[1:], strict=False):  # a trie path: sets shrink along it
                assert set(b.seq_ids[c]) <= set(b.seq_ids[a])
            assert set(b.rows[s]) == set(range(seq.first, len(seq.tokens)))
            for p, row in b.rows[s].items():
                assert b.output[mine[p]] and out_rank[mine[p]] == row
        # logits only where some sequence scores that position
        for i, out in enumerate(b.output):
            assert out == any(b.pos[i] >= seqs[b.members[s]].first for s in b.seq_ids[i])
        covered += b.members
    assert covered == list(range(len(seqs)))


def test_multiple_choice_questions_share_their_context_in_one_decode():
    # two questions, each a 5-token context and answers whose first token is shared ("the x" / "the y")
    seqs = sorted([Seq((1, 2, 3, 4, 5, 9, 7), 4), Seq((1, 2, 3, 4, 5, 9, 8), 4),
                   Seq((1, 2, 3, 6, 6, 9, 7), 4), Seq((1, 2, 3, 6, 6, 9, 8), 4)], key=lambda s: s.tokens)
    (batch,) = plan(seqs, max_tokens=64, max_outputs=64, max_seqs=8)
    _check([batch], seqs, 64, 64, 8)
    # the trie: 1 2 3 shared by all, 4 5 9 and 6 6 9 per question, then one token per answer
    assert len(batch) == 3 + 3 + 2 + 3 + 2
    assert batch.seq_ids[0] == [0, 1, 2, 3]
    # scored from position 4: "5 9" / "6 9" once per question, then each answer's last token
    assert batch.n_outputs == 2 * (2 + 2)


def test_budgets_split_batches_and_every_row_is_right():
    rng = random.Random(0)
    prefix = tuple(rng.randrange(50) for _ in range(12))  # a few-shot prefix common to all
    seqs = []
    for _ in range(40):
        question = prefix + tuple(rng.randrange(50) for _ in range(rng.randrange(1, 8)))
        for _ in range(rng.randrange(1, 5)):
            answer = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 6)))
            seqs.append(Seq(question + answer, len(question) - 1))
    seqs = sorted(set(seqs), key=lambda s: s.tokens)
    for max_tokens, max_outputs, max_seqs in [(4096, 4096, 256), (40, 12, 5), (30, 3, 2), (1, 1, 1)]:
        batches = plan(seqs, max_tokens, max_outputs, max_seqs)
        _check(batches, seqs, max_tokens, max_outputs, max_seqs)
    assert len(plan(seqs, 4096, 4096, 256)) == 1
    assert len(plan(seqs, 1, 1, 1)) == len(seqs)


def test_identical_prefixes_across_batches_are_decoded_again_but_not_within():
    seqs = [Seq((7,) * 10 + (i,), 9) for i in range(6)]
    batches = plan(seqs, max_tokens=20, max_outputs=64, max_seqs=64)
    assert [len(b.members) for b in batches] == [6] and len(batches[0]) == 10 + 6
    batches = plan(seqs, max_tokens=13, max_outputs=64, max_seqs=64)
    assert [len(b.members) for b in batches] == [3, 3]
    _check(batches, seqs, 13, 64, 64)


def test_rejects_a_sequence_without_a_scored_position():
    with pytest.raises(ValueError, match="outside"):
        plan([Seq((1, 2), 2)], 8, 8, 8)
