"""RS-CLIP: contrastive training of a small CLIPModel on remote-sensing images and their captions.

CRS-Diff's stage one conditions Stable Diffusion on a CLIP text encoder tuned on RS captions. At the small
presets we train one from scratch on SynthRS with CLIP's symmetric InfoNCE loss and a learnable temperature:

    L = 1/2 [ CE(s * T V^T, Y) + CE(s * V T^T, Y^T) ],   T, V: L2-normalised text / image features (B, D)

where ``s = exp(logit_scale)`` (clamped at 100) and ``Y`` is the target matrix. SynthRS captions repeat
("an aerial image of a port."), so two images in one batch can share a caption exactly; ``Y`` then spreads each
row's target evenly over the identical captions instead of calling one of them a negative.

The result is a folder that ``CLIPModel.from_pretrained`` and ``CLIPTokenizer.from_pretrained`` both read;
the resumable training checkpoint lives in its ``checkpoint/`` subfolder, the loss history in ``history.json``
and ``training.json`` marks a finished run (with the settings it was trained with).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rslib.config import Preset, resolve_path
from rslib.data import synthrs
from rslib.data.datasets import RSDataset, collate, pick_captions, split_dir
from rslib.data.formats import DATASET_MARKER
from rslib.models.text import build_rs_clip, clip_tokenizer, image_features, text_features, tokenize
from rslib.train.loop import CHECKPOINT_DIR, HISTORY_NAME, TrainConfig, checkpoint_progress, train_loop
from rslib.utils import remove_dir

DONE_NAME = "training.json"


# ---------------------------------------------------------------------------
# Helpers shared by the stage functions


def stage_dataset(cfg: Preset, split: str = "train") -> RSDataset:
    """Images and captions of one split (no condition maps), SynthRS generated first when it is the data."""
    folder = split_dir(cfg, split)
    scenes = None if cfg.data.root else synthrs.SCENES
    return RSDataset(folder, size=cfg.data.image_size, max_objects=cfg.data.max_objects, scenes=scenes,
                     with_conditions=False, in_memory=cfg.num_workers == 0)


# settings that only change how a trained model is sampled or evaluated, not the model: left out of the stamps
SAMPLING_ONLY = ("sample_steps", "guidance_scale", "control_scale", "eval_images")


def training_settings(part_cfg: Any) -> dict[str, Any]:
    """A stage config (dataclass) as a dict without its sampling-only fields (:data:`SAMPLING_ONLY`)."""
    return {k: v for k, v in asdict(part_cfg).items() if k not in SAMPLING_ONLY}


def conversion_digest(folder: str | os.PathLike) -> str | None:
    """A digest of the record ``python -m rslib.data convert`` leaves in a data set folder (format, source,
    records per split, what was skipped), or None where there is none (a folder made by hand)."""
    try:
        return hashlib.sha256((Path(folder) / DATASET_MARKER).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def data_stamp(cfg: Preset) -> dict[str, Any]:
    """Which images a preset's data settings stand for, as every stage and cache stamp records them: the data
    settings and, for SynthRS (generated here), the generator version, since a new version draws other images;
    for a real data set, the :func:`conversion_digest` of ``data.root``, since another data set converted into
    the same folder is other data."""
    data = asdict(cfg.data)
    if cfg.data.root:
        data["conversion"] = conversion_digest(cfg.data_dir())
    else:
        data["synthrs_version"] = synthrs.SYNTHRS_VERSION
    return data


def stage_stamp(cfg: Preset, part: str, part_cfg: Any = None, **inputs: Any) -> dict[str, Any]:
    """What a stage's result depends on: the preset name, the data (:func:`data_stamp`), the LR schedule, the
    ``inputs`` it was trained from (e.g. ``stage_one=<folder>``) and the training settings of ``part_cfg``
    (default ``cfg.<part>``)."""
    settings = training_settings(getattr(cfg, part) if part_cfg is None else part_cfg)
    return json.loads(json.dumps({"preset": cfg.name, "data": data_stamp(cfg), "lr_decay": cfg.lr_decay,
                                  **inputs, part: settings}))


# the files that identify one training of a stage folder (the finished record) or a pretrained folder (configs)
IDENTITY_FILES = (DONE_NAME, "stage_one.json", "model_index.json", "config.json")


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


STAMP_NAME = "stamp.json"  # the settings a run was started with, written before it trains


class ResumeRefused(RuntimeError):
    """A folder holds an unfinished run started with other settings: resuming it would mix two trainings."""


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when the file is missing or unreadable (e.g. cut short by a kill)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: Any) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
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


def _refuse_other_settings(folder: Path, recorded: Any, stamp: dict[str, Any]) -> None:
    """Raise :class:`ResumeRefused` when ``folder`` holds an unfinished checkpoint started with other settings."""
    progress = checkpoint_progress(folder)
    if recorded == stamp or progress is None or progress[0] >= progress[1]:
        return
    where = f"{folder} holds an unfinished run (step {progress[0]} of {progress[1]})"
    if not isinstance(recorded, dict):
        raise ResumeRefused(f"{where} that recorded no settings (an earlier version started it); nothing was "
                            f"deleted: start again with --force (force=True)")
    old, new = _flat(recorded), _flat(stamp)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))
    changes = ", ".join(f"{k} {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}" for k in keys)
    raise ResumeRefused(f"{where} started with other settings: {changes}; nothing was deleted: "
                        f"{_resume_hint(old, keys)}")


def fresh_work_dir(work: Path, stamp: dict[str, Any], force: bool = False) -> None:
    """Keep a stage's work folder (checkpoint, history) only if it was started with ``stamp``, so an interrupted run
    never resumes from a checkpoint of other settings or inputs; the folder then records ``stamp``.

    A finished or empty folder of other settings is emptied; an unfinished run of other settings is refused with
    :class:`ResumeRefused` (nothing deleted) unless ``force``, which always empties the folder.
    """
    recorded = _read_json(work / STAMP_NAME)
    if not force:
        _refuse_other_settings(work, recorded, stamp)
    if force or recorded != stamp:
        remove_dir(work)
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / STAMP_NAME, stamp)


def stage_train_config(cfg: Preset, mixed_precision: str = "", **settings: Any) -> TrainConfig:
    """A stage's loop settings: ``settings`` plus what every stage takes from the preset (seed, LR schedule and,
    unless the stage names its own ``mixed_precision``, the preset's precision)."""
    return TrainConfig(mixed_precision=mixed_precision or cfg.mixed_precision, seed=cfg.data.seed,
                       lr_decay=cfg.lr_decay, **settings)


