"""`finetune run`: every stage in order, from one RunConfig (or FinetuneJob YAML).

    Preparing → Training → Exporting → (Evaluating) → Uploading

Each stage is also its own command (`finetune train --config run.yaml --workdir W` runs only that
stage, reading what earlier stages left in W). With --resume, a stage whose outputs are in the
workdir for the same spec is skipped, and training continues from the newest checkpoint (local, or in
S3 when the pod lost its disk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from finetune_api import RunConfig, contract
from finetune_api.status import Artifact, Phase

from .data import chat_templates, prepare_ahead
from .data.prepare import load_split, prepare
from .errors import ConfigError
from .export import cache as export_cache
from .export import convert, parity
from .export.modelfile import write_modelfile
from .paths import Workdir
from .reporting import plots
from .reporting.progress import JsonlLogger, Reporter
from .storage import egress_guard
from .storage.cache import CACHE_DIR, Lookup, S3Cache, cache_uri
from .storage.s3 import S3Store
from .train import compile_cache, distributed, model_loading, recipe, trained_cache
from .train.checkpoints import Checkpoints
from .train.model_pool import ModelPool
from .upload.artifacts import upload as upload_artifacts

log = logging.getLogger(__name__)
_ASIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aside")  # Context.aside's work, in turn
ENV_CACHE = "FINETUNE_CACHE"  # "off": neither read nor write the S3 caches (storage/cache.py)
# "off": no compile caches in S3, so every new pod compiles (~28 s of Gemma 3 270M's first step on an
# H100, against 5 s with them: docs/benchmarks.md). On by default; the operator sets it from the
# cluster admin's Helm value security.compileCache.
ENV_COMPILE_CACHE = contract.ENV_COMPILE_CACHE


@dataclass
class Context:
    cfg: RunConfig
    wd: Workdir
    reporter: Reporter
    resume: bool = False
    timings: dict[str, Any] = field(default_factory=dict)  # stage → seconds; exportSteps → step → seconds
    caches: dict[str, Any] = field(default_factory=dict)  # cache hit/miss, for the status metrics
    compile: compile_cache.CompileCache | None = None
    trained: trained_cache.TrainedCache | None = None  # the training cache's lookup (rank 0)
    exports: export_cache.ExportCache | None = None  # the export cache (only after a training lookup)
    checkpoints: Checkpoints | None = None  # the final checkpoint may still be uploading (finish joins it)
    converter: convert.WarmConverter | None = None  # llama.cpp's converter, importing while the model trains
    ahead: prepare_ahead.Ahead | None = None  # the dataset, prepared in a child while this process imported
    auto: str | None = None  # what batchSize/gradientCheckpointing auto chose, and why
    aside: list[Future] = field(default_factory=list)  # work off the critical path that finish() waits for
    direct_tokenizer: bool = False  # the dataset child's: the named class, not AutoTokenizer (load_tokenizer)
    world: distributed.World = field(default_factory=distributed.World)  # this process under torchrun
    pool: ModelPool | None = None  # a warm trainer's model, kept between its runs (warm.py)

    @property
    def spec(self):
        return self.cfg.spec

    @cached_property
    def store(self) -> S3Store:
        return S3Store(self.spec.output.s3)

    @cached_property
    def base(self) -> model_loading.BaseModel:
        return model_loading.resolve(self.spec.base_model, self.wd.base_model, self.spec.output.s3)

    @cached_property
    def tokenizer(self):
        return model_loading.load_tokenizer(self.base, direct=self.direct_tokenizer)

    @cached_property
    def template(self) -> chat_templates.ChatTemplate:
        return chat_templates.resolve(self.spec.training.chat_template, self.tokenizer)

    def cache(self, kind: str) -> S3Cache | None:
        """The namespace's cache of this kind in the output bucket, or None when FINETUNE_CACHE=off."""
        if os.environ.get(ENV_CACHE, "").lower() in ("off", "0", "false"):
            return None
        bucket = self.cfg.output_uri[5:].split("/", 1)[0]
        return S3Cache(self.store, cache_uri(bucket, self.spec.output.s3.prefix, self.cfg.job.namespace), kind)

    @cached_property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.spec.wire(), sort_keys=True).encode()).hexdigest()[:16]

    # Done-markers, keyed by the spec, so --resume skips only what this very spec produced.
    def done(self, stage: str) -> bool:
        marker = self.wd.root / f".done-{stage}"
        return self.resume and marker.exists() and marker.read_text() == self.key

    def mark(self, stage: str) -> None:
        (self.wd.root / f".done-{stage}").write_text(self.key)

    def read_json(self, path: Path, stage: str) -> Any:
        if not path.exists():
            raise ConfigError("MissingStageOutput", f"{path} is missing: run the {stage} stage first")
        return json.loads(path.read_text())


