"""The Argo CD health check for FinetuneJob, run the way Argo CD runs it.

Argo CD evaluates `health.lua` in a Lua 5.1 VM (gopher-lua) that opens only the base, table and
package libraries plus a safe `os` (time, date): no `string`, no `math`, and therefore no string
methods either. Every case in `health_test.yaml` (argo-cd's own test format) runs twice under lupa's
Lua 5.1: in that sandbox, and with the standard libraries open (`useOpenLibs`).

Test data are loaded the way Argo CD sees objects: numbers stay numbers, timestamps stay strings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from finetune_api import FinetuneJobSpec, FinetuneJobStatus, Phase

ROOT = Path(__file__).resolve().parents[1]
CHECK_DIR = ROOT / "argocd" / "resource_customizations" / "finetune.dev" / "FinetuneJob"
HEALTH_LUA = CHECK_DIR / "health.lua"
VALID_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


class _NoTimestampLoader(yaml.SafeLoader):
    """SafeLoader that leaves RFC 3339 timestamps as strings, as the apiserver's JSON does."""


_NoTimestampLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_NoTimestampLoader)


# The base functions gopher-lua's OpenBase registers (Argo CD's VM), and nothing else.
_SANDBOX = """
return function(src, obj)
  local base = {"assert", "collectgarbage", "dofile", "error", "getfenv", "getmetatable", "ipairs",
    "load", "loadfile", "loadstring", "module", "newproxy", "next", "pairs", "pcall", "print",
    "rawequal", "rawget", "rawset", "select", "setfenv", "setmetatable", "tonumber", "tostring",
    "type", "unpack", "xpcall", "_VERSION"}
  local env = {}
  for _, name in ipairs(base) do env[name] = _G[name] end
  env._G = env
  env.table = table
  env.package = package
  local safe_os = {time = os.time, date = os.date}
  env.os = safe_os
  env.require = function(name)
    if name == "os" then return safe_os end
    error("module '" .. name .. "' not found")
  end
  -- Without the string library, strings have no methods: ("x"):upper() must fail here too.
  getmetatable("").__index = nil
  local fn = assert(loadstring(src, "=health.lua"))
  setfenv(fn, env)
  env.obj = obj
  return fn()
end
"""


def _to_dict(table: Any) -> dict[str, Any]:
    return {k: v for k, v in table.items()}


def run_health(obj: dict[str, Any], *, open_libs: bool, script: str | None = None) -> dict[str, Any]:
    """Evaluate the health script on `obj` in a fresh Lua 5.1 state."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True, register_eval=False, register_builtins=False)
    src = HEALTH_LUA.read_text() if script is None else script
    lua_obj = lua.table_from(obj, recursive=True)
    if open_libs:
        lua.globals().obj = lua_obj
        result = lua.execute(src)
    else:
        result = lua.execute(_SANDBOX)(src, lua_obj)
    return _to_dict(result)


def _cases() -> list[Any]:
    tests = load_yaml(CHECK_DIR / "health_test.yaml")["tests"]
    return [pytest.param(t["inputPath"], t["healthStatus"], id=Path(t["inputPath"]).stem) for t in tests]


@pytest.mark.parametrize("open_libs", [False, True], ids=["argocd-sandbox", "open-libs"])
@pytest.mark.parametrize(("input_path", "expected"), _cases())
def test_health_test_yaml_case(input_path: str, expected: dict[str, str], open_libs: bool) -> None:
    obj = load_yaml(CHECK_DIR / input_path)
    assert run_health(obj, open_libs=open_libs) == expected


def test_every_testdata_file_is_a_case() -> None:
    used = {t["inputPath"] for t in load_yaml(CHECK_DIR / "health_test.yaml")["tests"]}
    present = {f"testdata/{p.name}" for p in (CHECK_DIR / "testdata").glob("*.yaml")}
    assert used == present


@pytest.mark.parametrize("path", sorted((CHECK_DIR / "testdata").glob("*.yaml")), ids=lambda p: p.stem)
def test_testdata_is_a_valid_finetunejob(path: Path) -> None:
    """The fixtures use the API's real field names, so the check reads what the operator writes."""
    obj = load_yaml(path)
    assert (obj["apiVersion"], obj["kind"]) == ("finetune.dev/v1alpha1", "FinetuneJob")
    FinetuneJobSpec.model_validate(obj["spec"])
    if "status" in obj:
        FinetuneJobStatus.model_validate(obj["status"])
        # Timestamps reach Lua as strings, as in Argo CD.
        for cond in obj["status"].get("conditions", []):
            assert isinstance(cond["lastTransitionTime"], str)


