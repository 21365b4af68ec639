"""Base model: where it comes from (Hub id, local folder, s3:// folder, .gguf file) and how it is
loaded for training (Unsloth on CUDA, transformers + PEFT elsewhere) or for merging (always 16-bit
transformers, so a QLoRA adapter is merged into the real 16-bit weights, not dequantized 4-bit ones).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune_api.spec import BaseModelSpec, S3Spec, TrainingSpec
from finetune_api.status import Reason

from ..errors import ConfigError, TransientError

log = logging.getLogger(__name__)

ENV_BACKEND = "FINETUNE_BACKEND"  # auto (default), unsloth or transformers
READY = ".complete"  # marker written last into a materialized base-model folder
UNSLOTH_DEFAULT_ENV = {
    "UNSLOTH_DISABLE_STATISTICS": "1",  # no phoning home (and offline-safe)
    # Unsloth's fused LM-head loss, read at its import. bf16 logits, as transformers' own loss reads
    # them, rather than Unsloth's default fp32 ones (16 bytes of memory traffic per logit over Gemma's
    # 262k columns), and chunks of 2048 rows rather than 512: faster steps on an H100
    # (docs/benchmarks.md). Either can be set back in the trainer's environment.
    "UNSLOTH_LOGPROB_FP32_LOGITS": "0",
    "UNSLOTH_FUSED_LINEAR_MIN_ROWS": "2048",
    # On a machine with a GPU this only skips the rewriting of every TRL trainer that `import unsloth`
    # does (unsloth/models/rl.py PatchFastRL, _gpu_init's SFTTrainer patches): the trainer uses no TRL
    # trainer, and the rewriting was the largest part of the import (docs/benchmarks.md). Without a
    # GPU it would make Unsloth report one, but the trainer imports Unsloth only where CUDA is there.
    "UNSLOTH_ALLOW_CPU": "1",
    # Unsloth's own copy of torch.compile's artifacts lives in ~/.cache and is refused under a parent
    # that others may write (a pod's emptyDir is 0777), so in a pod it never served; on a machine it
    # served every later process, which the bench mistook for a warm machine. The compile cache keeps
    # the same artifacts in S3 (train/compile_cache.py).
    "UNSLOTH_MEGA_CACHE": "0",
}
# Unsloth switches a model family needs, by config model_type; set before Unsloth loads the model,
# unless the trainer's environment sets them already.
UNSLOTH_FAMILY_ENV = {
    # On an H100, Inductor failed compiling the backward of Unsloth's block-compiled Gemma 2 decoder
    # layer (an AssertionError in a post-grad pass); without that compile Unsloth's own kernels run it.
    "gemma2": {"UNSLOTH_BLOCK_COMPILE": "0"},
}


@dataclass(frozen=True)
class BaseModel:
    source: str  # what from_pretrained gets: a local folder or a Hub id
    revision: str | None = None
    from_gguf: bool = False

    @property
    def local(self) -> bool:
        return Path(self.source).is_dir()


def hub_offline() -> bool:
    """Offline mode as the environment says now (huggingface_hub reads it only once, at import)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def backend() -> str:
    """unsloth where CUDA and Unsloth are there (or forced), else transformers."""
    choice = os.environ.get(ENV_BACKEND, "auto")
    if choice in ("unsloth", "transformers"):
        return choice
    import torch

    return "unsloth" if torch.cuda.is_available() and importlib.util.find_spec("unsloth") else "transformers"


ENV_COMPILE_WORKERS = "FINETUNE_COMPILE_WORKERS"  # auto (default): Inductor's worker pool, started early; 1: none
MAX_COMPILE_WORKERS = 16


def compile_workers_env(env: dict[str, str], cpus: int) -> dict[str, str]:
    """The variables to set before torch loads, so the first step's compile runs on a pool of workers.

    A GPU pod names its one GPU in NVIDIA_VISIBLE_DEVICES (the device plugin) and leaves
    CUDA_VISIBLE_DEVICES unset; Unsloth then compiles every kernel on the main thread, since Inductor's
    workers would not find that GPU (unsloth/_gpu_init.py). Inside the container the GPU is device 0:
    saying so lets the workers find it. The first step of a new pod was ~28 s of compiling on an H100,
    most of it Inductor lowering and Triton kernels one at a time (docs/benchmarks.md)."""
    if env.get(ENV_COMPILE_WORKERS, "auto") != "auto" or int(env.get("WORLD_SIZE") or 1) > 1 or cpus < 4:
        return {}
    out = {}
    visible = env.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower()
    if "CUDA_VISIBLE_DEVICES" not in env and visible not in ("", "all", "none", "void") and "," not in visible:
        out["CUDA_VISIBLE_DEVICES"] = "0"
    if not env.get("TORCHINDUCTOR_COMPILE_THREADS"):
        out["TORCHINDUCTOR_COMPILE_THREADS"] = str(min(MAX_COMPILE_WORKERS, cpus))
    return out