def enforce_egress(cfg: RunConfig) -> None:
    """The operator's egress rule (absent when the trainer runs on its own): every connection from now
    on, and the spec's local paths, resolved."""
    if cfg.egress is None:
        return
    egress_guard.install(cfg.egress)
    spec = cfg.spec
    egress_guard.check_local_path(cfg.egress, "spec.dataset.source", spec.dataset.source)
    egress_guard.check_local_path(cfg.egress, "spec.baseModel.uri", spec.base_model.uri)
    if spec.evaluation:
        egress_guard.check_local_path(cfg.egress, "spec.evaluation.dataUri", spec.evaluation.data_uri)


def make_context(cfg: RunConfig, workdir: Path, resume: bool = False, reporter: Reporter | None = None) -> Context:
    enforce_egress(cfg)
    wd = Workdir(workdir).ensure()
    world = distributed.World.from_env()
    if not world.main:  # rank 0 alone reports to the status and writes the training log
        return Context(cfg, wd, Reporter(run=cfg.job.run), resume, world=world)
    reporter = reporter or Reporter.from_env(run=cfg.job.run)
    reporter.metric_loggers.append(JsonlLogger(wd.train_log))
    return Context(cfg, wd, reporter, resume, world=world)


def _timed(ctx: Context, name: str, t0: float) -> None:
    ctx.timings[f"{name}Seconds"] = round(time.monotonic() - t0, 2)


def preflight(ctx: Context) -> None:
    from . import preflight as checks

    checks.check_target_modules(ctx.base, list(ctx.spec.training.lora.target_modules))
    if ctx.spec.evaluation is not None:
        checks.check_eval_tasks(ctx.spec.evaluation, ctx.wd.eval,
                                ctx.store if ctx.spec.evaluation.data_uri else None)


def stage_prepare(ctx: Context) -> dict[str, Any]:
    t0 = time.monotonic()
    ctx.reporter.stage(Phase.PREPARING.value, f"base model {ctx.spec.base_model.resolved_name()}, dataset")
    if not ctx.world.local_main:  # the pod's first process prepares its workdir; the others read it
        distributed.barrier()
        report = ctx.read_json(ctx.wd.dataset / "report.json", "prepare-dataset")
    elif ctx.done("prepare"):
        report = ctx.read_json(ctx.wd.dataset / "report.json", "prepare-dataset")
    else:
        ahead, ctx.ahead = ctx.ahead, None
        report = ahead.join(ctx.wd.dataset) if ahead is not None else None  # its stage marked the workdir
        if report is not None and report.get("tokenizerClass") != type(ctx.tokenizer).__name__:
            log.warning("the dataset child encoded with %s where this process loads %s: preparing it here",
                        report.get("tokenizerClass"), type(ctx.tokenizer).__name__)
            report = None
        if report is None:
            report = prepare(ctx.spec.dataset, ctx.spec.training, ctx.tokenizer, ctx.template, ctx.wd.dataset,
                             parity_samples=ctx.spec.export.parity_samples, s3=ctx.spec.output.s3,
                             reporter=ctx.reporter, cache=ctx.cache("datasets"))
            ctx.mark("prepare")
        if "cache" in report:
            ctx.caches.update(report["cache"])
            ctx.reporter.message(f"prepared dataset: cache {report['cache']['dataset']} "
                                 f"({report['cache']['reason']})")
    if ctx.world.local_main and ctx.world.distributed:
        distributed.barrier()
    _timed(ctx, "prepare", t0)
    return report


