"""The MCP server (finetune_mcp) driven by the official SDK's own client.

- Without a cluster: the tools' input schemas carry the API models' bounds and help; bad arguments are
  refused naming the field, before anything reaches the apiserver; the pure builders and the progress
  tracker; the server's security settings.
- On the real local stack (apiserver, operator, pod runner, SeaweedFS S3, tiny Gemma 3): the seed's
  three prompts as tool calls over stdio — "Fine-tune ... for 2 epochs and export q4_k_m" (GGUF in S3),
  "Benchmark the new model" (evaluation metrics), "Adjust to 4 epochs and lower LR to 1e-5" (a re-run
  with history) — with progress notifications from `wait`; and a lighter pass over streamable HTTP
  with its bearer token.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from finetune_api.spec import GGUF_QUANT_TYPES, EvaluationSpec, FinetuneJobSpec, TrainingSpec
from finetune_mcp import config, jobs, server, views
from finetune_mcp.cluster import ClusterError

pytest_plugins = ["operator_fixtures"]

TASKS_DIR = Path(__file__).parent / "data" / "eval"
RUNNER = {"finetune.dev/local-runner": "true"}
ROWS = [{"instruction": f"Say the word number {i}.", "output": f"Word {i}: kestrel."} for i in range(8)]
TOOLS = {"prepare_dataset", "finetune_unsloth", "export_gguf", "run_eval", "adjust_and_rerun", "get_status",
         "list_jobs", "get_artifacts", "wait"}


class RecordingCluster:
    """Stands in for the apiserver where only what the server would send matters."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict]] = []
        self.patched: list[tuple[str, str, dict]] = []

    def create(self, namespace: str, body: dict) -> dict:
        self.created.append((namespace, body))
        return {**body, "metadata": {**body["metadata"], "name": body["metadata"].get("name", "x"),
                                     "namespace": namespace, "generation": 1, "resourceVersion": "1"}}

    def get(self, namespace: str, name: str) -> dict:
        for ns, body in self.created:  # as created, never reconciled: no status
            if ns == namespace and body["metadata"].get("name", "x") == name:
                return {**body, "metadata": {**body["metadata"], "name": name, "namespace": ns, "generation": 1}}
        raise ClusterError(f"FinetuneJob {namespace}/{name}: not found")

    def patch_spec(self, *args: Any) -> dict:
        self.patched.append(args)
        raise AssertionError("no patch expected")


def in_process(cluster: Any = None, **cfg: Any):
    from mcp import Client

    settings = {"namespaces": ("team-a",), "default_namespace": "team-a", "pickup_seconds": 0.1} | cfg
    return Client(server.build(config.McpConfig(**settings), cluster or RecordingCluster()))


def call(client, name: str, args: dict[str, Any], **kw: Any):
    return client.call_tool(name, args, **kw)


# ----------------------------------------------------------------------------- without a cluster


def test_tool_schemas_come_from_the_api_models() -> None:
    async def go() -> dict[str, Any]:
        async with in_process() as client:
            return {t.name: t for t in (await client.list_tools()).tools}

    tools = anyio.run(go)
    assert set(tools) == TOOLS
    ft = tools["finetune_unsloth"].input_schema
    assert ft["additionalProperties"] is False
    epochs = next(s for s in ft["properties"]["epochs"]["anyOf"] if s["type"] == "number")
    api_epochs = next(s for s in TrainingSpec.model_json_schema()["properties"]["epochs"]["anyOf"] if s["type"] == "number")
    assert (epochs["exclusiveMinimum"], epochs["maximum"]) == (api_epochs["exclusiveMinimum"], api_epochs["maximum"])
    lr = ft["properties"]["learning_rate"]
    assert lr["description"].startswith(TrainingSpec.model_fields["learning_rate"].description.rstrip("."))
    assert "Default: 0.0002" in lr["description"]
    quant_enum = next(s for s in ft["properties"]["quant"]["anyOf"] if s.get("type") == "string")["enum"]
    assert tuple(quant_enum) == GGUF_QUANT_TYPES
    ev = tools["run_eval"].input_schema
    assert set(ev["required"]) == {"job", "tasks"}
    assert ev["properties"]["tasks"]["description"] == EvaluationSpec.model_fields["tasks"].description
    assert tools["get_status"].annotations.read_only_hint is True
    assert tools["adjust_and_rerun"].annotations.destructive_hint is True


