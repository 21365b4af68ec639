"""`training.batchSize` takes a number or `auto` at admission (Kubernetes' int-or-string), nothing else;
`gradientCheckpointing` may be left out (auto). Server-side dry runs against the real apiserver."""

from __future__ import annotations

import pytest
import yaml
from operator_fixtures import kubectl

from tests.test_admission import with_

pytest_plugins = ["operator_fixtures"]

pytestmark = pytest.mark.cluster


def _apply(kubeconfig, manifest):
    return kubectl(kubeconfig, "apply", "--dry-run=server", "-n", "default", "-f", "-",
                   input=yaml.safe_dump(manifest), check=False)


@pytest.mark.parametrize("value", ["auto", 1, 32, 1024])
def test_batch_size_auto_or_a_number_is_accepted(kubeconfig, crd, value):
    proc = _apply(kubeconfig, with_("spec.training", {"batchSize": value, "gradientCheckpointing": False}))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("value", ["big", "32", 0, 1025, True])
def test_other_batch_sizes_are_rejected_naming_the_field(kubeconfig, crd, value):
    proc = _apply(kubeconfig, with_("spec.training.batchSize", value))
    assert proc.returncode != 0, f"{value!r}: accepted"
    assert "spec.training.batchSize" in proc.stderr, proc.stderr