def finished(out_dir: Path, stamp: dict[str, Any]) -> bool:
    """True if ``out_dir`` holds a finished run trained with the settings ``stamp``."""
    info = _read_json(out_dir / DONE_NAME)
    return isinstance(info, dict) and info.get("stamp") == stamp


def begin(out_dir: Path, stamp: dict[str, Any], force: bool) -> bool:
    """Prepare ``out_dir`` for training; returns whether to resume from its checkpoint.

    A forced run, or one whose folder holds a finished run with other settings, starts from scratch. An unfinished
    run resumes only if it was started with ``stamp``; one started with other settings is refused with
    :class:`ResumeRefused` (nothing deleted) unless ``force``.
    """
    info = _read_json(out_dir / DONE_NAME)
    recorded = info.get("stamp") if isinstance(info, dict) else _read_json(out_dir / STAMP_NAME)
    if not force:
        _refuse_other_settings(out_dir, recorded, stamp)
    fresh = force or recorded != stamp
    if fresh:
        remove_dir(out_dir / CHECKPOINT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DONE_NAME).unlink(missing_ok=True)
    _write_json(out_dir / STAMP_NAME, stamp)
    return not fresh


def mark_finished(out_dir: Path, stamp: dict[str, Any], **info: Any) -> None:
    """Write ``training.json`` last: the folder now holds a finished run."""
    (out_dir / DONE_NAME).write_text(json.dumps({"stamp": stamp, **info}, indent=1))


def training_info(folder: str | Path) -> dict[str, Any]:
    """What a finished stage folder records: ``history`` (loss per step), ``seconds``, ``steps`` and more."""
    folder = Path(folder)
    info = json.loads((folder / DONE_NAME).read_text()) if (folder / DONE_NAME).is_file() else {}
    hist = folder / HISTORY_NAME
    info["history"] = json.loads(hist.read_text()) if hist.is_file() else []
    return info


