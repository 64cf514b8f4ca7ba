"""SynthRS generation throughput (images/s), in memory and written to disk, at 64 and 256 px.

    python bench/synthrs_throughput.py [--n 2000] [--workers 0] [--sizes 64 256] [--json OUT] [--record]

Prints one line per setting; ``--json`` also writes them to a file, ``--record`` appends a section to
bench/RESULTS.md with the machine and date (nothing else is written).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from results import command_line, machine, record, write_json

from rslib.data.synthrs import generate, write_split


def measure(n: int, size: int, workers: int, to_disk: bool) -> float:
    """Images per second for n images at size px."""
    t0 = time.perf_counter()
    if to_disk:
        tmp = Path(tempfile.mkdtemp())
        try:
            write_split(tmp / "train", n, size, seed=1, workers=workers)
        finally:
            shutil.rmtree(tmp)
    else:
        generate(n, size, seed=1, workers=workers)
    return n / (time.perf_counter() - t0)


def images_at(size: int, n: int) -> int:
    """Images measured at ``size`` px: ``n`` at 64 px or less, a tenth of it (at least 64) above."""
    return n if size <= 64 else max(64, n // 10)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| size (px) | what | images/s | n |", "| ---: | --- | ---: | ---: |"]
    lines += [f"| {r['size']} | {r['what']} | {r['images_per_s']:.0f} | {r['n']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print it, and write it where asked; returns the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="images at 64 px (a tenth, at least 64, at larger sizes)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results to this file")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    generate(64, 64, workers=1)  # warm the texture cache
    rows = []
    for size in args.sizes:
        n = images_at(size, args.n)
        for to_disk in (False, True):
            rate = measure(n, size, args.workers, to_disk)
            what = "generate + write PNGs" if to_disk else "generate (in memory)"
            print(f"{size:4d} px  {what:24s} {rate:7.1f} images/s  (n={n})")
            rows.append({"size": size, "what": what, "images_per_s": rate, "n": n})
    result = {"script": "synthrs_throughput", "machine": machine(), "workers": args.workers, "rows": rows}
    if args.json is not None:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.record:
        record("SynthRS throughput", command_line("synthrs_throughput", argv), markdown(rows))
    return result


if __name__ == "__main__":
    main()
