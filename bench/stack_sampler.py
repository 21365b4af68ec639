"""Runs a Python module with every thread's stack written to a file at a fixed interval: a sampling
profiler with nothing to install, cheap enough to leave on for a whole `finetune run`. A thread in C
code shows as the Python line that called it.

    python bench/stack_sampler.py stacks.txt 0.25 -m finetune_trainer run --config c.yaml --workdir w

Each sample starts with a "Timeout (at T s)!" line, T seconds after the start (a sample waits for
the GIL, so the interval is a least). `python bench/stack_sampler.py --summary stacks.txt 0.25 FROM TO` counts the
main thread's innermost project or library frames between two times.
"""

from __future__ import annotations

import collections
import re
import runpy
import sys
import threading
import time
import traceback
from pathlib import Path


def sample(out, interval: float) -> None:
    """Every thread's stack, in faulthandler's format (its own dump_traceback_later reads the frames
    without the GIL and crashed the trainer while it imported torch): taken with the GIL, between bytecodes."""
    me, t0 = threading.get_ident(), time.monotonic()
    while True:
        time.sleep(interval)
        frames = sys._current_frames()
        lines = [f"Timeout (at {time.monotonic() - t0:.3f} s)!"]
        for ident, frame in sorted(frames.items(), key=lambda kv: kv[0] == threading.main_thread().ident):
            if ident == me:
                continue
            lines.append(f"Thread {ident:#x} (most recent call first):")
            lines += [f'  File "{f.filename}", line {f.lineno} in {f.name}'
                      for f in reversed(traceback.extract_stack(frame))]
            lines.append("")
        out.write("\n".join(lines) + "\n")


def summary(path: str, interval: float, start: float, end: float, depth: int = 6) -> None:
    parts = re.split(r"^Timeout \(at ([0-9.]+) s\)!\n", Path(path).read_text(), flags=re.M)[1:]
    counts: collections.Counter = collections.Counter()
    for at, sample in zip(parts[::2], parts[1::2], strict=True):
        if not start <= float(at) < end:
            continue
        # faulthandler writes the current thread (its own watchdog is not one) and then the others,
        # each "Thread 0x… (most recent call first):"; the main thread is the last one listed.
        threads = re.split(r"^(?:Thread|Current thread) 0x[0-9a-f]+ .*\n", sample, flags=re.M)
        frames = re.findall(r'^\s*File "(?:.*/)?(.*)", line (\d+) in (.*)$', threads[-1], flags=re.M)
        counts[" < ".join(f"{func} {file}:{line}" for file, line, func in frames[:depth])] += 1
    total = sum(counts.values())
    print(f"{total} samples of the main thread, {start:.1f}-{end:.1f} s")
    for stack, n in counts.most_common(25):
        print(f"{n:5d} ({n / max(total, 1):4.0%})  {stack}")


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        summary(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
        sys.exit(0)
    out, interval, flag, module, *args = sys.argv[1:]
    assert flag == "-m", "usage: stack_sampler.py OUT INTERVAL -m MODULE ARGS..."
    stacks = open(out, "w", buffering=1)  # noqa: SIM115 - written until the process ends
    threading.Thread(target=sample, args=(stacks, float(interval)), daemon=True).start()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
