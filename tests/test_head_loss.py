"""The padding-free step's loss from hidden states in row chunks (finetune_trainer/train/head_loss.py):
the same value and gradients as the model's own loss, without a tensor of tokens x vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from finetune_trainer.train import head_loss, recipe
from finetune_trainer.train.batching import IGNORE, Batches
from tests.test_trainer_packing import make_rows, varlen_model


def reference(hidden, weight, labels):
    logits = hidden[..., :-1, :] @ weight.t()
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels[..., 1:].reshape(-1), ignore_index=IGNORE)


def problem(tokens=61, hidden=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, vocab, (1, tokens), generator=g)
    y[0, ::5] = IGNORE  # sequence starts and prompts carry no loss
    return h, w, y


@pytest.mark.parametrize("rows", [1, 7, 16, 60, 1000])
def test_chunked_cross_entropy_has_the_loss_and_gradients_of_the_full_one(rows):
    h, w, y = problem()
    loss = head_loss.chunked_cross_entropy(h, w, y, rows=rows)
    gh, gw = torch.autograd.grad(3.0 * loss, (h, w))  # a weighted loss, as a step's micro-batch is
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = reference(h2, w2, y)
    eh, ew = torch.autograd.grad(3.0 * expected, (h2, w2))
    torch.testing.assert_close(loss, expected.to(loss.dtype))
    torch.testing.assert_close(gh, eh)
    torch.testing.assert_close(gw, ew)


def test_the_shift_and_the_ignored_labels_count():
    """The check above can fail: an unshifted loss, or one that counts ignored labels, differs."""
    h, w, y = problem()
    loss = float(head_loss.chunked_cross_entropy(h, w, y, rows=8).detach())
    unshifted = F.cross_entropy((h @ w.t()).reshape(-1, 50), y.reshape(-1), ignore_index=IGNORE)
    assert loss != pytest.approx(float(unshifted), rel=1e-3)
    y_all = y.clone()
    y_all[y_all == IGNORE] = 0
    assert loss != pytest.approx(float(reference(h, w, y_all)), rel=1e-3)


def test_a_frozen_head_gets_no_gradient_and_no_label_gives_zero():
    h, w, y = problem()
    w = w.detach()
    loss = head_loss.chunked_cross_entropy(h, w, y, rows=9)
    loss.backward()
    assert h.grad is not None and w.grad is None
    none = torch.full_like(y, IGNORE)
    assert float(head_loss.chunked_cross_entropy(h, w, none, rows=9)) == 0.0


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_of_tokens_by_vocabulary_is_made():
    tokens, vocab, rows = 512, 300, 32
    h, w, y = problem(tokens=tokens, hidden=4, vocab=vocab)
    w = w.detach()
    with LargestTensor() as chunked:
        head_loss.chunked_cross_entropy(h, w, y, rows=rows).backward()
    with LargestTensor() as full:
        reference(h, w, y).backward()
    assert full.numel >= (tokens - 1) * vocab  # the check can fail: the full loss makes the logits
    assert chunked.numel <= rows * vocab


def padding_free_batch():
    rows = make_rows()
    return Batches(rows, 4, 48, 0, 0, packing=True, bucket=True, padding_free=True).get(0)


def test_the_trainers_padding_free_loss_matches_the_models_own():
    """recipe.model_loss with the head set aside and the chunked loss, against the model's forward with
    labels, on the same padding-free batch of a tiny Gemma 3: loss and every weight's gradient."""
    batch = padding_free_batch()
    results = []
    for take_head in (False, True):
        model = varlen_model("sdpa").train()
        head = head_loss.for_model(model, "transformers") if take_head else None
        assert (head is not None) == take_head
        loss = recipe.model_loss(model, batch, torch.device("cpu"), head)
        loss.backward()
        assert model.lm_head is not None and isinstance(model.lm_head, torch.nn.Linear)  # the head is back
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (own, own_grads), (chunked, chunked_grads) = results
    assert head.kernel == "torch"
    assert chunked == pytest.approx(own, rel=1e-5)
    assert own_grads.keys() == chunked_grads.keys() and len(own_grads) > 5
    for name in own_grads:
        torch.testing.assert_close(chunked_grads[name], own_grads[name], atol=1e-5, rtol=1e-4)


def test_the_head_is_put_back_when_the_forward_fails():
    model = varlen_model("sdpa")
    head = head_loss.for_model(model, "transformers")
    original = model.lm_head
    with pytest.raises(RuntimeError, match="boom"), head.hidden_states():
        assert model.lm_head is not original
        raise RuntimeError("boom")
    assert model.lm_head is original


def test_models_whose_head_does_more_keep_their_own_loss(monkeypatch):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    assert config.final_logit_softcapping  # Gemma 2 softcaps its logits after the head
    assert not head_loss.takes(config)
    assert head_loss.for_model(Gemma2ForCausalLM(config), "transformers") is None
    model = varlen_model("sdpa")
    assert head_loss.takes(model.config)
    monkeypatch.setenv(head_loss.ENV, "off")
    assert head_loss.for_model(model, "transformers") is None