def start_compile_workers() -> int:
    """Starts Inductor's compile workers now, while the model loads: a pool first asked for at the first
    compile is not ready in time, and Inductor compiles on the main thread meanwhile. Returns how many
    (0: none, one thread compiles)."""
    try:
        from torch._inductor.async_compile import AsyncCompile, get_compile_threads

        workers = get_compile_threads()
        if workers <= 1:
            return 0
        AsyncCompile.warm_pool()
        AsyncCompile.wakeup()  # the pool's workers start importing now
        return workers
    except Exception as exc:  # noqa: BLE001 - an optimisation: the compile falls back to the main thread
        log.warning("compile workers not started ahead (%s: %s)", type(exc).__name__, exc)
        return 0


def set_compile_env() -> None:
    """compile_workers_env, applied: call before torch loads (and before its CUDA starts)."""
    from ..cpus import usable_cpus

    if importlib.util.find_spec("unsloth") and os.environ.get(ENV_BACKEND, "auto") != "transformers":
        os.environ.update(compile_workers_env(dict(os.environ), usable_cpus()))


def early_imports() -> None:
    """Unsloth patches transformers at import; it must come first, before anything loads transformers."""
    for key, value in UNSLOTH_DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    set_compile_env()
    if backend() == "unsloth":
        import unsloth  # noqa: F401

        # Unsloth calls gc.collect() again and again while it loads and patches a model, and each call
        # walked the millions of objects these imports made: half of a model load (docs/benchmarks.md).
        # Frozen, they are skipped by every later collection; they live as long as the process anyway.
        gc.freeze()
        if workers := start_compile_workers():
            log.info("compile workers: %d, started while the model loads", workers)


