"""How much of each GPU library file is in the page cache (mincore), before and after a run: what a
cold node had to read from disk during it (2026-12-07: ptxas and little else, so a cold machine's
slow first step is not its disk).

    python bench/page_residency.py snapshot before.json
    python bench/page_residency.py diff before.json after.json   # the files the run brought in, in MB
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
import sys
from pathlib import Path

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(path: str) -> int:
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: maps, reads nothing
        if addr in (None, ctypes.c_void_p(-1).value):
            return -1
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        libc.mincore(addr, size, vec)
        libc.munmap(addr, size)
        return sum(v & 1 for v in vec) * PAGE
    finally:
        os.close(fd)


def files() -> list[str]:
    roots = [p for name in ("torch", "nvidia", "triton", "bitsandbytes", "unsloth", "transformers")
             for spec in [importlib.util.find_spec(name)] if spec for p in spec.submodule_search_locations or []]
    found = [p for root in roots for p in glob.glob(f"{root}/**/*", recursive=True)]
    found += glob.glob("/usr/lib/x86_64-linux-gnu/lib*nvidia*") + glob.glob("/usr/lib/x86_64-linux-gnu/libcuda*")
    return sorted({os.path.realpath(p) for p in found
                   if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 1 << 20})


def main() -> None:
    if sys.argv[1] == "snapshot":
        snap = {p: [resident_bytes(p), os.path.getsize(p)] for p in files()}
        Path(sys.argv[2]).write_text(json.dumps(snap))
        print(f"page cache: {sum(r for r, _ in snap.values()) / 1e6:.0f} of "
              f"{sum(s for _, s in snap.values()) / 1e6:.0f} MB of {len(snap)} GPU library files resident")
    else:
        before, after = (json.loads(Path(f).read_text()) for f in sys.argv[2:4])
        grown = sorted(((after[p][0] - before.get(p, [0])[0], p) for p in after), reverse=True)
        print(f"brought into the page cache between the two: {sum(g for g, _ in grown if g > 0) / 1e6:.0f} MB")
        for g, p in grown[:25]:
            if g > 0:
                print(f"{g / 1e6:9.1f} MB of {after[p][1] / 1e6:9.1f}  {p}")


if __name__ == "__main__":
    main()
