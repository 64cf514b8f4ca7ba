"""The diffusers pipeline contract, for CRSDiffPipeline and CCDiffPipeline alike (modelled on the ideas of diffusers'
own common pipeline tests, on tiny components): encode_prompt and prompt embeddings, num_images_per_prompt, step
callbacks, cross_attention_kwargs, the generator, any image size, CPU offload, every image form, defaults,
exports, CC-Diff under diffusers' attention tools, and every bad input refused before the UNet runs."""
from __future__ import annotations

import copy
import inspect
import logging
import os
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import cpu_offload
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

import rslib
import rslib.pipelines
import standins
from rslib.config import get_preset
from rslib.data.formats import CONDITION_NAMES
from rslib.models.base import build_sampler, build_unet, build_vae
from rslib.models.cc_diff import CCDiffAdapter
from rslib.models.crs_diff import ContentTokenizer, CRSLocalAdapter, MetadataEncoder, with_identity_class_embedding
from rslib.models.references import ReferenceBank
from rslib.models.text import clip_tokenizer
from rslib.pipelines.cc_diff import CCDiffPipeline, load_cc_diff, sample_cc_diff
from rslib.pipelines.common import seeded_batches
from rslib.pipelines.crs_diff import (
    CRSDiffPipeline,
    conditions_from_maps,
    image_batch,
    load_crs_diff,
    sample_crs_diff,
)
from rslib.pipelines.stage_one import load_stage_one

TEXT_DIM = 32
DIMG = 12  # reference-token width
SIZE = 32  # the smoke preset's images (8 x 8 latents: the autoencoder divides by 4)
KINDS = ["crs", "cc"]
PROMPTS = ["an aerial image of a port.", "a farmland."]
LAYOUT = [{"label": "ship", "bbox": [0.1, 0.1, 0.5, 0.45]},
          {"label": "vehicle", "obb": [0.6, 0.6, 0.9, 0.62, 0.88, 0.85, 0.58, 0.83]}]


# ---------------------------------------------------------------------------
# Tiny pipelines


def _perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def parts():
    """Tiny stage-one parts at the smoke preset and the trained-looking branches of both pipelines."""
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    text, image = standins.clip_towers(TEXT_DIM)
    unet = build_unet(cfg, TEXT_DIM).eval()
    _perturb(unet, 0.02, 1)  # a stage-one UNet whose output depends on everything
    crs_unet = with_identity_class_embedding(unet)
    adapter = CRSLocalAdapter.from_unet(crs_unet, stem_channels=cfg.crs.stem_channels,
                                        inject_channels=cfg.crs.inject_channels, downscale=4)
    meta = MetadataEncoder(embed_dim=cfg.crs.metadata_dim, out_dim=4 * 16)
    content = ContentTokenizer(in_dim=TEXT_DIM, context_dim=TEXT_DIM, num_tokens=4)
    for i, m in enumerate((adapter, meta, content)):
        _perturb(m, 0.05, 2 + i)  # a "trained" branch: every weight moved, zero convs included
    torch.manual_seed(5)
    cc_adapter = CCDiffAdapter.from_unet(unet, cfg.cc.fusion_blocks, image_dim=DIMG, resampler_dim=16,
                                         resampler_depth=1, resampler_heads=2, resampler_dim_head=8,
                                         num_fg_queries=2, num_bg_queries=2, num_bridge_queries=2, ff_mult=2,
                                         fusion_heads=2, fusion_dim_head=8, box_hidden=16)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # open the zero-initialised outputs, so that the layout shows
        for name, p in cc_adapter.named_parameters():
            if "to_out" in name or "alpha" in name or name.endswith("ff.3.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(7)
    bank = ReferenceBank.build(
        ["ship", "vehicle", "airplane"], torch.randn(6, 3, DIMG, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]),
        torch.arange(6), torch.tensor([0.5, 2.0, 1.0, 1.5, 0.8, 1.2]), torch.randn(4, 5, DIMG, generator=g),
        torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1), torch.arange(4),
        torch.randn(16, TEXT_DIM, generator=g))
    return {"vae": build_vae(cfg).eval(), "text_encoder": text, "tokenizer": clip_tokenizer(77), "unet": unet,
            "crs_unet": crs_unet, "adapter": adapter, "metadata_encoder": meta, "content_tokenizer": content,
            "image_encoder": image, "cc_adapter": cc_adapter, "references": bank}


