"""SynthRS generation throughput (images/s), in memory and written to disk, at 64 and 256 px.

    python bench/synthrs_throughput.py [--n 2000] [--workers 0]

Prints one line per setting and appends a row to bench/RESULTS.md with the machine and date.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from rslib.data.synthrs import generate, write_split


def measure(n: int, size: int, workers: int, to_disk: bool) -> float:
    """Images per second for n images at size px."""
    t0 = time.perf_counter()
    if to_disk:
        tmp = Path(tempfile.mkdtemp())
        write_split(tmp / "train", n, size, seed=1, workers=workers)
        shutil.rmtree(tmp)
    else:
        generate(n, size, seed=1, workers=workers)
    return n / (time.perf_counter() - t0)


def main() -> None:
    """Run the benchmark and record it."""
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    generate(64, 64, workers=1)  # warm the texture cache
    rows = []
    for size, n in ((64, args.n), (256, max(64, args.n // 10))):
        for to_disk in (False, True):
            rate = measure(n, size, args.workers, to_disk)
            what = "generate + write PNGs" if to_disk else "generate (in memory)"
            print(f"{size:4d} px  {what:24s} {rate:7.1f} images/s  (n={n})")
            rows.append(f"| {size} | {what} | {rate:.0f} | {n} |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    stamp = datetime.date.today().isoformat()
    results = Path(__file__).with_name("RESULTS.md")
    header = "" if results.exists() else "# Benchmark results\n"
    with open(results, "a") as f:
        f.write(f"{header}\n## SynthRS throughput ({stamp}, {machine})\n\n`python bench/synthrs_throughput.py --n {args.n}`\n\n"
                "| size (px) | what | images/s | n |\n| ---: | --- | ---: | ---: |\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