@pytest.mark.parametrize(("args", "message"), [
    ({"quant": "q9_k"}, "quant (spec.export.gguf): unknown quantization 'q9_k'; known: f32"),
    ({"epochs": -1}, "epochs (spec.training.epochs): Input should be greater than 0"),
    ({"namespace": "kube-system"}, "namespace: 'kube-system' is not one this server allows (team-a)"),
    ({"epoch": 2}, "unknown argument(s) epoch"),
    ({"learning_rate": 2}, "learning_rate (spec.training.learningRate): Input should be less than or equal to 1"),
    ({"method": "qlora", "gpus": 0}, "spec: training.method qlora needs resources.gpus >= 1"),
    ({"epochs": 2, "max_steps": 5}, "spec.training: training: set only one of epochs and maxSteps"),
    ({"spec_overrides": {"training": {"lora": {"rank": 8}}}}, "spec.training.lora.rank: Extra inputs are not permitted"),
    ({"name": "Has_Caps"}, "name (metadata.name): 'Has_Caps' must be a DNS label"),
], ids=["unknown-quant", "negative-epochs", "foreign-namespace", "misspelt-argument", "lr-too-high",
        "qlora-on-cpu", "epochs-and-steps", "unknown-spec-field", "bad-name"])
def test_bad_arguments_are_refused_naming_the_field(args: dict[str, Any], message: str) -> None:
    cluster = RecordingCluster()

    async def go():
        async with in_process(cluster) as client:
            return await call(client, "finetune_unsloth", {"base_model": "gemma3:270m", "dataset": "yahma/alpaca-cleaned",
                                                           "gpus": 1, **args})

    result = anyio.run(go)
    assert result.is_error, result.content[0].text
    assert message in result.content[0].text, result.content[0].text
    assert cluster.created == []


def test_finetune_unsloth_writes_only_what_was_asked() -> None:
    cluster = RecordingCluster()

    async def go():
        async with in_process(cluster) as client:
            return await call(client, "finetune_unsloth", {
                "base_model": "Gemma3:270M", "dataset": "yahma/alpaca-cleaned", "epochs": 2, "quant": "q4_k_m",
                "s3_credentials_secret": "s3-credentials"})

    result = anyio.run(go)
    assert not result.is_error, result.content[0].text
    ((ns, body),) = cluster.created
    assert ns == "team-a" and body["metadata"]["generateName"] == "gemma-3-270m-it-"
    assert body["spec"] == {"baseModel": {"name": "unsloth/gemma-3-270m-it"}, "dataset": {"source": "yahma/alpaca-cleaned"},
                            "training": {"epochs": 2.0}, "export": {"gguf": ["q4_k_m"]},
                            "output": {"s3": {"credentialsSecretRef": {"name": "s3-credentials"}}}}
    FinetuneJobSpec.model_validate(body["spec"])
    assert "has not started run 1 yet" in result.structured_content["message"]  # nothing reconciles here


def test_finetune_unsloth_can_keep_its_trainer_warm_for_the_agents_next_run() -> None:
    cluster = RecordingCluster()

    async def go():
        async with in_process(cluster) as client:
            ok = await call(client, "finetune_unsloth", {"dataset": "d", "keep_warm_seconds": 600})
            too_long = await call(client, "finetune_unsloth", {"dataset": "d", "keep_warm_seconds": 99_999})
            return ok, too_long

    ok, too_long = anyio.run(go)
    assert not ok.is_error, ok.content[0].text
    ((_, body),) = cluster.created
    assert body["spec"]["runPolicy"] == {"keepWarmSeconds": 600}
    assert too_long.is_error and "keep_warm_seconds" in too_long.content[0].text


