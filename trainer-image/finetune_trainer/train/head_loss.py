"""The padding-free step's loss, computed from the decoder's hidden states in row chunks.

A padding-free micro-batch is one `[1, T]` row (varlen_attention.py). On an H100 that layout's step
held the whole micro-batch's logits: at 32 x 2048 on Gemma's 262k vocabulary, 32 GiB of bf16 and a
second tensor of their size, an out-of-memory where the same tokens padded fit (docs/benchmarks.md,
"Time to model"), so `batchSize: auto` had to halve the micro-batch. Here the causal LM runs without
labels and with its head set aside (`Head.hidden_states`), so it returns the final hidden states, and
the loss is computed a chunk of rows at a time: no tensor of T x vocab ever exists.

On CUDA with Unsloth the chunks go through Unsloth's own fused loss (compiled; what its padded path
runs). Elsewhere `chunked_cross_entropy` does the same in plain torch: each chunk's logits, their
cross-entropy and their gradient are made in the forward and the logits freed at once; the backward
only scales the saved gradient. Both take the mean over label tokens after the causal shift, as the
model's own loss does (tests/test_head_loss.py holds them to it). Measured on an H100 at 32 x 2048
(bench/loss_memory.py): 33.5 GiB and 0.31 s a step with Unsloth's kernel, 36.5 GiB and 0.66 s with
the torch one.

Models whose head is more than a matrix product (a final logit softcap or scale) keep their own loss.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data import IGNORE

# Elements of one chunk's fp32 logits (2 GiB; a chunk's working set is about three of them).
CHUNK_ELEMENTS = 1 << 29
ENV = "FINETUNE_HEAD_LOSS"  # auto | unsloth | torch | off (the model's own loss): for benchmarks


class _Passthrough(torch.nn.Module):
    """Stands in for the head during a padding-free forward: returns its input. It keeps the head's
    weight as an attribute, since generated forwards (Unsloth's) read `lm_head.weight` before they
    branch on the labels."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.weight = head.weight

    def forward(self, hidden):
        return hidden


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, rows: int):
        valid = labels != IGNORE
        n = valid.sum().clamp(min=1)
        acc = torch.promote_types(weight.dtype, torch.float32)  # logits, loss and sums: fp32 at least
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for a in range(0, hidden.shape[0], rows):
            h, y, v = hidden[a:a + rows], labels[a:a + rows], valid[a:a + rows]
            logits = (h.to(weight.dtype) @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            target = y.clamp(min=0)[:, None]
            total += ((lse - logits.gather(1, target).squeeze(1)) * v).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(mean CE)/d(logits) = (softmax - onehot) / n on label rows, 0 elsewhere; made in place.
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            grad.mul_((v / n)[:, None])
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[a:a + rows] = (grad @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ h.to(weight.dtype)).to(acc)
            del logits, grad
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_out if grad_hidden is not None else None,
                (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          rows: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T` against `labels` (`[..., T, H]` and `[..., T]`,
    shifted here as the model's loss does; IGNORE carries no loss), without holding more than `rows`
    rows of logits at once."""
    hidden = hidden[..., :-1, :].reshape(-1, hidden.shape[-1])
    labels = labels[..., 1:].reshape(-1).to(hidden.device)
    rows = rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, rows)


def _unsloth_loss():
    try:
        from unsloth_zoo.fused_losses import unsloth_fused_ce_loss
    except Exception:  # noqa: BLE001 - not installed, or no GPU for it to set itself up on
        return None
    return unsloth_fused_ce_loss


@dataclass
class Head:
    """The causal LM's head, and how a padding-free step computes its loss."""

    owner: torch.nn.Module  # the module holding it as `lm_head`
    module: torch.nn.Module
    fused: Callable | None = None  # Unsloth's fused loss, looked up once; None: chunked_cross_entropy

    def __post_init__(self):
        # One stand-in for every step: a compiled forward guarding on the head's identity recompiles once.
        self._passthrough = _Passthrough(self.module)

    @property
    def kernel(self) -> str:
        return "unsloth" if self.fused is not None else "torch"

    @contextlib.contextmanager
    def hidden_states(self):
        """While open, the model's forward returns its final hidden states where its logits were."""
        self.owner.lm_head = self._passthrough
        try:
            yield
        finally:
            self.owner.lm_head = self.module

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        if self.fused is None:
            return chunked_cross_entropy(hidden, weight, labels)
        torch._dynamo.mark_dynamic(hidden, 1)  # evaluation's rows may be another width
        torch._dynamo.mark_dynamic(labels, 1)
        return self.fused(trainer=None, hidden_states=hidden, lm_head_weight=weight, lm_head_bias=None,
                          labels=labels.to(hidden.device), mask=None, n_items=None, scaling=None, target_gb=None,
                          torch_compile=True, logit_scale_multiply=0, logit_scale_divide=0, logit_softcapping=0,
                          shift_labels=True)


def takes(config) -> bool:
    """Whether a model of this (text) config gets its padding-free loss here: its head must be a plain
    matrix product, with no final logit softcap or scale to apply between the head and the loss."""
    return all(getattr(config, key, None) in (None, 0, 1, 1.0) for key in
               ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def for_model(model, backend: str) -> Head | None:
    """The head of `model` (a causal LM, PEFT-wrapped or not) if its padding-free loss is taken here;
    None where the model keeps its own loss: `takes` says no, the head has a bias, the decoder is
    Unsloth's own fast forward (its loss chunks packed rows itself), or `FINETUNE_HEAD_LOSS=off`."""
    from .varlen_attention import unsloth_packs

    choice = os.environ.get(ENV, "auto")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "lm_head", None)
    if (choice == "off" or not isinstance(head, torch.nn.Linear) or head.bias is not None
            or not takes(base.config.get_text_config(decoder=True)) or unsloth_packs(base.get_decoder())):
        return None
    fused = None
    if choice == "unsloth" or (choice == "auto" and backend == "unsloth" and head.weight.is_cuda):
        fused = _unsloth_loss()
        if fused is None and choice == "unsloth":
            raise RuntimeError(f"{ENV}=unsloth, but Unsloth's fused loss cannot be imported")
    return Head(owner=base, module=head, fused=fused)
