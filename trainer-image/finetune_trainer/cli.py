"""The `finetune` command: each stage on its own, all of them (`run`), and the agent tools' schemas.

    finetune run --config run.yaml [--workdir /workspace] [--resume]
    finetune prepare-dataset --source data.jsonl --output-dir work/dataset [--base-model M]
    finetune train --dataset work/dataset --output-dir work [--base-model M] [--max-steps N]
    finetune export-gguf --checkpoint-dir work/adapter --quantization q4_k_m --output-file out/model.gguf
    finetune eval --gguf f16=out/model-f16.gguf --tasks arc_easy --limit 100 --output-dir out/eval
    finetune upload --config run.yaml --workdir work
    finetune tools --json

With --config, a stage command runs that stage of the run config in --workdir (what `run` does in
order). A stage command's own flags are the API's fields (flags.py): the same names, types, choices,
help and defaults as the FinetuneJob spec. Exit codes: 0 ok, 42 configuration error (do not retry), 75 transient (retry, resume), and the
reason goes to $FINETUNE_TERMINATION_LOG as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from finetune_api import contract
from finetune_api.status import Reason

from .errors import ConfigError, TrainerError, redact, write_termination_message
from .evaluation.head import HEAD_ENV, HEADS
from .flags import add_flags, from_flags
from .storage import egress_guard

log = logging.getLogger("finetune")


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_Redact())
    handler.set_name("finetune")
    root = logging.getLogger()
    # Replace only our own handler: main() may run more than once in a process (tools.call, tests).
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "finetune"] + [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "httpx", "datasets", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------- config
def check_config_digest(path: Path) -> None:
    """The operator puts the SHA-256 of the run config it wrote into the Job's pod template, which
    cannot change once the Job exists; the ConfigMap it is mounted from can (anyone with `edit`).
    A config that is not the one the operator wrote (its egress rule dropped, say) is refused."""
    expected = os.environ.get(contract.ENV_CONFIG_SHA256)
    if not expected:  # the trainer run on its own, without the operator
        return
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected.strip().lower():
        raise ConfigError(Reason.CONFIG_TAMPERED, f"{path}: SHA-256 {actual[:16]}… is not the {expected[:16]}… of the "
                                                  "run config the operator wrote: its ConfigMap was changed after the "
                                                  "run was created, so the trainer refuses it")


def load_config(path: str | None):
    from pydantic import ValidationError

    from finetune_api import RunConfig

    path = path or os.environ.get(contract.ENV_CONFIG)
    if not path:
        raise ConfigError(Reason.INVALID_SPEC, "no run config: pass --config or set FINETUNE_CONFIG")
    if not Path(path).is_file():
        raise ConfigError(Reason.CONFIG_NOT_FOUND, f"{path} does not exist")
    check_config_digest(Path(path))
    try:
        return RunConfig.load(path)
    except ValidationError as exc:
        errors = exc.errors()
        quant = [e for e in errors if "gguf" in e["loc"] or "quantizations" in e["loc"]]
        first = quant[0] if quant else errors[0]
        where = ".".join(str(p) for p in first["loc"])
        if quant:
            raise ConfigError(Reason.UNKNOWN_QUANTIZATION, f"{where}: {first['msg']} (input {first.get('input')!r})") from exc
        raise ConfigError(Reason.INVALID_SPEC, f"{where}: {first['msg']}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")) from exc
    except Exception as exc:  # YAML syntax and the like
        raise ConfigError(Reason.INVALID_SPEC, f"{path}: {exc}") from exc


def default_workdir() -> Path:
    return Path(os.environ.get(contract.ENV_WORKDIR) or "finetune-work")


def base_model_spec(value: str | None):
    from finetune_api.spec import BaseModelSpec

    if not value:
        return BaseModelSpec()
    if value.startswith(("s3://", "/", ".", "~")) or value.endswith(".gguf") or Path(value).exists():
        local = value if value.startswith("s3://") else str(Path(value).expanduser().resolve())
        return BaseModelSpec(uri=local)
    return BaseModelSpec(name=value)


def _context(args):
    from .pipeline import make_context

    return make_context(load_config(args.config), Path(args.workdir), resume=args.resume)


def _print(result: Any) -> None:
    print(json.dumps(result, indent=2, default=str))


# --------------------------------------------------------------------------------- commands
def cmd_run(args) -> Any:
    from .pipeline import run

    cfg = load_config(args.config)
    if args.keep_warm and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        log.warning("--keep-warm: ignored under torchrun (one warm process takes a run; a process group would not)")
        args.keep_warm = 0
    if not args.keep_warm:
        return run(cfg, Path(args.workdir), resume=args.resume, ahead=getattr(args, "ahead", None))
    from . import warm
    from .train.model_pool import ModelPool

    handoffs = warm.DirHandoffs(Path(args.handoff_dir)) if args.handoff_dir else warm.KubeHandoffs.from_env()
    pool = ModelPool() if handoffs is not None else None
    out = run(cfg, Path(args.workdir), resume=args.resume, ahead=getattr(args, "ahead", None), pool=pool)
    if handoffs is None:
        log.warning("--keep-warm: no operator (FinetuneJob env) and no --handoff-dir to take runs from; leaving")
        return out
    _print(out)  # the first run's result, before the wait
    taken = warm.serve(cfg, Path(args.workdir), args.keep_warm, handoffs, run, pool)
    return {"warmRunsTaken": taken}


def cmd_prepare(args) -> Any:
    from finetune_api.spec import DatasetSpec, TrainingSpec

    from .data import chat_templates
    from .data.prepare import prepare
    from .pipeline import stage_prepare
    from .train import model_loading

    if args.config:
        ctx = _context(args)
        ctx.direct_tokenizer = args.as_child  # the run's parent checks the class at join
        return stage_prepare(ctx)
    if not (args.source and args.output_dir):
        raise ConfigError(Reason.INVALID_SPEC, "prepare-dataset needs --source and --output-dir (or --config)")
    dataset = from_flags(args, DatasetSpec)
    training = from_flags(args, TrainingSpec)
    base = model_loading.resolve(base_model_spec(args.base_model), Path(args.workdir) / "base-model")
    tokenizer = model_loading.load_tokenizer(base)
    template = chat_templates.resolve(training.chat_template, tokenizer)
    return prepare(dataset, training, tokenizer, template, Path(args.output_dir))


def training_spec(args):
    from finetune_api.spec import LoraSpec, TrainingSpec

    if args.lora_alpha is None and args.lora_r is not None:
        args.lora_alpha = args.lora_r  # the command line keeps Unsloth's alpha = r when only r is given
    return from_flags(args, TrainingSpec, lora=from_flags(args, LoraSpec, prefix="lora"))


def cmd_train(args) -> Any:
    from dataclasses import asdict

    from .paths import Workdir
    from .pipeline import stage_train
    from .reporting import plots
    from .reporting.progress import JsonlLogger, Reporter
    from .train import model_loading, recipe

    if args.config:
        return asdict(stage_train(_context(args)))
    if not (args.dataset and args.output_dir):
        raise ConfigError(Reason.INVALID_SPEC, "train needs --dataset and --output-dir (or --config)")
    training = training_spec(args)  # a bad flag fails before any model is loaded
    wd = Workdir(Path(args.output_dir)).ensure()
    base = model_loading.resolve(base_model_spec(args.base_model), wd.base_model)
    tokenizer = model_loading.load_tokenizer(base)
    reporter = Reporter.from_env(metric_loggers=[JsonlLogger(wd.train_log)])
    reporter.stage("Training")
    result = recipe.train(base, training, Path(args.dataset), wd, reporter, resume=args.resume,
                          pad_id=tokenizer.pad_token_id or 0)
    plots.loss_curve(wd.train_log, wd.loss_plot, result.eval_loss)
    return asdict(result)


def cmd_export(args) -> Any:
    from finetune_api.spec import DEFAULT_GGUF, TrainingSpec

    from .data import chat_templates
    from .data.prepare import load_split
    from .export import convert, parity
    from .pipeline import stage_export
    from .train import model_loading

    if args.config:
        files, parity_results = stage_export(_context(args))
        return {"gguf": {q: str(p) for q, p in files.items()}, "parity": parity_results}
    if not args.checkpoint_dir:
        raise ConfigError(Reason.INVALID_SPEC, "export-gguf needs --checkpoint-dir (or --config)")
    ckpt = Path(args.checkpoint_dir)
    chat_template = from_flags(args, TrainingSpec).chat_template
    quants = [q for item in (args.quantization or [DEFAULT_GGUF]) for q in item.split(",") if q]
    out_dir = Path(args.output_file).parent if args.output_file else Path(args.output_dir or "gguf")
    name = args.name or (Path(args.output_file).stem if args.output_file else "model")
    if (ckpt / "adapter_config.json").exists():
        base_ref = args.base_model or json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = model_loading.resolve(base_model_spec(base_ref), out_dir / "base-model")
        tokenizer = model_loading.load_tokenizer(base)
        template = chat_templates.resolve(chat_template, tokenizer)
        merged = convert.merge(base, ckpt, out_dir / "merged", tokenizer, template)
    elif (ckpt / "config.json").exists():
        merged = ckpt
        template = chat_templates.resolve(chat_template, model_loading.load_tokenizer(model_loading.BaseModel(str(ckpt))))
    else:
        raise ConfigError(Reason.MODEL_NOT_FOUND, f"{ckpt} is neither a LoRA adapter nor a model folder")
    result = convert.export(merged, out_dir, quants, name, template)
    files = dict(result.gguf)
    if args.output_file and len(quants) == 1:  # the exact file asked for
        target = Path(args.output_file)
        files[quants[0]] = files[quants[0]].rename(target)
        modelfile = result.modelfiles.get(quants[0])
        if modelfile:
            modelfile.unlink()
            from .export.modelfile import write_modelfile

            write_modelfile(target, template, name, quants[0])
    summary: dict[str, Any] = {"gguf": {q: str(p) for q, p in files.items()}}
    if args.parity_dataset:
        rows = [list(r["input_ids"]) for r in load_split(Path(args.parity_dataset), "parity")]
        summary["parity"] = parity.check(merged, files, rows)
    return summary


def cmd_eval(args) -> Any:
    from finetune_api.spec import EvaluationSpec

    if args.config:
        from .pipeline import stage_eval

        ctx = _context(args)
        files = {q: ctx.wd.gguf / f"{ctx.cfg.job.name}-{q}.gguf" for q in ctx.spec.export.gguf}
        return stage_eval(ctx, files)
    if not (args.gguf and args.tasks):
        raise ConfigError(Reason.INVALID_SPEC, "eval needs --gguf and --tasks (or --config)")
    from .evaluation import run_eval

    files = {}
    for item in args.gguf:
        quant, sep, path = item.partition("=")
        if not sep:  # a bare path: the type is the file name's last dash-separated part (model-q4_k_m.gguf)
            quant, path = Path(item).stem.rsplit("-", 1)[-1], item
        files[quant.strip().lower()] = Path(path)
    if args.data_uri and not args.data_uri.startswith("s3://"):
        args.data_uri = str(Path(args.data_uri).expanduser().resolve())
    spec = from_flags(args, EvaluationSpec, include_base="base" in files)
    model_args = {k: v for k in ("n_ctx", "n_gpu_layers", "n_threads", "head") if (v := getattr(args, k)) is not None}
    return run_eval(files, spec, Path(args.output_dir), lambda msg, pct=None, eta=None: log.info("%s", msg),
                    model_args=model_args)


def cmd_upload(args) -> Any:
    from .pipeline import finish

    if not args.config:
        raise ConfigError(Reason.INVALID_SPEC, "upload needs --config (for the bucket and the run's prefix)")
    ctx = _context(args)
    ctx.store.check_access(ctx.cfg.output_uri)
    return finish(ctx)


def cmd_tools(args) -> Any:
    from .tools import schemas

    if args.json:
        return schemas()
    for tool in schemas():
        f = tool["function"]
        print(f"{f['name']}({', '.join(f['parameters']['properties'])})\n    {f['description']}")
    return None


# ----------------------------------------------------------------------------------- parser
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="Fine-tune a small LLM and export GGUF files.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def staged(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--config", help="RunConfig or FinetuneJob YAML (default $FINETUNE_CONFIG for run)")
        s.add_argument("--workdir", default=str(default_workdir()), help="scratch space (default $FINETUNE_WORKDIR)")
        s.add_argument("--resume", action="store_true", help="reuse finished stages and the newest checkpoint")
        return s

    r = staged("run", "all stages from a run config")
    r.add_argument(contract.ARG_KEEP_WARM, dest="keep_warm", type=float, default=0, metavar="SECONDS",
                   help="after the run, keep this process (imports, model, compiled kernels) this long for the "
                        "next run handed over (warm.py); in a pod the operator hands runs over through the status")
    r.add_argument("--handoff-dir", help="with --keep-warm outside a pod: take the next run's config from "
                                         "DIR/next.yaml (DIR/warm.json says who waits, until when)")
    r.set_defaults(fn=cmd_run)

    from finetune_api.spec import (
        DEFAULT_GGUF,
        GGUF_QUANT_TYPES,
        DatasetSpec,
        EvaluationSpec,
        LoraSpec,
        TrainingSpec,
    )

    s = staged("prepare-dataset", "load, format, tokenize and split a dataset")
    s.add_argument("--output-dir")
    s.add_argument("--base-model", help="tokenizer and chat template source (default unsloth/gemma-3-270m-it)")
    add_flags(s, DatasetSpec, exclude={"config_map_ref"})
    add_flags(s, TrainingSpec, only={"max_seq_length", "chat_template", "train_on_responses_only"})
    # `finetune run`'s dataset child (data/prepare_ahead.py); not args.ahead, run's handle on that child
    s.add_argument("--ahead", dest="as_child", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_prepare)

    t = staged("train", "LoRA/QLoRA fine-tuning on a prepared dataset")
    t.add_argument("--base-model")
    t.add_argument("--dataset", help="folder written by prepare-dataset")
    t.add_argument("--output-dir")
    add_flags(t, TrainingSpec, aliases={"checkpoint_every_steps": ["--checkpoint-every"]})
    add_flags(t, LoraSpec, prefix="lora")
    t.set_defaults(fn=cmd_train)

    e = staged("export-gguf", "merge the adapter and write GGUF files")
    e.add_argument("--checkpoint-dir", help="adapter folder or merged model folder")
    e.add_argument("--base-model")
    e.add_argument("--quantization", action="append",
                   help=f"{', '.join(GGUF_QUANT_TYPES)} (repeat or comma-separate; default {DEFAULT_GGUF})")
    e.add_argument("--output-file")
    e.add_argument("--output-dir")
    e.add_argument("--name")
    add_flags(e, TrainingSpec, only={"chat_template"})
    e.add_argument("--parity-dataset", help="prepared dataset folder whose parity split to check against")
    e.set_defaults(fn=cmd_export)

    v = staged("eval", "evaluate GGUF files with lm-evaluation-harness, in process through llama.cpp")
    v.add_argument("--gguf", action="append", metavar="[TYPE=]PATH",
                   help="a GGUF file and its quantization type (f16, q8_0, q4_k_m, ...; 'base' for the base "
                        "model); repeat for several")
    add_flags(v, EvaluationSpec, only={"tasks", "limit", "num_fewshot", "data_uri"},
              aliases={"data_uri": ["--include-path"]})
    v.add_argument("--output-dir", "--output", default="eval", help="folder for eval.json and eval.md")
    v.add_argument("--n-ctx", type=int, help="llama.cpp context size (default 4096)")
    v.add_argument("--n-gpu-layers", type=int, help="layers offloaded to a GPU (-1: all)")
    v.add_argument("--n-threads", type=int, help="CPU threads (default: all usable)")
    v.add_argument("--head", choices=HEADS, help=f"output layer: llama.cpp's, torch's on llama.cpp's hidden states, "
                   f"or auto (torch where the architecture allows it; default ${HEAD_ENV}, else auto)")
    v.set_defaults(fn=cmd_eval)

    u = staged("upload", "upload artifacts and manifest.json to the run's S3 prefix")
    u.set_defaults(fn=cmd_upload)

    o = sub.add_parser("tools", help="the agent tools' JSON Schemas")
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=cmd_tools)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "tools":
        result = args.fn(args)
        if result is not None:
            _print(result)
        return contract.EXIT_OK
    # A crash in native code (a CUDA kernel, llama.cpp, a compiled graph) prints every thread's Python
    # stack to the pod's log before the process dies, where there would be only "Segmentation fault".
    with contextlib.suppress(AttributeError, ValueError, OSError):  # a stderr with no descriptor (tests)
        faulthandler.enable()
    # Outside the training loop (which checkpoints first), SIGTERM ends the run as a transient failure.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.command in ("run", "train"):
            from .train.compile_cache import default_root, use_dirs
            from .train.model_loading import backend, early_imports, set_compile_env

            use_dirs(default_root())  # before Unsloth reads its location at import
            set_compile_env()  # before backend() loads torch
            if args.command == "run":  # the dataset is encoded meanwhile (data/prepare_ahead.py)
                args.ahead = _prepare_ahead(args, heavy_imports=backend() == "unsloth")
            early_imports()
        result = args.fn(args)
    except TrainerError as exc:
        if not isinstance(exc, ConfigError) and egress_guard.last_denial:
            # The egress policy refused a connection on the way to this failure: retrying cannot help.
            return _fail(Reason.EGRESS_DENIED, egress_guard.last_denial, contract.EXIT_CONFIG_ERROR)
        return _fail(exc.reason, exc.message, exc.exit_code)
    except KeyboardInterrupt:
        return _fail(Reason.INTERRUPTED, "interrupted", contract.EXIT_TRANSIENT)
    except MemoryError as exc:
        return _fail(Reason.OUT_OF_MEMORY, f"out of memory: {exc}; lower batchSize or maxSeqLength", contract.EXIT_CONFIG_ERROR)
    except Exception as exc:  # noqa: BLE001 - the operator needs a reason line whatever happened
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            return _fail(Reason.OUT_OF_MEMORY, f"GPU out of memory; lower batchSize or maxSeqLength ({exc})".splitlines()[0],
                         contract.EXIT_CONFIG_ERROR)
        if any(c.__name__ == "BackendCompilerFailed" for c in type(exc).__mro__):  # Inductor's own failures too
            # Deterministic for a model in this image (Gemma 2 under Unsloth is one: docs/benchmarks.md):
            # a retry would only spend another GPU start compiling to the same failure.
            log.exception("compilation failed")
            detail = (str(exc).strip().splitlines() or [""])[0]
            return _fail(Reason.COMPILE_FAILED, f"torch.compile failed compiling the model ({type(exc).__name__}: {detail}); "
                         "it fails the same way on every try, so the run is not retried", contract.EXIT_CONFIG_ERROR)
        if egress_guard.last_denial:
            return _fail(Reason.EGRESS_DENIED, egress_guard.last_denial, contract.EXIT_CONFIG_ERROR)
        log.exception("unexpected failure")
        return _fail(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", 1)
    finally:
        if getattr(args, "ahead", None) is not None:
            args.ahead.stop()  # a failure before the run waited for it
    if result is not None:
        _print(result)
    return contract.EXIT_OK


def _prepare_ahead(args, heavy_imports: bool):
    from .data import prepare_ahead

    if not prepare_ahead.wanted(heavy_imports):
        return None
    try:
        base_uri = load_config(args.config).spec.base_model.uri
    except TrainerError:  # the run itself says what is wrong with the config
        return None
    return prepare_ahead.start(args.config, Path(args.workdir), args.resume, base_uri)


def _terminated(signum, frame) -> None:
    from .errors import TransientError

    raise TransientError(Reason.TERMINATED, f"{signal.Signals(signum).name} outside the training loop; a retry resumes "
                                       "from the newest checkpoint")


def _fail(reason: str, message: str, code: int) -> int:
    from .warm import Serving

    log.error("%s: %s", reason, message)
    write_termination_message(reason, message)
    if Serving.handed_run is not None:  # a retry would start the pod's first run again, not this one
        return contract.EXIT_CONFIG_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