def stage_train(ctx: Context) -> recipe.TrainResult | None:
    """Trains, or reuses the adapter of an earlier run with the same training inputs (train/trained_cache.py).
    None on the other ranks of a run that reused one."""
    t0 = time.monotonic()
    ctx.reporter.stage(Phase.TRAINING.value, f"{ctx.spec.training.method} on {ctx.spec.base_model.resolved_name()}")
    if restore_trained(ctx):
        _timed(ctx, "train", t0)
        if not ctx.world.main:
            return None
        result = recipe.TrainResult(**ctx.read_json(ctx.wd.adapter / trained_cache.RESULT, "train"))
        result.restarts = 0  # this run's: it never trained, so it never resumed
        (ctx.wd.adapter / trained_cache.RESULT).write_text(json.dumps(asdict(result), indent=2))
        ctx.reporter.start_training(result.steps, result.total_steps, 0, result.train_loss)
        origin = ctx.trained.origin or {}
        ctx.reporter.stage(Phase.TRAINING.value, f"reused the adapter of {origin.get('name', '?')} run "
                           f"{origin.get('run', '?')} (training cache hit, {result.steps} steps not repeated)")
        return result
    checkpoints = Checkpoints(ctx.wd.checkpoints, ctx.cfg.output_uri + "checkpoints/", ctx.store)
    pad = ctx.tokenizer.pad_token_id
    training, choice = model_loading.resolve_auto(ctx.base, ctx.spec.training)
    ctx.auto = choice.reason if choice else None
    if ctx.world.local_main:  # one process per pod fills the pod's compile cache folders
        restore_compile_cache(ctx, training)
    distributed.barrier()
    ctx.checkpoints = checkpoints
    reused = ctx.pool.reused if ctx.pool is not None else 0
    result = recipe.train(ctx.base, training, ctx.wd.dataset, ctx.wd, ctx.reporter, checkpoints,
                          resume=ctx.resume, pad_id=pad if pad is not None else 0, upload_in_background=True,
                          pool=ctx.pool)
    if ctx.pool is not None:
        ctx.caches["model"] = "kept (warm trainer)" if ctx.pool.reused > reused else "loaded"
    if not ctx.world.main:
        return result
    if ctx.compile is not None:  # off the critical path: export runs while it archives and uploads
        if not (ctx.compile.lookup and ctx.compile.lookup.hit):
            t_save = time.monotonic()
            compile_cache.save_artifacts(ctx.compile.dirs)
            ctx.timings["compileArtifactsSaveSeconds"] = round(time.monotonic() - t_save, 2)
        ctx.compile.save_in_background()

    def after_training() -> None:  # neither is needed before the upload: export starts meanwhile
        plots.loss_curve(ctx.wd.train_log, ctx.wd.loss_plot, result.eval_loss,
                         title=f"{ctx.cfg.job.name} run {ctx.cfg.job.run}")
        if ctx.trained is not None:  # a few MB (the adapter): the next run with these inputs starts at the export
            ctx.trained.store(ctx.cfg.job.model_dump(mode="json", include={"namespace", "name", "uid", "run"})
                              | {"outputUri": ctx.cfg.output_uri})

    ctx.aside.append(_ASIDE.submit(after_training))
    _timed(ctx, "train", t0)
    return result


def restore_trained(ctx: Context) -> bool:
    """Rank 0 looks the training inputs up in the training cache; every rank learns whether it hit."""
    cache = ctx.cache("trained") if ctx.world.main else None
    return bool(distributed.agree(cache is not None and _lookup_trained(ctx, cache), pick=max))


def _lookup_trained(ctx: Context, cache: S3Cache) -> bool:
    t0 = time.monotonic()
    model = trained_cache.weights_identity(ctx.base.source, ctx.base.revision)
    if model is None:
        ctx.caches["training"] = "off: a Hub model without a pinned commit (baseModel.revision) can change"
        return False
    inputs = trained_cache.key_inputs(
        model=model, dataset_dir=ctx.wd.dataset, training=ctx.spec.training, versions=compile_cache.versions(),
        device=compile_cache.gpu(), world_size=ctx.world.size, backend=model_loading.backend())
    ctx.trained = trained_cache.TrainedCache(cache, ctx.wd, inputs, run=(ctx.cfg.job.uid, ctx.cfg.job.run))
    hit = ctx.trained.restore().hit
    ctx.caches.update(ctx.trained.report())
    ctx.timings["trainingCacheLookupSeconds"] = round(time.monotonic() - t0, 2)
    return hit


