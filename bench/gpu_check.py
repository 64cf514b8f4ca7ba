"""The GPU check: the gpu preset's stages, a grid from each pipeline and the SD 1.5-size benchmarks in one command.

    python bench/gpu_check.py [--dry-run] [--out DIR] [--figures DIR] [--scratch DIR] [--record]
    python bench/gpu_check.py --summary-of DIR/gpu_check.json [--record]

A real run (one CUDA GPU; estimated at 4 to 5 minutes on one H100, planned to stay under 8) does three things:

(a) trains the gpu preset's five stages (RS-CLIP text encoder, autoencoder, stage one, CRS-Diff, CC-Diff) on
    256-px SynthRS for :data:`REAL`'s fixed number of steps each, in a scratch folder holding its own SynthRS
    splits and runs folder (``runs/gpu`` and ``data/synthrs`` are never touched), then samples a grid from stage
    one, CRS-Diff and CC-Diff into ``--figures`` (default ``figures/gpu``);
(b) runs ``train_step.py`` (CRS-Diff vs diffusers' ControlNet, CC-Diff vs the frozen UNet's forward and
    backward; MFU; the largest batch of ours that fits 24 GiB with gradient checkpointing) and ``sampling.py``
    (``CRSDiffPipeline`` vs ``StableDiffusionControlNetPipeline``, 512 px, 50 steps) at SD 1.5 size: models
    built from config, bf16 autocast, SDPA;
(c) writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``runs/gpu_check``): the device,
    images/s, peak memory, MFU against a bf16 matmul timed in the same run, sampling images/s, the ratio against
    each diffusers reference, and each target of :data:`TARGETS` met or missed, with a profile of ours for each
    missed one.

``--dry-run`` runs the same code on the CPU at toy sizes (:data:`DRY`: smoke preset, the benchmarks' tiny size,
two steps each) and writes everything, grids included, into ``--out`` (default: a new temporary folder).
Nothing else is written: ``bench/RESULTS.md`` changes only with ``--record``. A part that fails is recorded
with its traceback and the others still run (exit status 1); the JSON is rewritten after every part, so a run
cut short keeps what it measured. ``--summary-of`` prints (and with ``--record`` records) the summary of a run
made elsewhere, e.g. on a lent GPU machine.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from common import environment, free_memory, markdown
from results import record, write_json, write_text

from rslib.config import REPO_ROOT, Preset, get_preset
from rslib.data.datasets import load_split_tensors, split_dataset
from rslib.data.formats import CONDITION_NAMES, ObjectAnnotation
from rslib.data.synthrs import ensure_synthrs
from rslib.eval import figures, layout
from rslib.eval.data import preset_split
from rslib.pipelines.cc_diff import load_cc_diff, sample_cc_diff
from rslib.pipelines.crs_diff import load_crs_diff, sample_crs_diff
from rslib.pipelines.stage_one import load_stage_one, sample_stage_one
from rslib.train.autoencoder import train_autoencoder
from rslib.train.cc_diff import train_cc_diff
from rslib.train.crs_diff import train_crs_diff
from rslib.train.stage import training_info
from rslib.train.stage_one import train_stage_one
from rslib.train.text_encoder import train_text_encoder
from rslib.utils import pick_device

RESULTS_JSON, SUMMARY_MD = "gpu_check.json", "gpu_check.md"
BUDGET_S = 480  # the whole real run on one H100


@dataclass(frozen=True)
class Plan:
    """What one run does: the preset, data and steps of (a) and the arguments of the two benchmarks of (b)."""

    preset: str
    images: dict[str, int]  # SynthRS images per split, written into the scratch folder
    stage_steps: int  # training steps of every stage
    grid: int  # images sampled from each pipeline
    sample_steps: int  # DDIM steps of those samples
    train_step: tuple[str, ...]  # arguments of bench/train_step.py
    sampling: tuple[str, ...]  # arguments of bench/sampling.py


REAL = Plan(
    preset="gpu", images={"train": 512, "val": 8, "test": 16}, stage_steps=40, grid=8, sample_steps=50,
    train_step=("--size", "sd15", "--device", "cuda", "--repeats", "10", "--warmup", "3", "--profile",
                "--profile-steps", "3", "--fit-gib", "24", "--fit-batches", "1", "2", "4", "8", "12", "16", "24", "32"),
    sampling=("--size", "sd15", "--device", "cuda", "--repeats", "2", "--warmup", "1", "--profile"),
)
DRY = Plan(
    preset="smoke", images={"train": 24, "val": 4, "test": 4}, stage_steps=2, grid=2, sample_steps=2,
    train_step=("--size", "tiny", "--device", "cpu", "--batch", "2", "--repeats", "1", "--warmup", "0", "--profile",
                "--profile-steps", "1", "--mfu", "--fit-gib", "24", "--fit-batches", "1"),
    sampling=("--size", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--steps", "2",
              "--profile"),
)


# ---------------------------------------------------------------------------
# (a) the gpu preset's stages, trained briefly in a scratch folder, and a grid from each pipeline

STAGES = {  # stage -> (train function, its part of the preset)
    "text_encoder": (train_text_encoder, "clip"),
    "autoencoder": (train_autoencoder, "vae"),
    "stage_one": (train_stage_one, "unet"),
    "crs_diff": (train_crs_diff, "crs"),
    "cc_diff": (train_cc_diff, "cc"),
}


def scratch_preset(plan: Plan, scratch: Path) -> Preset:
    """The plan's preset, reading SynthRS from and writing every stage into ``scratch``, ``stage_steps`` each."""
    steps = {f"{part}.steps": plan.stage_steps for _, part in STAGES.values()}
    return get_preset(plan.preset, runs_dir=str(scratch / "runs"), **{"data.root": str(scratch / "synthrs")},
                      **steps)


