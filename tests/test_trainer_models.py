"""Where a base model comes from, which backend trains it, and which chat template a run uses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from finetune_api.spec import BaseModelSpec, S3Spec
from finetune_trainer.cli import base_model_spec
from finetune_trainer.data import chat_templates
from finetune_trainer.errors import ConfigError
from finetune_trainer.train import model_loading
from tests.trainer_fixtures import OFFLINE_ENV, tiny_gemma


def test_base_model_from_an_s3_folder_is_fetched_once(s3, bucket, tmp_path, monkeypatch):
    for k, v in {**OFFLINE_ENV, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}.items():
        monkeypatch.setenv(k, v)
    client = s3.client()
    for f in tiny_gemma().iterdir():
        if f.is_file() and not f.name.startswith("."):
            client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    spec = S3Spec(bucket=bucket, endpoint=s3.endpoint, force_path_style=True)
    base = model_loading.resolve(BaseModelSpec(uri=f"s3://{bucket}/models/tiny"), tmp_path / "base", spec)
    assert base.local and (Path(base.source) / "model.safetensors").exists()
    assert model_loading.load_tokenizer(base)("hi")["input_ids"] == [2, 2202]
    client.delete_object(Bucket=bucket, Key="models/tiny/config.json")  # a second resolve does not download
    assert model_loading.resolve(BaseModelSpec(uri=f"s3://{bucket}/models/tiny"), tmp_path / "base", spec) == base
    with pytest.raises(ConfigError) as err:
        model_loading.resolve(BaseModelSpec(uri=f"s3://{bucket}/models/none"), tmp_path / "other", spec)
    assert err.value.reason == "ModelNotFound"


def test_local_base_models_must_exist(tmp_path):
    with pytest.raises(ConfigError) as err:
        model_loading.resolve(BaseModelSpec(uri=str(tmp_path / "missing.gguf")), tmp_path / "b")
    assert err.value.reason == "ModelNotFound"
    with pytest.raises(ConfigError) as err:
        model_loading.resolve(BaseModelSpec(uri=str(tmp_path)), tmp_path / "b")
    assert "no config.json" in err.value.message
    hub = model_loading.resolve(BaseModelSpec(name="unsloth/gemma-3-270m-it", revision="main"), tmp_path / "b")
    assert (hub.source, hub.revision, hub.local) == ("unsloth/gemma-3-270m-it", "main", False)


def test_command_line_model_references(tmp_path):
    assert base_model_spec("unsloth/gemma-3-270m-it").name == "unsloth/gemma-3-270m-it"
    assert base_model_spec("s3://models/x/y/").uri == "s3://models/x/y/"
    assert base_model_spec(str(tmp_path)).uri == str(tmp_path)
    assert base_model_spec("model.gguf").uri == str(Path("model.gguf").resolve())
    assert base_model_spec(None).resolved_name() == "unsloth/gemma-3-270m-it"


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("FINETUNE_BACKEND", "transformers")
    assert model_loading.backend() == "transformers"
    monkeypatch.setenv("FINETUNE_BACKEND", "auto")
    import importlib.util

    import torch

    expected = "unsloth" if torch.cuda.is_available() and importlib.util.find_spec("unsloth") else "transformers"
    assert model_loading.backend() == expected


def test_chat_template_choice():
    class Tok:
        chat_template = None
        eos_token = "</s>"

    assert chat_templates.resolve("auto", Tok()).name == "gemma3"  # no template of its own
    assert chat_templates.resolve("chatml", Tok()).stop == "<|im_end|>"
    Tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    own = chat_templates.resolve("auto", Tok())
    assert own.name == "tokenizer" and own.stop == "<|im_end|>" and "<|im_start|>" in own.ollama()
    assert chat_templates.resolve("llama3", Tok()).name == "llama3"  # an explicit choice wins
    with pytest.raises(KeyError):
        chat_templates.load("vicuna")


UNREADABLE_PROBE = """
import json, os, sys
from pathlib import Path
from finetune_api.spec import BaseModelSpec
from finetune_trainer.errors import ConfigError
from finetune_trainer.train import model_loading
if os.getuid() == 0:  # imported as root (the interpreter lives under /root); resolve() runs as nobody
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
try:
    base = model_loading.resolve(BaseModelSpec(uri=sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps({"source": base.source}))
except ConfigError as exc:
    print(json.dumps({"reason": exc.reason, "message": exc.message}))
"""


def resolve_as_another_user(uri: Path, dest: Path) -> dict:
    """resolve() in a child process as `nobody` (the image's trainer is not the owner of a mounted model);
    a non-root developer's own uid serves as well, since the files below are made unreadable by modes."""
    out = subprocess.run([sys.executable, "-c", UNREADABLE_PROBE, str(uri), str(dest)], capture_output=True,
                         text=True, timeout=120, cwd="/", env={**os.environ, "HOME": str(dest.parent)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_local_model_the_trainer_may_not_read_is_a_config_error_naming_it():
    """safetensors writes its files 0600: a model volume made that way by another user is unreadable by the
    trainer (uid 1000 in the image). That fails the same way on every retry: ModelNotReadable, never a
    retried InternalError (the trainer image's first run met exactly this)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        top = Path(tmp)
        top.chmod(0o777)
        model = top / "model"
        model.mkdir(mode=0o755)
        shutil.copyfile(tiny_gemma() / "config.json", model / "config.json")
        (model / "config.json").chmod(0o644)
        (model / "model.safetensors").write_bytes(b"weights")
        (model / "model.safetensors").chmod(0o600 if os.getuid() == 0 else 0o000)
        got = resolve_as_another_user(model, top / "dest")
        assert got["reason"] == "ModelNotReadable" and "model.safetensors" in got["message"], got
        assert "config.json" not in got["message"] and "spec.baseModel.uri" in got["message"]

        (model / "model.safetensors").chmod(0o644)
        assert resolve_as_another_user(model, top / "dest") == {"source": str(model)}

        model.chmod(0o700 if os.getuid() == 0 else 0o000)  # a folder it may not even enter
        got = resolve_as_another_user(model, top / "dest")
        assert got["reason"] == "ModelNotReadable" and "Permission denied" in got["message"], got
        model.chmod(0o755)


def test_a_gpu_pods_compile_runs_on_a_pool_of_workers_where_it_can():
    from finetune_trainer.train.model_loading import ENV_COMPILE_WORKERS, compile_workers_env

    pod = {"NVIDIA_VISIBLE_DEVICES": "GPU-5c1e9a3b-0f6d-4b8e-9e57-1f2a3b4c5d6e"}  # the device plugin's one GPU
    # Its one GPU is device 0 inside the container: said so, Unsloth leaves Inductor its workers.
    assert compile_workers_env(pod, cpus=16) == {"CUDA_VISIBLE_DEVICES": "0", "TORCHINDUCTOR_COMPILE_THREADS": "16"}
    assert compile_workers_env(pod, cpus=64)["TORCHINDUCTOR_COMPILE_THREADS"] == "16"  # capped
    assert compile_workers_env(pod, cpus=2) == {}  # too few CPUs for workers to pay
    # What the environment says already wins; several GPUs (torchrun's processes) are left alone.
    assert compile_workers_env({**pod, "CUDA_VISIBLE_DEVICES": "1"}, cpus=16) == {"TORCHINDUCTOR_COMPILE_THREADS": "16"}
    assert compile_workers_env({**pod, "TORCHINDUCTOR_COMPILE_THREADS": "4"}, cpus=16) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert "CUDA_VISIBLE_DEVICES" not in compile_workers_env({"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}, cpus=16)
    assert "CUDA_VISIBLE_DEVICES" not in compile_workers_env({"NVIDIA_VISIBLE_DEVICES": "all"}, cpus=16)
    assert compile_workers_env({**pod, "WORLD_SIZE": "2"}, cpus=16) == {}
    assert compile_workers_env({**pod, ENV_COMPILE_WORKERS: "1"}, cpus=16) == {}  # the way back to one thread
