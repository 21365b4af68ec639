"""Packed batches: rows packed together train exactly as they would one by one.

The trainer builds packed batches' flex-attention masks itself (finetune_trainer.packed_masks): a
block-diagonal causal mask, windowed on sliding layers. Checked here on CPU, on a tiny Gemma 3 with a
window shorter than the rows, against each row run alone with eager attention.
"""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.batching import Batches
from finetune_trainer.packed_masks import PackedMasks

LENGTHS = [13, 21, 7, 30, 5, 18, 26, 9]


def tiny_model(attn: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation=attn)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def loss_row_by_row(model, rows) -> float:
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total += float(loss) * (len(row["input_ids"]) - 1)
        count += len(row["input_ids"]) - 1
    return total / count


def test_packed_batch_with_our_masks_equals_the_rows_one_by_one(rows):
    eager = tiny_model("eager")
    flex = tiny_model("flex_attention")
    flex.load_state_dict(eager.state_dict())
    masks = PackedMasks.for_model(flex)
    assert masks is not None and masks.layer_types == ["full_attention", "sliding_attention"]

    batches = Batches(rows, batch_size=4, max_seq_length=48, pad_id=0, seed=0, packing=True)
    b = batches.get(0)
    assert b.position_ids is not None and b.input_ids.shape[0] > 1  # several packed sequences
    packed_rows = [rows[i] for unit in batches._epoch(0)[0] for i in unit]
    assert len(packed_rows) > b.input_ids.shape[0]  # really packed: more rows than sequences
    assert max(len(r["input_ids"]) for r in packed_rows) > 8  # rows longer than the window
    inputs = b.model_inputs("cpu", masks)
    assert set(inputs["attention_mask"]) == {"full_attention", "sliding_attention"}
    with torch.no_grad():
        packed = float(flex(**inputs, use_cache=False).loss)
    assert packed == pytest.approx(loss_row_by_row(eager, packed_rows), rel=1e-4)


def test_without_our_masks_the_rows_would_see_each_other(rows):
    """The check above can fail: with one causal mask over the whole packed sequence, the loss moves."""
    flex = tiny_model("flex_attention")
    eager = tiny_model("eager")
    eager.load_state_dict(flex.state_dict())
    batches = Batches(rows, batch_size=4, max_seq_length=48, pad_id=0, seed=0, packing=True)
    b = batches.get(0)
    packed_rows = [rows[i] for unit in batches._epoch(0)[0] for i in unit]
    causal_only = PackedMasks({"full_attention", "sliding_attention"}, 8)
    inputs = b.model_inputs("cpu")
    inputs["attention_mask"] = causal_only(torch.arange(b.input_ids.shape[1]).expand_as(b.input_ids))
    with torch.no_grad():
        leaky = float(flex(**inputs, use_cache=False).loss)
    assert leaky != pytest.approx(loss_row_by_row(eager, packed_rows), rel=1e-3)


def test_only_flex_models_get_our_masks():
    assert PackedMasks.for_model(tiny_model("eager")) is None
    assert PackedMasks.for_model(tiny_model("sdpa")) is None
    # Row ids restart wherever positions do; padding at the end is a row of its own.
    masks = PackedMasks({"full_attention"}, None)
    masks(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]))
    assert masks.doc.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3]]
