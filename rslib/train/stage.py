"""One protocol for every stage: the folder it trains into, the settings it records, when it is finished.

Every stage (RS-CLIP, the autoencoder, stage one, CRS-Diff, CC-Diff, the segmenter and the detector) trains into one
folder, by default ``runs/<preset>/<stage>/``::

    <the model's files>   what ``from_pretrained`` (or the stage's loader) reads
    training/             the training loop's work folder: checkpoint/, history.json and stamp.json, the settings
                          the run was started with
    training.json         written last: the folder holds a finished run (its settings, steps, wall times, ...)

and goes through one flow::

    stamp = stage_stamp(cfg, "clip")            # what the result depends on
    if not force and is_finished(out_dir, stamp):
        return out_dir                          # reused
    begin(out_dir, stamp, force)                # an unfinished run of other settings is refused, a stale one removed
    seed_initial_weights(cfg); model = ...      # the stage's own data, model and loss
    result = train_loop(model, loss_fn, data, stage_train_config(cfg, ...), work_dir(out_dir))
    model.save_pretrained(out_dir)
    finish(out_dir, stamp, result, started, **info)

A stage's *stamp* holds every setting its training reads (not the ones that only change how the result is sampled
or evaluated: :data:`SAMPLING_ONLY`), the data and the folders it was trained from (:func:`input_stamp`), so a
finished folder is reused exactly when the same training would produce it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from rslib.config import Preset, resolve_path
from rslib.train.loop import HISTORY_NAME, TrainConfig, TrainResult, checkpoint_progress, mean_tail
from rslib.utils import remove_dir

WORK_DIR = "training"  # the training loop's folder inside a stage folder
DONE_NAME = "training.json"  # written last: the stage folder holds a finished run
STAMP_NAME = "stamp.json"  # in the work folder: the settings a run was started with, written before it trains


# ---------------------------------------------------------------------------
# Stamps: what a stage's result depends on


# settings that only change how a trained model is sampled or evaluated, not the model: left out of the stamps
SAMPLING_ONLY = ("sample_steps", "guidance_scale", "control_scale", "map_guidance", "guidance_keeps_metadata",
                 "negative_prompt", "sampler", "eval_images")


# a stage's own data set (crs.data_root, cc.data_root): the stamp records it as the data (:func:`data_stamp`)
DATA_SETTINGS = ("data_root",)


def training_settings(part_cfg: Any) -> dict[str, Any]:
    """A stage config (dataclass) as a dict without its sampling-only fields (:data:`SAMPLING_ONLY`) and its data
    root (:data:`DATA_SETTINGS`, in the data stamp instead)."""
    return {k: v for k, v in asdict(part_cfg).items() if k not in SAMPLING_ONLY + DATA_SETTINGS}


def conversion_digest(folder: str | os.PathLike) -> str | None:
    """A digest of the record ``python -m rslib.data convert`` leaves in a data set folder (format, source,
    records per split, what was skipped), or None where there is none (a folder made by hand)."""
    from rslib.data.records import DATASET_MARKER

    try:
        return hashlib.sha256((Path(folder) / DATASET_MARKER).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def data_stamp(cfg: Preset) -> dict[str, Any]:
    """Which images a preset's data settings stand for, as every stage and cache stamp records them: the data
    settings and, for SynthRS (generated here), the generator version, since a new version draws other images;
    for a real data set, the :func:`conversion_digest` of ``data.root``, since another data set converted into
    the same folder is other data."""
    from rslib.data import synthrs

    data = asdict(cfg.data)
    if cfg.data.root:
        data["conversion"] = conversion_digest(cfg.data_dir())
    else:
        data["synthrs_version"] = synthrs.SYNTHRS_VERSION
    return data


def stage_stamp(cfg: Preset, part: str, **inputs: Any) -> dict[str, Any]:
    """What a stage's result depends on: the preset name, the data (:func:`data_stamp`), the training seed, the LR
    schedule, the ``inputs`` it was trained from (e.g. ``stage_one=<folder>``) and the training settings of
    ``cfg.<part>``."""
    return json.loads(json.dumps({"preset": cfg.name, "data": data_stamp(cfg), "seed": cfg.seed,
                                  "lr_decay": cfg.lr_decay, **inputs, part: training_settings(getattr(cfg, part))}))


# the files that identify one training of a stage folder (the finished record) or a pretrained folder (configs)
IDENTITY_FILES = (DONE_NAME, "model_index.json", "config.json")


def input_stamp(folder: str | Path) -> dict[str, str]:
    """How a stage records a folder it was trained from: its path and a digest of its finished record (or, for a
    pretrained folder, its config files). Training the input again, even into the same folder, changes the
    digest, so the stages built on it no longer count as finished."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in IDENTITY_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return {"path": str(folder), "digest": h.hexdigest()[:16]}