def restore_compile_cache(ctx: Context, training) -> None:
    """On GPU: the compile caches for this model, shapes, versions and GPU, from S3 (train/compile_cache.py)."""
    import torch

    cache = ctx.cache("compile")
    if cache is None or not torch.cuda.is_available():
        return
    if os.environ.get(ENV_COMPILE_CACHE, "on").lower() in ("off", "0", "false"):
        ctx.caches["compile"] = f"off ({ENV_COMPILE_CACHE}=off)"
        return
    t0 = time.monotonic()
    dirs = compile_cache.use_dirs(compile_cache.default_root())
    inputs = compile_cache.key_inputs(
        compile_cache.model_identity(ctx.base.source, ctx.base.revision), training,
        backend=model_loading.backend(), padding_free=training.padding_free, versions=compile_cache.versions(),
        gpu=compile_cache.gpu(), env=compile_cache.switches(model_loading.trainer_env(ctx.base)))
    ctx.compile = compile_cache.CompileCache(cache, dirs, inputs, ctx.wd.root)
    if ctx.pool is not None and ctx.compile.key in _COMPILED_HERE:  # a warm trainer's: the folders hold it
        ctx.compile.lookup = lookup = Lookup(True, "in this process (warm trainer)")
    else:
        lookup = ctx.compile.restore()
        if lookup.hit:  # before the model loads: its first compilation then finds them
            ctx.compile.artifacts = compile_cache.load_artifacts(dirs)
    _COMPILED_HERE.add(ctx.compile.key)
    ctx.caches.update(ctx.compile.report())
    ctx.timings["compileCacheRestoreSeconds"] = round(time.monotonic() - t0, 2)
    ctx.reporter.message(f"compile cache {lookup.label} ({lookup.reason}"
                         f"{f'; torch.compile artifacts {ctx.compile.artifacts}' if lookup.hit else ''})")


# Compile-cache keys this process restored or compiled (its folders hold them): a warm trainer's next run
# of the same key neither fetches nor stores them again.
_COMPILED_HERE: set[str] = set()


def stage_tokenizer_files(ctx: Context) -> None:
    """While the model trains: the merged folder's tokenizer files, for the warm converter to parse
    ahead. Best effort: where it fails, merge writes them itself, as it always did."""
    try:
        convert.stage_tokenizer_files(ctx.base, ctx.tokenizer, ctx.template, ctx.wd.tokenizer_ahead)
    except Exception as e:  # noqa: BLE001 - an optimisation; the export reports a real failure itself
        log.warning("tokenizer files not written ahead (%s: %s); the export writes them", type(e).__name__, e)