def write_synthrs(cfg: Preset, plan: Plan) -> dict[str, Any]:
    """Generate the plan's SynthRS splits at the preset's image size into the folder ``cfg.data.root``."""
    t0 = time.perf_counter()
    ensure_synthrs(cfg.data.root, plan.images, cfg.data.image_size, seed=cfg.data.seed)
    return {"images": plan.images, "image_size": cfg.data.image_size, "seconds": time.perf_counter() - t0}


def train_stage(cfg: Preset, stage: str) -> dict[str, Any]:
    """Train one stage; its steps, batch, loop and wall seconds, training images/s and final loss."""
    train, part = STAGES[stage]
    t0 = time.perf_counter()
    folder = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    info, part_cfg = training_info(folder), getattr(cfg, part)
    images = info["steps"] * part_cfg.batch_size * getattr(part_cfg, "grad_accum", 1)
    row = {"stage": stage, "steps": info["steps"], "batch": part_cfg.batch_size, "loop_s": info["train_seconds"],
           "wall_s": wall, "images_per_s": images / info["train_seconds"], "final_loss": info.get("final_loss"),
           "folder": str(folder)}
    print(f"{stage}: {row['steps']} steps of batch {row['batch']} in {row['loop_s']:.1f} s "
          f"({row['images_per_s']:.1f} images/s; {wall:.1f} s with data and saving)")
    return row


def save_grid(name: str, real: Any, generated: Any, titles: list[str], folder: Path,
              objects: list[list[ObjectAnnotation]] | None = None) -> Path:
    """Two rows, test images over generated ones (their boxes drawn on both when given), as ``folder/name.png``."""
    n = len(generated)
    fig = figures.image_grid(list(real[:n]) + list(generated), titles[:n], ncols=n, cell=1.8,
                             row_labels=["test image", name.replace("gpu_check_", "").replace("_", " ")])
    if objects is not None:
        for k, ax in enumerate(fig.axes[:2 * n]):
            figures.draw_boxes(ax, objects[k % n], real.shape[-1])
    path = figures.save_figure(fig, folder, name)
    plt.close(fig)
    return path


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall seconds (queued GPU work included)."""
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def sample_stage_one_grid(cfg: Preset, plan: Plan, folder: Path, device: torch.device, seed: int) -> dict[str, Any]:
    """Stage one from the test split's first captions."""
    test = preset_split(cfg, "test", maps=())
    prompts = [r.captions[0] for r in test.records[:plan.grid]]
    pipe = load_stage_one(cfg.run_dir("stage_one"), device)
    images, seconds = timed(lambda: sample_stage_one(pipe, prompts, cfg, seed, steps=plan.sample_steps), device)
    path = save_grid("gpu_check_stage_one", test.images, images, [r.scene for r in test.records], folder)
    return {"pipeline": "stage_one", "images": len(images), "steps": plan.sample_steps, "seconds": seconds,
            "file": path.name}


