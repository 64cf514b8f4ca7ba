"""Condition maps and content images for a converted data set: ``python -m rslib.data conditions``.

For every record of every split under ``root`` (the record format, :mod:`rslib.data.records`) this computes
the six CRS-Diff maps (:mod:`rslib.data.conditions`): lines, soft edges and sketch from the pixels; road,
depth and segmentation with the models the user supplies by local path. Each map goes to
``<split>/conditions/<name>/<stem>.png``, and ``<split>/metadata.jsonl`` then names it.

The **content image** of a record (CRS-Diff's global image condition) is another image of the same scene in
the same split, drawn with a fixed seed, as the SynthRS writer does. Records without a scene label (DIOR,
DIOR-RSVG, DOTA, unlabelled RSICD files), and the only record of its scene in a split, take their own image:
the convention of Uni-ControlNet, whose training code CRS-Diff builds on. A content image or a complete map
that a record already names (SynthRS has all of them) is kept.

Interruptions lose nothing and leave nothing half-written: every map file is written under a temporary name
and renamed into place, so a file at its final name is complete; ``metadata.jsonl`` is rewritten the same
way once a split is done. A rerun skips the records whose maps exist. ``<split>/conditions.json`` records
what was computed, with which models, and which maps were left out (``skip_missing``).
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from rslib.data.conditions import (MODEL_KINDS, ConditionModel, ModelLike, as_condition_model, line_segments,
                                   sketch, soft_edges)
from rslib.data.records import CONDITION_NAMES, CONTENT, DataFormatError, Record, encode_png, read_records

PIXEL_MAPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "lines": line_segments, "soft_edges": soft_edges, "sketch": sketch}
SUMMARY_NAME = "conditions.json"
COMMAND = "python -m rslib.data conditions"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of every complete PNG file
_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def map_file(record: Record, name: str) -> str:
    """Where a record's map lives, relative to its split: ``conditions/<name>/<image stem>.png``."""
    return f"conditions/{name}/{Path(record.file_name).stem}.png"


