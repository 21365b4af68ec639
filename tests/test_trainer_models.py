"""Where a base model comes from, which backend trains it, and which chat template a run uses."""

from __future__ import annotations

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
