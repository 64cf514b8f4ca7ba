"""CC-Diff's own ``metadata.jsonl`` (file_name, caption, bndboxes, obboxes), written from record-format splits."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterable

from rslib.data.records import Record, dataset_info, read_records, write_jsonl

# CC-Diff's instance counts per format, as (at most, padded to): upstream truncates and pads DIOR(-RSVG) to 6
# instances; its DOTA converter only pads, so DOTA keeps every object (None: no limit)
CCDIFF_INSTANCES: dict[str, tuple[int | None, int | None]] = {"dior": (6, 6), "dior-rsvg": (6, 6), "dota": (None, 6)}


def write_ccdiff_metadata(records: Iterable[Record], path: str | os.PathLike, max_instances: int | None = 6,
                          pad_to: int | None = None) -> None:
    """Write CC-Diff's own ``metadata.jsonl`` (file_name, caption, bndboxes, obboxes), one line per image.

    ``caption`` is ``[global caption, label_1, ..., label_k]``; boxes are
    normalised ``[x1, y1, x2, y2]`` and ``[x1, y1, ..., x4, y4]``. The first
    ``max_instances`` objects are kept (``None``: all of them), and the lists
    are padded with ``""`` and zero boxes to ``pad_to`` objects (default:
    ``max_instances``; 0 or ``None`` with ``max_instances=None``: no padding).
    :data:`CCDIFF_INSTANCES` holds upstream's values per format, and
    :func:`write_ccdiff_split` uses them.
    """
    for name, value in (("max_instances", max_instances), ("pad_to", pad_to)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    rows = []
    for rec in records:
        objs = list(rec.objects) if max_instances is None else list(rec.objects)[:max_instances]
        caption = [rec.captions[0] if rec.captions else "", *(o.label for o in objs)]
        bnd = [[round(float(v), 5) for v in o.bbox] for o in objs]
        obb = [[round(float(v), 5) for v in o.obb] for o in objs]
        pad = max(0, ((max_instances if pad_to is None else pad_to) or 0) - len(objs))
        caption += [""] * pad
        bnd += [[0.0] * 4 for _ in range(pad)]
        obb += [[0.0] * 8 for _ in range(pad)]
        rows.append({"file_name": rec.file_name, "caption": caption, "bndboxes": bnd, "obboxes": obb})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{secrets.token_hex(6)}")  # permissions from the umask, as for path
    try:
        write_jsonl(tmp, rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_ccdiff_split(split_dir: str | os.PathLike, path: str | os.PathLike) -> tuple[int | None, int | None]:
    """CC-Diff's ``metadata.jsonl`` at ``path`` for a converted split, with the instance counts upstream uses for
    the split's format (:data:`CCDIFF_INSTANCES`; 6 and 6 for other formats); returns (at most, padded to)."""
    fmt = dataset_info(split_dir).get("format")
    max_instances, pad_to = CCDIFF_INSTANCES.get(fmt, (6, 6))
    write_ccdiff_metadata(read_records(split_dir), path, max_instances, pad_to)
    return max_instances, pad_to
