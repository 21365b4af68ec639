"""The agent tools: JSON Schemas derived from the API models, and calls that run the real commands."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_api.spec import GGUF_QUANT_TYPES
from finetune_trainer import tools
from finetune_trainer.cli import main
from tests.trainer_fixtures import OFFLINE_ENV, tiny_gemma

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def test_tools_json_lists_the_four_tools_with_schemas(capsys):
    assert main(["tools", "--json"]) == 0
    defs = {t["function"]["name"]: t["function"] for t in json.loads(capsys.readouterr().out)}
    assert set(defs) == {"prepare_dataset", "finetune", "export_gguf", "run_eval"}
    params = {name: d["parameters"] for name, d in defs.items()}
    assert params["prepare_dataset"]["required"] == ["source", "output_dir"]
    assert params["finetune"]["properties"]["learning_rate"]["exclusiveMinimum"] == 0  # from TrainingSpec
    assert params["finetune"]["properties"]["lora_r"]["maximum"] == 256  # from LoraSpec
    assert params["export_gguf"]["properties"]["quantization"]["enum"] == list(GGUF_QUANT_TYPES)
    assert params["run_eval"]["properties"]["eval_set"]["type"] == "array"
    assert all(p["additionalProperties"] is False for p in params.values())
    assert all(d["description"] for d in defs.values())


def test_tool_calls_map_to_commands():
    assert tools.argv("finetune", {"dataset": "d", "output_dir": "o", "quant": "4bit", "max_steps": 30})[:9] == [
        "train", "--base-model", "unsloth/gemma-3-270m-it", "--dataset", "d", "--output-dir", "o", "--max-steps", "30"]
    assert "qlora" in tools.argv("finetune", {"dataset": "d", "output_dir": "o", "quant": "4bit"})
    assert tools.argv("export_gguf", {"checkpoint_dir": "a", "output_file": "m.gguf", "quantization": "q8_0"}) == [
        "export-gguf", "--checkpoint-dir", "a", "--quantization", "q8_0", "--output-file", "m.gguf"]
    assert tools.argv("run_eval", {"gguf_file": "m.gguf", "eval_set": ["arc_easy", "piqa"], "limit": 5})[:5] == [
        "eval", "--gguf", "m.gguf", "--tasks", "arc_easy,piqa"]


def test_prepare_dataset_tool_call_runs_the_command(tmp_path, monkeypatch, capsys):
    for k, v in OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    code = tools.call("prepare_dataset", {"source": str(EXAMPLES / "sharegpt-mini.jsonl"),
                                          "output_dir": str(tmp_path / "ds"), "base_model": str(tiny_gemma())})
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "sharegpt" and report["rows"]["used"] == 12
    assert (tmp_path / "ds" / "train.parquet").exists()


def test_the_stage_commands_flags_are_the_api_fields(tmp_path, monkeypatch, capsys):
    """One source: every TrainingSpec and LoraSpec field is a `finetune train` flag with the model's
    choices and default; what is not given is the model's default; a bad value names the flag."""
    from finetune_api.spec import LoraSpec, TrainingSpec
    from finetune_trainer.cli import parser, training_spec

    train = next(a for a in parser()._actions if a.dest == "command").choices["train"]
    flags = {a.dest: a for a in train._actions}
    assert set(TrainingSpec.model_fields) - {"lora"} <= set(flags)
    assert {f"lora_{name}" for name in LoraSpec.model_fields} <= set(flags)
    assert flags["lr_scheduler"].choices == ["linear", "cosine", "constant", "constant_with_warmup"]
    assert "(default: 0.0002)" in flags["learning_rate"].help and "(default: auto)" in flags["batch_size"].help
    assert training_spec(train.parse_args([])) == TrainingSpec()
    spec = training_spec(train.parse_args(["--batch-size", "4", "--no-packing", "--lora-r", "32", "--max-steps", "3"]))
    assert (spec.batch_size, spec.packing, spec.lora.r, spec.lora.alpha, spec.max_steps) == (4, False, 32, 32, 3)
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "t"))
    assert main(["train", "--dataset", "d", "--output-dir", str(tmp_path), "--learning-rate", "0"]) == 42
    term = json.loads((tmp_path / "t").read_text())
    assert term["reason"] == "InvalidSpec" and term["message"].startswith("--learning-rate:")
