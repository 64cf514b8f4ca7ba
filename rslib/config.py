"""Presets (smoke | cpu | gpu | paper) as frozen dataclasses.

Every notebook resolves one preset with :func:`get_preset` and passes it to
the library. A preset only holds numbers and paths; no code reads global state.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PRESET_NAMES = ("smoke", "cpu", "gpu", "paper")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DataConfig:
    """Where the data set lives and how much of SynthRS to generate."""

    image_size: int = 64
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    seed: int = 0
    root: str = ""  # folder of a real data set in the record format; "" = SynthRS
    max_objects: int = 12  # boxes per image after padding


@dataclass(frozen=True)
class Preset:
    """One named preset: every knob a notebook needs, resolved once."""

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    runs_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | mps
    num_workers: int = 0

    def run_dir(self, stage: str) -> Path:
        """Folder of one stage's artifact, e.g. runs/cpu/stage_one."""
        return resolve_path(self.runs_dir) / self.name / stage

    def synthrs_dir(self) -> Path:
        """Folder of the SynthRS splits for this preset's image size and seed."""
        return REPO_ROOT / "data" / "synthrs" / f"{self.data.image_size}px_seed{self.data.seed}"

    def data_dir(self) -> Path:
        """Folder holding the train/val/test splits (SynthRS or a real data set)."""
        return resolve_path(self.data.root) if self.data.root else self.synthrs_dir()

    def figures_dir(self) -> Path:
        """Where notebooks save figures: figures/ for the cpu preset (the committed gallery), else runs/<preset>/figures."""
        return REPO_ROOT / "figures" if self.name == "cpu" else self.run_dir("figures")

    def split_sizes(self) -> dict[str, int]:
        """Number of SynthRS images per split."""
        return {"train": self.data.n_train, "val": self.data.n_val, "test": self.data.n_test}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for printing and for saving next to artifacts)."""
        return asdict(self)


def resolve_path(path: str | os.PathLike) -> Path:
    """Relative paths are taken from the repository root, so notebooks run from anywhere."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


_PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        data=DataConfig(image_size=32, n_train=48, n_val=16, n_test=16, max_objects=8),
    ),
    "cpu": Preset(
        name="cpu",
        data=DataConfig(image_size=64, n_train=4000, n_val=400, n_test=400),
    ),
    "gpu": Preset(
        name="gpu",
        data=DataConfig(image_size=256, n_train=20000, n_val=1000, n_test=1000, max_objects=24),
        num_workers=4,
    ),
    "paper": Preset(
        name="paper",
        data=DataConfig(image_size=512, n_train=0, n_val=0, n_test=0, max_objects=24),
        num_workers=8,
    ),
}


def get_preset(name: str | None = None, **overrides: Any) -> Preset:
    """Return the named preset (default: $RSLIB_PRESET or "cpu"), with top-level or
    dotted overrides, e.g. ``get_preset("cpu", **{"data.seed": 3})``."""
    name = name or os.environ.get("RSLIB_PRESET", "cpu")
    if name not in _PRESETS:
        raise ValueError(
            f"unknown preset {name!r}: choose one of {', '.join(PRESET_NAMES)} "
            f"(set it in the notebook's parameters cell or with RSLIB_PRESET)"
        )
    preset = _PRESETS[name]
    for key, value in overrides.items():
        preset = _override(preset, key.split("."), value)
    return preset


def _override(obj: Any, keys: list[str], value: Any) -> Any:
    head, *rest = keys
    if not hasattr(obj, head):
        raise ValueError(f"preset has no field {head!r} (fields: {', '.join(asdict(obj))})")
    new = _override(getattr(obj, head), rest, value) if rest else value
    return replace(obj, **{head: new})