def stage_export(ctx: Context) -> tuple[dict[str, Path], dict[str, dict]]:
    t0 = time.monotonic()
    spec = ctx.spec.export
    ctx.reporter.stage(Phase.EXPORTING.value, f"merging and converting to {', '.join(spec.gguf)}")
    name = ctx.cfg.job.name
    if ctx.done("export"):
        files = {q: ctx.wd.gguf / f"{name}-{q}.gguf" for q in spec.gguf}
        return files, ctx.read_json(ctx.wd.gguf / "parity.json", "export-gguf")
    if not (ctx.wd.adapter / "adapter_config.json").exists():
        raise ConfigError("MissingStageOutput", f"no adapter in {ctx.wd.adapter}: run the train stage first")
    files, parity_results = restore_exports(ctx)  # types an earlier run made from this very adapter
    todo = [q for q in spec.gguf if q not in files]
    steps: dict[str, float] = {}
    if todo or spec.merged_safetensors:
        rows = parity.usable_rows([list(r["input_ids"]) for r in load_split(ctx.wd.dataset, "parity")]
                                  [: spec.parity_samples]) if spec.parity_check and todo else []
        reference: list = []  # the merged model's predictions on those rows, while it is still in memory
        merge_parts: dict[str, float] = {}
        converting: list[Future] = []
        t_merge = time.monotonic()

        def convert_meanwhile(merged_dir: Path) -> None:  # the folder is on disk: the converter starts
            steps["merge"] = round(time.monotonic() - t_merge, 2)
            steps.update({f"merge.{k}": v for k, v in merge_parts.items()})
            converting.append(pool.submit(convert.export, merged_dir, ctx.wd.gguf, todo, name, ctx.template,
                                          spec.ollama_modelfile, warm=ctx.converter))

        def predict(model) -> None:  # on the GPU, while the converter and quantizer use the CPUs
            t = time.monotonic()
            reference.extend(parity.reference_of(model, rows))
            steps["parityReference"] = round(time.monotonic() - t, 2)

        # A failure in the reference still waits for the conversion thread before it propagates.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert") as pool:
            merged = convert.merge(ctx.base, ctx.wd.adapter, ctx.wd.merged, ctx.tokenizer, ctx.template,
                                  with_model=predict if rows else None, on_saved=convert_meanwhile,
                                  seconds=merge_parts,
                                  tokenizer_files=ctx.converter.tokenizer_dir if ctx.converter else None)
            result = converting[0].result()
        steps.update(result.seconds)
        files.update(result.gguf)
        if rows and result.gguf:
            ctx.reporter.message("parity check: each GGUF against the merged model on held-out rows")
            t_parity = time.monotonic()
            parity_results.update(parity.check(merged, result.gguf, rows, ref=reference or None))
            steps["parity"] = round(time.monotonic() - t_parity, 2)
    if spec.ollama_modelfile:
        for q in spec.gguf:
            if q not in todo:
                write_modelfile(files[q], ctx.template, name, q)
    files = {q: files[q] for q in spec.gguf}
    # Where the export's time goes (merge, 16-bit convert, each quantization, parity), for the status.
    ctx.timings["exportSteps"] = steps
    ctx.wd.gguf.mkdir(parents=True, exist_ok=True)  # absent where export.gguf is empty (adapter only)
    (ctx.wd.gguf / "parity.json").write_text(json.dumps(parity_results, indent=2))
    ctx.mark("export")
    _timed(ctx, "export", t0)
    return files, parity_results


def restore_exports(ctx: Context) -> tuple[dict[str, Path], dict[str, dict]]:
    """GGUF files of the same adapter from the export cache (export/cache.py), with their parity results.
    Only where the adapter came from the training cache: a freshly trained one has no earlier exports."""
    ctx.exports = None
    if ctx.trained is None or ctx.trained.lookup is None:
        return {}, {}
    cache = ctx.cache("exports")
    if cache is None:
        return {}, {}
    namespace_uri = cache_uri(ctx.cfg.output_uri[5:].split("/", 1)[0], ctx.spec.output.s3.prefix,
                              ctx.cfg.job.namespace).removesuffix(f"{CACHE_DIR}/")
    ctx.exports = export_cache.ExportCache(cache, ctx.store, namespace_uri, ctx.wd.root / ".export-cached")
    files: dict[str, Path] = {}
    parity_results: dict[str, dict] = {}
    if not ctx.trained.lookup.hit:
        return files, parity_results
    ctx.wd.gguf.mkdir(parents=True, exist_ok=True)
    for q in ctx.spec.export.gguf:
        dest = ctx.wd.gguf / f"{ctx.cfg.job.name}-{q}.gguf"
        found = ctx.exports.restore(export_key(ctx, q)[0], q, dest)
        if found is not None and (found or not ctx.spec.export.parity_check):
            files[q] = dest
            if found:
                parity_results[q] = found
        elif found is not None:  # made without the parity check this run asks for: make it again
            dest.unlink()
            ctx.exports.report[q] = "miss: made without a parity check"
    ctx.caches["exports"] = dict(ctx.exports.report)
    if files:
        ctx.reporter.message(f"export cache: {', '.join(files)} from the run that made them")
    return files, parity_results