# ---------------------------------------------------------------------------
# Refusing to resume a run with other settings


class ResumeRefused(RuntimeError):
    """A folder holds an unfinished run started with other settings: resuming it would mix two trainings."""


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when the file is missing or unreadable (e.g. cut short by a kill)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any, **dumps: Any) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it); ``dumps``: json.dumps options other
    than the default one-space indent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, **{"indent": 1, "default": str, **dumps}))
    os.replace(tmp, path)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested stamp as ``{"clip.steps": 100, ...}``."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def _is_setting(cfg: Preset, key: str) -> bool:
    """True when ``key`` is a preset field that ``--set key=value`` changes."""
    obj: Any = cfg
    for part in key.split("."):
        if not is_dataclass(obj) or not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return not is_dataclass(obj)


def _set_text(value: Any) -> str:
    """``value`` as ``--set key=<text>`` reads it back, in one shell word (lists without spaces)."""
    return repr(value).replace(", ", ",") if isinstance(value, (list, tuple)) else repr(value)


def _resume_hint(old: dict[str, Any], keys: list[str]) -> str:
    """How to rerun with the settings a run was started with, or why that is not possible."""
    from rslib.config import PRESET_NAMES, get_preset

    name = old.get("preset")
    cfg = get_preset(name) if name in PRESET_NAMES else None
    args = [f"--preset {name}"] if "preset" in keys and cfg is not None else []
    sets = [f"{k}={_set_text(old[k])}" for k in keys if k in old and cfg is not None and _is_setting(cfg, k)]
    if sets:
        args.append("--set " + " ".join(sets))
    fixed = [k for k in keys if k != "preset" and not (k in old and cfg is not None and _is_setting(cfg, k))]
    if fixed:
        return (f"{', '.join(fixed)} cannot be set back (an input was trained again or a version changed), so start "
                f"again with --force (force=True)")
    return f"either start again with --force (force=True), or resume with its settings: {' '.join(args)}"


def _refuse_other_settings(work: Path, recorded: Any, stamp: dict[str, Any]) -> None:
    """Raise :class:`ResumeRefused` when ``work`` holds an unfinished checkpoint started with other settings."""
    progress = checkpoint_progress(work)
    if recorded == stamp or progress is None or progress[0] >= progress[1]:
        return
    where = f"{work} holds an unfinished run (step {progress[0]} of {progress[1]})"
    if not isinstance(recorded, dict):
        raise ResumeRefused(f"{where} that recorded no settings (an earlier version started it); nothing was "
                            f"deleted: start again with --force (force=True)")
    old, new = _flat(recorded), _flat(stamp)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))
    changes = ", ".join(f"{k} {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}" for k in keys)
    raise ResumeRefused(f"{where} started with other settings: {changes}; nothing was deleted: "
                        f"{_resume_hint(old, keys)}")