def make_pipe(parts, kind: str, **config):
    """A CRS-Diff or CC-Diff pipeline over the shared parts (``config``: its saved defaults)."""
    common = {k: parts[k] for k in ("vae", "text_encoder", "tokenizer")}
    if kind == "crs":
        pipe = CRSDiffPipeline(**common, unet=parts["crs_unet"], scheduler=build_sampler(), adapter=parts["adapter"],
                               metadata_encoder=parts["metadata_encoder"],
                               content_tokenizer=parts["content_tokenizer"], image_encoder=parts["image_encoder"],
                               **config)
    else:
        pipe = CCDiffPipeline(**common, unet=parts["unet"], scheduler=build_sampler(), adapter=parts["cc_adapter"],
                              references=parts["references"], **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def own_copy(parts, kind: str):
    """A pipeline on copies of the parts, for tests that change its modules (offload, attention processors)."""
    return make_pipe(copy.deepcopy(parts), kind)


def conditions(b: int = 2, h: int = SIZE, w: int = SIZE, seed: int = 0) -> torch.Tensor:
    """A (B, 18, H, W) stack of binary maps."""
    return (torch.rand(b, 18, h, w, generator=torch.Generator().manual_seed(seed)) > 0.7).float()


def call_args(kind: str, **kw) -> dict:
    """A small call: two prompts, their conditions, 2 steps with guidance, fixed noise."""
    args = dict(prompt=list(PROMPTS), num_inference_steps=2, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(0))
    if kind == "crs":
        args.update(conditions=conditions(), metadata={"cloud_cover": 40, "month": 7})
    else:
        args.update(layout=LAYOUT)
    args.update(kw)
    return args


def run(pipe, kind: str, **kw) -> np.ndarray | torch.Tensor:
    return pipe(**call_args(kind, **kw)).images


# ---------------------------------------------------------------------------
# 1. encode_prompt, prompt embeddings, num_images_per_prompt, callbacks, cross_attention_kwargs


@pytest.mark.parametrize("kind", KINDS)
def test_encode_prompt_has_diffusers_signature_and_needs_only_the_text_parts(parts, kind):
    pipe = make_pipe(parts, kind)
    ours = list(inspect.signature(pipe.encode_prompt).parameters)
    theirs = list(inspect.signature(StableDiffusionPipeline.encode_prompt).parameters)[1:]  # without self
    assert ours[:7] == theirs[:7]  # prompt, device, num_images_per_prompt, do_cfg, negative_prompt, *_embeds
    text_only = type(pipe)(**{k: (v if k in ("text_encoder", "tokenizer") else None)
                              for k, v in pipe.components.items()})
    alone = text_only.encode_prompt(PROMPTS, torch.device("cpu"), 2, True, negative_prompt="clouds")
    full = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 2, True, negative_prompt="clouds")
    assert len(alone) == len(full) == (2 if kind == "crs" else 3)
    for a, b in zip(alone, full):
        assert a.shape[0] == 4 and torch.equal(a, b)  # two images per prompt: rows 0, 1 = prompt 0
    assert torch.equal(full[0][0], full[0][1]) and not torch.equal(full[0][1], full[0][2])
    assert pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, False)[1] is None  # no guidance, no negative


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_embeds_give_the_images_of_their_prompts(parts, kind):
    pipe = make_pipe(parts, kind)
    expected = run(pipe, kind, negative_prompt="clouds")
    embeds = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, True, negative_prompt="clouds")
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds"][:len(embeds)]
    got = run(pipe, kind, prompt=None, **dict(zip(names, embeds)))
    np.testing.assert_array_equal(got, expected)
    if kind == "crs":  # diffusers' "encode_prompt works in isolation": the rest runs without the text parts
        without_text = CRSDiffPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None})
        without_text.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(run(without_text, kind, prompt=None, **dict(zip(names, embeds))), expected)
    else:  # CC-Diff encodes the instance phrases with its text encoder
        without_text = CCDiffPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None})
        with pytest.raises(ValueError, match="needs its text_encoder"):
            run(without_text, kind, prompt=None, **dict(zip(names, embeds)))