def export_key(ctx: Context, quant: str) -> tuple[str, dict[str, Any]]:
    return export_cache.entry_key(ctx.trained.key, quant, ctx.cfg.job.name, ctx.template, ctx.spec.export)


def store_exports(ctx: Context, artifacts: list[Artifact]) -> None:
    """Pointers to this run's uploaded GGUF files, for a later run with the same adapter."""
    if ctx.exports is None:
        return
    parity_results = json.loads((ctx.wd.gguf / "parity.json").read_text()) if (ctx.wd.gguf / "parity.json").exists() else {}
    for art in artifacts:
        if art.kind == "gguf" and art.quantization and not ctx.exports.report.get(art.quantization, "").startswith("hit"):
            key, inputs = export_key(ctx, art.quantization)
            ctx.exports.store_pointer(key, inputs, art.wire(), parity_results.get(art.quantization))


def stage_eval(ctx: Context, gguf_files: dict[str, Path]) -> dict[str, Any] | None:
    if ctx.spec.evaluation is None:
        return None
    t0 = time.monotonic()
    ctx.reporter.stage(Phase.EVALUATING.value, f"lm-eval: {', '.join(ctx.spec.evaluation.tasks)}")
    from .evaluation import run_eval  # lm-eval loads only when asked for

    files = dict(gguf_files)
    if ctx.spec.evaluation.include_base:
        files["base"] = base_gguf(ctx)
    results = run_eval(files, ctx.spec.evaluation, ctx.wd.eval, ctx.reporter.work,
                       store=ctx.store if ctx.spec.evaluation.data_uri else None)
    (ctx.wd.root / "eval-metrics.json").write_text(json.dumps(results, indent=2))
    _timed(ctx, "eval", t0)
    return results


def base_gguf(ctx: Context) -> Path:
    """The base model as an f16 GGUF, for the before/after delta against the fine-tuned f16."""
    source = Path(ctx.base.source)
    if not source.is_dir():  # a Hub id: the snapshot from_pretrained already cached
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(ctx.base.source, revision=ctx.base.revision))
    ctx.reporter.message("converting the base model to GGUF f16 for the before/after delta")
    out = convert.export(source, ctx.wd.eval / "base", ["f16"], f"{ctx.cfg.job.name}-base", ctx.template,
                        modelfiles=False)
    return out.gguf["f16"]


def collect_metrics(ctx: Context, report: dict, result: dict, parity_results: dict, eval_results) -> dict[str, Any]:
    metrics = {
        "trainLoss": result.get("train_loss"), "evalLoss": result.get("eval_loss"), "steps": result.get("steps"),
        "totalSteps": result.get("total_steps"), "tokens": result.get("tokens"), "restarts": result.get("restarts"),
        "trainableParameters": result.get("trainable_parameters"), "backend": result.get("backend"),
        "dataset": report.get("rows"), "parity": parity_results or None, "eval": eval_results,
        "timings": dict(ctx.timings), "cache": dict(ctx.caches) or report.get("cache"),
        "batchSize": result.get("batch_size"), "gradientCheckpointing": result.get("gradient_checkpointing"),
        "auto": result.get("auto") or ctx.auto,
    }
    return {k: v for k, v in metrics.items() if v is not None}


def stage_upload(ctx: Context, metrics: dict[str, Any]) -> list[Artifact]:
    """Every artifact, then manifest.json. finish() has announced the stage already."""
    t0 = time.monotonic()
    extra = {"job": ctx.cfg.job.wire(), "baseModel": ctx.spec.base_model.resolved_name(),
             "chatTemplate": ctx.template.name, "parity": metrics.get("parity", {}), "metrics": metrics}
    artifacts = upload_artifacts(ctx.wd, ctx.cfg.output_uri, ctx.store, extra, adapter=ctx.spec.export.adapter,
                                  merged=ctx.spec.export.merged_safetensors, on_file=ctx.reporter.message)
    _timed(ctx, "upload", t0)
    return artifacts


