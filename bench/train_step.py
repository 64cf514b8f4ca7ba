"""Training-step throughput of CRS-Diff and CC-Diff against diffusers references, models built from config.

    python bench/train_step.py [--size small|sd15|tiny] [--device auto|cpu|cuda] [--repeats 5] [--warmup 2]
                               [--bench crs cc] [--compile] [--profile] [--mfu] [--fit-gib 24] [--json OUT] [--record]

One step = noise-prediction MSE forward, backward and an AdamW step of the trainable parts, on one fixed
batch (the same latents, noise, uniform timesteps and text states on both sides of a comparison; the text
tower, condition dropout and rslib's per-sample clamp(1/SNR) loss weights are left out, being the same or
negligible work on both sides):

* ``crs``: CRS-Diff stage two (adapter with its feature extractor and FF/AFF fusion, metadata encoder, content
  tokenizer; frozen UNet) vs ``diffusers.ControlNetModel.from_unet`` on the same frozen UNet, fed the same
  18-channel condition stack (six maps).
* ``cc``: CC-Diff (its adapter's fusion hooked into the frozen UNet; synthetic boxes, phrase states and
  reference tokens of the preset's shapes) vs a plain forward and backward of the frozen UNet to its input.

On CUDA: bf16 autocast, TF32, SDPA; peak memory per side; FLOPs per step (FlopCounterMode) and MFU against
the bf16 matmul rate measured in the same run (``--mfu`` does the same on the CPU, against a float32 matmul).
The ratio is ours' images/s over the reference's.

``--fit-gib G``: then the largest of ``--fit-batches`` whose step of ours, with gradient checkpointing (the
frozen UNet's blocks, diffusers'; CRS-Diff's adapter as one segment), peaks under G GiB of GPU memory less
:data:`HEADROOM_GIB` for the CUDA context (on the CPU the steps run and no memory is read).
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from common import (
    PROMPT,
    SIZES,
    add_common_args,
    autocast,
    build_controlnet_on,
    build_crs_on,
    build_text_encoder,
    build_unet_on,
    compile_modules,
    crs_conditions,
    describe,
    free_memory,
    measure,
    peak_matmul,
    peak_memory,
    preset_for,
    print_profile,
    report,
    setup_device,
    text_states,
    trainable_count,
)

from rslib.config import Preset
from rslib.data.synthrs import OBJECT_CLASSES
from rslib.models.base import build_noise_scheduler, latent_size
from rslib.models.cc_diff import CCDiffModel, boxes_to_obb
from rslib.models.crs_diff import N_METADATA
from rslib.models.references import phrase_for
from rslib.train.cc_diff import build_adapter

LossFn = Callable[[], torch.Tensor]
HEADROOM_GIB = 1.5  # of a card's memory, left to the CUDA context and the allocator's fragmentation


@dataclass(frozen=True)
class Setup:
    """What every side builder needs."""

    cfg: Preset
    device: torch.device
    seed: int
    compile: bool
    text_encoder: torch.nn.Module
    checkpointing: bool = False  # gradient checkpointing (see checkpoint_whole and the UNets' own)


def checkpoint_whole(module: torch.nn.Module) -> None:
    """Recompute ``module``'s activations in the backward pass instead of keeping them (one checkpoint segment)."""
    module.forward = functools.partial(torch.utils.checkpoint.checkpoint, module.forward, use_reentrant=False)