def gguf_to_hf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantizes a GGUF into a 16-bit Hugging Face folder with a rebuilt SentencePiece tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from .gguf_tokenizer import tokenizer_from_gguf

    if (out_dir / READY).exists():
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    log.info("dequantizing %s to 16-bit (once per workdir)", gguf_file.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError("InvalidModel", f"{gguf_file.name}: transformers cannot load this GGUF: {exc}") from exc
    # The loaded model still says it is quantized; save_pretrained refuses that.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    try:
        tokenizer_from_gguf(gguf_file, out_dir)
    except ValueError as exc:  # a vocabulary it cannot rebuild: the same on every retry
        raise ConfigError("InvalidModel", str(exc)) from exc
    (out_dir / READY).write_text(gguf_file.name)
    return out_dir


def resolve(spec: BaseModelSpec, dest: Path, s3: S3Spec | None = None) -> BaseModel:
    """Makes the base model loadable by from_pretrained, fetching or converting it into dest if needed."""
    ref = spec.resolved_name()
    if spec.uri and spec.uri.startswith("s3://"):
        from ..storage.s3 import S3Store

        if s3 is None:
            raise ConfigError("InvalidSpec", "an s3:// base model needs output.s3 for the endpoint and region")
        store = S3Store(s3)
        if ref.endswith(".gguf"):
            local = dest / "source" / Path(ref).name
            if not local.exists():
                store.download_file(ref, local)
            return BaseModel(str(gguf_to_hf(local, dest / "hf")), from_gguf=True)
        folder = dest / "hf"
        if not (folder / READY).exists():
            shutil.rmtree(folder, ignore_errors=True)
            if not store.download_prefix(ref, folder):
                raise ConfigError("ModelNotFound", f"no objects under {ref}")
            (folder / READY).write_text(ref)
        return BaseModel(str(folder))
    if spec.uri:
        path = Path(spec.uri)
        try:
            if path.suffix == ".gguf":
                if not path.is_file():
                    raise ConfigError("ModelNotFound", f"{path} does not exist")
                if not os.access(path, os.R_OK):
                    raise _not_readable(path, "the file")
            elif not (path / "config.json").is_file():
                raise ConfigError("ModelNotFound", f"{path} is not a Hugging Face model folder (no config.json)")
            elif unreadable := sorted(f.name for f in path.iterdir() if f.is_file() and not os.access(f, os.R_OK)):
                raise _not_readable(path, ", ".join(unreadable))
        except PermissionError as exc:  # a folder on the way that this user may not enter
            raise _not_readable(path, f"the path ({exc.strerror})") from exc
        if path.suffix == ".gguf":
            return BaseModel(str(gguf_to_hf(path, dest / "hf")), from_gguf=True)
        return BaseModel(str(path))
    return BaseModel(ref, revision=spec.revision)


def _not_readable(path: Path, what: str) -> ConfigError:
    """A volume mounted with another owner's modes (safetensors writes its files 0600) fails the same way on
    every retry: say what and for whom."""
    return ConfigError(Reason.MODEL_NOT_READABLE,
                       f"spec.baseModel.uri: {path}: {what} cannot be read by the trainer's user (uid {os.getuid()}, "
                       f"gid {os.getgid()}); make its files readable by that user or group (a+r; the pod's fsGroup is "
                       "applied to volumes that support it, not to hostPath)")


def _from_pretrained_errors(base: BaseModel, exc: Exception) -> Exception:
    text = str(exc)
    offline = hub_offline()
    if any(s in text for s in ("is not a local folder", "does not appear to have", "not a valid model identifier",
                               "Repository Not Found", "gated repo", "401", "404")) or offline:
        return ConfigError("ModelNotFound", f"{base.source}: {text.splitlines()[0] if text else exc!r}"
                           + (" (offline mode: the model must be in the local cache)" if offline else ""))
    return TransientError("ModelUnavailable", f"{base.source}: {text.splitlines()[0] if text else exc!r}")


def load_tokenizer(base: BaseModel, direct: bool = False):
    """The base model's tokenizer, as AutoTokenizer picks it.

    direct: with the class the local folder's tokenizer_config.json names, imported on its own, where it
    names one transformers has. `import AutoTokenizer` pulls in transformers' modeling and generation
    modules (and scikit-learn), seconds that a process which only encodes text never uses (the dataset
    child, data/prepare_ahead.py). AutoTokenizer may still pick another class (its model-type table can
    override the file), so a caller that loads this way must compare the class with an AutoTokenizer
    load before trusting what it encoded: prepare_ahead's join does.
    """
    named = named_tokenizer_class(base) if direct else None
    if named is None:
        from transformers import AutoTokenizer as named
    try:
        tok = named.from_pretrained(base.source, revision=base.revision, token=hf_token(),
                                    local_files_only=hub_offline())
    except OSError as exc:
        raise _from_pretrained_errors(base, exc) from exc
    return getattr(tok, "tokenizer", tok)  # a processor (multimodal checkpoints) wraps the tokenizer


def named_tokenizer_class(base: BaseModel):
    """The tokenizer class a local folder's tokenizer_config.json names, or None: no such file, custom
    code (auto_map), or a name transformers does not export as a tokenizer. AutoTokenizer's own
    reading of the name: a trailing "Fast" is dropped first, then tried again."""
    config = Path(base.source) / "tokenizer_config.json"
    if not base.local or not config.is_file():
        return None
    try:
        named = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    name = named.get("tokenizer_class") if isinstance(named, dict) and "auto_map" not in named else None
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]{1,80}", name):
        return None
    import transformers

    stem = name.removesuffix("Fast")
    for candidate in (stem, stem + "Fast"):
        try:
            cls = getattr(transformers, candidate, None)
        except Exception:  # noqa: BLE001 - transformers' lazy module raises where a backend is missing
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase):
            return cls
    return None


def load_for_training(base: BaseModel, training: TrainingSpec, offload_checkpoints: bool = True):
    """Returns (peft_model, backend_name). One entry point, two loaders behind it.

    offload_checkpoints: with Unsloth, keep checkpointed activations in CPU memory (the default) or on
    the GPU (plain checkpointing: more GPU memory, no PCIe traffic); bench/ measures both.
    """
    training, _ = resolve_auto(base, training)  # a no-op where the caller decided already
    name = backend()
    if training.method == "qlora" and name != "unsloth":
        raise ConfigError("UnsupportedMethod", "training.method qlora needs a CUDA GPU with Unsloth and bitsandbytes")
    if training.optimizer == "adamw_8bit" and not importlib.util.find_spec("bitsandbytes"):
        raise ConfigError("UnsupportedOptimizer", "adamw_8bit needs bitsandbytes (GPU images only)")
    try:
        model = (_load_unsloth(base, training, offload_checkpoints) if name == "unsloth"
                 else _load_transformers(base, training))
    except OSError as exc:
        raise _from_pretrained_errors(base, exc) from exc
    return model, name


def trainer_env(base: BaseModel) -> dict[str, str]:
    """The Unsloth switches the trainer itself sets for this model (the environment's own values win)."""
    return {**UNSLOTH_DEFAULT_ENV, **UNSLOTH_FAMILY_ENV.get(model_type(base), {})}