def is_complete_png(path: Path) -> bool:
    """True when ``path`` is a PNG file that ends with its IEND chunk (a truncated file does not)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size < len(_PNG_END) + 8:
        return False
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(-len(_PNG_END), os.SEEK_END)
        return head == b"\x89PNG\r\n\x1a\n" and f.read() == _PNG_END


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------
# Which maps, from which models


def _missing_models_error(kinds: Sequence[str]) -> FileNotFoundError:
    """The refusal when maps that need a model have none: names each map, its flag and the way out."""
    flags = ", ".join(f"{k} maps need --{k}-model PATH ({k}_model= in Python)" for k in kinds)
    return FileNotFoundError(
        f"{flags}: give a local transformers folder or a TorchScript file for each, or pass --skip-missing "
        f"(skip_missing=True) to leave {'it' if len(kinds) == 1 else 'them'} out and record "
        f"{'it' if len(kinds) == 1 else 'them'} as missing; see data/README.md")


def resolve_models(road_model: ModelLike = None, depth_model: ModelLike = None,
                   segmentation_model: ModelLike = None, skip_missing: bool = False
                   ) -> tuple[dict[str, ConditionModel], dict[str, str]]:
    """The given models loaded (a missing file fails here, before any work) and the maps left out, with why."""
    given = {"road": road_model, "depth": depth_model, "segmentation": segmentation_model}
    absent = [k for k in MODEL_KINDS if given[k] is None]
    if absent and not skip_missing:
        raise _missing_models_error(absent)
    models = {k: as_condition_model(k, m) for k, m in given.items() if m is not None}
    return models, {k: f"no --{k}-model given (--skip-missing)" for k in absent}


def _model_paths(**given: ModelLike) -> dict[str, str]:
    """Local paths of the given models (a process pool loads them again in each worker)."""
    out = {}
    for kind, model in given.items():
        if model is None:
            continue
        if not isinstance(model, (str, Path)):
            raise ValueError(f"workers > 1 needs every model as a local path; {kind}_model is a "
                             f"{type(model).__name__} (use workers=1)")
        out[kind] = str(Path(model).expanduser().resolve())
    return out


# ---------------------------------------------------------------------------
# One record


def record_maps(split_dir: Path, record: Record, names: Sequence[str],
                models: Mapping[str, ConditionModel]) -> dict[str, str]:
    """Compute and write the maps ``names`` of one record that are not complete on disk; returns their paths
    (a complete map the record already names is kept where it is)."""
    out = {}
    for name in names:
        known = record.conditions.get(name)
        out[name] = known if known and is_complete_png(split_dir / known) else map_file(record, name)
    todo = [name for name in names if not is_complete_png(split_dir / out[name])]
    if todo:
        from rslib.data.datasets import load_image

        path = split_dir / record.file_name
        try:
            image = load_image(path).copy()  # writable (torch models read it without a copy)
        except OSError as e:
            raise DataFormatError(path, f"cannot read the image ({e})",
                                  fix="replace the file or remove its record from metadata.jsonl") from e
        for name in todo:
            m = PIXEL_MAPS[name](image) if name in PIXEL_MAPS else models[name](image)
            write_atomically(split_dir / out[name], encode_png(m))
    return out


_WORKER: dict[str, Any] = {}


def _init_worker(names: Sequence[str], model_paths: Mapping[str, str]) -> None:
    """Process-pool initialiser: one thread per worker, the models loaded once."""
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    _WORKER.update(names=tuple(names), models={k: as_condition_model(k, p) for k, p in model_paths.items()})


def _worker_maps(task: tuple[Path, Record]) -> dict[str, str]:
    """:func:`record_maps` of one (split folder, record) inside a pool worker."""
    return record_maps(task[0], task[1], _WORKER["names"], _WORKER["models"])


# ---------------------------------------------------------------------------
# Content images


def content_files(records: Sequence[Record], split: str, seed: int = 0) -> list[str]:
    """Each record's content image: another record of its scene (seeded draw), else its own image."""
    by_scene: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        if rec.scene:
            by_scene.setdefault(rec.scene, []).append(i)
    rng = np.random.default_rng([seed, _SPLIT_SEEDS.get(split, 3), 99])
    out = []
    for i, rec in enumerate(records):
        others = [j for j in by_scene.get(rec.scene, []) if j != i] if rec.scene else []
        out.append(records[int(others[rng.integers(len(others))])].file_name if others else rec.file_name)
    return out


# ---------------------------------------------------------------------------
# metadata.jsonl


