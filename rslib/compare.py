"""Compare two runs folders file by file: are the weights, measurements, figures and tables of two runs the same?

    python -m rslib.compare runs_before/smoke runs/smoke

Every file found under either folder is compared by kind:

* weights (``.safetensors``): tensor by tensor, names, dtypes, shapes and values; optimizer and scheduler states
  (``.pt``) likewise, read with ``weights_only=True``;
* JSON (eval.json, the completion and settings files, loss histories): number by number; values whose key
  records a wall time (``seconds``, ``images_per_s``, ...) or hashes a file that records one (``digest``) are
  listed as volatile, never as differences;
* figures (``.png``): pixel by pixel;
* tables (``.csv``, ``.md``) and every other file: byte for byte.

Executed notebooks (``.ipynb``) are left out: their outputs print wall times. Files renamed between versions of
the project are matched by :data:`RENAMES` (old name -> new name), applied to both folders. The command prints
one line per file that differs or is missing on one side, then a summary, and exits with status 0 when all
compared files are identical, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (pattern, replacement) on a file's path relative to the runs folder: where a file of an earlier layout lives now.
# Before one stage protocol (rslib.train.stage), RS-CLIP, the autoencoder, the segmenter and the detectors kept their
# checkpoint, history and stamp in the stage folder itself, and the pipeline stages marked a finished run with
# <stage>.json instead of training.json.
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(text_encoder|autoencoder|segmenter|detector[^/]*|engine/[^/]+)/(checkpoint/|history\.json$|stamp\.json$)",
     r"\1/training/\2"),
    (r"^(.*/)?(stage_one|crs_diff|cc_diff)\.json$", r"\1training.json"),
)
SKIPPED_SUFFIXES = (".ipynb",)
# keys whose values are wall times or rates (they differ between any two runs), or digests of files holding them
VOLATILE_KEY = re.compile(r"(seconds|_s|per_s|_time|wall|digest)$")
VOLATILE_FILES = ("timings.json",)


@dataclass
class Report:
    """What a comparison found: identical files, differing ones (with the first difference), one-sided files."""

    identical: list[str] = field(default_factory=list)
    different: dict[str, str] = field(default_factory=dict)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    volatile: dict[str, int] = field(default_factory=dict)  # file -> number of volatile values skipped

    @property
    def all_identical(self) -> bool:
        """True when no compared file differs and no file is on one side only."""
        return not (self.different or self.only_a or self.only_b)

    def lines(self) -> list[str]:
        """The report as text: one line per difference or one-sided file, then a summary."""
        out = [f"DIFFERENT  {name}: {why}" for name, why in sorted(self.different.items())]
        out += [f"ONLY IN A  {name}" for name in self.only_a] + [f"ONLY IN B  {name}" for name in self.only_b]
        skipped = sum(self.volatile.values())
        out.append(f"{len(self.identical)} files identical, {len(self.different)} different, {len(self.only_a)} only "
                   f"in A, {len(self.only_b)} only in B ({skipped} wall-time values and digests not compared)")
        out.append("all identical" if self.all_identical else "NOT identical")
        return out


def canonical_name(relative: str) -> str:
    """A file's path under its runs folder with :data:`RENAMES` applied (the current layout's name)."""
    for pattern, replacement in RENAMES:
        relative = re.sub(pattern, replacement, relative)
    return relative


def run_files(root: str | Path) -> dict[str, Path]:
    """Every compared file under ``root`` by its canonical relative name."""
    root = Path(root)
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix not in SKIPPED_SUFFIXES:
            files[canonical_name(path.relative_to(root).as_posix())] = path
    return files


# ---------------------------------------------------------------------------
# One comparison per kind of file; each returns None when equal, else where the first difference lies


def _tensors_differ(a: Any, b: Any, where: str = "") -> str | None:
    """The first difference between two nested structures of tensors and plain values (None if equal)."""
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            return f"{where or 'value'}: a tensor on one side only"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where or 'tensor'}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max() if a.is_floating_point() else "n/a"
            return f"{where or 'tensor'}: values differ (largest difference {diff})"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where or 'keys'}: keys {sorted(map(str, set(a) ^ set(b)))[:5]} on one side only"
        for k in a:
            found = _tensors_differ(a[k], b[k], f"{where}.{k}" if where else str(k))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where or 'list'}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _tensors_differ(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where or 'value'}: {a!r} vs {b!r}"


def compare_safetensors(a: Path, b: Path) -> str | None:
    """Tensor by tensor: the same names, dtypes, shapes and values."""
    from safetensors.torch import load_file

    return _tensors_differ(load_file(str(a)), load_file(str(b)))


def compare_torch_state(a: Path, b: Path) -> str | None:
    """An optimizer or scheduler state (``torch.save``), read with ``weights_only=True``."""
    import torch

    return _tensors_differ(torch.load(a, map_location="cpu", weights_only=True),
                           torch.load(b, map_location="cpu", weights_only=True))


def _json_leaves(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) of every number, string, bool or null in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_leaves(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_leaves(v, f"{where}[{i}]")
    else:
        yield where, value


def _volatile(path: str) -> bool:
    """True for a value whose key (or any key above it) records a wall time, a rate or a digest."""
    return any(VOLATILE_KEY.search(part) for part in re.split(r"[.\[]", path) if part)


def _same_leaf(x: Any, y: Any) -> bool:
    """Equal JSON leaves; NaN equals NaN, and 1 equals 1.0 only as the same number."""
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return type(x) is type(y) and x == y


def compare_json(a: Path, b: Path, volatile: dict[str, int], name: str) -> str | None:
    """Number by number, volatile values (wall times, digests) counted in ``volatile`` and not compared."""
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    la, lb = dict(_json_leaves(left)), dict(_json_leaves(right))
    skipped = 0
    for key in sorted(la.keys() | lb.keys()):
        if name.endswith(VOLATILE_FILES) or _volatile(key):
            skipped += 1
            continue
        if key not in la or key not in lb:
            return f"{key}: present on one side only"
        if not _same_leaf(la[key], lb[key]):
            return f"{key}: {la[key]!r} vs {lb[key]!r}"
    if skipped:
        volatile[name] = skipped
    return None


def compare_png(a: Path, b: Path) -> str | None:
    """Pixel by pixel (the decoded images, whatever the PNG metadata)."""
    import numpy as np
    from PIL import Image

    x, y = np.asarray(Image.open(a).convert("RGBA")), np.asarray(Image.open(b).convert("RGBA"))
    if x.shape != y.shape:
        return f"size {x.shape[1]} x {x.shape[0]} vs {y.shape[1]} x {y.shape[0]}"
    n = int((x != y).any(-1).sum())
    return f"{n} pixels differ" if n else None


def compare_bytes(a: Path, b: Path) -> str | None:
    """Byte for byte; for text, the first line that differs."""
    x, y = a.read_bytes(), b.read_bytes()
    if x == y:
        return None
    try:
        lines = zip(x.decode().splitlines(), y.decode().splitlines())
        first = next(((i, p, q) for i, (p, q) in enumerate(lines, 1) if p != q), None)
    except UnicodeDecodeError:
        first = None
    return f"line {first[0]}: {first[1]!r} vs {first[2]!r}" if first else f"{len(x)} vs {len(y)} bytes"


def compare_file(a: Path, b: Path, volatile: dict[str, int], name: str) -> str | None:
    """The comparison of the file's kind (by suffix)."""
    suffix = a.suffix
    if suffix == ".safetensors":
        return compare_safetensors(a, b)
    if suffix == ".pt":
        return compare_torch_state(a, b)
    if suffix == ".json":
        return compare_json(a, b, volatile, name)
    if suffix == ".png":
        return compare_png(a, b)
    return compare_bytes(a, b)


def compare_runs(a: str | Path, b: str | Path) -> Report:
    """Compare every file of two runs folders (see the module's description)."""
    fa, fb = run_files(a), run_files(b)
    report = Report(only_a=sorted(fa.keys() - fb.keys()), only_b=sorted(fb.keys() - fa.keys()))
    for name in sorted(fa.keys() & fb.keys()):
        why = compare_file(fa[name], fb[name], report.volatile, name)
        if why is None:
            report.identical.append(name)
        else:
            report.different[name] = why
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: print the report; status 0 when all identical."""
    p = argparse.ArgumentParser(prog="python -m rslib.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="a runs folder, e.g. runs/smoke of one version")
    p.add_argument("b", type=Path, help="the runs folder to compare it with")
    args = p.parse_args(argv)
    for folder in (args.a, args.b):
        if not folder.is_dir():
            p.error(f"{folder} is not a folder")
    report = compare_runs(args.a, args.b)
    print("\n".join(report.lines()))
    return 0 if report.all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
