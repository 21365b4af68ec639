"""The MCP server: the seed's four tools and five more, mapped onto FinetuneJobs.

    prepare_dataset   validate and preview a dataset in process (no Job, no GPU)
    finetune_unsloth  create a FinetuneJob                               → run 1
    export_gguf       add a GGUF type to a finished job's export list    → run N+1
    run_eval          set spec.evaluation                                → run N+1
    adjust_and_rerun  a validated spec patch                             → run N+1, run N kept in history
    get_status, list_jobs, get_artifacts, wait (progress notifications: step, loss, ETA)

The operator owns runs: each change of a FinetuneJob's spec starts run N+1, the previous run's record
stays in status.history and its files under run-N/ in S3. A run whose training inputs match an earlier
run's (export_gguf, run_eval: only the export or the evaluation changed) reuses that run's adapter from
the trainer's training cache and starts at the export; any change to training trains again. The tools
say so in what they return.

Parameters carry the API models' bounds and help (fields.py). Arguments are checked before anything is
sent: the tool's own schema first, then the whole spec against FinetuneJobSpec, with messages that name
the field (`epochs (spec.training.epochs): Input should be greater than 0`); the apiserver's admission
checks the same again and its message is passed on.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.types import ToolAnnotations
from pydantic import Field, ValidationError

from finetune_api.spec import (
    ConfigMapKeyRef,
    DatasetFormat,
    DatasetSpec,
    EvaluationSpec,
    ExportSpec,
    GgufQuant,
    LoraSpec,
    ResourcesSpec,
    RunPolicySpec,
    TrainingSpec,
)
from finetune_api.status import Phase

from . import datasets, jobs, views
from .cluster import Cluster, ClusterError
from .config import McpConfig
from .fields import like

INSTRUCTIONS = """\
Fine-tunes small LLMs on Kubernetes through FinetuneJobs (finetune.dev/v1alpha1). Typical flow:
prepare_dataset to check the data, finetune_unsloth to start run 1, wait (it streams step, loss and
ETA) until Succeeded, get_artifacts for the GGUF files in S3. export_gguf, run_eval and
adjust_and_rerun change the spec, and every spec change makes the operator start a new run (run N+1,
trained again) while run N stays in status.history. Secrets are only ever named (an S3 credentials
Secret for output), never read."""

Job = Annotated[str, Field(description="Name of the FinetuneJob.", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                           max_length=253)]
Namespace = Annotated[str | None, Field(
    None, description="Namespace of the FinetuneJob; default: this server's default namespace. Only the "
                      "namespaces this server allows are accepted.", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    max_length=63)]
Quant = Annotated[GgufQuant | list[GgufQuant] | None, Field(
    None, description=f"{ExportSpec.model_fields['gguf'].description} One type or a list. Default: ['q4_k_m'].")]
BaseModelArg = Annotated[str | None, Field(
    None, max_length=1024, description=(
        "The model to fine-tune: a Hugging Face repo id (unsloth/gemma-3-270m-it), Ollama-style gemma3:270m, or "
        "s3://bucket/path, a path or a .gguf file where the weights are (spec.baseModel.uri). "
        f"Default: {jobs.DEFAULT_BASE_MODEL}."))]
TrainingMethod = TrainingSpec.model_fields["method"].annotation
READ_ONLY = ToolAnnotations(readOnlyHint=True, openWorldHint=False)
CREATES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=False)
# A spec change stops the current run's Job if it still runs (its record and files are kept).
CHANGES = ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=False, openWorldHint=False)


class FinetuneMCP(MCPServer):
    """MCPServer whose argument errors name the FinetuneJob field, and which refuses unknown arguments
    (the SDK would silently drop a misspelt one, e.g. `epoch`)."""

    def __init__(self, tools: list[Tool]):
        self.arg_names = {t.name: set(t.parameters.get("properties", {})) for t in tools}
        for tool in tools:
            tool.parameters["additionalProperties"] = False
        super().__init__(name="finetune-operator", title="finetune-operator", instructions=INSTRUCTIONS,
                         version="0.1.0", tools=tools)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        unknown = sorted(set(arguments) - self.arg_names.get(name, set(arguments)))
        if unknown:
            raise ToolError(f"Error executing tool {name}: unknown argument(s) {', '.join(unknown)}; {name} takes "
                            f"{', '.join(sorted(self.arg_names[name]))}. Nothing was created or changed.")
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(f"Error executing tool {name}: {jobs.argument_errors(exc.__cause__)}. "
                                "Nothing was created or changed.") from exc.__cause__
            raise


EXPECTED = (jobs.InvalidArguments, ClusterError, datasets.Unavailable)


def _tool_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What the caller can act on becomes a ToolError with its message; the SDK hides any other text."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(*args: Any, **kw: Any) -> Any:
            try:
                return await fn(*args, **kw)
            except EXPECTED as exc:
                raise ToolError(str(exc)) from exc
        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except EXPECTED as exc:
            raise ToolError(str(exc)) from exc
    return run


class Tools:
    """The tool bodies, bound to one configuration and one cluster client."""

    def __init__(self, config: McpConfig, cluster: Cluster, sleep: Callable[[float], None] = time.sleep):
        self.config, self.cluster, self.sleep = config, cluster, sleep

    # -- helpers ---------------------------------------------------------------------------------------

    def namespace(self, namespace: str | None) -> str:
        ns = namespace or self.config.default_namespace
        if not self.config.allows(ns):
            raise jobs.InvalidArguments(f"namespace: {ns!r} is not one this server allows "
                                        f"({', '.join(self.config.namespaces)}); nothing was created or changed")
        return ns

    def await_pickup(self, namespace: str, name: str, run_at_least: int) -> dict[str, Any]:
        """The object once the operator has acted on its latest spec (or as it is when time runs out)."""
        deadline = time.monotonic() + self.config.pickup_seconds
        while True:
            obj = self.cluster.get(namespace, name)
            if views.picked_up(obj) and ((obj.get("status") or {}).get("run") or 0) >= run_at_least:
                return obj
            if (obj.get("status") or {}).get("reason") == "InvalidSpec" and views.picked_up(obj):
                return obj
            if time.monotonic() >= deadline:
                return obj
            self.sleep(min(0.5, self.config.poll_seconds))

    def started(self, obj: dict[str, Any], expected_run: int, what: str) -> dict[str, Any]:
        status = obj.get("status") or {}
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        out = {"name": name, "namespace": ns, "run": expected_run, "phase": status.get("phase") or "Pending"}
        if views.picked_up(obj) and (status.get("run") or 0) >= expected_run:
            out["run"] = status["run"]
            out["message"] = f"{what}; the operator started run {status['run']} (Job {status.get('jobName')})."
        elif views.picked_up(obj) and status.get("phase") == Phase.FAILED:
            out["message"] = f"{what}; the operator refused it: {status.get('reason')}: {status.get('message')}"
        else:
            out["message"] = (f"{what}; the operator has not started run {expected_run} yet (it starts it on its "
                              "next reconcile; if this persists, check that it runs and watches this namespace).")
        out["next"] = f"wait(job='{name}', namespace='{ns}') streams progress until run {out['run']} finishes."
        return out

    def change_spec(self, namespace: str, name: str, obj: dict[str, Any], new_spec: dict[str, Any],
                    what: str) -> dict[str, Any]:
        patch = jobs.rerun_patch(obj.get("spec") or {}, new_spec)
        previous = (obj.get("status") or {}).get("run") or 0
        self.cluster.patch_spec(namespace, name, patch, obj["metadata"]["resourceVersion"])
        out = self.started(self.await_pickup(namespace, name, previous + 1), previous + 1, what)
        out["previousRun"] = previous
        out["specPatch"] = patch
        if previous:
            out["history"] = (f"run {previous} is kept in status.history, its files under run-{previous}/ in S3; "
                              f"run {previous + 1} trains with the new spec unless its training inputs are those "
                              "of an earlier run (then it reuses that run's adapter: status.metrics.cache).")
        return out

    # -- the tools -------------------------------------------------------------------------------------

    def prepare_dataset(
        self,
        source: Annotated[str | None, like(DatasetSpec, "source")] = None,
        config_map: Annotated[ConfigMapKeyRef | None, Field(
            None, description="Rows in a ConfigMap key (JSON Lines or a JSON array), read with the caller's "
                              "identity from `namespace`. Set this or source.")] = None,
        split: Annotated[str | None, like(DatasetSpec, "split")] = None,
        format: Annotated[DatasetFormat | None, like(DatasetSpec, "format")] = None,
        base_model: Annotated[str | None, Field(None, max_length=1024, description=(
            "Model whose tokenizer and chat template measure the rows in tokens (a local model folder or a "
            "Hugging Face id in the cache); without one, or where it cannot be loaded, lengths are in "
            "characters."))] = None,
        max_seq_length: Annotated[int | None, like(TrainingSpec, "max_seq_length")] = None,
        preview_rows: Annotated[int, Field(3, ge=0, le=20, description="Normalized rows to show.")] = 3,
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """Validate and preview a dataset before training: the format detected (alpaca, sharegpt, messages,
        prompt-completion, text), rows read and usable, malformed rows with their row numbers and why, and
        length percentiles (tokens with the base model's tokenizer, else characters). Runs in the MCP server's
        process with the trainer's own readers; nothing is created in the cluster."""
        if (source is None) == (config_map is None):
            raise jobs.InvalidArguments("source, config_map: set exactly one of them (spec.dataset.source or "
                                        "spec.dataset.configMapRef)")
        spec = jobs.validate_spec({"dataset": jobs.prune({
            "source": source, "configMapRef": config_map.model_dump() if config_map else None, "split": split,
            "format": format})}).dataset
        training = TrainingSpec(**({"max_seq_length": max_seq_length} if max_seq_length else {}))
        text = None
        if config_map is not None:
            text = self.cluster.config_map_key(self.namespace(namespace), config_map.name, config_map.key)
        report = datasets.preview(spec, training, base_model=jobs.resolve_base_model(base_model),
                                  config_map_text=text, allow_local_paths=self.config.allow_local_paths,
                                  s3_endpoint=self.config.s3_endpoint, preview_rows=preview_rows)
        report["datasetSpec"] = spec.wire(exclude_defaults=True) | ({"format": report["format"]})
        return report

    def finetune_unsloth(
        self,
        base_model: BaseModelArg = None,
        dataset: Annotated[str | None, like(DatasetSpec, "source")] = None,
        epochs: Annotated[float | None, like(TrainingSpec, "epochs", description=(
            "Passes over the data. Set this or max_steps; neither means 1 epoch."))] = None,
        learning_rate: Annotated[float | None, like(TrainingSpec, "learning_rate")] = None,
        lora_r: Annotated[int | None, like(LoraSpec, "r")] = None,
        quant: Quant = None,
        namespace: Namespace = None,
        name: Annotated[str | None, Field(None, max_length=jobs.NAME_MAX, description=(
            "Name of the new FinetuneJob; default: generated from the model's name."))] = None,
        dataset_config_map: Annotated[ConfigMapKeyRef | None, Field(
            None, description="Training rows from a ConfigMap key instead of dataset (small sets).")] = None,
        split: Annotated[str | None, like(DatasetSpec, "split")] = None,
        dataset_format: Annotated[DatasetFormat | None, like(DatasetSpec, "format")] = None,
        max_samples: Annotated[int | None, like(DatasetSpec, "max_samples")] = None,
        max_steps: Annotated[int | None, like(TrainingSpec, "max_steps")] = None,
        method: Annotated[TrainingMethod | None, like(TrainingSpec, "method")] = None,
        batch_size: Annotated[int | None, like(TrainingSpec, "batch_size")] = None,
        max_seq_length: Annotated[int | None, like(TrainingSpec, "max_seq_length")] = None,
        gpus: Annotated[int | None, like(ResourcesSpec, "gpus")] = None,
        keep_warm_seconds: Annotated[int | None, like(RunPolicySpec, "keep_warm_seconds", description=(
            "Keep the trainer this many seconds after each run, so that adjust_and_rerun's next run starts "
            "in seconds on it (no new pod, imports, model load or compile); it holds its GPU meanwhile."))] = None,
        s3_bucket: Annotated[str | None, Field(None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", description=(
            "Bucket for the artifacts (spec.output.s3.bucket); default: the operator's.")) ] = None,
        s3_credentials_secret: Annotated[str | None, Field(
            None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=253, description=(
                "Name of a Secret in the namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the "
                "upload; only its name is written, the trainer reads it. Default: the operator's."))] = None,
        spec_overrides: Annotated[dict[str, Any] | None, Field(None, description=(
            "Any other FinetuneJob spec fields, camelCase as in kubectl, merged over what the other arguments "
            "set (JSON merge patch), e.g. {\"resources\": {\"gpus\": 0}, \"export\": {\"paritySamples\": 4}}. "
            "Checked against the FinetuneJob schema."))] = None,
    ) -> dict[str, Any]:
        """Fine-tune a model with Unsloth LoRA/QLoRA and export GGUF to S3: creates a FinetuneJob, which the
        operator runs as run 1 (prepare, train, export each GGUF type, evaluate if asked, upload). Returns
        its name and run; follow it with wait, then get_artifacts."""
        ns = self.namespace(namespace)
        manifest = jobs.finetunejob(
            name=name, base_model=jobs.resolve_base_model(base_model), dataset=dataset,
            dataset_config_map=dataset_config_map.model_dump() if dataset_config_map else None, split=split,
            dataset_format=dataset_format, max_samples=max_samples, epochs=epochs, max_steps=max_steps,
            learning_rate=learning_rate, lora_r=lora_r, method=method, batch_size=batch_size,
            max_seq_length=max_seq_length, quant=quant, gpus=gpus, s3_bucket=s3_bucket,
            s3_credentials_secret=s3_credentials_secret, spec_overrides=spec_overrides,
            keep_warm_seconds=keep_warm_seconds,
            labels={"app.kubernetes.io/created-by": "finetune-mcp"})
        created = self.cluster.create(ns, manifest)
        name = created["metadata"]["name"]
        out = self.started(self.await_pickup(ns, name, 1), 1, f"FinetuneJob {ns}/{name} created")
        out["spec"] = created.get("spec")
        return out

    def export_gguf(
        self,
        job: Job,
        quantization: Annotated[GgufQuant, Field(description="llama.cpp quantization type to add to the job's "
                                                             "export list (spec.export.gguf).")],
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """Add a GGUF quantization to a finished FinetuneJob. A FinetuneJob's exports are part of its spec, so
        this patches spec.export.gguf and the operator starts run N+1, which reuses run N's adapter (the
        training cache: no training steps) and exports every listed type; run N and its files stay as they are. A type already exported is returned as is."""
        ns = self.namespace(namespace)
        obj = self.cluster.get(ns, job)
        status = obj.get("status") or {}
        phase = status.get("phase") or "Pending"
        spec = obj.get("spec") or {}
        changes = jobs.export_changes(spec, quantization)
        if changes is None:
            arts = views.artifacts(obj)
            if quantization in arts["gguf"]:
                return {"name": job, "namespace": ns, "run": status.get("run"), "quantization": quantization,
                        "uri": arts["gguf"][quantization],
                        "message": f"run {status.get('run')} already exported {quantization}; nothing changed."}
            raise jobs.InvalidArguments(
                f"quantization: {quantization} is already in spec.export.gguf of {ns}/{job} (run "
                f"{status.get('run')} is {phase}); wait for the run, or use adjust_and_rerun to change the spec")
        if not views.finished(obj):
            raise jobs.InvalidArguments(
                f"job: run {status.get('run') or 1} of {ns}/{job} is still {phase}; export_gguf adds to a finished "
                "run. Wait for it (wait), or use adjust_and_rerun to restart now with the new export list")
        new_spec = jobs.merge(spec, changes)
        out = self.change_spec(ns, job, obj, new_spec, f"spec.export.gguf of {ns}/{job} is now "
                               f"{new_spec['export']['gguf']}")
        out["note"] = ("Run N+1 reuses run N's adapter from the training cache (status.metrics.cache.trainedBy) "
                       "instead of training again, then exports every listed type.")
        return out

    def run_eval(
        self,
        job: Job,
        tasks: Annotated[list[str], like(EvaluationSpec, "tasks", required=True)],
        limit: Annotated[int | None, like(EvaluationSpec, "limit")] = None,
        num_fewshot: Annotated[int | None, like(EvaluationSpec, "num_fewshot")] = None,
        data_uri: Annotated[str | None, like(EvaluationSpec, "data_uri")] = None,
        quantizations: Annotated[list[GgufQuant] | None, like(EvaluationSpec, "quantizations")] = None,
        include_base: Annotated[bool | None, like(EvaluationSpec, "include_base")] = None,
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """Evaluate a finished FinetuneJob's GGUF files with lm-evaluation-harness tasks (e.g. mmlu, hellaswag,
        arc_easy): sets spec.evaluation, so the operator starts run N+1, which reuses run N's adapter (the training
        cache: no training steps), exports and scores each GGUF in process through llama.cpp. The scores land in status.metrics.eval (get_status)."""
        ns = self.namespace(namespace)
        obj = self.cluster.get(ns, job)
        status = obj.get("status") or {}
        if not views.finished(obj):
            raise jobs.InvalidArguments(
                f"job: run {status.get('run') or 1} of {ns}/{job} is still {status.get('phase') or 'Pending'}; "
                "run_eval evaluates a finished run. Wait for it (wait), or use adjust_and_rerun with "
                "changes={'evaluation': {...}} to restart now")
        evaluation = jobs.evaluation(tasks=tasks, limit=limit, num_fewshot=num_fewshot, data_uri=data_uri,
                                     quantizations=quantizations, include_base=include_base)
        out = self.change_spec(ns, job, obj, jobs.with_evaluation(obj.get("spec") or {}, evaluation),
                               f"spec.evaluation of {ns}/{job} set to tasks {evaluation['tasks']}")
        out["note"] = ("Run N+1 reuses run N's adapter from the training cache (status.metrics.cache.trainedBy) "
                       "instead of training again, exports, then evaluates; read the scores with get_status once "
                       "wait reports Succeeded.")
        return out

    def adjust_and_rerun(
        self,
        job: Job,
        epochs: Annotated[float | None, like(TrainingSpec, "epochs", description=(
            "New number of passes over the data (replaces max_steps)."))] = None,
        learning_rate: Annotated[float | None, like(TrainingSpec, "learning_rate")] = None,
        lora_r: Annotated[int | None, like(LoraSpec, "r")] = None,
        max_steps: Annotated[int | None, like(TrainingSpec, "max_steps", description=(
            "New number of optimizer steps (replaces epochs)."))] = None,
        batch_size: Annotated[int | None, like(TrainingSpec, "batch_size")] = None,
        max_seq_length: Annotated[int | None, like(TrainingSpec, "max_seq_length")] = None,
        quant: Quant = None,
        changes: Annotated[dict[str, Any] | None, Field(None, description=(
            "Any spec changes as a JSON merge patch, camelCase as in kubectl (null removes a field), e.g. "
            "{\"training\": {\"warmupRatio\": 0.1}, \"dataset\": {\"maxSamples\": 1000}}. Applied first; the "
            "other arguments win."))] = None,
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """Change a FinetuneJob's spec and run it again: the patch is checked against the FinetuneJob schema,
        then the operator starts run N+1 (stopping run N's Job if it still runs) and keeps run N's record in
        status.history and its files under run-N/ in S3."""
        ns = self.namespace(namespace)
        patch = jobs.training_changes(epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
                                      lora_r=lora_r, batch_size=batch_size, max_seq_length=max_seq_length,
                                      quant=quant, changes=changes)
        obj = self.cluster.get(ns, job)
        was = (obj.get("status") or {}).get("phase")
        out = self.change_spec(ns, job, obj, jobs.merge(obj.get("spec") or {}, patch), f"{ns}/{job} patched")
        if was and not Phase(was).finished:
            out["note"] = f"run {out['previousRun']} was still {was}: it was stopped and recorded as superseded."
        return out

    def get_status(self, job: Job, namespace: Namespace = None) -> dict[str, Any]:
        """A FinetuneJob's phase, run, live progress (step, loss, tokens/s, ETA), conditions, metrics
        (train and eval loss, GGUF parity, evaluation scores) and earlier runs."""
        return views.summary(self.cluster.get(self.namespace(namespace), job))

    def list_jobs(self, namespace: Namespace = None) -> dict[str, Any]:
        """FinetuneJobs with phase, run and progress: in `namespace`, or in every namespace this server allows."""
        if namespace:
            spaces = [self.namespace(namespace)]
        elif "*" in self.config.namespaces:
            spaces = [None]
        else:
            spaces = list(self.config.namespaces)
        rows = [views.list_row(obj) for ns in spaces for obj in self.cluster.list(ns)]
        return {"jobs": sorted(rows, key=lambda r: (r["namespace"], r["name"])), "namespaces": spaces}

    def get_artifacts(
        self, job: Job, namespace: Namespace = None,
        run: Annotated[int | None, Field(None, ge=1, description="Run number; default the current run.")] = None,
    ) -> dict[str, Any]:
        """A run's artifacts in S3 (GGUF files per quantization, adapter, Modelfile, manifest, evaluation),
        each with its s3:// URI, size and SHA-256."""
        return views.artifacts(self.cluster.get(self.namespace(namespace), job), run)

    async def wait(
        self,
        job: Job,
        ctx: Context,
        namespace: Namespace = None,
        timeout_seconds: Annotated[float, Field(600, gt=0, le=86400, description=(
            "Give up waiting after this many seconds (the run goes on); call wait again to keep waiting."))] = 600,
        run: Annotated[int | None, Field(None, ge=1, description=(
            "Run to wait for; default: the run of the job's latest spec."))] = None,
    ) -> dict[str, Any]:
        """Wait for a FinetuneJob's run to finish, sending MCP progress notifications as it goes (stage, step,
        loss, tokens/s, ETA). Returns the final status; on timeout, the status so far with finished=false."""
        ns = self.namespace(namespace)
        tracker = views.ProgressTracker()
        deadline = anyio.current_time() + timeout_seconds
        while True:
            obj = await anyio.to_thread.run_sync(self.cluster.get, ns, job)
            status = obj.get("status") or {}
            current = status.get("run") or 0
            if run is not None and current > run:  # superseded while we waited: report what it ended as
                entry = next((h for h in status.get("history") or [] if h.get("run") == run), {})
                return {**views.ref(obj), "finished": True, "run": run, "phase": entry.get("phase"),
                        "supersededBy": current, "history": views.history_entry(entry) if entry else None}
            ours = run is None or current == run
            if ours and views.picked_up(obj):
                update = tracker.update(status)
                if update:
                    await ctx.report_progress(update[0], 100, update[1])
                if views.finished(obj):
                    return {**views.summary(obj), "finished": True}
            if anyio.current_time() >= deadline:
                return {**views.summary(obj), "finished": False,
                        "message": f"still {status.get('phase') or 'Pending'} after {timeout_seconds:g} s "
                                   f"({views.progress_line(status)}); the run goes on, call wait again"}
            await anyio.sleep(self.config.poll_seconds)


TOOL_NAMES = ("prepare_dataset", "finetune_unsloth", "export_gguf", "run_eval", "adjust_and_rerun", "get_status",
              "list_jobs", "get_artifacts", "wait")
ANNOTATIONS = {"prepare_dataset": READ_ONLY, "finetune_unsloth": CREATES, "export_gguf": CHANGES,
               "run_eval": CHANGES, "adjust_and_rerun": CHANGES, "get_status": READ_ONLY, "list_jobs": READ_ONLY,
               "get_artifacts": READ_ONLY, "wait": READ_ONLY}


def build(config: McpConfig, cluster: Cluster) -> FinetuneMCP:
    impl = Tools(config, cluster)
    tools = [Tool.from_function(_tool_errors(getattr(impl, name)), name=name, annotations=ANNOTATIONS[name],
                                structured_output=True)
             for name in TOOL_NAMES]
    return FinetuneMCP(tools)