def sample_crs_grid(cfg: Preset, plan: Plan, folder: Path, device: torch.device, seed: int) -> dict[str, Any]:
    """CRS-Diff from the test split's six maps, metadata, content images and first captions."""
    split = split_dataset(cfg, "test")
    test = load_split_tensors(split, n=plan.grid)
    records = split.records[:plan.grid]
    pipe = load_crs_diff(cfg.run_dir("crs_diff"), device)
    images, seconds = timed(lambda: sample_crs_diff(
        pipe, [c[0] for c in test["captions"]], seed, conditions=test["conditions"], maps=CONDITION_NAMES,
        metadata=[dict(r.metadata) for r in records], content_images=test["content"],
        guidance_scale=cfg.crs.guidance_scale, steps=plan.sample_steps), device)
    path = save_grid("gpu_check_crs_diff", test["pixel_values"], images, [r.scene for r in records], folder)
    return {"pipeline": "crs_diff", "images": len(images), "steps": plan.sample_steps, "seconds": seconds,
            "file": path.name}


def sample_cc_grid(cfg: Preset, plan: Plan, folder: Path, device: torch.device, seed: int) -> dict[str, Any]:
    """CC-Diff from the test split's layouts and first captions."""
    test = preset_split(cfg, "test", maps=())
    lays = layout.layouts_of(test, plan.grid, cfg.cc.max_instances)
    prompts = [r.captions[0] for r in test.records[:plan.grid]]
    pipe = load_cc_diff(cfg.run_dir("cc_diff"), device)
    images, seconds = timed(lambda: sample_cc_diff(pipe, prompts, lays, seed, steps=plan.sample_steps,
                                                          guidance_scale=cfg.cc.guidance_scale), device)
    objects = [[ObjectAnnotation(o["label"], o["bbox"], o["obb"]) for o in lay] for lay in lays]
    path = save_grid("gpu_check_cc_diff", test.images, images, [r.scene for r in test.records], folder, objects)
    return {"pipeline": "cc_diff", "images": len(images), "steps": plan.sample_steps, "seconds": seconds,
            "file": path.name}


SAMPLERS = {"stage_one": sample_stage_one_grid, "crs_diff": sample_crs_grid, "cc_diff": sample_cc_grid}


# ---------------------------------------------------------------------------
# (c) targets and the summary


@dataclass(frozen=True)
class Target:
    """One target of the check: ``value`` (read from the results) at least ``threshold``."""

    key: str
    text: str
    threshold: float
    value: Callable[[dict[str, Any]], float | None]
    profile: tuple[str, str] | None = None  # (benchmark, profile name) that says where ours' time goes


