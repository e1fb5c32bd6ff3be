"""Measures the native fault loop's service rate (not a test; pytest does not collect it).

    python3 tests/bench_native_faults.py [--pages 32768] [--windows 1,16,64,256] [--repeat 3]

For each window size, a fresh tests/native_target.c process gets its region saved to a paging
file (page cache), evicted with injected MADV_DONTNEED, and then reads one word of every page
(sequentially): every page comes back through gfvm.native.FaultLoop. Reported: pages/s seen by
the process, windows served, loop latency p50/p99 per window. Baseline: the same process
first-touching as many fresh pages (plain kernel faults, no uffd). Compare ratios from one run:
absolute numbers are noisy on shared 2-vCPU machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from native_support import HERE, PAGE, Target

from gfvm import native


def build_target(tmp: Path) -> Path:
    out = tmp / "native_target"
    subprocess.run(
        ["gcc", "-O1", "-pthread", "-o", str(out), str(HERE / "native_target.c")], check=True
    )
    return out


def served_rate(binary: Path, tmp: Path, npages: int, window: int, tracer: native.Tracer) -> dict:
    t = Target(binary, npages)
    try:
        with native.FaultLoop(window) as loop, open(tmp / f"paging-{t.pid}", "w+b") as f:
            loop.start()
            uffd = tracer.inject_userfaultfd(t.pid)
            uffd.api(native.PAGER_FEATURES)
            uffd.register(t.addr, npages * PAGE, missing=True, wp=True)
            uffd.writeprotect(t.addr, npages * PAGE)
            buf = bytearray(npages * PAGE)
            native.read_ranges(t.pid, [(t.addr, t.end)], buf)
            f.write(buf)
            f.flush()
            index = native.PageIndex(npages)
            index.set_many([t.page(i) for i in range(npages)], range(npages))
            uid = loop.add(uffd, [native.Source(index, f.fileno())], wp=True, pid=t.pid)
            native.evict_pages(
                tracer, t.pid, [(t.addr, t.end)], loop=loop, uffd_id=uid, uffd=uffd, index=index
            )
            word, elapsed_us = t.cmd("touch", timeout=600).split()
            assert word == "ok"
            check = t.cmd("verify", timeout=600)
            assert check == f"ok {npages}", check
            counters, hist = loop.counters(uid), loop.latency()
            uffd.close()
        return {
            "rate": npages / (int(elapsed_us) / 1e6),
            "windows": counters.windows,
            "p50_us": (hist.p50_ns or 0) / 1000,
            "p99_us": (hist.p99_ns or 0) / 1000,
        }
    finally:
        t.kill()


def kernel_rate(binary: Path, npages: int) -> float:
    t = Target(binary, npages)
    try:
        word, elapsed_us = t.cmd("fresh", timeout=600).split()
        assert word == "ok"
        return npages / (int(elapsed_us) / 1e6)
    finally:
        t.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=32768)
    ap.add_argument("--windows", default="1,16,64,256")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (userfaultfd, ptrace)")
    with tempfile.TemporaryDirectory() as d, native.Tracer() as tracer:
        tmp = Path(d)
        binary = build_target(tmp)
        base = [kernel_rate(binary, args.pages) for _ in range(args.repeat)]
        print(
            f"{args.pages} pages ({args.pages * PAGE >> 20} MiB), sequential reads, "
            f"median of {args.repeat}"
        )
        print(f"plain first-touch kernel faults: {statistics.median(base) / 1e3:8.0f} k pages/s")
        for window in (int(w) for w in args.windows.split(",")):
            runs = [
                served_rate(binary, tmp, args.pages, window, tracer) for _ in range(args.repeat)
            ]
            mid = sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]
            print(
                f"fault loop, window {window:3d}:      {mid['rate'] / 1e3:8.0f} k pages/s   "
                f"({mid['windows']} windows, per window p50 {mid['p50_us']:.0f} us, "
                f"p99 {mid['p99_us']:.0f} us)"
            )


if __name__ == "__main__":
    main()