def prepare_work_dir(work: Path, stamp: dict[str, Any], force: bool = False) -> None:
    """Keep a work folder (checkpoint, history) only if it was started with ``stamp``, so an interrupted run never
    resumes from a checkpoint of other settings or inputs; the folder then records ``stamp``.

    A finished or empty folder of other settings is emptied; an unfinished run of other settings is refused with
    :class:`ResumeRefused` (nothing deleted) unless ``force``, which always empties the folder.
    """
    recorded = read_json(work / STAMP_NAME)
    if not force:
        _refuse_other_settings(work, recorded, stamp)
    if force or recorded != stamp:
        remove_dir(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / STAMP_NAME, stamp)


# ---------------------------------------------------------------------------
# The flow


def work_dir(out_dir: str | Path) -> Path:
    """The training loop's folder of a stage folder (checkpoint, history, stamp)."""
    return Path(out_dir) / WORK_DIR


def is_finished(out_dir: str | Path, stamp: dict[str, Any] | None = None) -> bool:
    """True if ``out_dir`` holds a finished run (trained with the settings ``stamp``, if given)."""
    info = read_json(Path(out_dir) / DONE_NAME)
    return isinstance(info, dict) and (stamp is None or info.get("stamp") == stamp)


def begin(out_dir: str | Path, stamp: dict[str, Any], force: bool = False) -> Path:
    """Prepare ``out_dir`` for training ``stamp`` and return its work folder: the folder no longer counts as
    finished, and its work folder is kept only for the same settings (:func:`prepare_work_dir`: an unfinished run
    of other settings is refused unless ``force``), so the training loop resumes only a run of ``stamp``."""
    work = work_dir(out_dir)
    prepare_work_dir(work, stamp, force)
    (Path(out_dir) / DONE_NAME).unlink(missing_ok=True)
    return work


def finish(out_dir: str | Path, stamp: dict[str, Any], result: TrainResult, started: float, **info: Any) -> None:
    """Write ``training.json`` last (the folder now holds a finished run): the stamp, the steps, the wall time since
    ``started`` (``time.perf_counter()``) and of the loop, the mean loss of the last steps, and ``info``."""
    record = {"stamp": stamp, "steps": result.steps, "seconds": round(time.perf_counter() - started, 2),
              "train_seconds": round(result.seconds, 2), "final_loss": mean_tail(result.history), **info}
    write_json(Path(out_dir) / DONE_NAME, record)


def read_history(out_dir: str | Path) -> list[dict[str, float]]:
    """The per-step history (loss, learning rate, ...) of a stage's training, finished or not."""
    path = work_dir(out_dir) / HISTORY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no training history at {path}: train the stage first (its notebook, or "
                                f"python -m rslib.train <stage>)")
    return json.loads(path.read_text())


def training_info(out_dir: str | Path) -> dict[str, Any]:
    """What a stage folder records of its training: ``training.json`` (empty while unfinished) and ``history``."""
    info = read_json(Path(out_dir) / DONE_NAME)
    info = info if isinstance(info, dict) else {}
    return {**info, "history": read_history(out_dir) if (work_dir(out_dir) / HISTORY_NAME).is_file() else []}


def stage_train_config(cfg: Preset, mixed_precision: str = "", **settings: Any) -> TrainConfig:
    """A stage's loop settings: ``settings`` plus what every stage takes from the preset (the training seed, the
    LR schedule and, unless the stage names its own ``mixed_precision``, the preset's precision)."""
    return TrainConfig(mixed_precision=mixed_precision or cfg.mixed_precision, seed=cfg.seed, lr_decay=cfg.lr_decay,
                       **settings)


def seed_initial_weights(cfg: Preset) -> None:
    """Seed torch's global generator with the training seed: a freshly built model's initial weights."""
    torch.manual_seed(cfg.seed)


# ---------------------------------------------------------------------------
# Inputs that several stages read


def stage_dataset(cfg: Preset, split: str = "train"):
    """Images and captions of one split (no condition maps), SynthRS generated first when it is the data."""
    from rslib.data import synthrs
    from rslib.data.datasets import RSDataset, split_dir

    scenes = None if cfg.data.root else synthrs.SCENES
    return RSDataset(split_dir(cfg, split), size=cfg.data.image_size, max_objects=cfg.data.max_objects,
                     scenes=scenes, with_conditions=False, in_memory=cfg.num_workers == 0)


