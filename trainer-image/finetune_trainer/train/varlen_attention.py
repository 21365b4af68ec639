"""Padding-free attention: a micro-batch trains as one row of concatenated sequences. The trainer's
default on GPU (`training.paddingFree: auto`): on an H100 it scored and trained as padded batches do
through Unsloth's 16-bit and 4-bit layers alike, whole 16-bit LoRA and 4-bit QLoRA runs passed on it,
and it measured faster (docs/benchmarks.md, "Padding-free attention"); `off` keeps padded rows.

Laid out padding-free, a micro-batch is `[1, T]`: its sequences back to back, position ids restarting
at each, and `cu_seqlens` marking where each begins (batching.Batches with padding_free=True). This
attention function keeps each sequence causal and walled off from its neighbours, sliding windows
included (Gemma 3's local layers), through torch's bundled FlashAttention-2 varlen kernel, which takes
head dim 256 and grouped K/V heads as they are. No T x T mask exists anywhere, so packing costs nothing
extra and padding shrinks to one short tail per micro-batch.

How it is reached: the model keeps its attention implementation, and the registry's entry for that
name is wrapped so that a call carrying `ft_cu_seqlens` comes here and every other call goes where it
went before. Renaming the implementation would not do: Unsloth's patched Gemma 3 layers dispatch only
"flex_attention" through transformers' registry and run their own SDPA over dense window masks for any
other name (slow, and attending across the packed sequences: docs/benchmarks.md). The `ft_*` keywords
travel from the outermost call to the decoder stack only (hooks), so the loss never sees them, and
with them the decoder is handed an already-prepared, empty mask mapping, so no mask is built. The
trainer stops with an error if its first padding-free step never reached this function, rather than
train across sequences.

Why at all: with Unsloth, Gemma 3 runs flex attention, whose block masks for packed rows are rebuilt
on the host every step (the GPU starves: docs/benchmarks.md), and SDPA's packed route needs a
dense T x T mask.

Off CUDA the same contract runs on SDPA with an explicit mask: the reference the tests hold the layout
against, and fine for the small batches CPU training sees.

Models on Unsloth's own fast decoder (Llama; Unsloth gives Mistral, Qwen 2/3 and others the same
forward, unchecked here) never consult the registry: their attention reads sequence boundaries from
Unsloth's `packed_seq_lengths` keyword and goes through Unsloth's own attention dispatch. For those
the padding-free batch's lengths go in under that name instead, and the same reach check counts
attention calls that received them. On torch 2.11 that dispatch finds no varlen kernel it can use and
runs one SDPA call per sequence, so it is lent the flash kernel (lend_unsloth_the_kernel). On an H100 a
Llama scored and trained so as padded (tests/test_trainer_families.py), 3.3x as fast on rows of mixed
lengths (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn.functional as F

from finetune_api.status import Reason

from ..errors import ConfigError

NAME = "finetune_varlen"
# Extra model(...) keyword arguments; transformers hands them to the attention function untouched.
CU_SEQLENS = "ft_cu_seqlens"
MAX_SEQLEN = "ft_max_seqlen"
SEQ_LENGTHS = "ft_seq_lengths"  # the same boundaries as lengths, in host memory (what Unsloth's route takes)
UNSLOTH_LENGTHS = "packed_seq_lengths"  # Unsloth's name for them
# Calls that reached the kernel, or compiled graphs that will (the trainer checks its first step got
# here, not a silent fallback).
# "lent": calls Unsloth made to the kernel lent to it (lend_unsloth_the_kernel).
STATS = {"calls": 0, "lent": 0}
# One function per count, made once: a closure made per call inside a compiled region recompiled it
# (7 graphs where 2 do, tests/test_trainer_packing.py).
_INCREMENTS = {key: (lambda ctx, key=key: STATS.__setitem__(key, STATS[key] + 1)) for key in STATS}


def _count(key: str) -> None:
    # Inside a compiled region (Unsloth compiles each decoder layer) a plain `STATS["calls"] += 1`
    # makes dynamo guard on the count's value and recompile every call (on the H100: a step not done
    # 50 s after the first); comptime counts once, at trace time, and leaves nothing in the graph.
    if torch.compiler.is_compiling():
        from torch._dynamo.comptime import comptime

        comptime(_INCREMENTS[key])
    else:
        STATS[key] += 1


def require_reached() -> None:
    """After a first padding-free forward: stop rather than train with attention across sequences."""
    if not STATS["calls"]:
        # The model's attention path does not route through the kernel: a retry would miss it again.
        raise ConfigError(Reason.PADDING_FREE_UNSUPPORTED, "padding-free batches did not reach the varlen "
                          "attention kernel; set training.paddingFree: off to train on padded batches")


def unservable(config, on_unsloth_decoder: bool = False) -> str | None:
    """Why a model (its text config) cannot train padding-free, or None if it can. `on_unsloth_decoder`:
    it runs on Unsloth's fast decoder, which builds no mask for packed rows (see unsloth_packs())."""
    if getattr(config, "attn_logit_softcapping", None):
        return "its attention softcaps logits (Gemma 2), which the flash kernel cannot"
    if not on_unsloth_decoder and not getattr(config, "layer_types", None):
        # Without a per-layer-type mask mapping the decoder builds a dense T x T mask for the packed row.
        return f"{type(config).__name__} builds its attention mask without per-layer types"
    return None


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers' attention-function contract: q (B, H, T, D), k/v (B, H_kv, T, D) → ((B, T, H, D), None).

    With our batches B is 1 and `ft_cu_seqlens` marks the sequences. A caller without them (a plain
    forward, generate) gets one causal sequence per row: right padding needs no mask under causality
    (a real token never sees the pads after it), so rows of any batch come out right.
    """
    # A model's configuration decides these: the same spec would fail the same way on a retry.
    if dropout:
        raise ConfigError(Reason.PADDING_FREE_UNSUPPORTED, "training.paddingFree is on, but the model's attention "
                          "has dropout, which padding-free attention does not implement; set paddingFree: false")
    if not getattr(module, "is_causal", True):
        raise ConfigError(Reason.PADDING_FREE_UNSUPPORTED, f"training.paddingFree is on, but {type(module).__name__} "
                          "is not causal attention; set paddingFree: false")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    cu_seqlens, max_seqlen = kwargs.get(CU_SEQLENS), kwargs.get(MAX_SEQLEN)
    rows, _, width, _ = query.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (rows + 1) * width, width, dtype=torch.int32, device=query.device)
        max_seqlen = width
        query, key, value = (x.transpose(0, 1).reshape(1, x.shape[1], rows * width, x.shape[-1])
                             for x in (query, key, value))
    elif rows != 1:
        raise ValueError(f"{CU_SEQLENS} needs one packed row, got a batch of {rows}")
    _count("calls")
    if query.is_cuda:
        # Unsloth hands Gemma 3's q/k/v over in fp32 (its norms upcast); SDPA under autocast would run
        # them in the autocast dtype, and so does the flash kernel here (it takes fp16/bf16 only).
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
        dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        q, k, v = (x.to(dtype) for x in (query, key, value))
        out = _flash(q, k, v, cu_seqlens, int(max_seqlen), scale, sliding_window)
        if not torch.is_autocast_enabled("cuda"):
            out = out.to(query.dtype)
    else:
        out = _reference(query, key, value, cu_seqlens, scale, sliding_window)
    return out.reshape(rows, width, *out.shape[2:]), None


def _flash(query, key, value, cu_seqlens, max_seqlen: int, scale: float, window: int | None):
    # aten's op directly: a native autograd backward, grouped K/V heads as they are, and it traces
    # inside compiled regions. Window: transformers' sliding_window counts the query itself.
    out = torch.ops.aten._flash_attention_forward(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale,
        window_size_left=-1 if window is None else window - 1, window_size_right=0,
    )[0]
    return out.unsqueeze(0)


def segment_mask(cu_seqlens: torch.Tensor, total: int, window: int | None, device) -> torch.Tensor:
    """(T, T) bool: causal inside each segment, nothing across segments, within the window if any."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=total)
    pos = torch.arange(total, device=device)
    q, k = pos[:, None], pos[None, :]
    mask = (seg[:, None] == seg[None, :]) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    return mask


