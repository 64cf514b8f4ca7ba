"""What the benchmark scripts share: sizes, stage-one parts built from config, devices, timers, tables.

Every model is built from a preset's config with random weights (nothing is downloaded or read from disk).
Each measurement runs one side (ours or the diffusers reference) at a time; a side's models are built just
before it is timed and dropped afterwards, so its peak memory counts only what it needs plus the shared parts.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from results import command_line, machine, record, write_json  # noqa: E402

from rslib.config import Preset, get_preset  # noqa: E402
from rslib.models.base import build_unet, build_vae, latent_size, vae_scale_factor  # noqa: E402
from rslib.models.crs_diff import N_MAPS, N_METADATA, CRSDiffModel, with_identity_class_embedding  # noqa: E402
from rslib.models.text import clip_tokenizer, rs_clip_config  # noqa: E402
from rslib.train.crs_diff import build_crs_model  # noqa: E402
from rslib.utils import pick_device  # noqa: E402

PROMPT = "an aerial image of a harbour with ships, storage tanks and a road along the quay."
NO_WEIGHTS = {"unet.pretrained": "", "vae.pretrained": "", "clip.pretrained": ""}  # always built from config


# ---------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Size:
    """One benchmark size: the preset whose configs build the models, batches and sampling steps."""

    name: str
    preset: str
    train_batch: int
    sample_batch: int
    sample_steps: int
    gpu_only: bool = False


SIZES = {
    "tiny": Size("tiny", "smoke", train_batch=4, sample_batch=2, sample_steps=3),  # tests: seconds on a CPU
    "small": Size("small", "cpu", train_batch=32, sample_batch=8, sample_steps=20),  # 64 px, 16 x 16 latents
    "sd15": Size("sd15", "paper", train_batch=8, sample_batch=8, sample_steps=50, gpu_only=True),  # SD 1.5, 512 px
}


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark script takes."""
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="tiny: smoke preset (tests); small: cpu preset, 64 px; sd15: SD 1.5 configs, 512 px (GPU)")
    p.add_argument("--preset", default=None,
                   help="build the models from this rslib preset instead of the size's own (pretrained paths "
                        "are ignored: every model is built from config)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the size's)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions per side before timing")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks of both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results to this file")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")


def preset_for(size: Size, name: str | None = None) -> Preset:
    """The preset whose configs build the models, with every pretrained path cleared."""
    return get_preset(name or size.preset, **NO_WEIGHTS)


def describe(cfg: Preset) -> dict[str, Any]:
    """Image and latent sizes of a preset, for tables and JSON."""
    return {"preset": cfg.name, "image_size": cfg.data.image_size, "latent_size": latent_size(cfg),
            "unet_channels": list(cfg.unet.block_out_channels), "text_dim": cfg.clip.hidden}


# ---------------------------------------------------------------------------
# Devices and precision


