"""The LoRA fine-tuning recipe: setup → train → save. One loop for both backends.

    finetune train --base-model unsloth/gemma-3-270m-it --dataset work/dataset --max-steps 60

The model comes from Unsloth's FastLanguageModel on CUDA (bf16 LoRA, or 4-bit QLoRA) and from
transformers + PEFT elsewhere (fp32 on CPU); from there on the code is the same. The loss of a step is
the mean over every label token of its micro-batches (not the mean of micro-batch means), so gradient
accumulation gives the same update as one large batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from finetune_api.spec import TrainingSpec

from ..data.prepare import load_split
from ..errors import ConfigError, TransientError
from ..paths import Workdir
from ..reporting.progress import Reporter
from . import distributed, head_loss, varlen_attention
from .batching import Batches
from .checkpoints import Checkpoints
from .model_loading import BaseModel, load_for_training, resolve_auto
from .model_loading import backend as backend_name
from .model_pool import Held, ModelPool, load_key

log = logging.getLogger(__name__)
MAX_GRAD_NORM = 1.0


@dataclass
class TrainResult:
    backend: str
    steps: int
    total_steps: int
    train_loss: float | None  # mean over the last (up to) 10 steps
    eval_loss: float | None
    tokens: int
    seconds: float
    restarts: int
    trainable_parameters: int
    adapter_dir: str
    batch_size: int | None = None  # the micro-batch trained with (decided here when the spec said auto)
    gradient_checkpointing: bool | None = None
    auto: str | None = None  # why auto chose them


class StopOnSignal:
    """Turns SIGTERM into a request to stop after the current step (and save a checkpoint there)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals are main-thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this step", self.requested)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model, training: TrainingSpec):
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    # Fused AdamW: one kernel for all of LoRA's small tensors (CPU and CUDA since torch 2.4).
    fused = training.optimizer == "adamw_torch_fused"
    return torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay, fused=fused)


def model_loss(model, batch, device, head: head_loss.Head | None = None) -> torch.Tensor:
    """The micro-batch's mean loss per label token (bf16 autocast on CUDA). `head`: a padding-free batch's
    loss is computed from the hidden states in row chunks (head_loss.py), never from its whole logits."""
    inputs = batch.model_inputs(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if head is None:
            out = model(**inputs, use_cache=False)
            # No label tokens on this rank: DDP still needs its backward, a zero-weight one.
            return out.logits.float().sum() * 0.0 if batch.label_tokens == 0 else out.loss
        labels = inputs.pop("labels")
        with head.hidden_states():
            hidden = model(**inputs, use_cache=False).logits
        return hidden.float().sum() * 0.0 if batch.label_tokens == 0 else head.loss(hidden, labels)


def forward_backward(model, batch, device, weight: float, padding_free: bool,
                     head: head_loss.Head | None = None) -> torch.Tensor:
    """One micro-batch of a training step: the forward, its mean loss times `weight`, the backward;
    returns that weighted loss, detached. bench/train_throughput.py times this."""
    loss = model_loss(model, batch, device, head) * weight
    if padding_free:  # never across sequences: the varlen kernel must really have run
        varlen_attention.require_reached()
    loss.backward()
    return loss.detach()


def optimizer_step(trainable, optimizer, scheduler=None) -> float:
    """The end of a step: gradients clipped to MAX_GRAD_NORM, the update, the schedule; the norm before clipping."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def plan_steps(training: TrainingSpec, per_epoch: int) -> int:
    if training.max_steps:
        return training.max_steps
    epochs = training.epochs or 1.0
    return max(1, math.ceil(epochs * per_epoch / training.gradient_accumulation_steps))


@torch.no_grad()
def evaluate(model, batches: Batches, device, head: head_loss.Head | None = None) -> float | None:
    """Mean loss per label token over the validation split."""
    if not batches.rows:
        return None
    model.eval()
    total, count = 0.0, 0
    for m in range(batches.per_epoch):
        b = batches.get(m)
        if b.label_tokens == 0:
            continue
        total += float(model_loss(model, b, device, head)) * b.label_tokens
        count += b.label_tokens
    model.train()
    return total / count if count else None


def agree_on_auto(training: TrainingSpec) -> TrainingSpec:
    """Every rank trains with the same micro-batch: the smallest any GPU's auto chose (and checkpointing
    wherever any rank needed it), since the micro-batches are dealt out by index."""
    batch = distributed.agree(training.batch_size)
    checkpointing = distributed.agree(bool(training.gradient_checkpointing), pick=any)
    return training.model_copy(update={"batch_size": batch, "gradient_checkpointing": checkpointing})


def wrap_data_parallel(model, device, world: distributed.World):
    """DDP over the LoRA model: gradients all-reduced (averaged) in the last micro-batch's backward."""
    if not world.distributed:
        return model
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # Every rank loaded the same base weights: broadcast only the trainable (LoRA) ones from rank 0,
    # not the whole frozen model as DDP's start-up sync would.
    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, init_sync=False)