class FinishedJobCluster:
    """One Succeeded FinetuneJob (run 1, q4_k_m exported); a spec patch is picked up as run 2 at once."""

    def __init__(self) -> None:
        self.patches: list[tuple[dict, str]] = []
        self.obj = {
            "metadata": {"name": "seed", "namespace": "team-a", "generation": 1, "resourceVersion": "7"},
            "spec": {"dataset": {"source": "d"}, "training": {"epochs": 2}, "export": {"gguf": ["q4_k_m"]}},
            "status": {"run": 1, "phase": "Succeeded", "observedGeneration": 1, "jobName": "seed-r1",
                       "artifacts": [{"name": "gguf/seed-q4_k_m.gguf", "kind": "gguf", "quantization": "q4_k_m",
                                      "uri": "s3://b/finetune/team-a/seed/run-1/gguf/seed-q4_k_m.gguf",
                                      "sizeBytes": 1, "sha256": "0" * 64}]}}

    def get(self, namespace: str, name: str) -> dict:
        return self.obj

    def patch_spec(self, namespace: str, name: str, patch: dict, resource_version: str) -> dict:
        self.patches.append((patch, resource_version))
        self.obj = {"metadata": {**self.obj["metadata"], "generation": 2},
                    "spec": jobs.merge(self.obj["spec"], patch),
                    "status": {"run": 2, "phase": "Pending", "observedGeneration": 2, "jobName": "seed-r2"}}
        return self.obj


@pytest.mark.parametrize(("tool", "args", "patch", "note"), [
    ("export_gguf", {"quantization": "q8_0"}, {"export": {"gguf": ["q4_k_m", "q8_0"]}}, "reuses run N's adapter"),
    ("run_eval", {"tasks": ["mmlu"], "limit": 50}, {"evaluation": {"tasks": ["mmlu"], "limit": 50}},
     "reuses run N's adapter"),
], ids=["export_gguf", "run_eval"])
def test_a_finished_job_is_patched_into_run_two(tool: str, args: dict[str, Any], patch: dict, note: str) -> None:
    cluster = FinishedJobCluster()

    async def go():
        async with in_process(cluster) as client:
            return await call(client, tool, {"job": "seed", **args})

    result = anyio.run(go)
    assert not result.is_error, result.content[0].text
    out = result.structured_content
    assert cluster.patches == [(patch, "7")]  # guarded by the resourceVersion that was read
    assert (out["previousRun"], out["run"]) == (1, 2) and note in out["note"]
    assert "the operator started run 2 (Job seed-r2)" in out["message"]
    assert "run 1 is kept in status.history" in out["history"]


def test_export_gguf_of_a_type_already_exported_changes_nothing() -> None:
    cluster = FinishedJobCluster()

    async def go():
        async with in_process(cluster) as client:
            return await call(client, "export_gguf", {"job": "seed", "quantization": "q4_k_m"})

    out = anyio.run(go).structured_content
    assert out["uri"].endswith("/run-1/gguf/seed-q4_k_m.gguf") and "nothing changed" in out["message"]
    assert cluster.patches == []


