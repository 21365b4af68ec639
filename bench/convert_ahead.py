"""The export's 16-bit conversion of the Gemma 3 270M shape, three ways, on this machine's CPUs:

    .venv/bin/python bench/convert_ahead.py --model-dir /tmp/gemma3-270m-random --repeats 3

- cold: llama.cpp's converter as a fresh process (imports included);
- warm: the converter child started ahead, imports done, told to convert (what runs since the
  converter was started while the model trains);
- warm + tokenizer ahead: the same child, which has also parsed the merged folder's tokenizer files,
  written ahead (tokenizer.json, the SentencePiece vocabulary: convert.stage_tokenizer_files).
Only the conversion call is timed (from the arguments sent to the file written); a warm child gets
20 s to import and parse first, as it would while the model trains. Random weights of the real shape;
the real Gemma 3 tokenizer (the project's cache, hack/bootstrap.sh). Prints seconds and ratios
against cold, measured in this run; every output file is checked byte for byte against cold's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "trainer-image"))
sys.path.insert(0, str(ROOT / "hack"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="/tmp/gemma3-270m-random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds a warm child gets before the call")
    args = parser.parse_args()

    from train_throughput import make_model_dir
    from transformers import AutoTokenizer

    from devstack.models import gemma_tokenizer_dir
    from finetune_trainer.data import chat_templates
    from finetune_trainer.export import convert
    from finetune_trainer.train.model_loading import BaseModel

    model_dir = make_model_dir(Path(args.model_dir), gemma_tokenizer_dir())
    base = BaseModel(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template = chat_templates.resolve("auto", tokenizer)
    work = Path(args.model_dir).with_name(Path(args.model_dir).name + "-convert-bench")
    staged = convert.stage_tokenizer_files(base, tokenizer, template, work / "tokenizer-ahead")
    merged = work / "merged"  # what merge writes: the weights and the staged tokenizer files
    merged.mkdir(parents=True, exist_ok=True)
    for f in list(model_dir.iterdir()):
        if f.name.startswith("model") or f.name == "config.json":  # read only: linked
            (merged / f.name).unlink(missing_ok=True)
            (merged / f.name).symlink_to(f)
    shutil.copyfile(model_dir / "generation_config.json", merged / "generation_config.json")  # rewritten below
    convert._write_tokenizer(base, tokenizer, template, "gemma3_text", merged, staged)

    times: dict[str, list[float]] = {"cold": [], "warm": [], "warm + tokenizer ahead": []}
    digests: set[str] = set()
    for i in range(args.repeats):
        for way in times:
            warm = None
            if way != "cold":
                warm = convert.WarmConverter(base.source, staged if "ahead" in way else None)
                time.sleep(args.settle)
            out = work / f"out-{i}-{way.split()[0]}-{len(way)}.gguf"
            t0 = time.perf_counter()
            convert.convert(merged, out, "f16", "bench", warm)
            times[way].append(time.perf_counter() - t0)
            digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
            out.unlink()
            print(f"{way}: {times[way][-1]:.2f} s", flush=True)
    if len(digests) != 1:
        raise SystemExit(f"the three ways wrote different files: {digests}")
    cold = statistics.median(times["cold"])
    result = {way: {"medianSeconds": round(statistics.median(t), 2), "runs": [round(x, 2) for x in t],
                    "vsCold": round(cold / statistics.median(t), 2)} for way, t in times.items()}
    print(json.dumps({"model": str(model_dir), "repeats": args.repeats, "identicalFiles": True, **result}, indent=2))


if __name__ == "__main__":
    main()
