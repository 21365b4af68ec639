"""`training.batchSize: auto` and `training.gradientCheckpointing` unset: chosen for the GPU the pod got.

Pure functions of the model's size, maxSeqLength and the GPU's free memory; an explicit value in the
spec always wins. The rule, from the throughput measurements in docs/benchmarks.md:

- a step wants ~65k tokens to keep a GPU busy, so the micro-batch is the power of two nearest below
  65536 / maxSeqLength (at least 1, at most MAX_MICRO_BATCH);
- activation checkpointing costs a recompute of the forward, so it is off when the estimated peak
  memory without it fits in SAFE_FRACTION of the free memory, and on otherwise;
- if even with checkpointing the micro-batch does not fit, it is halved until it does.

The memory model is deliberately simple and calibrated on the measured Gemma 3 270M numbers (micro-batch
32 x 2048: 33.5 GB without checkpointing, 3.5 GB with Unsloth's offloaded checkpointing on an H100):
activations grow with tokens x layers x (hidden + intermediate) without checkpointing, and with
tokens x (layers x hidden + one layer's working set) with it. CPU keeps the small, safe defaults.

Padding-free batches (packing on a GPU) of a model whose head head_loss.py cannot take (a logit softcap
or scale) hold the whole micro-batch's logits and a second tensor of their size (32 x 2048 on Gemma's
262k vocabulary: 64 GiB more, an out-of-memory on an 80 GB H100); for those the estimate counts them,
and the batch is halved before checkpointing goes on. Every other model's padding-free loss is chunked.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKENS_PER_STEP = 65536
MAX_MICRO_BATCH = 256
CPU_MICRO_BATCH = 8  # the old default: CPU runs are small and memory-bound, not occupancy-bound
SAFE_FRACTION = 0.7  # of the free GPU memory; the rest is headroom for the allocator, logits chunks, eval
# Bytes per token per layer per (hidden + intermediate) unit of activations kept for the backward pass
# without checkpointing: (33.5 GB - weights) / (65536 tokens x 18 layers x (640 + 2048)) ≈ 10.
ACTIVATION_BYTES = 10.0
CHECKPOINT_BYTES = 2.0  # bf16 layer inputs kept per token per layer per hidden unit (offloaded or not)
# Bytes per token per vocabulary entry where a padding-free step holds its logits: the bf16 logits and
# one more tensor of their size (the out-of-memory of 2026-12-05: 65 GiB in use at 32 x 2048, asking 32 GiB more).
LOGIT_BYTES = 4.0


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a model."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int = 0
    chunked_head: bool = True  # a padding-free step's loss is chunked (head_loss.takes its config)


@dataclass(frozen=True)
class Choice:
    batch_size: int
    gradient_checkpointing: bool
    reason: str  # one line for the log and the status metrics


def pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def micro_batch_for(max_seq_length: int) -> int:
    """The ~65k-tokens-a-step rule: clamp(pow2(65536 // maxSeqLength), 1, MAX_MICRO_BATCH)."""
    return min(MAX_MICRO_BATCH, pow2_floor(TOKENS_PER_STEP // max_seq_length))


def weight_bytes(shape: ModelShape, method: str) -> float:
    # 16-bit weights (LoRA) or ~4.5 bits (QLoRA, with its scales); LoRA's own weights and AdamW state are small.
    return shape.parameters * (2.0 if method == "lora" else 0.6)


def peak_bytes(shape: ModelShape, tokens: int, checkpointing: bool, method: str = "lora",
               full_logits: bool = False) -> float:
    """Estimated peak GPU memory of a training step on `tokens` tokens per micro-batch."""
    per_layer = ACTIVATION_BYTES * tokens * (shape.hidden + shape.intermediate)
    if checkpointing:
        activations = per_layer + CHECKPOINT_BYTES * tokens * shape.hidden * shape.layers
    else:
        activations = per_layer * shape.layers
    logits = LOGIT_BYTES * tokens * shape.vocab if full_logits else 0.0
    return weight_bytes(shape, method) + activations + logits


def choose(shape: ModelShape | None, max_seq_length: int, free_bytes: int | None, *, cuda: bool,
           batch_size: int | str = "auto", gradient_checkpointing: bool | None = None,
           method: str = "lora", full_logits: bool = False) -> Choice:
    """The micro-batch and checkpointing for a run; explicit values (int, bool) are kept as given.
    full_logits: a padding-free step holds the micro-batch's whole logits (see the module's note)."""
    explicit_batch = batch_size if isinstance(batch_size, int) else None
    if not cuda or shape is None or not free_bytes:
        why = "CPU" if not cuda else "unknown model size or GPU memory"
        return Choice(explicit_batch or CPU_MICRO_BATCH,
                      True if gradient_checkpointing is None else gradient_checkpointing,
                      f"{why}: the small defaults")
    budget = SAFE_FRACTION * free_bytes
    batch = explicit_batch or micro_batch_for(max_seq_length)

    def fits(b: int, c: bool) -> bool:
        return peak_bytes(shape, b * max_seq_length, c, method, full_logits) <= budget

    if gradient_checkpointing is not None:
        ckpt = gradient_checkpointing
    elif full_logits and explicit_batch is None:
        # The logits do not shrink with checkpointing: a half batch without it (still ~32k tokens a
        # step) before checkpointing the full one.
        half = max(1, batch // 2)
        ckpt = not fits(batch, False) and not fits(half, False)
        if not ckpt and not fits(batch, False):
            batch = half
    else:
        ckpt = not fits(batch, False)
    if explicit_batch is None:
        while batch > 1 and not fits(batch, ckpt):
            batch //= 2
    est = peak_bytes(shape, batch * max_seq_length, ckpt, method, full_logits)
    return Choice(batch, ckpt, f"{batch} x {max_seq_length} tokens, checkpointing {'on' if ckpt else 'off'}: "
                               f"~{est / 2**30:.1f} GiB estimated of {free_bytes / 2**30:.1f} GiB free")


def resolve(training, shape: ModelShape | None, free_bytes: int | None, *, cuda: bool):
    """(training with batchSize and gradientCheckpointing decided, the Choice); explicit values kept."""
    # Packing on a GPU trains padding-free unless switched off (recipe.py; varlen_attention.enable).
    padding_free = training.padding_free == "on" or (training.packing and training.padding_free == "auto")
    full_logits = padding_free and shape is not None and not shape.chunked_head
    choice = choose(shape, training.max_seq_length, free_bytes, cuda=cuda, batch_size=training.batch_size,
                    gradient_checkpointing=training.gradient_checkpointing, method=training.method,
                    full_logits=full_logits)
    return training.model_copy(update={"batch_size": choice.batch_size,
                                       "gradient_checkpointing": choice.gradient_checkpointing}), choice
