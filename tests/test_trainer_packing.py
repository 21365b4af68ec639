"""Packed batches: rows packed together train exactly as they would one by one.

With packing, batching.py restarts position ids at every row and leaves the attention mask out, so
transformers builds a block-diagonal causal mask (windowed on sliding layers). Checked on CPU on a
tiny Gemma 3 whose sliding window is shorter than the rows, for the attention implementations the
trainer runs: sdpa (transformers on CPU) and flex attention (what Unsloth picks for Gemma 3 on GPU).
"""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.batching import Batches

LENGTHS = [13, 21, 7, 30, 5, 18, 26, 9]


def tiny_model(attn: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)  # same seed, same weights, whatever the attention implementation
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation=attn)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def packed():
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    batches = Batches(rows, batch_size=4, max_seq_length=48, pad_id=0, seed=0, packing=True)
    batch = batches.get(0)
    in_batch = [rows[i] for unit in batches._epoch(0)[0] for i in unit]
    assert batch.position_ids is not None and batch.attention_mask is None
    assert len(in_batch) > batch.input_ids.shape[0] > 1  # several sequences, more rows than sequences
    assert max(len(r["input_ids"]) for r in in_batch) > 8  # rows longer than the sliding window
    return batch, in_batch


def loss_row_by_row(model, rows) -> float:
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total += float(loss) * (len(row["input_ids"]) - 1)
        count += len(row["input_ids"]) - 1
    return total / count


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_a_packed_batch_trains_as_its_rows_one_by_one(packed, attn):
    batch, rows = packed
    model = tiny_model(attn)
    with torch.no_grad():
        loss = float(model(**batch.model_inputs("cpu"), use_cache=False).loss)
    assert loss == pytest.approx(loss_row_by_row(tiny_model("eager"), rows), rel=1e-4)


def test_the_check_can_fail_rows_that_see_each_other_score_differently(packed):
    batch, rows = packed
    inputs = batch.model_inputs("cpu")
    inputs["position_ids"] = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)  # no restarts
    with torch.no_grad():
        leaky = float(tiny_model("sdpa")(**inputs, use_cache=False).loss)
    assert leaky != pytest.approx(loss_row_by_row(tiny_model("eager"), rows), rel=1e-3)