def make_step(loss_fn: LossFn, params: list[torch.nn.Parameter], device: torch.device, lr: float) -> Callable[[], None]:
    """One training step: loss under autocast, backward, and an AdamW step when there is something to train."""
    opt = torch.optim.AdamW(params, lr=lr) if params else None

    def step() -> None:
        with autocast(device):
            loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def noise_inputs(cfg: Preset, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Latents, noise and timesteps of one batch at the preset's latent size."""
    c, h = cfg.vae.latent_channels, latent_size(cfg)
    return {"latents": torch.randn(batch, c, h, h, generator=g), "noise": torch.randn(batch, c, h, h, generator=g),
            "t": torch.randint(0, 1000, (batch,), generator=g)}


def mse_to_noise(pred: torch.Tensor, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The noise-prediction loss, in fp32."""
    return F.mse_loss(pred.float(), x["noise"].float())


# ---------------------------------------------------------------------------
# (a) CRS-Diff stage two vs ControlNet


def crs_inputs(cfg: Preset, batch: int, text: torch.Tensor, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """A stage-two batch: noise inputs, text states, condition stack, content embeddings, metadata."""
    g = torch.Generator().manual_seed(seed)
    x = {**noise_inputs(cfg, batch, g), **crs_conditions(cfg, batch, g)}
    x = {k: v.to(device) for k, v in x.items()}
    x["text"] = text
    return x


def crs_ours(s: Setup, x: dict[str, torch.Tensor]):
    """CRS-Diff's step and the modules it keeps alive."""
    cfg, device = s.cfg, s.device
    model = build_crs_on(cfg, device, s.seed)
    model.train()
    model.unet.eval()
    if s.checkpointing:
        model.unet.enable_gradient_checkpointing()
        checkpoint_whole(model.adapter)
    if s.compile:
        compile_modules(model.unet, model.adapter)
    sched = build_noise_scheduler()

    def loss() -> torch.Tensor:  # reads its batch from x when called: refilling x changes the batch
        b = x["t"].shape[0]
        keep_c = torch.ones(b, dtype=torch.bool, device=device)
        keep_m = torch.ones(b, N_METADATA, dtype=torch.bool, device=device)
        noisy = sched.add_noise(x["latents"], x["noise"], x["t"])
        pred = model(noisy, x["t"], x["text"], x["conditions"], x["content"], keep_c, x["metadata"], keep_m)
        return mse_to_noise(pred, x)

    params = [p for p in model.parameters() if p.requires_grad]
    info = {"what": "adapter + metadata + content, frozen UNet", "trainable_params": trainable_count(model)}
    return make_step(loss, params, device, cfg.crs.lr), model, info


def crs_reference(s: Setup, x: dict[str, torch.Tensor]):
    """diffusers ControlNet (same 18-channel input) on the same frozen UNet."""
    cfg, device = s.cfg, s.device
    unet, controlnet = build_controlnet_on(cfg, device, s.seed)
    controlnet.train()
    if s.checkpointing:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    if s.compile:
        compile_modules(unet, controlnet)
    sched = build_noise_scheduler()

    def loss() -> torch.Tensor:
        noisy = sched.add_noise(x["latents"], x["noise"], x["t"])
        down, mid = controlnet(noisy, x["t"], encoder_hidden_states=x["text"], controlnet_cond=x["conditions"],
                               return_dict=False)
        pred = unet(noisy, x["t"], encoder_hidden_states=x["text"], down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]
        return mse_to_noise(pred, x)

    info = {"what": "ControlNetModel.from_unet, frozen UNet", "trainable_params": trainable_count(controlnet)}
    return make_step(loss, list(controlnet.parameters()), device, cfg.crs.lr), (unet, controlnet), info


# ---------------------------------------------------------------------------
# (b) CC-Diff vs the plain frozen UNet


def reference_token_shapes(cfg: Preset) -> tuple[int, int, int]:
    """(instance tokens, scene tokens, token width) of the preset's reference encoder (RS-CLIP or DINOv2)."""
    c = cfg.cc
    if c.image_encoder == "dinov2":
        patches, dim = (c.dino_size // 14) ** 2, 1024  # DINOv2 ViT-L/14
    else:
        patches, dim = (cfg.data.image_size // cfg.clip.patch) ** 2, cfg.clip.vision_hidden

    def tokens(grid: int) -> int:
        return 1 + (grid * grid if 0 < grid * grid < patches else patches)

    return tokens(c.fg_ref_grid), tokens(c.bg_ref_grid), dim


def cc_inputs(cfg: Preset, batch: int, text_encoder, tokenizer, device: torch.device,
              seed: int) -> dict[str, torch.Tensor]:
    """A CC-Diff batch: noise inputs, caption and phrase states, max_instances random boxes, reference tokens."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.cc.max_instances
    x = noise_inputs(cfg, batch, g)
    xy = torch.rand(batch, n, 2, generator=g) * 0.6
    x["boxes"] = torch.cat([xy, (xy + 0.1 + 0.3 * torch.rand(batch, n, 2, generator=g)).clamp(max=1.0)], -1)
    x["obb"] = boxes_to_obb(x["boxes"])
    x["valid"] = torch.ones(batch, n, dtype=torch.bool)
    fg_t, bg_t, dim = reference_token_shapes(cfg)
    x["fg_refs"] = torch.randn(batch, n, fg_t, dim, generator=g)
    x["bg_ref"] = torch.randn(batch, bg_t, dim, generator=g)
    labels = torch.randint(0, len(OBJECT_CLASSES), (batch, n), generator=g)
    x = {k: v.to(device) for k, v in x.items()}
    phrase_hidden, phrase_pooled = text_states(text_encoder, tokenizer, [phrase_for(c) for c in OBJECT_CLASSES])
    x["phrase_hidden"], x["phrase_pooled"] = phrase_hidden[labels.to(device)], phrase_pooled[labels.to(device)]
    x["text"], x["pooled"] = text_states(text_encoder, tokenizer, [PROMPT] * batch)
    return x


def cc_ours(s: Setup, x: dict[str, torch.Tensor]):
    """CC-Diff's step (layout encoding included) and the modules it keeps alive."""
    cfg, device, seed = s.cfg, s.device, s.seed
    with torch.device(device):
        unet = build_unet_on(cfg, device, seed)
        torch.manual_seed(seed + 1)
        adapter = build_adapter(cfg, unet, x["fg_refs"].shape[-1])
    model = CCDiffModel(unet, s.text_encoder, adapter)  # the text tower is not run: phrase states are given
    adapter.train()
    if s.checkpointing:
        model.enable_gradient_checkpointing()  # the fusion hooks are entered again in each recomputed block
    if s.compile:
        compile_modules(model.unet)
    sched = build_noise_scheduler()

    def loss() -> torch.Tensor:  # reads its batch from x when called: refilling x changes the batch
        hw = tuple(x["latents"].shape[-2:])
        ctx = adapter.encode(x["obb"], x["valid"], x["phrase_hidden"], x["phrase_pooled"], x["pooled"], hw,
                             fg_refs=x["fg_refs"], bg_ref=x["bg_ref"], boxes=x["boxes"])
        noisy = sched.add_noise(x["latents"], x["noise"], x["t"])
        return mse_to_noise(model(noisy, x["t"], x["text"], ctx), x)

    info = {"what": f"adapter ({len(adapter.fusion)} fusion layers), frozen UNet",
            "trainable_params": trainable_count(adapter)}
    return make_step(loss, list(adapter.parameters()), device, cfg.cc.lr), model, info


def cc_reference(s: Setup, x: dict[str, torch.Tensor]):
    """The plain frozen UNet, forward and backward to its input (no optimizer: nothing is trained)."""
    unet = build_unet_on(s.cfg, s.device, s.seed)
    if s.checkpointing:
        unet.enable_gradient_checkpointing()
    if s.compile:
        compile_modules(unet)
    sched = build_noise_scheduler()

    def loss() -> torch.Tensor:
        noisy = sched.add_noise(x["latents"], x["noise"], x["t"]).detach().requires_grad_(True)
        return mse_to_noise(unet(noisy, x["t"], encoder_hidden_states=x["text"], return_dict=False)[0], x)

    info = {"what": "frozen UNet, backward to the input", "trainable_params": 0}
    return make_step(loss, [], s.device, 0.0), unet, info


# ---------------------------------------------------------------------------


SIDES = {"crs": (crs_reference, crs_ours), "cc": (cc_reference, cc_ours)}


def bench_inputs(bench: str, cfg: Preset, batch: int, text_encoder: torch.nn.Module, tokenizer: Any,
                 device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """One fixed batch of ``batch`` items for a comparison (both sides get the same)."""
    if bench == "crs":
        text, _ = text_states(text_encoder, tokenizer, [PROMPT] * batch)
        return crs_inputs(cfg, batch, text, device, seed)
    return cc_inputs(cfg, batch, text_encoder, tokenizer, device, seed)


def step_peak(step: Callable[[], None], device: torch.device, batch: int) -> dict[str, Any]:
    """Peak GPU memory (GiB; None on the CPU) of two steps at ``batch`` (the second with the optimizer's state),
    or ``oom`` when they do not fit on this card."""
    row: dict[str, Any] = {"batch": batch}
    free_memory(device)  # the reserved peak then counts this batch's blocks alone
    try:
        with peak_memory(device, row):
            step()
            step()
    except torch.cuda.OutOfMemoryError:
        row.update(peak_gib=None, oom=True)
    if device.type == "cuda":
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    return row


def fit_memory(setup: Setup, bench: str, batches: list[int], budget_gib: float, make_inputs) -> dict[str, Any]:
    """Peak memory of ours' step with gradient checkpointing at each batch, up to the first that does not fit
    ``budget_gib`` less :data:`HEADROOM_GIB`; ``largest``: the largest batch that fits (None when nothing was
    measured, on the CPU)."""
    limit = budget_gib - HEADROOM_GIB
    x = make_inputs(min(batches))
    step, keep, _ = SIDES[bench][1](replace(setup, checkpointing=True), x)
    rows, largest = [], None
    for batch in sorted(batches):
        x.clear()
        x.update(make_inputs(batch))  # the step reads its batch from x
        row = step_peak(step, setup.device, batch)
        rows.append(row)
        print(f"{bench} ours, gradient checkpointing, batch {batch}: peak {row['peak_gib']} GiB")
        if row["peak_gib"] is None and not row.get("oom"):
            continue  # the CPU: the step ran, there is no GPU memory to read
        if row.get("oom") or row["peak_gib"] > limit:
            break
        largest = batch
    del step, keep, x
    free_memory(setup.device)
    return {"bench": bench, "budget_gib": budget_gib, "headroom_gib": HEADROOM_GIB, "rows": rows, "largest": largest}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--bench", nargs="+", choices=("crs", "cc"), default=["crs", "cc"])
    p.add_argument("--profile", action="store_true", help="profile a few steps of ours and print the top 15 ops")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--mfu", action="store_true", help="FLOPs and MFU on the CPU too (always on CUDA)")
    p.add_argument("--grad-checkpointing", action="store_true", help="time both sides with gradient checkpointing")
    p.add_argument("--fit-gib", type=float, default=None,
                   help="also find the largest --fit-batches batch of ours that fits this many GiB (see above)")
    p.add_argument("--fit-batches", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparisons, print the table, return (and optionally write) the results."""
    args = parse_args(argv)
    size = SIZES[args.size]
    cfg = preset_for(size, args.preset)
    device = setup_device(args.device, size)
    batch = args.batch or size.train_batch
    peak = peak_matmul(device) if device.type == "cuda" or args.mfu else None
    text_encoder, tokenizer = build_text_encoder(cfg, device, args.seed)
    settings = {**describe(cfg), "size": size.name, "batch": batch, "gradient_checkpointing": args.grad_checkpointing,
                "precision": "bf16 autocast, TF32" if device.type == "cuda" else "fp32"}
    print(f"training step, {settings}")

    setup = Setup(cfg, device, args.seed, args.compile, text_encoder, args.grad_checkpointing)
    rows, profiles, memory = [], {}, []
    for bench in args.bench:
        x = bench_inputs(bench, cfg, batch, text_encoder, tokenizer, device, args.seed)
        for side, build in zip(("reference", "ours"), SIDES[bench]):
            step, keep, info = build(setup, x)
            rows.append(measure(bench, side, step, batch, args, device, peak and peak["tflops"], **info))
            if args.profile and side == "ours":
                profiles[bench] = print_profile(step, device, f"{bench} ours, batch {batch}", args.profile_steps)
            del step, keep
            free_memory(device)
        if args.fit_gib:
            make = functools.partial(bench_inputs, bench, cfg, text_encoder=text_encoder, tokenizer=tokenizer,
                                     device=device, seed=args.seed)
            memory.append(fit_memory(setup, bench, args.fit_batches, args.fit_gib, make))
    return report("train_step", args, settings, rows, device, peak, argv, profiles=profiles, memory=memory)


if __name__ == "__main__":
    main()
