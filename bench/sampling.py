"""Sampling throughput of ``CRSDiffPipeline`` against diffusers' ``StableDiffusionControlNetPipeline``.

    python bench/sampling.py [--size small|sd15|tiny] [--device auto|cpu|cuda] [--repeats 5] [--warmup 1]
                             [--steps N] [--dtype auto|fp32|bf16] [--compile] [--profile] [--json OUT] [--record]

Both pipelines share one VAE, text tower and tokenizer (built from config, random weights); their UNets come
from the same seed, and the reference's ``ControlNetModel.from_unet`` reads the same 18-channel condition stack
as CRS-Diff's adapter. Same DDIM sampler (rslib's ``build_sampler``), steps, batch, prompt, guidance scale and
starting noise; classifier-free guidance on in both, so both run their control branch on both halves of every
step, with the same maps in both halves (``map_guidance=False``, CRS-Diff's own choice and what the reference
does); ``output_type="pt"`` (VAE decoding included). Ours also gets metadata and content embeddings, as in use.
On CUDA every model runs in bf16 (``--dtype``), with TF32 and SDPA. The ratio is ours' images/s over the
reference's (the target is at least 0.9).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from common import (
    PROMPT,
    SIZES,
    add_common_args,
    build_controlnet_on,
    build_crs_on,
    build_text_encoder,
    build_vae_on,
    compile_modules,
    crs_conditions,
    describe,
    free_memory,
    measure,
    preset_for,
    print_profile,
    report,
    setup_device,
    to_dtype,
)
from diffusers import AutoencoderKL, StableDiffusionControlNetPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from rslib.config import Preset
from rslib.models.base import build_sampler
from rslib.pipelines.crs_diff import CRSDiffPipeline


@dataclass(frozen=True)
class Shared:
    """What both pipelines share: the frozen parts, the inputs and the sampling settings."""

    cfg: Preset
    device: torch.device
    dtype: torch.dtype
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    inputs: dict[str, torch.Tensor]
    steps: int
    guidance: float
    seed: int
    compile: bool

    @property
    def prompts(self) -> list[str]:
        """One prompt per image of the batch."""
        return [PROMPT] * len(self.inputs["conditions"])

    def call_kwargs(self) -> dict[str, Any]:
        """Arguments both pipelines take, with a fresh generator (the same starting noise every call)."""
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance, "output_type": "pt",
                "generator": torch.Generator(self.device).manual_seed(self.seed)}


def ours(sh: Shared):
    """``CRSDiffPipeline`` around a fresh condition branch; returns the call, the pipeline and a description."""
    crs = build_crs_on(sh.cfg, sh.device, sh.seed).to(sh.dtype).eval()
    pipe = CRSDiffPipeline(vae=sh.vae, text_encoder=sh.text_encoder, tokenizer=sh.tokenizer, unet=crs.unet,
                           scheduler=build_sampler(), adapter=crs.adapter, metadata_encoder=crs.metadata_encoder,
                           content_tokenizer=crs.content_tokenizer)
    if sh.compile:
        compile_modules(pipe.unet, pipe.adapter)
    pipe.set_progress_bar_config(disable=True)
    x = sh.inputs

    def call() -> torch.Tensor:  # map_guidance off: both CFG halves see the maps, as in the reference
        return pipe(sh.prompts, conditions=x["conditions"], metadata=x["metadata"], content_embeds=x["content"],
                    map_guidance=False, **sh.call_kwargs()).images

    return call, pipe, {"what": "CRSDiffPipeline (adapter, metadata, content)"}


def reference(sh: Shared):
    """``StableDiffusionControlNetPipeline`` with ``ControlNetModel.from_unet``; returns the call, the pipeline and
    a description."""
    unet, controlnet = build_controlnet_on(sh.cfg, sh.device, sh.seed)
    pipe = StableDiffusionControlNetPipeline(
        vae=sh.vae, text_encoder=sh.text_encoder, tokenizer=sh.tokenizer, unet=to_dtype(unet, sh.dtype),
        controlnet=to_dtype(controlnet, sh.dtype).eval(), scheduler=build_sampler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    if sh.compile:
        compile_modules(pipe.unet, pipe.controlnet)
    pipe.set_progress_bar_config(disable=True)
    size = sh.cfg.data.image_size

    def call() -> torch.Tensor:
        return pipe(sh.prompts, image=sh.inputs["conditions"], height=size, width=size, **sh.call_kwargs()).images

    return call, pipe, {"what": "StableDiffusionControlNetPipeline"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.set_defaults(warmup=1)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the size's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the preset's crs one)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--profile", action="store_true", help="profile one call of ours and print the top 15 ops")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time both pipelines, print the table, return (and optionally write) the results."""
    args = parse_args(argv)
    size = SIZES[args.size]
    cfg = preset_for(size, args.preset)
    device = setup_device(args.device, size)
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") else torch.float32
    batch, steps = args.batch or size.sample_batch, args.steps or size.sample_steps
    guidance = args.guidance if args.guidance is not None else cfg.crs.guidance_scale
    if guidance <= 1.0:
        raise ValueError("--guidance must be above 1: the comparison is with classifier-free guidance on")
    text_encoder, tokenizer = build_text_encoder(cfg, device, args.seed)
    vae = build_vae_on(cfg, device, args.seed)
    inputs = crs_conditions(cfg, batch, torch.Generator().manual_seed(args.seed))
    shared = Shared(cfg, device, dtype, to_dtype(vae, dtype), to_dtype(text_encoder, dtype), tokenizer,
                    {k: v.to(device) for k, v in inputs.items()}, steps, guidance, args.seed, args.compile)
    settings = {**describe(cfg), "size": size.name, "batch": batch, "steps": steps, "guidance_scale": guidance,
                "sampler": "DDIM", "dtype": str(dtype).replace("torch.", "")}
    print(f"sampling, {settings}")

    rows, profiles = [], {}
    for side, build in (("reference", reference), ("ours", ours)):
        call, keep, info = build(shared)
        rows.append(measure("crs sampling", side, call, batch, args, device, **info))
        if args.profile and side == "ours":
            profiles["crs sampling"] = print_profile(call, device, f"CRSDiffPipeline, batch {batch}, {steps} steps", 1)
        del call, keep
        free_memory(device)
    return report("sampling", args, settings, rows, device, argv=argv, profiles=profiles)


if __name__ == "__main__":
    main()