def _raw_lines(split_dir: Path) -> list[dict[str, Any]]:
    """Every record of ``metadata.jsonl`` as its JSON object (fields this module does not know are kept)."""
    with open(split_dir / "metadata.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def update_metadata(split_dir: Path, conditions: Sequence[Mapping[str, str]]) -> None:
    """Add each record's condition paths (and ``<name>_file_name`` columns) to ``metadata.jsonl``, atomically."""
    rows = _raw_lines(split_dir)
    if len(rows) != len(conditions):
        raise RuntimeError(f"{split_dir / 'metadata.jsonl'} changed while its maps were computed "
                           f"({len(rows)} records, {len(conditions)} expected): run {COMMAND} again")
    text = []
    for row, new in zip(rows, conditions):
        row["conditions"] = {**(row.get("conditions") or {}), **new}
        row.update({f"{name}_file_name": rel for name, rel in new.items()})
        text.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomically(split_dir / "metadata.jsonl", "".join(text).encode("utf-8"))


# ---------------------------------------------------------------------------
# A whole data set


def split_dirs(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """(split name, folder) of each split under ``root`` (``root`` itself when it is one split)."""
    root = Path(root)
    splits = [(name, root / name) for name in _SPLIT_SEEDS if (root / name / "metadata.jsonl").is_file()]
    if not splits and (root / "metadata.jsonl").is_file():
        splits = [(root.name, root)]
    if not splits:
        raise DataFormatError(root, "no split here (train/, val/ or test/ with a metadata.jsonl)",
                              fix="convert a data set first: python -m rslib.data convert --format ... --out ROOT")
    return splits


def _check_stems(split_dir: Path, records: Sequence[Record]) -> None:
    """Two images with one file stem would share their map files: refuse."""
    seen: dict[str, str] = {}
    for rec in records:
        stem = Path(rec.file_name).stem
        if stem in seen:
            raise DataFormatError(split_dir / "metadata.jsonl",
                                  f"images {seen[stem]!r} and {rec.file_name!r} share the stem {stem!r}, so their "
                                  "condition maps would share a file", fix="rename one of them")
        seen[stem] = rec.file_name


def _remove_stale_temporaries(split_dir: Path) -> None:
    """Temporary files an interrupted run left beside the maps."""
    for tmp in (split_dir / "conditions").glob("*/.*.tmp"):
        tmp.unlink(missing_ok=True)


def _worker_pool(workers: int, names: Sequence[str], model_paths: Mapping[str, str]) -> ProcessPoolExecutor:
    """``workers`` processes that compute maps, each with its own copy of the models."""
    # spawned, not forked: a fork of a process whose torch thread pool is running can hang
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(tuple(names), dict(model_paths)))


def _split_maps(split_dir: Path, records: Sequence[Record], names: Sequence[str],
                models: Mapping[str, ConditionModel], pool: ProcessPoolExecutor | None) -> Iterator[dict[str, str]]:
    """Every record's map paths in order, computed in this process or in the pool's."""
    if pool is None:
        for rec in records:
            yield record_maps(split_dir, rec, names, models)
    else:
        yield from pool.map(_worker_maps, [(split_dir, rec) for rec in records], chunksize=4)


def compute_condition_maps(root: str | os.PathLike, road_model: ModelLike = None, depth_model: ModelLike = None,
                           segmentation_model: ModelLike = None, skip_missing: bool = False, workers: int = 1,
                           seed: int = 0, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Write the condition maps and content images of every split under ``root``; returns each split's summary.

    ``*_model``: a local path (transformers folder or TorchScript file), a :class:`ConditionModel` or a
    callable; a map whose model is missing is refused unless ``skip_missing``. ``workers`` > 1 computes in
    that many processes (models as paths only; 0 = one per core). Resumable: complete map files are kept.
    """
    from tqdm.auto import tqdm

    models, missing = resolve_models(road_model, depth_model, segmentation_model, skip_missing)
    names = [n for n in CONDITION_NAMES if n in PIXEL_MAPS or n in models]
    workers = workers or (os.cpu_count() or 1)
    model_paths = (_model_paths(road=road_model, depth=depth_model, segmentation=segmentation_model)
                   if workers > 1 else None)
    splits = [(name, folder, read_records(folder)) for name, folder in split_dirs(root)]
    for _, folder, records in splits:
        _check_stems(folder, records)
    summaries = {}
    pool = _worker_pool(workers, names, model_paths) if model_paths is not None else None
    with tqdm(total=sum(len(r) for *_, r in splits), desc="condition maps", unit="image",
              disable=not progress) as bar, pool or contextlib.nullcontext():
        for split, folder, records in splits:
            _remove_stale_temporaries(folder)
            found = []
            for paths in _split_maps(folder, records, names, models, pool):
                found.append(paths)
                bar.update()
            drawn = content_files(records, split, seed)
            content = [rec.conditions.get(CONTENT) or c for rec, c in zip(records, drawn)]
            update_metadata(folder, [{**p, CONTENT: c} for p, c in zip(found, content)])
            given = {"road": road_model, "depth": depth_model, "segmentation": segmentation_model}
            summaries[split] = {
                "maps": list(names), "missing": missing, "records": len(records),
                "models": {k: str(m) if isinstance(m, (str, Path)) else repr(m) for k, m in given.items() if m},
                "content": f"another image of the same scene in the split (seed {seed}), else the image itself",
            }
            write_atomically(folder / SUMMARY_NAME, (json.dumps(summaries[split], indent=1) + "\n").encode())
    return summaries


__all__ = ["COMMAND", "PIXEL_MAPS", "SUMMARY_NAME", "compute_condition_maps", "content_files", "is_complete_png",
           "map_file", "record_maps", "resolve_models", "split_dirs", "update_metadata", "write_atomically"]
