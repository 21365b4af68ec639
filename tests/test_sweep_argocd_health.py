"""The Argo CD health check for FinetuneSweep, run in Lua 5.1 as Argo CD runs it (the sandbox and
loader are test_argocd_health's: base, table, package and a safe os only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_argocd_health import load_yaml, run_health

from finetune_api.sweep import FinetuneSweepSpec, FinetuneSweepStatus, SweepPhase

ROOT = Path(__file__).resolve().parents[1]
CHECK_DIR = ROOT / "argocd" / "resource_customizations" / "finetune.dev" / "FinetuneSweep"
HEALTH_LUA = CHECK_DIR / "health.lua"


def health(obj, open_libs):
    return run_health(obj, open_libs=open_libs, script=HEALTH_LUA.read_text())


def _cases():
    tests = load_yaml(CHECK_DIR / "health_test.yaml")["tests"]
    return [pytest.param(t["inputPath"], t["healthStatus"], id=Path(t["inputPath"]).stem) for t in tests]


@pytest.mark.parametrize("open_libs", [False, True], ids=["argocd-sandbox", "open-libs"])
@pytest.mark.parametrize(("input_path", "expected"), _cases())
def test_health_test_yaml_case(input_path, expected, open_libs):
    assert health(load_yaml(CHECK_DIR / input_path), open_libs) == expected


def test_every_testdata_file_is_a_case():
    used = {t["inputPath"] for t in load_yaml(CHECK_DIR / "health_test.yaml")["tests"]}
    assert used == {f"testdata/{p.name}" for p in (CHECK_DIR / "testdata").glob("*.yaml")}


@pytest.mark.parametrize("path", sorted((CHECK_DIR / "testdata").glob("*.yaml")), ids=lambda p: p.stem)
def test_testdata_is_a_valid_finetunesweep(path):
    obj = load_yaml(path)
    assert (obj["apiVersion"], obj["kind"]) == ("finetune.dev/v1alpha1", "FinetuneSweep")
    FinetuneSweepSpec.model_validate(obj["spec"])
    if "status" in obj:
        FinetuneSweepStatus.model_validate(obj["status"])


@pytest.mark.parametrize("open_libs", [False, True], ids=["argocd-sandbox", "open-libs"])
@pytest.mark.parametrize(("phase", "expected"), [
    (SweepPhase.PENDING, "Progressing"), (SweepPhase.RUNNING, "Progressing"), (SweepPhase.SUSPENDED, "Suspended"),
    (SweepPhase.SUCCEEDED, "Healthy"), (SweepPhase.FAILED, "Degraded")])
def test_every_sweep_phase_maps_to_a_health_status(phase, expected, open_libs):
    hs = health({"metadata": {"generation": 1}, "status": {"phase": phase, "observedGeneration": 1}}, open_libs)
    assert hs["status"] == expected and hs["message"]


def test_script_names_no_string_or_math_library():
    code = "\n".join(line.split("--", 1)[0] for line in HEALTH_LUA.read_text().splitlines())
    assert not re.search(r"\b(string|math|io|debug)\s*\.", code)
    assert not re.search(r"\brequire\b", code)