def _reference(query, key, value, cu_seqlens, scale: float, window: int | None):
    total = query.shape[2]
    mask = segment_mask(cu_seqlens, total, window, query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[None, None], scale=scale,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def routed(original):
    """`original` (a registered attention function) with padding-free calls taken here instead."""
    if getattr(original, "_finetune_varlen_router", False):
        return original

    @functools.wraps(original)  # keeps the markers others read off the registered function (Unsloth's)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if kwargs.get(CU_SEQLENS) is not None:
            return varlen_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    attention._finetune_varlen_router = True
    return attention


def _to_the_decoder(model, base, masks: dict) -> None:
    """Hands `ft_*` keywords to the decoder stack only, with `masks` as its attention mask. A causal LM
    passes its extra keywords to its loss as well as to its layers, and Unsloth's fused cross-entropy
    leaves its fast chunked kernel for a slower general path on any keyword it does not know; so the
    outermost call (PEFT's wrapper, whose own forward may call the causal LM's forward directly) drops
    them, and the decoder's call, under it in the same forward, takes them back. Calls without them
    (padded batches, generate) pass untouched."""
    if getattr(model, "_finetune_varlen_hooks", False):
        return
    decoder, held = base.get_decoder(), {}

    def take(module, args, kwargs):
        if any(key in kwargs for key in (CU_SEQLENS, MAX_SEQLEN, SEQ_LENGTHS)):
            held.clear()
            held.update({key: kwargs.pop(key) for key in (CU_SEQLENS, MAX_SEQLEN) if key in kwargs})
            kwargs.pop(SEQ_LENGTHS, None)  # the kernel reads cu_seqlens, already on the device
        return args, kwargs

    def give(module, args, kwargs):
        return (args, {**kwargs, **held, "attention_mask": masks}) if held else None

    def forget(module, args, kwargs, output):
        held.clear()

    for outer in {id(model): model, id(base): base}.values():
        outer.register_forward_pre_hook(take, with_kwargs=True)
        outer.register_forward_hook(forget, with_kwargs=True, always_call=True)
    decoder.register_forward_pre_hook(give, with_kwargs=True)
    model._finetune_varlen_hooks = True


def unsloth_packs(decoder) -> bool:
    """Whether the decoder stack is Unsloth's own fast forward, which takes packed rows itself: given
    `packed_seq_lengths` (host int32 lengths of a [1, T] row), its attention keeps each sequence to
    itself and no mask is built. Unwrapped: on the H100 the class's forward was a functools.wraps
    wrapper around Unsloth's."""
    fast = getattr(sys.modules.get("unsloth.models.llama"), "LlamaModel_fast_forward", None)
    forward = getattr(type(decoder), "forward", None)
    return fast is not None and forward is not None and inspect.unwrap(forward) is fast


def unsloth_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, *, scale=None,
                        window_size=(-1, -1), enable_gqa: bool = False, **_):
    """torch.nn.attention.varlen.varlen_attn as torch 2.12 spells it ((T, H, D) tensors, grouped K/V
    heads with enable_gqa), on the bundled flash kernel, which takes grouped heads as they are."""
    _count("lent")
    left, right = window_size
    return torch.ops.aten._flash_attention_forward(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, right == 0, False, scale=scale,
        window_size_left=left, window_size_right=right)[0]


