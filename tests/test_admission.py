"""Invalid FinetuneJobs are rejected at admission by the generated schema and CEL rules.

Each case is applied with a server-side dry run against the real apiserver; the error must name
the offending field, so a user knows what to fix without reading the operator's logs.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from operator_fixtures import kubectl

pytest_plugins = ["operator_fixtures"]

pytestmark = pytest.mark.cluster

VALID = {
    "apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "x"},
    "spec": {"dataset": {"source": "yahma/alpaca-cleaned"}, "output": {"s3": {"bucket": "models"}}},
}


def with_(path: str, value):
    doc = copy.deepcopy(VALID)
    node = doc
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return doc


DELETE = object()
CASES = [
    ("no spec", with_("spec", DELETE), "spec"),
    ("no dataset", with_("spec.dataset", DELETE), "spec.dataset"),
    ("bad bucket name", with_("spec.output.s3.bucket", "Bad_Bucket"), "spec.output.s3.bucket"),
    ("dataset source and configMapRef", with_("spec.dataset.configMapRef", {"name": "rows", "key": "a"}), "source and configMapRef"),
    ("dataset neither", with_("spec.dataset", {"split": "train"}), "source and configMapRef"),
    ("unknown dataset format", with_("spec.dataset.format", "csv"), "spec.dataset.format"),
    ("validation split too big", with_("spec.dataset.validationSplit", 0.9), "spec.dataset.validationSplit"),
    ("maxSamples zero", with_("spec.dataset.maxSamples", 0), "spec.dataset.maxSamples"),
    ("baseModel name and uri", with_("spec.baseModel", {"name": "a/b", "uri": "/m"}), "name and uri"),
    ("baseModel uri scheme", with_("spec.baseModel.uri", "ftp://x/y"), "spec.baseModel.uri"),
    ("unknown method", with_("spec.training.method", "full"), "spec.training.method"),
    ("epochs and maxSteps", with_("spec.training", {"epochs": 1, "maxSteps": 5}), "epochs and maxSteps"),
    ("negative epochs", with_("spec.training.epochs", -1), "spec.training.epochs"),
    ("zero learning rate", with_("spec.training.learningRate", 0), "spec.training.learningRate"),
    ("learning rate as string", with_("spec.training.learningRate", "fast"), "spec.training.learningRate"),
    ("batch size zero", with_("spec.training.batchSize", 0), "spec.training.batchSize"),
    ("seq length too short", with_("spec.training.maxSeqLength", 8), "spec.training.maxSeqLength"),
    ("unknown scheduler", with_("spec.training.lrScheduler", "step"), "spec.training.lrScheduler"),
    ("lora rank too big", with_("spec.training.lora", {"r": 4096}), "spec.training.lora.r"),
    ("lora dropout 1", with_("spec.training.lora", {"dropout": 1.0}), "spec.training.lora.dropout"),
    ("unknown quant", with_("spec.export.gguf", ["q4_k_m", "q9_x"]), "spec.export.gguf"),
    ("duplicate quant", with_("spec.export.gguf", ["q8_0", "q8_0"]), "spec.export.gguf"),
    ("qlora without gpu", with_("spec.resources", {"gpus": 0}) | {}, None),  # replaced below
    ("too many gpus", with_("spec.resources.gpus", 64), "spec.resources.gpus"),
    ("zero nodes", with_("spec.resources.nodes", 0), "spec.resources.nodes"),
    ("accumulation not shared by the processes", with_("spec.resources", {"gpus": 2, "nodes": 2}),
     "spec.training.gradientAccumulationSteps"),
    ("bad memory quantity", with_("spec.resources.memory", "lots"), "spec.resources.memory"),
    ("bad pull policy", with_("spec.resources.imagePullPolicy", "Sometimes"), "spec.resources.imagePullPolicy"),
    ("negative backoff", with_("spec.runPolicy.backoffLimit", -1), "spec.runPolicy.backoffLimit"),
    ("bad queue name", with_("spec.runPolicy.queueName", "Not A Queue"), "spec.runPolicy.queueName"),
    ("evaluation without tasks", with_("spec.evaluation", {"limit": 5}), "spec.evaluation.tasks"),
    ("evaluation without gguf", {**with_("spec.export", {"gguf": []}),
                                 "spec": {**with_("spec.export", {"gguf": []})["spec"], "evaluation": {"tasks": ["piqa"]}}},
     "evaluation needs at least one export.gguf"),
    ("evaluated quant not exported", {**VALID, "spec": {**VALID["spec"], "export": {"gguf": ["q4_k_m"]},
                                                        "evaluation": {"tasks": ["piqa"], "quantizations": ["q8_0"]}}},
     "spec.evaluation.quantizations"),
    ("s3 endpoint not a URL", with_("spec.output.s3.endpoint", "minio:9000"), "spec.output.s3.endpoint"),
    ("secret ref without name", with_("spec.output.s3.credentialsSecretRef", {"accessKeyIdKey": "a"}),
     "spec.output.s3.credentialsSecretRef.name"),
    ("name too long", with_("metadata.name", "a" * 60), "metadata.name"),
    ("evalEverySteps zero", with_("spec.training.evalEverySteps", 0), "spec.training.evalEverySteps"),
    ("evalEverySteps without validation rows", with_("spec.training.evalEverySteps", 10),
     "spec.training.evalEverySteps needs dataset.validationSplit > 0"),
    # Secrets are only ever read from the FinetuneJob's own namespace: there is no field to say otherwise.
    ("secret in another namespace", with_("spec.output.s3.credentialsSecretRef", {"name": "s3", "namespace": "kube-system"}),
     "spec.output.s3.credentialsSecretRef.namespace"),
]
# qlora needs a GPU: a cross-field CEL rule.
CASES[22] = ("qlora without gpu", {**VALID, "spec": {**VALID["spec"], "training": {"method": "qlora"},
                                                     "resources": {"gpus": 0}}}, "qlora needs resources.gpus")


def test_the_table_is_large():
    assert len(CASES) >= 25


def test_valid_manifest_is_accepted(kubeconfig, crd):
    proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-n", "default", "-f", "-",
                   input=yaml.safe_dump(VALID), check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name, manifest, field", CASES, ids=[c[0] for c in CASES])
def test_invalid_spec_is_rejected_naming_the_field(kubeconfig, crd, name, manifest, field):
    proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-n", "default", "-f", "-",
                   input=yaml.safe_dump(manifest), check=False)
    assert proc.returncode != 0, f"{name}: accepted"
    assert field in proc.stderr, f"{name}: error does not name {field!r}: {proc.stderr}"


@pytest.mark.parametrize("field, shown, in_docs", [
    ("spec.training.maxSeqLength", "Default: 1024. Bounds: >= 16, <= 131072.", "Bounds: >= 16, <= 131072."),
    # the docs' type column lists a Literal's values already
    ("spec.dataset.format", "One of: auto, alpaca, sharegpt, messages, text, prompt-completion.", "`prompt-completion`"),
    ("spec.dataset.validationSplit", "Bounds: >= 0.0, <= 0.5.", "Bounds: >= 0.0, <= 0.5."),
])
def test_kubectl_explain_and_the_docs_show_defaults_bounds_and_enums(kubeconfig, crd, field, shown, in_docs):
    """`kubectl explain` prints a field's description only: the generator puts the schema's bounds and
    enums there (and into docs/api.md's table), so a user sees them without reading the OpenAPI schema."""
    from pathlib import Path

    out = kubectl(kubeconfig, "explain", f"ftj.{field}").stdout
    assert shown in " ".join(out.split()), out
    docs = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith(f"| `{field}` |"))
    assert in_docs in row, row