_EXPECTED_BY_PHASE = {
    Phase.SUCCEEDED: "Healthy",
    Phase.FAILED: "Degraded",
    Phase.QUEUED: "Suspended",
    Phase.SUSPENDED: "Suspended",
}


@pytest.mark.parametrize("open_libs", [False, True], ids=["argocd-sandbox", "open-libs"])
@pytest.mark.parametrize("phase", list(Phase), ids=str)
def test_every_api_phase_maps_to_a_health_status(phase: Phase, open_libs: bool) -> None:
    obj = {"metadata": {"name": "x", "generation": 1},
           "status": {"phase": str(phase), "observedGeneration": 1}}
    hs = run_health(obj, open_libs=open_libs)
    assert hs["status"] == _EXPECTED_BY_PHASE.get(phase, "Progressing")
    assert hs["status"] in VALID_STATUSES
    assert hs["message"]


@pytest.mark.parametrize("open_libs", [False, True], ids=["argocd-sandbox", "open-libs"])
def test_progress_as_numeric_strings_and_derived_percent(open_libs: bool) -> None:
    obj = {"metadata": {"generation": 1},
           "status": {"phase": "Training", "progress": {"step": "5", "totalSteps": 8, "loss": "2.0049"}}}
    assert run_health(obj, open_libs=open_libs) == {
        "status": "Progressing", "message": "Training 62% (step 5/8), loss 2"}


@pytest.mark.parametrize("open_libs", [False, True], ids=["argocd-sandbox", "open-libs"])
def test_failed_without_reason_or_message(open_libs: bool) -> None:
    obj = {"status": {"phase": "Failed"}}
    assert run_health(obj, open_libs=open_libs) == {"status": "Degraded", "message": "Failed"}


def test_stale_generation_only_delays_finished_phases() -> None:
    running = {"metadata": {"generation": 4},
               "status": {"phase": "Training", "observedGeneration": 3, "progress": {"step": 1}}}
    assert run_health(running, open_libs=False) == {"status": "Progressing", "message": "Training (step 1)"}


@pytest.mark.parametrize("snippet", [
    'return {status = "Healthy", message = string.format("%d", 1)}',
    'return {status = "Healthy", message = tostring(math.floor(1.5))}',
    'return {status = "Healthy", message = ("x"):upper()}',
])
def test_sandbox_really_lacks_string_and_math(snippet: str) -> None:
    """The sandbox must reject what Argo CD's VM rejects, or the cases above prove nothing."""
    with pytest.raises(lua51.LuaError):
        run_health({}, open_libs=False, script=snippet)
    assert run_health({}, open_libs=True, script=snippet)["status"] == "Healthy"


def test_sandbox_has_only_base_table_package_and_safe_os() -> None:
    script = ('return {status = "Healthy", message = type(io) .. type(debug) .. type(os.time) '
              '.. type(os.execute) .. type(table.concat) .. type(package)}')
    assert run_health({}, open_libs=False, script=script)["message"] == "nilnilfunctionnilfunctiontable"


def test_script_names_no_string_or_math_library() -> None:
    code = "\n".join(line.split("--", 1)[0] for line in HEALTH_LUA.read_text().splitlines())
    assert not re.search(r"\b(string|math|io|debug)\s*\.", code)
    assert not re.search(r"\brequire\b", code)