def test_spec_patches() -> None:
    spec = {"dataset": {"source": "d"}, "training": {"maxSteps": 4, "lora": {"alpha": 8}},
            "evaluation": {"tasks": ["piqa"], "limit": 5}}
    patch = jobs.training_changes(epochs=4, learning_rate=1e-5, lora_r=32)
    new = jobs.merge(spec, patch)
    assert new["training"] == {"epochs": 4, "learningRate": 1e-5, "lora": {"alpha": 8, "r": 32}}
    assert jobs.rerun_patch(spec, new) == {"training": {"epochs": 4, "learningRate": 1e-5, "maxSteps": None,
                                                        "lora": {"r": 32}}}
    with pytest.raises(jobs.InvalidArguments, match="spec would stay the same"):
        jobs.rerun_patch(spec, spec)
    with pytest.raises(jobs.InvalidArguments, match="only runPolicy.suspend differs"):
        jobs.rerun_patch(spec, jobs.merge(spec, {"runPolicy": {"suspend": True}}))
    with pytest.raises(jobs.InvalidArguments, match="spec.training.epochs: Input should be greater than 0"):
        jobs.rerun_patch(spec, jobs.merge(spec, jobs.training_changes(epochs=-1)))
    # Evaluation is replaced as a whole: the old limit must not linger on the new task list.
    ev = jobs.with_evaluation(spec, jobs.evaluation(tasks=["mmlu"], limit=None, num_fewshot=None, data_uri=None,
                                                    quantizations=None, include_base=None))
    assert jobs.rerun_patch(spec, ev) == {"evaluation": {"tasks": ["mmlu"], "limit": None}}
    # export_gguf: the API default list is what a spec without export.gguf exports.
    assert jobs.export_changes(spec, "q8_0") == {"export": {"gguf": ["q4_k_m", "q8_0"]}}
    assert jobs.export_changes(spec, "q4_k_m") is None


def test_progress_notifications_only_grow_and_say_step_loss_and_eta() -> None:
    tracker = views.ProgressTracker()
    statuses = [
        {"run": 1, "phase": "Pending"},
        {"run": 1, "phase": "Preparing", "progress": {"stage": "Preparing", "message": "tokenizing"}},
        {"run": 1, "phase": "Training", "progress": {"step": 1, "totalSteps": 4, "loss": 2.5, "etaSeconds": 9,
                                                     "tokensPerSecond": 300.0}},
        {"run": 1, "phase": "Training", "progress": {"step": 1, "totalSteps": 4, "loss": 2.5, "etaSeconds": 9,
                                                     "tokensPerSecond": 300.0}},  # unchanged: no notification
        {"run": 1, "phase": "Training", "progress": {"step": 4, "totalSteps": 4, "loss": 1.25, "etaSeconds": 0}},
        {"run": 1, "phase": "Exporting", "progress": {"step": 4, "totalSteps": 4, "loss": 1.25}},
        {"run": 1, "phase": "Succeeded", "progress": {"step": 4, "totalSteps": 4, "loss": 1.25}},
    ]
    sent = [u for s in statuses if (u := tracker.update(s))]
    assert len(sent) == 6
    values = [v for v, _ in sent]
    assert values == sorted(values) and len(set(values)) == len(values) and values[-1] == 100
    assert sent[2][1] == "run 1 Training: step 1/4, loss 2.5, 300 tok/s, ETA 9 s"
    assert sent[4][1] == "run 1 Exporting: step 4/4, loss 1.25"


def test_http_needs_a_token_off_loopback_and_local_paths_follow_the_transport() -> None:
    with pytest.raises(config.ConfigError, match="without a bearer token"):
        config.from_env({}, transport="http", host="0.0.0.0").check()
    assert config.from_env({"FINETUNE_MCP_TOKEN": "t"}, transport="http", host="0.0.0.0").check().token == "t"
    assert config.from_env({}, transport="http").check().allow_local_paths is False
    assert config.from_env({}, transport="stdio").check().allow_local_paths is True
    cfg = config.from_env({"FINETUNE_MCP_NAMESPACES": "a,b"}, fallback_namespace="c")
    assert cfg.namespaces == ("a", "b") and cfg.default_namespace == "a" and not cfg.allows("c")