def step_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator seeded from the step's generator (for draws that must happen on the CPU)."""
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# The contrastive loss


def colour_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Per-image brightness and contrast jitter of images in [-1, 1] (B, 3, H, W)."""
    b = images.shape[0]
    u = torch.rand(b, 2, 1, 1, generator=generator, device=generator.device).to(images) * 2 - 1  # (B, 2, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * (1 + strength * u[:, :1]) + mean + strength * u[:, 1:]
    return out.clamp(-1, 1)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor,
                     captions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE of L2-normalised features (B, D); identical captions share the target mass."""
    b = text.shape[0]
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * text @ image.T  # (B texts, B images)
    if captions is None:
        same = torch.eye(b, device=text.device)
    else:
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        key = torch.tensor([ids[c] for c in captions], device=text.device)
        same = (key[:, None] == key[None, :]).float()  # (B, B), symmetric
    target = same / same.sum(1, keepdim=True)
    loss_t = -(target * logits.log_softmax(1)).sum(1).mean()  # text -> image
    loss_i = -(target * logits.T.log_softmax(1)).sum(1).mean()  # image -> text
    hit = same[torch.arange(b), logits.argmax(1)]  # the best image's caption equals the query
    return {"loss": 0.5 * (loss_t + loss_i), "logit_scale": scale.detach(), "batch_r1": hit.mean()}


def clip_loss_fn(tokenizer: Any, max_length: int, augment: bool = True):
    """``loss_fn(model, batch, generator)`` for train_loop: one caption per image, symmetric InfoNCE."""

    def loss_fn(model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        captions = pick_captions(batch["captions"], step_generator(generator))
        ids = tokenize(tokenizer, captions, max_length).to(batch["pixel_values"].device)  # (B, L)
        images = batch["pixel_values"]  # (B, 3, S, S)
        if augment:
            images = colour_jitter(images, generator)
        text = nn.functional.normalize(text_features(model, ids), dim=-1)  # (B, D)
        image = nn.functional.normalize(image_features(model, images), dim=-1)  # (B, D)
        return contrastive_loss(text, image, model.logit_scale, captions)

    return loss_fn


# ---------------------------------------------------------------------------
# The stage


def train_text_encoder(cfg: Preset, out_dir: str | Path | None = None, *, force: bool = False,
                       progress: bool = True) -> Path:
    """Train RS-CLIP on the training split and save it (model + tokenizer) to ``runs/<preset>/text_encoder``.

    A folder holding a finished run with the same settings is returned as it is (``force=True`` retrains);
    at the paper preset (``clip.pretrained`` set) the local CLIP folder is returned unchanged.
    """
    if cfg.clip.pretrained:
        from rslib.models.base import require_local_dir

        return require_local_dir(cfg.clip.pretrained, "CLIP weights", "clip.pretrained")
    out_dir = resolve_path(out_dir) if out_dir is not None else cfg.run_dir("text_encoder")
    stamp = stage_stamp(cfg, "clip")
    if not force and finished(out_dir, stamp):
        return out_dir
    resume = begin(out_dir, stamp, force)
    t0 = time.perf_counter()
    dataset = stage_dataset(cfg, "train")
    torch.manual_seed(cfg.data.seed)  # the fresh RS-CLIP's initial weights
    model = build_rs_clip(cfg)
    tokenizer = clip_tokenizer(cfg.clip.max_length)
    c = cfg.clip
    tcfg = stage_train_config(cfg, steps=c.steps, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                              warmup_steps=min(c.warmup_steps, max(c.steps // 5, 0)), num_workers=cfg.num_workers,
                              checkpoint_every=c.checkpoint_every)
    result = train_loop(model, clip_loss_fn(tokenizer, c.max_length, c.augment), dataset, tcfg, out_dir,
                        collate_fn=collate, resume=resume, progress=progress)
    model.to("cpu").eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    mark_finished(out_dir, stamp, steps=result.steps, seconds=round(time.perf_counter() - t0, 1),
                  train_seconds=round(result.seconds, 1), images=len(dataset),
                  final_loss=result.history[-1]["loss"] if result.history else None)
    return out_dir