def lend_unsloth_the_kernel() -> bool:
    """Unsloth 2026.10 sends packed rows to torch's varlen_attn only where it takes `enable_gqa` (torch
    2.12); on torch 2.11 it runs one SDPA call per sequence instead. On an H100, a Llama step on rows of
    mixed lengths then spent 30 % of its time on those launches and the copies and fills around them
    (the GPU 70 % busy). The kernel it would call is lent under that contract. True if lent now."""
    dispatch = sys.modules.get("unsloth.utils.attention_dispatch")
    if dispatch is None or not hasattr(dispatch, "_TORCH_VARLEN_ATTN") or dispatch._TORCH_VARLEN_ATTN is not None:
        return False
    dispatch._TORCH_VARLEN_ATTN = unsloth_varlen_attn
    return True


def _to_unsloth(model, decoder) -> None:
    """Unsloth's route: the outermost call swaps a padding-free batch's `ft_*` keywords for
    `packed_seq_lengths`, which Unsloth carries down to every attention call (and its loss, which masks
    labels across boundaries with them); the first layer's attention counts the calls that got them."""
    if getattr(model, "_finetune_varlen_hooks", False):
        return

    def swap(module, args, kwargs):
        if SEQ_LENGTHS not in kwargs:
            return None
        for key in (CU_SEQLENS, MAX_SEQLEN):
            kwargs.pop(key, None)
        # Host lengths: Unsloth stages them in one pinned copy; device ones cost a sync every step.
        kwargs[UNSLOTH_LENGTHS] = kwargs.pop(SEQ_LENGTHS)
        return args, kwargs

    def reached(module, args, kwargs):
        if kwargs.get(UNSLOTH_LENGTHS) is not None:
            _count("calls")

    model.register_forward_pre_hook(swap, with_kwargs=True)
    decoder.layers[0].self_attn.register_forward_pre_hook(reached, with_kwargs=True)
    model._finetune_varlen_hooks = True


def enable(model, setting: str = "auto") -> bool:
    """Routes the model's padding-free calls (those given `Batch.model_inputs()` of a padding-free
    batch) here. False where `setting` (training.paddingFree) is off, or is auto and the model cannot
    take it: then nothing is changed and batches stay padded. `on` for such a model is a ConfigError."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if setting == "off":
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config(decoder=True)
    decoder = base.get_decoder()
    on_unsloth_decoder = unsloth_packs(decoder)
    if reason := unservable(config, on_unsloth_decoder):
        return _declined(setting, reason)
    if on_unsloth_decoder:
        lend_unsloth_the_kernel()
        _to_unsloth(model, decoder)
        return True
    implementation = config._attn_implementation
    if implementation in ("eager", None):  # eager is no registered function to wrap: take its place
        AttentionInterface.register(NAME, varlen_attention_forward)
        config._attn_implementation = NAME
    elif (original := ALL_ATTENTION_FUNCTIONS.get(implementation)) is not None:
        # An entry set on the shared instance (Unsloth wraps flex_attention so) shadows register(), so
        # the router goes where lookups look first; wrappers Unsloth adds later wrap the router.
        ALL_ATTENTION_FUNCTIONS[implementation] = routed(original)
    else:
        return _declined(setting, f"its attention implementation {implementation!r} is no registered function")
    _to_the_decoder(model, base, {kind: None for kind in set(config.layer_types)})
    return True


def _declined(setting: str, reason: str) -> bool:
    """auto falls back to padded batches; on, asked for explicitly, stops the run with the reason."""
    if setting == "on":
        raise ConfigError(Reason.PADDING_FREE_UNSUPPORTED, f"training.paddingFree is on, but {reason}; "
                          "set it to auto or off to train on padded batches")
    return False