def test_local_paths_are_not_read_when_not_allowed(tmp_path: Path) -> None:
    secret = tmp_path / "notes.jsonl"
    secret.write_text(json.dumps({"text": "private"}) + "\n")

    async def go():
        async with in_process(allow_local_paths=False) as client:
            return await call(client, "prepare_dataset", {"source": str(secret)})

    result = anyio.run(go)
    assert result.is_error and "path on the MCP server's disk" in result.content[0].text
    assert "private" not in result.content[0].text


# ----------------------------------------------------------------------------- on the local stack


def server_env(kubeconfig: Path, **extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "FTO_CACHE",
            "XDG_CACHE_HOME")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, "KUBECONFIG": str(kubeconfig),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FINETUNE_MCP_POLL_SECONDS": "0.5", **extra}


@pytest.fixture
def inputs(k8s, s3, namespace):
    import trainer_fixtures as fx

    k8s.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
               "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
    k8s.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rows"},
               "data": {"train.jsonl": "\n".join(json.dumps(r) for r in ROWS)}})
    return fx.tiny_gemma()


class Session:
    """One MCP client session; every result's text is kept to check what never leaks."""

    def __init__(self, client) -> None:
        self.client, self.texts = client, []

    async def ok(self, name: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
        result = await self.client.call_tool(name, args, **kw)
        self.texts.append(result.content[0].text)
        assert not result.is_error, f"{name}: {result.content[0].text}"
        return result.structured_content

    async def refused(self, name: str, args: dict[str, Any]) -> str:
        result = await self.client.call_tool(name, args)
        self.texts.append(result.content[0].text)
        assert result.is_error, f"{name} accepted {args}"
        return result.content[0].text

    async def wait(self, job: str, run: int) -> tuple[dict[str, Any], list[tuple[float, str]]]:
        seen: list[tuple[float, str]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            assert total == 100
            seen.append((progress, message or ""))

        final = await self.ok("wait", {"job": job, "timeout_seconds": 600, "run": run}, progress_callback=on_progress)
        return final, seen


def s3_object(s3, uri: str) -> bytes:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.cluster
@pytest.mark.slow  # three trainer runs of a tiny model: minutes on two CPU cores
def test_the_seeds_three_prompts_over_stdio(operator, k8s, kubeconfig, namespace, s3, bucket, inputs, pod_runner) -> None:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=["-m", "finetune_mcp", "--namespaces", namespace],
                                   env=server_env(kubeconfig))

    async def prompts() -> None:
        async with Client(params) as client:
            s = Session(client)
            # Look at the data first: format, rows, token lengths with the model's own tokenizer.
            data = await s.ok("prepare_dataset", {"config_map": {"name": "rows", "key": "train.jsonl"},
                                                  "base_model": str(inputs), "preview_rows": 1})
            assert data["format"] == "alpaca" and data["rows"] == {"read": 8, "usable": 8, "malformed": 0}
            assert data["lengths"]["unit"] == "tokens" and data["lengths"]["max"] >= data["lengths"]["min"] > 5
            assert data["trainable"] is True and data["preview"][0]["messages"][1]["role"] == "assistant"

            # Bad arguments: refused, naming the field, and nothing is created anywhere.
            base = {"base_model": str(inputs), "dataset_config_map": {"name": "rows", "key": "train.jsonl"}}
            assert "unknown quantization 'q9_k'" in await s.refused("finetune_unsloth", {**base, "quant": "q9_k"})
            assert "epochs (spec.training.epochs)" in await s.refused("finetune_unsloth", {**base, "epochs": -2})
            assert "not one this server allows" in await s.refused("finetune_unsloth", {**base, "namespace": "default"})
            assert (await s.ok("list_jobs", {}))["jobs"] == []
            assert not k8s.get("ftj")["items"]

            # 1. "Fine-tune Gemma3:270M on alpaca_cleaned for 2 epochs and export q4_k_m" (tiny model, 8 rows).
            started = await s.ok("finetune_unsloth", {
                **base, "name": "seed", "epochs": 2, "quant": "q4_k_m", "batch_size": 4, "max_seq_length": 64,
                "gpus": 0, "s3_bucket": bucket, "s3_credentials_secret": "s3",
                # Trimmed for CPU time: no parity check, adapter or Modelfile (test_e2e covers those).
                "spec_overrides": {"resources": {"nodeSelector": RUNNER},
                                   "export": {"parityCheck": False, "adapter": False, "ollamaModelfile": False},
                                   "output": {"s3": {"endpoint": s3.endpoint, "forcePathStyle": True}}}})
            assert (started["name"], started["run"]) == ("seed", 1), started
            final, seen = await s.wait("seed", 1)
            assert final["phase"] == "Succeeded" and final["finished"] is True, (final, pod_runner.log_tails())
            assert seen and [v for v, _ in seen] == sorted(v for v, _ in seen) and seen[-1][0] == 100
            assert any("step" in m and "loss" in m for _, m in seen), seen
            steps_run1 = final["progress"]["totalSteps"]
            arts = await s.ok("get_artifacts", {"job": "seed"})
            uri = arts["gguf"]["q4_k_m"]
            # outputs are keyed by the object's uid as well as its run
            uid = k8s.get("ftj", "seed")["metadata"]["uid"]
            assert uri == f"s3://{bucket}/finetune/{namespace}/seed/{uid}/run-1/gguf/seed-q4_k_m.gguf"
            art = next(a for a in arts["artifacts"] if a["uri"] == uri)
            body = s3_object(s3, uri)
            assert (len(body), hashlib.sha256(body).hexdigest()) == (art["sizeBytes"], art["sha256"])
            assert body[:4] == b"GGUF"

            # 2. "Benchmark the new model" — an offline lm-eval task here (no MMLU data offline).
            evaluated = await s.ok("run_eval", {"job": "seed", "tasks": ["tiny_antonyms"], "limit": 4,
                                                "data_uri": str(TASKS_DIR)})
            assert (evaluated["previousRun"], evaluated["run"]) == (1, 2), evaluated
            final, _ = await s.wait("seed", 2)
            assert final["phase"] == "Succeeded", (final, pod_runner.log_tails())
            status = await s.ok("get_status", {"job": "seed"})
            assert "tiny_antonyms" in status["metrics"]["eval"]["q4_k_m"], status["metrics"]
            assert [h["run"] for h in status["history"]] == [1]
            # An evaluate-only change: run 2 scored run 1's model, it did not train again.
            cache = status["metrics"]["cache"]
            assert cache["training"] == "hit" and cache["trainedBy"]["run"] == 1, cache
            assert cache["trainedBy"]["uid"] == uid
            assert cache["exports"] == {"q4_k_m": "hit"}, cache  # and run 1's GGUF, not a new conversion

            # 3. "Adjust to 4 epochs and lower LR to 1e-5" (and re-run).
            adjusted = await s.ok("adjust_and_rerun", {"job": "seed", "epochs": 4, "learning_rate": 1e-5})
            assert adjusted["run"] == 3 and adjusted["specPatch"] == {"training": {"epochs": 4.0, "learningRate": 1e-05}}
            final, seen = await s.wait("seed", 3)
            assert final["phase"] == "Succeeded", (final, pod_runner.log_tails())
            assert final["progress"]["totalSteps"] == 2 * steps_run1
            assert final["spec"]["epochs"] == 4 and final["spec"]["learningRate"] == 1e-5
            assert [(h["run"], h["phase"]) for h in final["history"]] == [(1, "Succeeded"), (2, "Succeeded")]
            assert final["history"][1]["outputUri"].endswith(f"/seed/{uid}/run-2/")
            assert "tiny_antonyms" in final["history"][1]["metrics"]["eval"]["q4_k_m"]
            run3 = await s.ok("get_artifacts", {"job": "seed"})
            assert run3["gguf"]["q4_k_m"].endswith(f"/seed/{uid}/run-3/gguf/seed-q4_k_m.gguf")
            older = await s.ok("get_artifacts", {"job": "seed", "run": 1})
            assert older["outputUri"].endswith(f"/seed/{uid}/run-1/") and "manifest.json" in older["note"]

            # Secrets are named, never read: no tool result carries the key.
            assert all(s3.secret_key not in t for t in s.texts)

    anyio.run(prompts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.cluster
def test_streamable_http_with_a_bearer_token(operator, k8s, kubeconfig, namespace, tmp_path) -> None:
    """Lighter: bad arguments refused, a suspended job (no training), re-run as run 2 with history, wait
    timing out, over HTTP."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    port = free_port()
    log_path = tmp_path / "mcp.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "finetune_mcp", "--transport", "http", "--port", str(port),
                                 "--namespaces", namespace],
                                env=server_env(kubeconfig, FINETUNE_MCP_TOKEN="tok-123"), stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/mcp"

    async def drive() -> None:
        deadline = time.monotonic() + 60
        async with httpx2.AsyncClient() as plain:
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if (await plain.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                await anyio.sleep(0.3)
            assert (await plain.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})).status_code == 401
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer tok-123"}, timeout=60) as http, \
                Client(streamable_http_client(url, http_client=http)) as client:
            s = Session(client)
            # Bad arguments over HTTP too: refused naming the field, nothing created.
            base = {"base_model": "tiny/model", "dataset": "tiny/data", "s3_bucket": "models"}
            assert "unknown quantization 'q9_k'" in await s.refused("finetune_unsloth", {**base, "quant": "q9_k"})
            assert "epochs (spec.training.epochs)" in await s.refused("finetune_unsloth", {**base, "epochs": -2})
            assert "not one this server allows" in await s.refused("finetune_unsloth", {**base, "namespace": "default"})
            assert not k8s.get("ftj")["items"]
            started = await s.ok("finetune_unsloth", {
                "base_model": "tiny/model", "dataset": "tiny/data", "max_steps": 2, "gpus": 0, "name": "held",
                "s3_bucket": "models",
                "spec_overrides": {"runPolicy": {"suspend": True}}})
            assert started["run"] == 1 and started["phase"] == "Suspended", started
            rerun = await s.ok("adjust_and_rerun", {"job": "held", "max_steps": 3})
            assert (rerun["previousRun"], rerun["run"]) == (1, 2) and "superseded" in rerun["note"], rerun
            status = await s.ok("get_status", {"job": "held"})
            assert status["run"] == 2 and status["spec"]["maxSteps"] == 3
            assert status["history"][0]["run"] == 1 and "superseded" in status["history"][0]["phase"]
            waited = await s.ok("wait", {"job": "held", "timeout_seconds": 1})
            assert waited["finished"] is False and "call wait again" in waited["message"]
            text = await s.refused("export_gguf", {"job": "held", "quantization": "q8_0"})
            assert "still Suspended" in text

    try:
        anyio.run(drive)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.cluster
def test_admission_messages_from_the_apiserver_are_passed_on(kubeconfig, namespace, crd) -> None:
    """What the server's own check would have caught, sent anyway: the apiserver's 422 names the field,
    and the tool's error carries that message."""
    from finetune_mcp.cluster import Cluster, api_client

    cluster = Cluster(api_client(str(kubeconfig)))
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "bad"},
            "spec": {"dataset": {"source": "d"}, "training": {"epochs": -1, "maxSteps": 3}}}
    with pytest.raises(ClusterError) as err:
        cluster.create(namespace, body)
    message = str(err.value)
    assert message.startswith(f"FinetuneJob {namespace}/bad rejected by admission: "), message
    assert "spec.training.epochs" in message and "set only one of epochs and maxSteps" in message, message
    assert cluster.list(namespace) == []
    with pytest.raises(ClusterError, match=f"FinetuneJob {namespace}/nope: not found"):
        cluster.get(namespace, "nope")