def resolve_clip_dir(cfg: Preset, clip_dir: str | os.PathLike | None = None, parameter: str = "clip_dir") -> Path:
    """The RS-CLIP folder (text tower, image tower): ``clip_dir``, else ``clip.pretrained``, else the one notebook 01
    trains; a clear error naming what makes it (``parameter``: the argument that passes another folder)."""
    if clip_dir:
        path = resolve_path(clip_dir)
    elif cfg.clip.pretrained:
        path = resolve_path(cfg.clip.pretrained)
    else:
        path = cfg.run_dir("text_encoder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no RS-CLIP at {path}: run notebook 01 (rslib.train.text_encoder."
                                f"train_text_encoder(cfg)) first, or pass {parameter}=<a transformers CLIP folder>")
    return path


def resolve_stage_one(cfg: Preset, stage_one_dir: str | os.PathLike | None = None) -> Path:
    """The stage-one pipeline folder, or a clear error naming the notebook that makes it."""
    path = resolve_path(stage_one_dir) if stage_one_dir else cfg.run_dir("stage_one")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no stage-one model at {path}: run notebook 02 "
                                f"(rslib.train.stage_one.train_stage_one(cfg)) first, or pass stage_one_dir=")
    return path


def load_stage_one_parts(path: str | os.PathLike, **unet_config: Any) -> dict[str, Any]:
    """vae, text_encoder, tokenizer and unet of a stage-one folder, frozen and in eval mode; ``unet_config``
    overrides the UNet's config (e.g. ``class_embed_type="identity"``, no new weight)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True).eval()
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, **unet_config).eval()
    for m in (vae, text, unet):
        m.requires_grad_(False)
    return {"vae": vae, "text_encoder": text, "tokenizer": tok, "unet": unet}


# ---------------------------------------------------------------------------
# Pipeline folders


def save_pipeline_folder(pipe: Any, out_dir: str | Path, parts: Sequence[str]) -> Path:
    """Write a diffusers pipeline's ``parts`` into ``out_dir`` (beside ``training/``), then its index; the stage
    marks the folder finished afterwards (:func:`finish`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_index.json").unlink(missing_ok=True)
    tmp = out_dir / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for part in parts:
        if (out_dir / part).exists():
            shutil.rmtree(out_dir / part)
        if (tmp / part).exists():
            os.replace(tmp / part, out_dir / part)
    os.replace(tmp / "model_index.json", out_dir / "model_index.json")
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def refresh_scheduler(out_dir: str | Path, scheduler: Any) -> None:
    """Make a saved pipeline folder sample with ``scheduler`` (a diffusers scheduler) when it holds another kind
    (``cc.sampler`` is a sampling-only setting): its ``scheduler/`` config and ``model_index.json`` entry."""
    index = Path(out_dir) / "model_index.json"
    config = json.loads(index.read_text())
    entry = ["diffusers", type(scheduler).__name__]
    if config.get("scheduler") == entry:
        return
    folder = Path(out_dir) / "scheduler"
    staging = folder.with_name("scheduler.tmp-refresh")
    scheduler.save_pretrained(staging)
    os.replace(staging / "scheduler_config.json", folder / "scheduler_config.json")
    shutil.rmtree(staging, ignore_errors=True)
    write_json(index, {**config, "scheduler": entry}, indent=2, sort_keys=True)


def refresh_sampling_defaults(out_dir: str | Path, **defaults: Any) -> None:
    """Set the sampling defaults a saved pipeline folder records (its ``model_index.json``) to ``defaults``: a
    finished folder reused under other sampling settings samples as the preset now says, without retraining."""
    index = Path(out_dir) / "model_index.json"
    config = json.loads(index.read_text())
    wanted = json.loads(json.dumps(defaults))
    if any(config.get(k) != v for k, v in wanted.items()):
        write_json(index, {**config, **wanted}, indent=2, sort_keys=True)  # as diffusers writes it