def _ratio(result: str, bench: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r.get(result, {}).get("ratio_ours_over_reference", {}).get(bench)


def _mfu(bench: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: next((row.get("mfu") for row in r.get("train_step", {}).get("rows", [])
                           if row["bench"] == bench and row["side"] == "ours"), None)


def _fit(bench: str) -> Callable[[dict[str, Any]], float | None]:
    def largest(r: dict[str, Any]) -> float | None:  # 0: measured, and no batch fits
        fit = next((m for m in r.get("train_step", {}).get("memory", []) if m["bench"] == bench), None)
        measured = fit is not None and any(row["peak_gib"] is not None or row.get("oom") for row in fit["rows"])
        return (fit["largest"] or 0) if measured else None

    return largest


TARGETS = (
    Target("crs_train", "CRS-Diff training step >= 0.8x ControlNet's images/s", 0.8, _ratio("train_step", "crs"),
           ("train_step", "crs")),
    Target("cc_train", "CC-Diff training step >= 0.5x the frozen UNet's forward + backward", 0.5,
           _ratio("train_step", "cc"), ("train_step", "cc")),
    Target("sampling", "CRSDiffPipeline >= 0.9x StableDiffusionControlNetPipeline (512 px, 50 steps)", 0.9,
           _ratio("sampling", "crs sampling"), ("sampling", "crs sampling")),
    Target("mfu_crs", "MFU of CRS-Diff's training step >= 35% (bf16)", 0.35, _mfu("crs"), ("train_step", "crs")),
    Target("mfu_cc", "MFU of CC-Diff's training step >= 35% (bf16)", 0.35, _mfu("cc"), ("train_step", "cc")),
    Target("fit_crs", "a CRS-Diff training batch fits 24 GiB with gradient checkpointing (largest batch)", 1,
           _fit("crs")),
    Target("fit_cc", "a CC-Diff training batch fits 24 GiB with gradient checkpointing (largest batch)", 1,
           _fit("cc")),
)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target's value and status: met, missed, not measured, or (dry run) not checked: toy sizes on a CPU."""
    out = []
    for t in TARGETS:
        value = t.value(results)
        if results.get("dry_run"):
            status = "not checked (dry run)"
        elif value is None:
            status = "not measured"
        else:
            status = "met" if value >= t.threshold else "missed"
        out.append({"key": t.key, "target": t.text, "threshold": t.threshold, "value": value, "status": status,
                    "profile": list(t.profile) if t.profile else None})
    return out


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.startswith("mfu"):
        return f"{100 * value:.1f}%"
    if key.startswith("fit"):
        return f"batch {value}" if value else "none fits"
    return f"{value:.2f}x"


def _targets_md(results: dict[str, Any], h: str) -> list[str]:
    lines = [f"{h} Targets", "", "| target | value | status |", "| --- | ---: | --- |"]
    return lines + [f"| {t['target']} | {_fmt(t['key'], t['value'])} | {t['status']} |"
                    for t in results.get("targets", [])]


def _stages_md(results: dict[str, Any], h: str) -> list[str]:
    stages, samples = results.get("stages", []), results.get("samples", [])
    if not stages:
        return []
    lines = ["", f"{h} (a) {results['preset']} preset, {results['plan']['stage_steps']} steps per stage on SynthRS "
             f"{results.get('synthrs', {}).get('image_size')} px", "",
             "| stage | steps | batch | train loop s | images/s | wall s | final loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {s['stage']} | {s['steps']} | {s['batch']} | {s['loop_s']:.1f} | {s['images_per_s']:.1f} | "
              f"{s['wall_s']:.1f} | {s['final_loss'] if s['final_loss'] is None else round(s['final_loss'], 4)} |"
              for s in stages]
    if samples:
        lines += ["", "| pipeline | images | steps | seconds | images/s | grid |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {s['pipeline']} | {s['images']} | {s['steps']} | {s['seconds']:.1f} | "
                  f"{s['images'] / s['seconds']:.2f} | {s['file']} |" for s in samples]
    return lines


def _memory_md(fit: dict[str, Any]) -> str:
    def peak(row: dict[str, Any]) -> str:
        if row.get("oom"):
            return "out of memory"
        return "not read (CPU)" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"

    rows = ", ".join(f"batch {r['batch']}: {peak(r)}" for r in fit["rows"])
    return (f"{fit['bench']} ours with gradient checkpointing, peak allocated ({rows}); the largest batch within "
            f"{fit['budget_gib']:g} GiB less {fit['headroom_gib']:g} for the CUDA context: {fit['largest']}")


def _benchmarks_md(results: dict[str, Any], h: str) -> list[str]:
    lines = []
    for name, title in (("train_step", "(b) training step"), ("sampling", "(b) sampling")):
        part = results.get(name)
        if not part or "table" not in part:
            continue
        st = part["settings"]
        lines += ["", f"{h} {title}: {st['size']} size ({st['image_size']} px, UNet {st['unet_channels']}), "
                  f"batch {st['batch']}", "", part["table"]]
        if part.get("peak_matmul"):
            pm = part["peak_matmul"]
            lines.append(f"MFU against a {pm['dtype']} {pm['n']}^3 matmul timed in the same run: "
                         f"{pm['tflops']:.1f} TFLOP/s")
        lines += ["\n" + _memory_md(fit) for fit in part.get("memory", [])]
    return lines


def _profiles_md(results: dict[str, Any], h: str) -> list[str]:
    """One profile of ours per benchmark behind a missed target."""
    missed: dict[tuple[str, str], list[str]] = {}
    for t in results.get("targets", []):
        if t["status"] == "missed" and t["profile"]:
            missed.setdefault(tuple(t["profile"]), []).append(t["target"])
    lines = []
    for (part, bench), targets in missed.items():
        table = results.get(part, {}).get("profiles", {}).get(bench)
        if table:
            lines += ["", f"{h} Where the time goes ({part}, {bench}): missed " + "; ".join(targets), "", "```",
                      table.strip(), "```"]
    return lines


def summary_markdown(results: dict[str, Any], section: str = "##", title: bool = True) -> str:
    """The results as markdown: a title (unless ``title`` is False), then sections headed by ``section``."""
    env = results.get("environment", {})
    lines = [f"# GPU check ({results['date']}, {results['device']})", ""] if title else []
    if results.get("dry_run"):
        lines += ["Dry run: the same code on the CPU at toy sizes (smoke preset, tiny benchmark size); its numbers "
                  "say nothing about a GPU and the targets are not checked.", ""]
    lines += [f"`{results['command']}`", "",
              f"torch {env.get('torch')}, diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, "
              f"accelerate {env.get('accelerate')}, CUDA {env.get('cuda')}; "
              f"{results.get('total_seconds', 0):.0f} s in all (real run planned under {BUDGET_S} s on one H100): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("seconds", {}).items()), ""]
    lines += _targets_md(results, section) + _stages_md(results, section) + _benchmarks_md(results, section)
    lines += _profiles_md(results, section)
    for part, tb in results.get("errors", {}).items():
        lines += ["", f"{section} Error in {part}", "", "```", tb.strip()[-3000:], "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The run


def bench_result(module: str, args: list[str]) -> dict[str, Any]:
    """Run ``bench/<module>.py``'s main with ``args``; its result with its table as markdown."""
    result = importlib.import_module(module).main(args)
    return {**result, "table": markdown(result["rows"], result["ratio_ours_over_reference"])}


class Run:
    """The results of one check, written to ``out`` (atomically) after every part."""

    def __init__(self, plan: Plan, out: Path, dry_run: bool, device: torch.device, command: str):
        self.out = out
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {
            "date": datetime.date.today().isoformat(), "command": command, "dry_run": dry_run, "complete": False,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "environment": {**environment(device), "cuda": torch.version.cuda}, "preset": plan.preset,
            "plan": asdict(plan), "seconds": {}, "errors": {}}

    def part(self, name: str, fn: Callable[[], Any], key: str | None = None) -> Any:
        """Run one part and save; its result goes under ``name`` (or is appended to the list ``key``), a
        failure's traceback under ``errors`` (the result is then None)."""
        t0 = time.perf_counter()
        print(f"\n=== {name}", flush=True)
        try:
            out = fn()
        except Exception:  # noqa: BLE001 - recorded, and the other parts still run
            out = None
            self.results["errors"][name] = traceback.format_exc()
            print(self.results["errors"][name], file=sys.stderr, flush=True)
        else:
            if key:
                self.results.setdefault(key, []).append(out)
            else:
                self.results[name] = out
        self.results["seconds"][name] = time.perf_counter() - t0
        self.save()
        return out

    def save(self, complete: bool = False) -> None:
        """Write the JSON and the summary as they stand."""
        r = self.results
        r["total_seconds"] = time.perf_counter() - self.t0
        r["complete"] = complete
        r["targets"] = evaluate_targets(r)
        write_json(self.out / RESULTS_JSON, r)
        write_text(self.out / SUMMARY_MD, summary_markdown(r))


def train_and_sample(run: Run, plan: Plan, figures_dir: Path, scratch: Path, device: torch.device,
                     seed: int) -> None:
    """Part (a): SynthRS and the stages in ``scratch`` (up to the first that fails), then each trained pipeline's
    grid."""
    cfg = scratch_preset(plan, scratch)
    if run.part("synthrs", lambda: write_synthrs(cfg, plan)) is None:
        return
    for stage in STAGES:
        if run.part(f"train {stage}", lambda s=stage: train_stage(cfg, s), key="stages") is None:
            break  # the later stages read this one's folder
    trained = {s["stage"] for s in run.results.get("stages", [])}
    for name, sample in SAMPLERS.items():
        if name in trained:
            run.part(f"sample {name}", lambda f=sample: f(cfg, plan, figures_dir, device, seed), key="samples")


def run_check(plan: Plan, out: Path, figures_dir: Path, scratch_root: Path | None, dry_run: bool, command: str,
              seed: int = 0) -> Run:
    """Parts (a) and (b), the results written as they come; (a)'s scratch folder is removed at its end."""
    device = pick_device("cpu" if dry_run else "cuda")
    run = Run(plan, out, dry_run, device, command)
    if scratch_root is not None:
        scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=scratch_root))
    try:
        train_and_sample(run, plan, figures_dir, scratch, device, seed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    free_memory(device)  # (b)'s peak memory counts only its own models
    run.part("train_step", lambda: bench_result("train_step", list(plan.train_step)))
    run.part("sampling", lambda: bench_result("sampling", list(plan.sampling)))
    run.save(complete=True)
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at toy sizes")
    p.add_argument("--out", type=Path, default=None,
                   help="folder of gpu_check.json and gpu_check.md (default runs/gpu_check; dry run: a new "
                        "temporary folder)")
    p.add_argument("--figures", type=Path, default=None,
                   help="folder of the grids (default figures/gpu; dry run: --out)")
    p.add_argument("--scratch", type=Path, default=None,
                   help="where the scratch folder of part (a) is made, and removed at the end (default: the "
                        "system's temporary folder)")
    p.add_argument("--record", action="store_true", help="append the summary to bench/RESULTS.md")
    p.add_argument("--summary-of", type=Path, default=None, metavar="JSON",
                   help="run nothing: print (and with --record record) the summary of this gpu_check.json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def record_summary(results: dict[str, Any]) -> None:
    """Append the summary (sections one level down) to bench/RESULTS.md, dated and named after the device."""
    title = "GPU check, dry run" if results.get("dry_run") else "GPU check"
    record(title, results["command"], summary_markdown(results, "###", title=False), results["device"])


def main(argv: list[str] | None = None) -> int:
    """Run the check (or summarise one); 0 when every part ran, 1 when one failed, 2 without a GPU."""
    args = parse_args(argv)
    if args.summary_of is not None:
        results = json.loads(args.summary_of.read_text())
        print(summary_markdown(results))
        if args.record:
            record_summary(results)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. The real run needs a GPU; --dry-run runs the same code on the CPU "
              "at toy sizes.", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check-dry-")) if args.dry_run
                       else REPO_ROOT / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    figures_dir = args.figures or (out if args.dry_run else REPO_ROOT / "figures" / "gpu")
    command = " ".join(["python bench/gpu_check.py", *[a for a in (sys.argv[1:] if argv is None else argv)
                                                       if a != "--record"]])
    run = run_check(DRY if args.dry_run else REAL, out, figures_dir, args.scratch, args.dry_run, command, args.seed)
    print("\n" + summary_markdown(run.results))
    print(f"wrote {out / RESULTS_JSON}, {out / SUMMARY_MD} and the grids in {figures_dir}")
    if args.record:
        record_summary(run.results)
    return 1 if run.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