@pytest.mark.parametrize("kind", KINDS)
def test_num_images_per_prompt_repeats_each_prompt(parts, kind):
    """n images per prompt = the prompts (and their per-prompt inputs) repeated n times, same noise per image."""
    pipe = make_pipe(parts, kind)
    seeds = [3, 4, 5, 6]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    per_prompt = {"conditions": conditions(2)} if kind == "crs" else {"layout": [LAYOUT, LAYOUT[:1]]}
    out = run(pipe, kind, num_images_per_prompt=2, generator=gens, **per_prompt)
    assert out.shape == (4, SIZE, SIZE, 3)
    repeated = ({"conditions": conditions(2).repeat_interleave(2, dim=0)} if kind == "crs"
                else {"layout": [LAYOUT, LAYOUT, LAYOUT[:1], LAYOUT[:1]]})
    ref = run(pipe, kind, prompt=[p for p in PROMPTS for _ in range(2)],
              generator=[torch.Generator().manual_seed(s) for s in seeds], **repeated)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert np.abs(out[0] - out[1]).max() > 1e-3  # the same prompt, other noise


@pytest.mark.parametrize("kind", KINDS)
def test_step_callback_reads_and_replaces_the_running_tensors(parts, kind):
    pipe = make_pipe(parts, kind)
    seen = []

    def record(p, i, t, kwargs):
        seen.append((i, int(t), {k: tuple(v.shape) for k, v in kwargs.items()}))
        return kwargs

    names = list(pipe._callback_tensor_inputs)
    assert names == ["latents", "prompt_embeds", "negative_prompt_embeds"]
    run(pipe, kind, num_inference_steps=3, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names)
    assert [s[0] for s in seen] == [0, 1, 2] and [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert seen[0][2]["latents"] == (2, 4, 8, 8)
    assert seen[0][2]["prompt_embeds"] == (4, 77, TEXT_DIM)  # [unconditional ; conditional], as diffusers'
    assert seen[0][2]["negative_prompt_embeds"] == (2, 77, TEXT_DIM)

    def zero_last(p, i, t, kwargs):  # diffusers' test_callback_inputs: the returned latents replace the running ones
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = run(pipe, kind, output_type="latent", callback_on_step_end=zero_last)
    assert torch.equal(out, torch.zeros_like(out))

    def more_guidance(p, i, t, kwargs):  # diffusers' test_callback_cfg
        p._guidance_scale += 1.0
        return kwargs

    guided = run(pipe, kind, callback_on_step_end=more_guidance)
    assert pipe.guidance_scale == 3.0 + 2 and np.abs(guided - run(pipe, kind)).max() > 1e-4

    calls = []

    def interrupt(p, i, t, kwargs):  # diffusers' interrupt: the remaining steps are skipped
        calls.append(i)
        p._interrupt = True
        return kwargs

    run(pipe, kind, num_inference_steps=3, callback_on_step_end=interrupt)
    assert calls == [0] and pipe.interrupt
    run(pipe, kind, num_inference_steps=1)
    assert not pipe.interrupt  # a new call starts afresh


class ProbeProcessor(AttnProcessor2_0):
    """SDPA attention that records the ``probe`` keyword it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, probe=None):
        self.seen.append(probe)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.mark.parametrize("kind", KINDS)
def test_cross_attention_kwargs_reach_the_unets_processors(parts, kind):
    pipe = own_copy(parts, kind)
    plain = run(pipe, kind)
    probe = ProbeProcessor()
    pipe.unet.set_attn_processor(probe)
    out = run(pipe, kind, cross_attention_kwargs={"probe": "here"})
    assert probe.seen and set(probe.seen) == {"here"}
    np.testing.assert_allclose(out, plain, atol=1e-5, rtol=0)  # CC-Diff's layout still applies around it


# ---------------------------------------------------------------------------
# 2-3. generator and sizes


@pytest.mark.parametrize("kind", KINDS)
def test_the_generator_reaches_every_scheduler(parts, kind):
    """Euler-Ancestral draws noise at every step: from the given generator, whatever the global seed."""
    pipe = make_pipe(parts, kind)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    images = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        images.append(run(pipe, kind, num_inference_steps=3))
    np.testing.assert_array_equal(images[0], images[1])
    torch.manual_seed(1)
    assert np.abs(run(pipe, kind, num_inference_steps=3, generator=torch.Generator().manual_seed(9))
                  - images[0]).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_height_and_width_may_differ(parts, kind):
    pipe = make_pipe(parts, kind)
    extra = {"conditions": conditions(2, 32, 48)} if kind == "crs" else {}
    out = run(pipe, kind, height=32, width=48, **extra)
    assert out.shape == (2, 32, 48, 3) and np.isfinite(out).all()


# ---------------------------------------------------------------------------
# 4. CPU offload


def offload_trace(pipe, kind: str) -> tuple[list[str], Counter]:
    """Run one call under ``enable_model_cpu_offload`` on the CPU, following the hooks' chain as it would move the
    modules: a component counts as on the device from its hook's ``pre_forward`` until the next module of
    ``model_cpu_offload_seq`` offloads it. Returns the modules that ran while their component was off the
    device, and how often each component was loaded."""
    pipe.enable_model_cpu_offload(device="cpu")
    owner = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for m in component.modules():
                owner.setdefault(m, name)
    loaded, loads, misses, handles = set(), Counter(), [], []
    for user_hook in pipe._all_hooks:
        hook = user_hook.hook

        def pre_forward(module, *args, _hook=hook, _original=hook.pre_forward, **kwargs):
            if owner[module] not in loaded:
                loads[owner[module]] += 1
            loaded.add(owner[module])
            if _hook.prev_module_hook is not None:
                loaded.discard(owner[_hook.prev_module_hook.model])
            return _original(module, *args, **kwargs)

        hook.pre_forward = pre_forward
    roots = {c for c in pipe.components.values() if isinstance(c, torch.nn.Module)}
    for m, name in owner.items():
        if m not in roots and any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _name=name: None if _name in loaded else misses.append(_name)))
    try:
        run(pipe, kind)
    finally:
        for h in handles:
            h.remove()
    return sorted(set(misses)), loads


@pytest.mark.parametrize("kind", KINDS)
def test_model_cpu_offload_hooks_cover_every_module(parts, kind):
    pipe = own_copy(parts, kind)
    expected = run(pipe, kind)
    misses, loads = offload_trace(pipe, kind)
    assert misses == []  # every module ran with its component on the execution device
    assert loads and all(v == 1 for v in loads.values()), loads  # each component moves once a call, not per step
    seq = pipe.model_cpu_offload_seq.split("->")
    assert set(loads) - set(seq) == {"adapter"}  # the per-step adapter is hooked beside the chain, as ControlNet
    np.testing.assert_allclose(run(pipe, kind), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_sequential_cpu_offload_runs_and_gives_the_same_images(parts, kind):
    """Weights live on the meta device between uses: every tensor must be made on the execution device."""
    pipe = own_copy(parts, kind)
    extra = {"content_image": torch.rand(1, 3, SIZE, SIZE) * 2 - 1} if kind == "crs" else {}
    expected = run(pipe, kind, **extra)
    # what enable_sequential_cpu_offload attaches, with the CPU as the execution device (accelerate's hooks fail on
    # the "cpu:0" that diffusers would name)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)
    assert pipe.device.type == "meta"  # what a pipeline that asks self.device would put its latents on
    np.testing.assert_allclose(run(pipe, kind, **extra), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# 5. Images in every form (CRS-Diff)


def test_content_image_in_every_form_gives_the_same_image(parts):
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    as_tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 * 2 - 1  # (3, H, W) in [-1, 1]
    forms = {"pil": PIL.Image.fromarray(pixels), "uint8": pixels, "float": pixels.astype(np.float32) / 255.0,
             "batch": pixels[None], "list": [PIL.Image.fromarray(pixels)], "tensor": as_tensor,
             "uint8 tensor": torch.from_numpy(pixels).permute(2, 0, 1)}
    for name, form in forms.items():
        torch.testing.assert_close(image_batch(form), as_tensor[None], atol=1e-6, rtol=0, msg=name)
    pipe = make_pipe(parts, "crs")
    a = run(pipe, "crs", content_image=forms["pil"])
    np.testing.assert_array_equal(a, run(pipe, "crs", content_image=as_tensor))
    assert np.abs(a - run(pipe, "crs")).max() > 1e-3  # the content image reaches the output


def test_condition_maps_in_every_form_are_scaled_alike(parts):
    road = (np.random.default_rng(1).random((SIZE, SIZE)) > 0.8).astype(np.uint8) * 255
    expected = conditions_from_maps({"road": torch.from_numpy(road).float() / 255}, SIZE)
    for form in (road, road[..., None].repeat(3, -1), PIL.Image.fromarray(road), torch.from_numpy(road),
                 road.astype(np.float32) / 255):
        torch.testing.assert_close(conditions_from_maps({"road": form}, SIZE), expected, atol=0, rtol=0)
    half = road[::2, ::2]  # the same aspect ratio at another size: resized (nearest), not refused
    assert conditions_from_maps({"road": half}, SIZE).shape == (18, SIZE, SIZE)
    pipe = make_pipe(parts, "crs")
    maps = conditions(2)
    as_uint8 = (maps * 255).to(torch.uint8)
    np.testing.assert_array_equal(run(pipe, "crs", conditions=as_uint8), run(pipe, "crs", conditions=maps))
    np.testing.assert_array_equal(run(pipe, "crs", conditions=as_uint8.numpy()), run(pipe, "crs", conditions=maps))
    per_prompt = [{n: maps[i, 3 * k:3 * k + 3] for k, n in enumerate(CONDITION_NAMES)} for i in range(2)]
    np.testing.assert_array_equal(run(pipe, "crs", conditions=per_prompt), run(pipe, "crs", conditions=maps))


# ---------------------------------------------------------------------------
# 6-7. Defaults and exports


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_pil_output_and_saved_sampling_settings(parts, kind, tmp_path):
    pipe = make_pipe(parts, kind)
    images = pipe(PROMPTS[0], num_inference_steps=1, **({"layout": LAYOUT} if kind == "cc" else {})).images
    assert isinstance(images[0], PIL.Image.Image) and images[0].size == (SIZE, SIZE)
    type(pipe)(**pipe.components, guidance_scale=2.5, num_inference_steps=2).save_pretrained(tmp_path / "p")
    loaded = (load_crs_diff if kind == "crs" else load_cc_diff)(tmp_path / "p", "cpu")
    assert loaded.config.guidance_scale == 2.5 and loaded.config.num_inference_steps == 2
    args = call_args(kind)
    del args["guidance_scale"], args["num_inference_steps"]
    by_default = loaded(**args).images
    np.testing.assert_array_equal(by_default, run(loaded, kind, guidance_scale=2.5, num_inference_steps=2))
    assert np.abs(by_default - run(loaded, kind)).max() > 1e-4  # 3.0 and 2 steps differ


@pytest.mark.parametrize("kind", KINDS)
def test_the_saved_negative_prompt_is_the_default(parts, kind, tmp_path):
    pipe = make_pipe(parts, kind)
    type(pipe)(**pipe.components, negative_prompt="blurry").save_pretrained(tmp_path / "p")
    loaded = (load_crs_diff if kind == "crs" else load_cc_diff)(tmp_path / "p", "cpu")
    assert loaded.config.negative_prompt == "blurry"
    _, by_default = loaded.encode_prompt(PROMPTS[0], torch.device("cpu"), 1, True)[:2]
    _, given = pipe.encode_prompt(PROMPTS[0], torch.device("cpu"), 1, True, negative_prompt="blurry")[:2]
    _, empty = pipe.encode_prompt(PROMPTS[0], torch.device("cpu"), 1, True)[:2]
    assert torch.equal(by_default, given) and not torch.equal(by_default, empty)
    args = call_args(kind)
    np.testing.assert_array_equal(loaded(**args).images, run(pipe, kind, negative_prompt="blurry"))


def crs_encode_inputs(pipe, monkeypatch, **kw) -> dict:
    """What one CRS-Diff call gives its denoiser's ``encode`` ([uncond ; cond] rows while guiding)."""
    from rslib.models.crs_diff import CRSDiffModel

    seen = {}
    original = CRSDiffModel.encode

    def spy(self, text, conditions=None, content_embeds=None, content_keep=None, metadata=None,
            metadata_keep=None, *args, **kwargs):
        seen.update(content=content_embeds.clone(), content_keep=content_keep.clone(), metadata=metadata.clone(),
                    metadata_keep=metadata_keep.clone())
        return original(self, text, conditions, content_embeds, content_keep, metadata, metadata_keep, *args,
                        **kwargs)

    monkeypatch.setattr(CRSDiffModel, "encode", spy)
    content = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    pipe(**call_args("crs", content_image=content, **kw))
    return seen


def test_crs_diff_unconditional_branch_as_the_small_presets_build_it(parts, monkeypatch):
    """Learned nulls: the unconditional rows drop the content image and every metadata field."""
    seen = crs_encode_inputs(make_pipe(parts, "crs"), monkeypatch)
    assert seen["content_keep"].tolist() == [False, False, True, True]
    assert not seen["metadata_keep"][:2].any() and seen["metadata_keep"][2:].sum() == 2 * 2  # cloud cover, month


def test_crs_diff_unconditional_branch_as_the_paper_builds_it(parts, monkeypatch):
    """CRS-Diff's: a zero content embedding through the tokenizer (no learned null), the same metadata as the
    conditional rows, zeros for the fields the caller left out, and the images change with it."""
    pipe = make_pipe(parts, "crs", guidance_keeps_metadata=True, null_conditions="zero")
    seen = crs_encode_inputs(pipe, monkeypatch)
    assert seen["content_keep"].all() and seen["metadata_keep"].all()  # no learned null anywhere
    assert not seen["content"][:2].any() and seen["content"][2:].abs().sum(1).min() > 0
    torch.testing.assert_close(seen["metadata"][:2], seen["metadata"][2:])
    assert (seen["metadata"][2:] != 0).sum() == 2 * 2  # the two given fields; the others are zeros
    monkeypatch.undo()
    assert np.abs(run(pipe, "crs") - run(make_pipe(parts, "crs"), "crs")).max() > 1e-4
    with pytest.raises(ValueError, match="null_conditions must be one of learned, zero, not 'none'"):
        make_pipe(parts, "crs", null_conditions="none")


def test_pipelines_and_loaders_at_package_level():
    assert rslib.pipelines.CRSDiffPipeline is rslib.CRSDiffPipeline is CRSDiffPipeline
    assert rslib.pipelines.CCDiffPipeline is rslib.CCDiffPipeline is CCDiffPipeline
    assert rslib.load_crs_diff is load_crs_diff and rslib.load_cc_diff is load_cc_diff
    assert rslib.load_stage_one is load_stage_one
    with pytest.raises(AttributeError):
        rslib.NoSuchPipeline  # noqa: B018


# ---------------------------------------------------------------------------
# CC-Diff and diffusers' attention tools


def _attention_state(unet):
    return ({k: id(v) for k, v in unet.attn_processors.items()},
            sum(len(m._forward_hooks) for m in unet.modules()))


def test_cc_diff_leaves_the_unet_as_it_found_it(parts):
    unet = copy.deepcopy(parts["unet"])
    before = _attention_state(unet)
    pipe = CCDiffPipeline(**{**make_pipe(parts, "cc").components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    assert _attention_state(unet) == before
    run(pipe, "cc")
    assert _attention_state(unet) == before

    def stop(p, i, t, kwargs):
        raise RuntimeError("stopped at the first step")

    with pytest.raises(RuntimeError, match="stopped"):  # and after a call that fails halfway, too
        run(pipe, "cc", callback_on_step_end=stop)
    assert _attention_state(unet) == before


def test_cc_diff_keeps_its_layout_under_attention_slicing_and_the_default_processor(parts):
    pipe = own_copy(parts, "cc")
    expected = run(pipe, "cc")
    assert np.abs(expected - run(pipe, "cc", layout=None)).max() > 0.05  # the layout shows
    pipe.enable_attention_slicing(1)
    np.testing.assert_allclose(run(pipe, "cc"), expected, atol=2e-3, rtol=0)
    pipe.disable_attention_slicing()
    pipe.unet.set_default_attn_processor()
    np.testing.assert_allclose(run(pipe, "cc"), expected, atol=2e-3, rtol=0)


def test_a_stable_diffusion_pipeline_sharing_the_unet_is_unaffected(parts):
    p = copy.deepcopy(parts)
    sd = StableDiffusionPipeline(vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=p["tokenizer"],
                                 unet=p["unet"], scheduler=build_sampler(), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    args = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=3.0, output_type="np")
    before, state = sd(**args, generator=torch.Generator().manual_seed(0)).images, _attention_state(sd.unet)
    cc = CCDiffPipeline.from_pipe(sd, adapter=p["cc_adapter"], references=p["references"])
    cc.set_progress_bar_config(disable=True)
    assert cc.unet is sd.unet and _attention_state(sd.unet) == state
    layout_image = run(cc, "cc")
    assert _attention_state(sd.unet) == state
    np.testing.assert_array_equal(sd(**args, generator=torch.Generator().manual_seed(0)).images, before)
    assert np.abs(layout_image - before).max() > 0.05


def test_more_objects_than_the_model_knows_keep_the_largest(parts, caplog):
    pipe = CCDiffPipeline(**make_pipe(parts, "cc").components, max_instances=2)
    pipe.set_progress_bar_config(disable=True)
    crowd = LAYOUT + [{"label": "airplane", "bbox": [0.05 * i, 0.7, 0.05 * i + 0.04, 0.74]} for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="rslib.pipelines.cc_diff"):
        out = run(pipe, "cc", layout=crowd)
    assert "layout[0] has 8 objects, more than the 2 this model was trained with" in caplog.text
    np.testing.assert_array_equal(out, run(pipe, "cc", layout=LAYOUT))  # the two largest


# ---------------------------------------------------------------------------
# Every bad input refused before the UNet runs


def _nan_stack() -> torch.Tensor:
    c = conditions(2)
    c[0, 0, 0, 0] = float("nan")
    return c


BAD_INPUTS = [
    # both pipelines
    ("crs", {"prompt": []}, r"prompt must be a string or a non-empty list"),
    ("cc", {"prompt": []}, r"prompt must be a string or a non-empty list"),
    ("crs", {"prompt": None}, r"pass a prompt"),
    ("cc", {"prompt": None}, r"pass a prompt"),
    ("crs", {"prompt_embeds": torch.zeros(2, 77, TEXT_DIM)}, r"prompt or prompt_embeds, not both"),
    ("crs", {"negative_prompt": ["a", "b", "c"]}, r"negative_prompt gives 3 entries for 2 prompts"),
    ("cc", {"negative_prompt": ["a", "b", "c"]}, r"negative_prompt gives 3 entries for 2 prompts"),
    ("crs", {"negative_prompt_embeds": torch.zeros(2, 77, TEXT_DIM)}, r"negative_prompt_embeds .* must come with"),
    ("crs", {"height": 0}, r"height must be a positive multiple of 4"),
    ("cc", {"width": -8}, r"width must be a positive multiple of 4"),
    ("crs", {"height": 30}, r"height must be a positive multiple of 4"),
    ("cc", {"num_inference_steps": 0}, r"num_inference_steps must be an integer >= 1"),
    ("crs", {"num_inference_steps": -1}, r"num_inference_steps must be an integer >= 1"),
    ("crs", {"num_images_per_prompt": 0}, r"num_images_per_prompt"),
    ("crs", {"guidance_scale": float("nan")}, r"guidance_scale must be a finite number"),
    ("cc", {"guidance_scale": float("nan")}, r"guidance_scale must be a finite number"),
    ("crs", {"eta": -0.5}, r"eta must be a number >= 0"),
    ("cc", {"eta": -0.5}, r"eta must be a number >= 0"),
    ("crs", {"generator": [torch.Generator().manual_seed(0)] * 3}, r"list of 3 generators for 2 images"),
    ("cc", {"num_images_per_prompt": 2, "generator": [torch.Generator()] * 2}, r"list of 2 generators for 4 images"),
    ("crs", {"latents": torch.zeros(2, 4, 4, 4)}, r"latents must be \(2, 4, 8, 8\)"),
    ("cc", {"latents": torch.zeros(1, 4, 8, 8)}, r"latents must be \(2, 4, 8, 8\)"),
    ("crs", {"output_type": "jpg"}, r"output_type must be"),
    ("cc", {"callback_on_step_end_tensor_inputs": ["noise"]}, r"callback_on_step_end_tensor_inputs \['noise'\]"),
    # CRS-Diff: metadata, maps, content, scales
    ("crs", {"metadata": {"month": 99}}, r"metadata\['month'\] = 99 is outside the range the model knows, 0..12"),
    ("crs", {"metadata": {"cloud_cover": float("nan")}}, r"metadata\['cloud_cover'\] must be a finite number"),
    ("crs", {"metadata": {"altitude": 3}}, r"unknown metadata field\(s\) \['altitude'\]"),
    ("crs", {"metadata": torch.full((2, 7), float("nan"))}, r"metadata must be finite"),
    ("crs", {"metadata": torch.full((2, 7), 1.5)}, r"normalised metadata must lie in \[0, 1\]"),
    ("crs", {"metadata": [{"gsd": 0.5}] * 3}, r"metadata has 3 rows for 2 prompts"),
    ("crs", {"conditions": _nan_stack()}, r"conditions must be finite"),
    ("crs", {"conditions": conditions(3)}, r"conditions has 3 rows for 2 prompts"),
    ("crs", {"conditions": conditions(2) * 2}, r"conditions must lie in \[0, 1\]"),
    ("crs", {"conditions": {"road": np.zeros((32, 48), np.uint8)}},
     r"conditions\['road'\] is 32 x 48 but the images are 32 x 32: crop or pad"),
    ("crs", {"conditions": {"roads": np.zeros((32, 32), np.uint8)}}, r"unknown condition map\(s\) \['roads'\]"),
    ("crs", {"conditions": torch.zeros(2, 6, 32, 32)}, r"conditions must be an \(18, H, W\)"),
    ("crs", {"control_scale": float("nan")}, r"control_scale must be finite"),
    ("crs", {"control_scale": [1.0] * 3}, r"control_scale must be 7 numbers, got 3"),
    ("crs", {"global_strength": float("inf")}, r"global_strength must be finite"),
    ("crs", {"content_image": torch.zeros(3, 3, SIZE, SIZE)}, r"content_image has 3 rows for 2 prompts"),
    ("crs", {"content_image": np.zeros((1, 3, SIZE, SIZE), np.float32)}, r"channels last"),
    ("crs", {"content_image": torch.full((1, 3, SIZE, SIZE), 5.0)}, r"content_image must lie in \[-1, 1\]"),
    ("crs", {"content_embeds": torch.full((2, TEXT_DIM), float("nan"))}, r"content_embeds must be finite"),
    # CC-Diff: layouts and references
    ("cc", {"layout": [LAYOUT, LAYOUT, LAYOUT]}, r"layout gives 3 per-image layouts for 2 prompts"),
    ("cc", {"layout": [{"label": "ship", "bbox": [0.1, 0.1, 0.5, 0.5],
                        "obb": [0.6, 0.6, 0.9, 0.6, 0.9, 0.9, 0.6, 0.9]}]}, r"layout\[0\]\[0\]: 'bbox' .* and 'obb' disagree"),
    ("cc", {"layout": [{"label": "ship", "bbox": [0.1, float("nan"), 0.5, 0.5]}]}, r"\['bbox'\] must be finite"),
    ("cc", {"fg_refs": torch.zeros(3, 2, 3, DIMG)}, r"fg_refs has 3 rows for 2 prompts"),
    ("cc", {"fg_refs": torch.full((2, 2, 3, DIMG), float("nan"))}, r"fg_refs must be finite"),
    ("cc", {"fg_refs": torch.zeros(2, 5, 3, DIMG)}, r"fg_refs must be \(B, N=2"),
    ("cc", {"background": 99}, r"background must be a retrieval-pool index in 0..3"),
    ("cc", {"background": [0, 1, 2]}, r"background has 3 rows for 2 prompts"),
    ("cc", {"background": 1.5}, r"background must be a retrieval-pool index"),
    ("cc", {"prompt": None, "prompt_embeds": torch.zeros(2, 77, TEXT_DIM)}, r"need pooled_prompt_embeds"),
]


@pytest.mark.parametrize("kind,kwargs,message", BAD_INPUTS,
                         ids=[f"{k}-{next(iter(kw))}-{i}" for i, (k, kw, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_before_the_unet_runs(parts, kind, kwargs, message):
    pipe = make_pipe(parts, kind)

    def no_unet(*_):
        raise AssertionError("the UNet ran before the input was refused")

    handle = pipe.unet.register_forward_pre_hook(no_unet)
    try:
        with pytest.raises(ValueError, match=message):
            run(pipe, kind, **kwargs)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------
# One sampling helper


def test_seeded_batches_seed_each_image_by_its_index():
    draws = seeded_batches(lambda i, j, gens: [float(torch.rand(1, generator=g)) for g in gens], 5, 10, 2,
                           torch.device("cpu"))
    assert [len(d) for d in draws] == [2, 2, 1]
    assert sum(draws, []) == [float(torch.rand(1, generator=torch.Generator().manual_seed(10 + k))) for k in range(5)]
    same = seeded_batches(lambda i, j, gens: [float(torch.rand(1, generator=g)) for g in gens], 3, 10, 2,
                          torch.device("cpu"), same_noise=True)
    assert len(set(sum(same, []))) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_helpers_do_not_depend_on_the_batch_size(parts, kind):
    pipe = make_pipe(parts, kind)
    prompts = PROMPTS + ["a river."]
    if kind == "crs":
        maps = (conditions(3) * 255).to(torch.uint8)
        sample = lambda bs: sample_crs_diff(pipe, prompts, 4, conditions=maps, steps=2, batch_size=bs)  # noqa: E731
    else:
        sample = lambda bs: sample_cc_diff(pipe, prompts, [LAYOUT, [], LAYOUT[1:]], 4, steps=2,  # noqa: E731
                                           batch_size=bs)
    whole, single = sample(3), sample(1)
    assert whole.shape == (3, 3, SIZE, SIZE)
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=0)
    empty = (sample_crs_diff(pipe, [], 0, steps=2) if kind == "crs" else sample_cc_diff(pipe, [], [], 0, steps=2))
    assert empty.shape == (0, 3, SIZE, SIZE)