def finish(ctx: Context) -> dict[str, Any]:
    """Metrics from what the stages left in the workdir, the upload, and the final status report."""
    # Uploading from here: the final checkpoint, the training cache's entry and the compile caches may
    # still be on their way to S3, and an S3 outage now must show as this stage, not the one before.
    ctx.reporter.stage(Phase.UPLOADING.value, f"to {ctx.cfg.output_uri}")
    if ctx.checkpoints is not None:  # the final checkpoint is in S3 before the run says it is done
        t0 = time.monotonic()
        ctx.checkpoints.wait()
        ctx.timings["checkpointUploadWaitSeconds"] = round(time.monotonic() - t0, 2)
    if ctx.aside:
        t0 = time.monotonic()
        for work in ctx.aside:  # the loss plot and the training cache's entry: raises what they raised
            work.result()
        ctx.timings["plotAndTrainingCacheWaitSeconds"] = round(time.monotonic() - t0, 2)
    if ctx.trained is not None:
        ctx.caches.update(ctx.trained.report())
    if ctx.compile is not None:
        t0 = time.monotonic()
        ctx.compile.join()
        ctx.timings["compileCacheSaveWaitSeconds"] = round(time.monotonic() - t0, 2)
        ctx.caches.update(ctx.compile.report())
    report = ctx.read_json(ctx.wd.dataset / "report.json", "prepare-dataset")
    result = ctx.read_json(ctx.wd.adapter / "train_result.json", "train")
    parity_results = ctx.read_json(ctx.wd.gguf / "parity.json", "export-gguf")
    eval_results = None
    if ctx.spec.evaluation is not None:
        eval_results = ctx.read_json(ctx.wd.root / "eval-metrics.json", "eval")
    metrics = collect_metrics(ctx, report, result, parity_results, eval_results)
    artifacts = stage_upload(ctx, metrics)
    store_exports(ctx, artifacts)
    metrics["timings"] = dict(ctx.timings)
    ctx.wd.metrics.write_text(json.dumps(metrics, indent=2))
    ctx.reporter.finish(metrics, artifacts)
    log.info("run finished: manifest.json and %d artifacts in %s", len(artifacts), ctx.cfg.output_uri)
    return {"metrics": metrics, "artifacts": [a.wire() for a in artifacts]}


def run(cfg: RunConfig, workdir: Path, resume: bool = False, reporter: Reporter | None = None,
        ahead: prepare_ahead.Ahead | None = None, pool: ModelPool | None = None) -> dict[str, Any]:
    """ahead: the prepare stage already running in a child process (cli.py starts it before the imports).
    pool: a warm trainer's (warm.py): the model it kept from its run before, and keeps for the next."""
    world = distributed.World.from_env()
    if not resume and world.main:  # a run from scratch in a used workdir starts its training log over, too
        Workdir(workdir).train_log.unlink(missing_ok=True)
    ctx = make_context(cfg, workdir, resume, reporter)
    ctx.ahead = ahead
    ctx.pool = pool if world.size == 1 else None
    distributed.init(world)
    try:
        # Fail in seconds, not after hours of training, when the bucket, the credentials, the LoRA
        # targets or the evaluation tasks are wrong.
        ctx.store.check_access(cfg.output_uri)
        if world.main:
            preflight(ctx)
        stage_prepare(ctx)
        if world.main and ctx.spec.export.gguf:
            ctx.converter = convert.WarmConverter(ctx.base.source, ctx.wd.tokenizer_ahead)
            ctx.aside.append(_ASIDE.submit(stage_tokenizer_files, ctx))
        result = stage_train(ctx)
        if not world.main:
            # Wait for rank 0 to export and upload: should it fail, this process fails too, so the
            # Job retries every pod of the run (an Indexed Job would only replace the failed one).
            distributed.barrier()
            return {"rank": world.rank, "steps": result.steps if result is not None else None}
        gguf_files, _ = stage_export(ctx)
        stage_eval(ctx, gguf_files)
        out = finish(ctx)
        distributed.barrier()
        return out
    finally:
        if ctx.converter is not None:  # not needed after all (every type from the export cache), or a failure
            ctx.converter.close()
        ctx.reporter.close()  # the last progress still waiting for the apiserver (a failure's stage, say)
        distributed.shutdown()
