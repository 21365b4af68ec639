"""Every FinetuneJob manifest under examples/ is accepted by the real apiserver (server-side dry run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from operator_fixtures import kubectl

from finetune_api.spec import FinetuneJobSpec

pytest_plugins = ["operator_fixtures"]
pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted(p for p in (ROOT / "examples").rglob("*.yaml")
                   if any(d.get("kind") == "FinetuneJob" for d in yaml.safe_load_all(p.read_text()) if d))


def test_there_are_examples():
    names = {p.relative_to(ROOT).as_posix() for p in MANIFESTS}
    assert {"examples/demo/finetunejob.yaml", "examples/gemma3-270m-alpaca.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_example_is_valid(path, kubeconfig, crd):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "FinetuneJob":
            FinetuneJobSpec.model_validate(doc["spec"])  # the trainer accepts it too
            doc["metadata"].pop("namespace", None)
            proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-n", "default", "-f", "-",
                           input=yaml.safe_dump(doc), check=False)
            assert proc.returncode == 0, proc.stderr