def model_type(base: BaseModel) -> str | None:
    """The config's model_type ("gemma3_text", "llama", …), or None where no config can be read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.source, revision=base.revision, token=hf_token(),
                                            local_files_only=hub_offline())
    except (OSError, ValueError):
        return None  # from_pretrained below says why, with the error mapped to a reason
    return getattr(config.get_text_config(decoder=True), "model_type", None)


def _safetensors_parameters(folder: Path) -> int | None:
    """Parameters counted from the safetensors headers (no weights read, no model code run)."""
    import json
    import struct

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
    return total


def model_shape(base: BaseModel):
    """Parameters, layers and widths from the model's config (and its safetensors headers where local)."""
    from transformers import AutoConfig

    from . import head_loss
    from .auto_batch import ModelShape

    try:
        config = AutoConfig.from_pretrained(base.source, revision=base.revision, token=hf_token(),
                                            local_files_only=hub_offline()).get_text_config(decoder=True)
        hidden, layers = config.hidden_size, config.num_hidden_layers
        inter = getattr(config, "intermediate_size", None) or 4 * hidden
        params = _safetensors_parameters(Path(base.source)) if base.local else None
        if params is None:  # a Hub id: estimated from the config (embedding + attention + MLP per layer)
            head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
            kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            attn = 2 * hidden * config.num_attention_heads * head_dim + 2 * hidden * kv * head_dim
            params = config.vocab_size * hidden + layers * (attn + 3 * hidden * inter)
        return ModelShape(parameters=params, layers=layers, hidden=hidden, intermediate=inter,
                          vocab=getattr(config, "vocab_size", 0) or 0, chunked_head=head_loss.takes(config))
    except Exception as exc:  # noqa: BLE001 - without a shape, auto falls back to the small defaults
        log.warning("model size unknown (%s): batchSize auto takes the small defaults", exc)
        return None


def resolve_auto(base: BaseModel, training: TrainingSpec):
    """training with `auto` values decided for this model and the GPU this process sees (auto_batch.py)."""
    from . import auto_batch

    if training.batch_size != "auto" and training.gradient_checkpointing is not None:
        return training, None
    import torch

    cuda = torch.cuda.is_available()
    free = torch.cuda.mem_get_info()[0] if cuda else None
    training, choice = auto_batch.resolve(training, model_shape(base) if cuda else None, free, cuda=cuda)
    log.info("batchSize/gradientCheckpointing auto: %s", choice.reason)
    return training, choice


def _load_unsloth(base: BaseModel, training: TrainingSpec, offload_checkpoints: bool = True):
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import torch
    from unsloth import FastLanguageModel

    for key, value in UNSLOTH_FAMILY_ENV.get(model_type(base), {}).items():
        os.environ.setdefault(key, value)  # read while the model trains too, so it stays set
    # Under torchrun each process trains on its own GPU (Unsloth's default map starts at GPU 0).
    placement = {"device_map": {"": torch.cuda.current_device()}} if int(os.environ.get("WORLD_SIZE", 1)) > 1 else {}
    model, _ = FastLanguageModel.from_pretrained(
        model_name=base.source, max_seq_length=training.max_seq_length, dtype=torch.bfloat16,
        load_in_4bit=training.method == "qlora", full_finetuning=False, token=hf_token(),
        revision=base.revision, random_state=training.seed, **placement,
    )
    lora = training.lora
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, target_modules=list(lora.target_modules), lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, bias="none",
        # "unsloth" offloads checkpointed activations to CPU: long sequences at almost no speed cost.
        use_gradient_checkpointing=(("unsloth" if offload_checkpoints else True)
                                    if training.gradient_checkpointing else False),
        random_state=training.seed, max_seq_length=training.max_seq_length,
    )
    FastLanguageModel.for_training(model)
    return model


def _load_transformers(base: BaseModel, training: TrainingSpec):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        base.source, revision=base.revision, token=hf_token(), local_files_only=hub_offline(),
        # CPU: fp32 (bf16 matmuls are slow and lossy there); GPU without Unsloth: bf16 weights.
        dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa",
    )
    if cuda:
        model.to("cuda")
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = training.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(training.seed)  # LoRA A matrices are initialized randomly
    return get_peft_model(model, config)


def load_merged(base: BaseModel, adapter_dir: Path, device: str):
    """Base in 16-bit + adapter, merged: the weights that become the GGUF."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base.source, revision=base.revision, token=hf_token(), local_files_only=hub_offline(),
            # Merge in fp32 on CPU (exact), bf16 on GPU; saved as bf16 either way.
            dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    except OSError as exc:
        raise _from_pretrained_errors(base, exc) from exc
    model.to(device)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