def train(base: BaseModel, training: TrainingSpec, data_dir: Path, workdir: Workdir, reporter: Reporter,
          checkpoints: Checkpoints | None = None, resume: bool = False, pad_id: int = 0,
          upload_in_background: bool = False, pool: ModelPool | None = None) -> TrainResult:
    """upload_in_background: the final checkpoint's upload runs on while this returns (export follows at
    once); the caller joins it with checkpoints.wait() before the run is done.
    pool: a warm trainer's (model_pool.py): the model is taken from it where it was loaded for the same
    settings, and kept in it afterwards for the next run.

    Under torchrun every rank runs this; rank 0 alone reports, checkpoints and writes the adapter
    (distributed.py says how the ranks share a step)."""
    # ---------------------------------------------------------------- setup
    world = distributed.World.from_env()
    distributed.init(world)
    seed_everything(training.seed)
    training, choice = resolve_auto(base, training)
    if world.distributed:
        training = agree_on_auto(training)
    key = load_key(base, training, backend_name()) if pool is not None else ""
    held = pool.take(key) if pool is not None else None
    if held is not None:
        model, backend = held.model, held.backend
        log.info("warm trainer: the model kept from the run before, its adapter as loaded (%d runs reused it)",
                 pool.reused)
    else:
        model, backend = load_for_training(base, training)
        initial = ModelPool.snapshot(model) if pool is not None else {}
    device = next(p.device for p in model.parameters() if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)

    rows = load_split(data_dir, "train")
    val_rows = load_split(data_dir, "validation")
    if not rows:
        raise ConfigError("InvalidDataset", "the prepared train split is empty")
    bucket = device.type == "cuda"  # fixed shapes for compiled kernels; CPU runs eager, so no waste there
    # GPU: one padding-free row per micro-batch through FlashAttention's varlen kernel, where the
    # model takes it and training.paddingFree wants it.
    padding_free = held.padding_free if held is not None else (
        device.type == "cuda" and varlen_attention.enable(model, training.padding_free))
    # Their loss from the hidden states in row chunks: a [1, T] row's whole logits are T x vocab.
    head = head_loss.for_model(model, backend) if padding_free else None
    batches = Batches(rows, training.batch_size, training.max_seq_length, pad_id, training.seed, training.packing,
                      bucket=bucket, padding_free=padding_free)
    if training.packing and backend == "unsloth" and not padding_free:
        log.warning("packing with Unsloth on this stack was measured slower than padding (host-bound steps, "
                    "docs/benchmarks.md); padding to power-of-two buckets is the faster choice on GPU")
    val_batches = Batches(val_rows, training.batch_size, training.max_seq_length, pad_id, training.seed,
                          bucket=bucket, padding_free=padding_free) if val_rows else None
    eval_every = training.eval_every_steps if val_batches else None
    if training.eval_every_steps and not val_batches:
        log.warning("training.evalEverySteps is set but the validation split is empty (too few rows): "
                    "no periodic evaluation")
    accum = training.gradient_accumulation_steps
    total_steps = plan_steps(training, batches.per_epoch)

    from transformers import get_scheduler

    optimizer = build_optimizer(model, training)
    scheduler = get_scheduler(training.lr_scheduler, optimizer,
                              num_warmup_steps=math.ceil(training.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    checkpoints = checkpoints or Checkpoints(workdir.checkpoints)
    step, restarts, tokens_seen, losses = 0, 0, 0, []
    newest = None
    if resume:  # the pod's first process fetches the checkpoint into the pod's workdir; the others read it
        if world.local_main:
            newest = checkpoints.newest()
        distributed.barrier()
        if not world.local_main:
            newest = checkpoints.newest()
    if newest is not None:
        state = checkpoints.load(newest, model, optimizer, scheduler)
        step, restarts = state["step"], state.get("restarts", 0) + 1
        tokens_seen, losses = state.get("tokens", 0), state.get("losses", [])
        log.info("resuming from %s: step %d of %d (restart %d)", newest.name, step, total_steps, restarts)
    if world.distributed and len(set(distributed.agree(step, pick=tuple))) > 1:
        raise TransientError("CheckpointMismatch", "the training processes found different checkpoints to resume from")
    reporter.start_training(step, total_steps, restarts, losses[-1] if losses else None)
    log.info("training config: %s", json.dumps({
        "backend": backend, "device": str(device), "paddingFree": padding_free,
        "headLoss": head.kernel if head else "model", "trainableParameters": n_trainable, "rows": len(rows),
        "worldSize": world.size,
        "microBatchesPerEpoch": batches.per_epoch, "totalSteps": total_steps, "startStep": step,
        **training.wire()}))

    # ---------------------------------------------------------------- train
    model.train()
    ddp = wrap_data_parallel(model, device, world)
    t_start, start_step = time.monotonic(), step
    stop = StopOnSignal()
    try:
        while step < total_steps:
            t0 = time.monotonic()
            mine = world.micro_batches(step, accum)
            micro = [batches.get(m) for m in mine]
            local_labels = sum(b.label_tokens for b in micro)
            if world.distributed:  # the step's label tokens, and whether any rank was told to stop
                n_labels, stopping = distributed.all_sum([local_labels, float(bool(stop.requested))], device)
            else:
                n_labels, stopping = local_labels, float(bool(stop.requested))
            if stopping:  # preempted or suspended: the pod has a grace period for this checkpoint
                if world.main:
                    checkpoints.save(step, model, optimizer, scheduler,
                                     {"restarts": restarts, "tokens": tokens_seen, "losses": losses})
                distributed.barrier()  # torchrun stops a pod's processes once one of them exits
                raise TransientError("Terminated", f"{stop.requested or 'another process stopped'} at step {step}; "
                                     "checkpoint saved, resume continues")
            n_labels = n_labels or 1
            step_loss = 0.0
            for i, (m, b) in enumerate(zip(mine, micro, strict=True)):
                if b.label_tokens == 0 and not world.distributed:
                    continue
                if training.lora.dropout:  # masks follow the micro-batch, so any number of ranks draws the same
                    torch.manual_seed(training.seed + m)
                # DDP all-reduces gradients in the backward of this rank's last micro-batch only.
                sync = i == len(micro) - 1 or not world.distributed
                with ddp.no_sync() if not sync else contextlib.nullcontext():
                    # out.loss is this micro-batch's mean; weighted by its share of the step's label tokens
                    # (times the ranks, since DDP averages the ranks' gradients).
                    loss = forward_backward(ddp, b, device, b.label_tokens / n_labels * world.size, padding_free,
                                            head)
                step_loss += float(loss) / world.size
            step_tokens = sum(b.tokens for b in micro)
            if world.distributed:  # the step's loss and tokens, over all ranks
                step_loss, step_tokens = distributed.all_sum([step_loss, step_tokens], device)
                step_tokens = int(step_tokens)
            grad_norm = optimizer_step(trainable, optimizer, scheduler)
            step += 1
            tokens_seen += step_tokens
            losses.append(round(step_loss, 6))
            elapsed = time.monotonic() - t_start
            metrics = {
                "loss": step_loss, "learningRate": scheduler.get_last_lr()[0], "gradNorm": grad_norm,
                "epoch": batches.epoch_of(step * accum), "tokens": tokens_seen,
                "tokensPerSecond": step_tokens / max(time.monotonic() - t0, 1e-9),
                "etaSeconds": elapsed / (step - start_step) * (total_steps - step),
            }
            if device.type == "cuda":
                metrics["peakMemoryGB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if eval_every and step % eval_every == 0 and step < total_steps:  # the last step's follows below
                # Rank 0 evaluates the unwrapped model (no DDP hooks: no collectives to pair); the other
                # ranks wait at the barrier, so none runs ahead into the next step's all-reduce.
                if world.main and (val_loss := evaluate(model, val_batches, device, head)) is not None:
                    metrics["evalLoss"] = val_loss
                distributed.barrier()
            if world.main:
                reporter.train_step(step, total_steps, metrics)
            if not math.isfinite(step_loss):
                raise ConfigError("TrainingDiverged", f"loss became {step_loss} at step {step}; lower the learning rate")
            if (world.main and training.checkpoint_every_steps and step % training.checkpoint_every_steps == 0
                    and step < total_steps):
                checkpoints.save(step, model, optimizer, scheduler,
                                 {"restarts": restarts, "tokens": tokens_seen, "losses": losses})
    finally:
        stop.restore()

    # ---------------------------------------------------------------- save
    seconds = time.monotonic() - t_start
    del ddp
    tail = losses[-10:]
    result = TrainResult(
        backend=backend, steps=step, total_steps=total_steps,
        train_loss=sum(tail) / len(tail) if tail else None, eval_loss=None, tokens=tokens_seen,
        seconds=round(seconds, 2), restarts=restarts, trainable_parameters=n_trainable,
        adapter_dir=str(workdir.adapter), batch_size=training.batch_size,
        gradient_checkpointing=training.gradient_checkpointing, auto=choice.reason if choice else None)
    if not world.main:  # rank 0 saves, evaluates and writes the adapter
        del model, optimizer
        return result
    if step > start_step:  # the final checkpoint: a retry after this point skips training entirely
        checkpoints.save(step, model, optimizer, scheduler, {"restarts": restarts, "tokens": tokens_seen, "losses": losses},
                         background=upload_in_background)
    eval_loss = evaluate(model, val_batches, device, head) if val_batches else None
    reporter.eval_loss(step, eval_loss)
    model.save_pretrained(str(workdir.adapter))
    result.eval_loss = eval_loss
    (workdir.adapter / "train_result.json").write_text(json.dumps(asdict(result), indent=2))
    if pool is not None:
        pool.keep(held or Held(key, model, backend, padding_free, initial))
    del model, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result