def setup_device(name: str, size: Size) -> torch.device:
    """Resolve the device; on CUDA switch TF32 on (SDPA is diffusers' default attention)."""
    device = pick_device(name)
    if device.type not in ("cpu", "cuda"):
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    elif size.gpu_only:
        warnings.warn(f"--size {size.name} is meant for a GPU: on the CPU one step can take minutes", stacklevel=2)
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing (fp32) on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect dropped models and release cached GPU blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a model to ``dtype`` (diffusers' note about modules to keep in float32 is silenced: these have none)."""
    from diffusers.utils import logging as diffusers_logging

    if dtype == torch.float32:
        return module
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def compile_modules(*modules: torch.nn.Module | None) -> None:
    """torch.compile each module in place (its type and config stay, so pipelines keep working)."""
    for m in modules:
        if m is not None:
            m.compile()


# ---------------------------------------------------------------------------
# Stage-one parts, built from config


def build_unet_on(cfg: Preset, device: torch.device, seed: int) -> UNet2DConditionModel:
    """The preset's UNet (random weights, seeded, so both sides start from the same one), built on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = build_unet(cfg, cross_attention_dim=cfg.clip.hidden)
    return unet.eval().requires_grad_(False)


def build_text_encoder(cfg: Preset, device: torch.device, seed: int) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The preset's text tower (RS-CLIP's; at the paper preset the size of SD 1.5's) and the CLIP tokenizer."""
    torch.manual_seed(seed)
    with torch.device(device):
        text = CLIPTextModel(rs_clip_config(cfg).text_config).eval().requires_grad_(False)
    return text, clip_tokenizer(cfg.clip.max_length)


def build_vae_on(cfg: Preset, device: torch.device, seed: int) -> AutoencoderKL:
    """The preset's AutoencoderKL (random weights)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return build_vae(cfg).eval().requires_grad_(False)


@torch.no_grad()
def text_states(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (n, L, D) and pooled outputs (n, D) of ``n`` prompts."""
    dev = next(text_encoder.parameters()).device
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(dev)
    out = text_encoder(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def crs_conditions(cfg: Preset, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """CRS-Diff's conditions for a batch (CPU): the six maps as an 18-channel stack in {0, 1}, metadata (B, 7)
    in [0, 1] and L2-normalised content embeddings (B, D)."""
    s = cfg.data.image_size
    return {"conditions": (torch.rand(batch, 3 * N_MAPS, s, s, generator=g) > 0.7).float(),
            "metadata": torch.rand(batch, N_METADATA, generator=g),
            "content": torch.nn.functional.normalize(torch.randn(batch, cfg.clip.projection_dim, generator=g), dim=-1)}


def build_crs_on(cfg: Preset, device: torch.device, seed: int) -> CRSDiffModel:
    """CRS-Diff around the seeded UNet (identity class embedding): fresh adapter, metadata encoder and content
    tokenizer sized by ``cfg.crs``, all on ``device``."""
    with torch.device(device):
        unet = with_identity_class_embedding(build_unet_on(cfg, device, seed))
        torch.manual_seed(seed + 1)
        return build_crs_model(cfg, unet, vae_scale_factor(cfg), cfg.clip.projection_dim)


def build_controlnet_on(cfg: Preset, device: torch.device,
                        seed: int) -> tuple[UNet2DConditionModel, ControlNetModel]:
    """The seeded UNet and ``ControlNetModel.from_unet`` of it, reading the same 18-channel condition stack as
    CRS-Diff, its conditioning embedding downsampling by the VAE's factor (diffusers' default widths at 8)."""
    levels = vae_scale_factor(cfg).bit_length() - 1
    with torch.device(device):
        unet = build_unet_on(cfg, device, seed)
        torch.manual_seed(seed + 1)
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3 * N_MAPS,
                                               conditioning_embedding_out_channels=(16, 32, 96, 256)[: levels + 1])
    return unet, controlnet


def trainable_count(*modules: torch.nn.Module | None) -> int:
    """Number of trainable parameters of the modules."""
    return sum(p.numel() for m in modules if m is not None for p in m.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# Timing, FLOPs, profiling


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int,
               device: torch.device) -> tuple[list[float], list[float]]:
    """Wall seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (GPU work included),
    and the process CPU seconds of each (wall much above CPU / threads: the machine was busy)."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """The measured rate (TFLOP/s) of n x n x n matrix products of random ``dtype`` data on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    rate = 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12
    del a, b
    free_memory(device)
    return rate


def peak_matmul(device: torch.device) -> dict[str, Any]:
    """The MFU denominator, timed now in the precision the benchmarks compute in: bf16 8192^3 products on CUDA,
    float32 1024^3 ones on the CPU (where the steps run in float32)."""
    if device.type == "cuda":
        return {"tflops": matmul_tflops(device, torch.bfloat16, 8192, 30), "dtype": "bfloat16", "n": 8192}
    return {"tflops": matmul_tflops(device, torch.float32, 1024, 5), "dtype": "float32", "n": 1024}


def print_profile(fn: Callable[[], Any], device: torch.device, title: str, steps: int = 3, rows: int = 15) -> str:
    """Profile ``steps`` calls of ``fn`` and print the top ``rows`` ops by self CUDA (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    print(f"\n### profile: {title} ({steps} steps, by {key})\n\n{table}")
    return table


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, Any]) -> Iterator[None]:
    """Record the peak allocated GPU memory (GiB) of the block into ``out["peak_gib"]`` (None on the CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def measure(bench: str, side: str, fn: Callable[[], Any], batch: int, args: argparse.Namespace,
            device: torch.device, peak_tflops: float | None = None, **extra: Any) -> dict[str, Any]:
    """Time ``fn`` (one step or one pipeline call over ``batch`` images); FLOPs and MFU when ``peak_tflops``."""
    row: dict[str, Any] = {"bench": bench, "side": side, "batch": batch, **extra}
    if peak_tflops:  # counted eagerly (compiled modules run uncompiled here)
        row["gflop_per_call"] = count_flops(fn) / 1e9
    with peak_memory(device, row):
        times, cpu = time_calls(fn, args.repeats, args.warmup, device)
    med = statistics.median(times)
    row.update(seconds=times, median_s=med, images_per_s=batch / med, cpu_seconds=cpu)
    if peak_tflops:
        row["mfu"] = row["gflop_per_call"] * 1e9 / med / (peak_tflops * 1e12)
    return row


# ---------------------------------------------------------------------------
# Reporting


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per benchmark, ours' images/s over the reference's (above 1: ours is faster)."""
    out = {}
    for bench in dict.fromkeys(r["bench"] for r in rows):
        rate = {r["side"]: r["images_per_s"] for r in rows if r["bench"] == bench}
        if "ours" in rate and "reference" in rate:
            out[bench] = rate["ours"] / rate["reference"]
    return out


def markdown(rows: list[dict[str, Any]], ratio: dict[str, float]) -> str:
    """The results as a markdown table, then one ratio line per benchmark."""
    gpu = any(r.get("peak_gib") is not None for r in rows)
    flops = any("mfu" in r for r in rows)
    head = ["benchmark", "side", "what", "batch", "images/s", "ms / call"]
    head += ["peak GiB"] if gpu else []
    head += ["GFLOP / call", "MFU"] if flops else []
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | --- | ---: | ---: | ---: |" + " ---: |" * (len(head) - 6)]
    for r in rows:
        cells = [r["bench"], r["side"], r.get("what", ""), str(r["batch"]), f"{r['images_per_s']:.2f}",
                 f"{1000 * r['median_s']:.1f}"]
        if gpu:
            cells.append(f"{r['peak_gib']:.2f}")
        if flops:
            cells += [f"{r['gflop_per_call']:,.1f}", f"{100 * r['mfu']:.1f}%"] if "mfu" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{bench}: ours / reference = {x:.2f}x (images/s)" for bench, x in ratio.items()]
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the machine, for the JSON record."""
    import accelerate
    import diffusers
    import transformers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "python": platform.python_version(),
           "machine": machine(), "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def report(script: str, args: argparse.Namespace, settings: dict[str, Any], rows: list[dict[str, Any]],
           device: torch.device, peak: dict[str, Any] | None = None, argv: list[str] | None = None,
           **extra: Any) -> dict[str, Any]:
    """Print the table and the ratios; write them to ``--json`` (and ``bench/RESULTS.md`` with ``--record``);
    return them. ``peak``: the matmul rate MFU was computed against (:func:`peak_matmul`)."""
    ratio = ratios(rows)
    table = markdown(rows, ratio)
    print(table)
    if peak:
        print(f"measured {peak['dtype']} matmul rate (MFU denominator): {peak['tflops']:.1f} TFLOP/s")
    env = environment(device)
    result = {"script": script, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "settings": settings, "environment": env, "peak_matmul": peak, "rows": rows,
              "ratio_ours_over_reference": ratio, **extra}
    if args.json is not None:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.record:
        where = env.get("gpu") or env["machine"]
        title = f"{script} ({settings.get('size')} size, {settings.get('precision') or settings.get('dtype')})"
        record(title, command_line(script, argv), table, where)
    return result
