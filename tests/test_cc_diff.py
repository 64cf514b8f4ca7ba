"""CC-Diff: box embedding, masks, confinement, direction of conditioning, padding, processors, overfitting."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from rslib.models import cc_diff as cc

D = 16  # context (text) dim of the tiny UNet
DIMG = 12  # reference-token dim


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=D, attention_head_dim=4,
        norm_num_groups=8).eval()


def tiny_adapter(unet: UNet2DConditionModel, seed: int = 0, **kw) -> cc.CCDiffAdapter:
    torch.manual_seed(seed)
    args = dict(resampler_dim=16, resampler_depth=1, resampler_heads=2, resampler_dim_head=8, num_fg_queries=3,
                num_bg_queries=2, num_bridge_queries=2, ff_mult=2, fusion_heads=2, fusion_dim_head=8, box_hidden=32)
    args.update(kw)
    return cc.CCDiffAdapter.from_unet(unet, ("mid_block", "up_blocks.0", "down_blocks.0"), image_dim=DIMG, **args)


def randomise_outputs(adapter: cc.CCDiffAdapter, seed: int = 1) -> None:
    """Give the zero-initialised outputs and gates random values (a 'trained' adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "to_out" in name or "alpha" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    if adapter.mode == "cc_diff":  # the GLIGEN-style baseline has no resampler
        _train_bridge_outputs(adapter.resampler.bridge)


def layout_batch(b: int = 2, n: int = 3, seed: int = 0, n_valid: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, n, 2, generator=g) * 0.5 + 0.1
    wh = torch.rand(b, n, 2, generator=g) * 0.3 + 0.15
    boxes = torch.cat([xy, (xy + wh).clamp(max=0.98)], -1)
    valid = torch.ones(b, n, dtype=torch.bool)
    if n_valid is not None:
        valid[:, n_valid:] = False
    return dict(obb=cc.boxes_to_obb(boxes), valid=valid, phrase_hidden=torch.randn(b, n, 5, D, generator=g),
                phrase_pooled=torch.randn(b, n, D, generator=g), global_pooled=torch.randn(b, D, generator=g),
                fg_refs=torch.randn(b, n, 4, DIMG, generator=g), bg_ref=torch.randn(b, 6, DIMG, generator=g))


def unet_inputs(b: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10, 500, 900, 30][:b]),
            torch.randn(b, 7, D, generator=g))


# ---------------------------------------------------------------------------- 1-3 boxes and masks


def test_fourier_box_embedding_layout_and_shapes():
    coords = torch.rand(2, 3, 8)
    emb = cc.FourierBoxEmbed(num_freqs=8, temperature=100.0)(coords)
    assert emb.shape == (2, 3, 128)
    f1 = 100.0 ** (1 / 8)
    torch.testing.assert_close(emb[..., 0:8], coords.sin())  # frequency 1: sin of the 8 coordinates, then cos
    torch.testing.assert_close(emb[..., 8:16], coords.cos())
    torch.testing.assert_close(emb[..., 16:24], (f1 * coords).sin())
    assert cc.BoxEmbedNet(out_dim=D, hidden=32)(coords).shape == (2, 3, D)


def test_obb_raster_area_rotation_and_background():
    axis = cc.boxes_to_obb(torch.tensor([[[0.25, 0.25, 0.75, 0.75]]]))
    m = cc.rasterize_obb(axis, 16, 16)
    assert m.shape == (1, 1, 16, 16)
    assert abs(float(m.mean()) - 0.25) < 0.01  # fills its box area
    diamond = torch.tensor([[[0.5, 0.1, 0.9, 0.5, 0.5, 0.9, 0.1, 0.5]]])  # a square rotated by 45 degrees
    d = cc.rasterize_obb(diamond, 32, 32, min_side=32)[0, 0]
    assert d[16, 16] == 1 and d[2, 2] == 0 and d[29, 29] == 0 and d[16, 4] == 1  # point-in-polygon
    assert abs(float(d.mean()) - 0.32) < 0.02  # area of the diamond: 2 * 0.4^2
    both = torch.cat([axis, diamond], 1)
    inst, bg = cc.region_masks(both, 16, 16)
    union = 1 - (1 - inst).prod(1)
    torch.testing.assert_close(union + bg, torch.ones_like(bg))
    zero = cc.rasterize_obb(torch.zeros(1, 1, 8), 8, 8)
    assert zero.abs().sum() == 0


def test_soft_ellipse_values():
    box = torch.tensor([[[16.5, 16.5, 47.5, 47.5]]]) / 64
    e = cc.ellipse_masks(box, 64, 64)[0, 0]
    assert float(e[31:33, 31:33].min()) > 0.99  # centre
    assert abs(float(e[32, 16]) - 0.5) < 0.03 and abs(float(e[16, 32]) - 0.5) < 0.03  # edge midpoints
    assert float(e[2, 2]) < 1e-3 and float(e[60, 40]) < 1e-3  # outside
    zero = cc.ellipse_masks(torch.zeros(1, 2, 4), 8, 8, valid=torch.tensor([[True, False]]))
    assert zero.abs().sum() == 0  # zero boxes and padding give exactly 0
    small = torch.tensor([[[0.30, 0.30, 0.36, 0.36]]])  # smaller than one cell at 8 x 8
    assert float(cc.ellipse_masks(small, 8, 8, peak_normalise=True).max()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- 4-5 confinement


def test_layout_attention_confines_each_region():
    torch.manual_seed(0)
    boxes = torch.tensor([[[0.05, 0.05, 0.4, 0.4], [0.55, 0.55, 0.95, 0.95]]])
    inst, bg = cc.region_masks(cc.boxes_to_obb(boxes), 16, 16)
    member = cc.region_membership(inst, bg)  # (1, 3, 256)
    mask = cc.layout_attention_mask(member)
    lsa = cc.LayoutSelfAttention(8, 2, 4)
    torch.nn.init.normal_(lsa.attn.to_out.weight)
    h = torch.randn(1, 256, 8)
    h2 = h.clone()
    a, b_, back = member[0, 0], member[0, 1], member[0, 2] & ~member[0, 0] & ~member[0, 1]
    h2[0, a] += torch.randn(int(a.sum()), 8)  # perturb box A only
    y, y2 = lsa(h, mask), lsa(h2, mask)
    assert torch.isfinite(y).all()
    assert (y2 - y)[0, a].abs().max() > 1e-3  # box A changes
    torch.testing.assert_close(y2[0, b_], y[0, b_])  # box B unchanged
    torch.testing.assert_close(y2[0, back], y[0, back])  # background unchanged


def test_instance_reference_changes_output_only_inside_its_ellipse():
    torch.manual_seed(0)
    cgm = cc.ConditionalGenerationModule(channels=8, context_dim=D, heads=2, dim_head=4)
    for mod in (cgm.ea_obj, cgm.ea_bg):
        torch.nn.init.normal_(mod.to_out.weight)
    boxes = torch.tensor([[[0.05, 0.05, 0.4, 0.4], [0.55, 0.5, 0.95, 0.9]]])
    ctx = cc.CCDiffContext(boxes=boxes, obb=cc.boxes_to_obb(boxes), valid=torch.ones(1, 2, dtype=torch.bool),
                           latent_hw=(16, 16), phrase_pooled=torch.randn(1, 2, D), fg_tokens=torch.randn(1, 2, 3, D),
                           box_tokens=torch.randn(1, 2, D), bg_tokens=torch.randn(1, 4, D), global_pooled=torch.randn(1, D))
    h, ca0, ca_inst = torch.randn(1, 256, 8), torch.randn(1, 256, 8), torch.randn(1, 2, 256, 8)
    y = cgm(h, ca0, ca_inst, ctx, (16, 16))
    ctx2 = cc.CCDiffContext(**{**ctx.__dict__, "_cache": {}})
    ctx2.fg_tokens = ctx.fg_tokens.clone()
    ctx2.fg_tokens[0, 0] = torch.randn(3, D)  # a new reference for instance 0
    y2 = cgm(h, ca0, ca_inst, ctx2, (16, 16))
    s0 = ctx.ellipses((16, 16))[0, 0]
    diff = (y2 - y)[0].abs().amax(-1)
    assert diff[s0 > 0.5].min() > 1e-4  # it changes inside instance 0
    assert diff[s0 < 1e-7].max() < 1e-5  # and nowhere else


@pytest.mark.parametrize("aware", [True, False])
def test_background_attention_reads_the_foreground_only_in_cc_diff(aware):
    """CC-Diff queries the background attention with the foreground just computed; the no-bridge ablation does not,
    so there its background update is the same whatever the instances' references are."""
    torch.manual_seed(0)
    cgm = cc.ConditionalGenerationModule(channels=8, context_dim=D, heads=2, dim_head=4,
                                         foreground_aware_background=aware)
    for mod in (cgm.ea_obj, cgm.ea_bg):
        torch.nn.init.normal_(mod.to_out.weight)
    bg_out = []
    cgm.ea_bg.register_forward_hook(lambda m, i, o: bg_out.append(o))
    boxes = torch.tensor([[[0.05, 0.05, 0.4, 0.4], [0.55, 0.5, 0.95, 0.9]]])
    ctx = cc.CCDiffContext(boxes=boxes, obb=cc.boxes_to_obb(boxes), valid=torch.ones(1, 2, dtype=torch.bool),
                           latent_hw=(16, 16), phrase_pooled=torch.randn(1, 2, D), fg_tokens=torch.randn(1, 2, 3, D),
                           box_tokens=torch.randn(1, 2, D), bg_tokens=torch.randn(1, 4, D), global_pooled=torch.randn(1, D))
    h, ca0, ca_inst = torch.randn(1, 256, 8), torch.randn(1, 256, 8), torch.randn(1, 2, 256, 8)
    cgm(h, ca0, ca_inst, ctx, (16, 16))
    ctx2 = cc.CCDiffContext(**{**ctx.__dict__, "_cache": {}})
    ctx2.fg_tokens = torch.randn(1, 2, 3, D)  # other references for both instances
    cgm(h, ca0, ca_inst, ctx2, (16, 16))
    inside = ctx.ellipses((16, 16))[0].amax(0) > 0.5
    change = (bg_out[1] - bg_out[0])[0].abs().amax(-1)
    if aware:
        assert change[inside].min() > 1e-4
    else:
        assert torch.equal(bg_out[1], bg_out[0])


def test_no_bridge_adapter_has_foreground_blind_background():
    unet = tiny_unet()
    assert all(m.foreground_aware_background for m in tiny_adapter(unet).fusion.values())
    assert not any(m.foreground_aware_background for m in tiny_adapter(unet, use_bridge=False).fusion.values())


# ---------------------------------------------------------------------------- 6 direction of conditioning


def _dual(use_bridge: bool = True) -> cc.DualResampler:
    torch.manual_seed(0)
    return cc.DualResampler(DIMG, D, dim=16, depth=1, heads=2, dim_head=8, num_fg_queries=3, num_bg_queries=2,
                            num_bridge_queries=2, ff_mult=2, use_bridge=use_bridge)


def test_bridge_is_identity_at_init():
    dual = _dual()
    fg = torch.randn(2, 3, 4, D)
    q = dual.bridge(fg, torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(q, dual.bridge.queries.expand(2, -1, -1))
    x = layout_batch()
    box = torch.randn(2, 3, D)
    _, bg1 = dual(x["fg_refs"], x["bg_ref"], box, x["valid"])
    _, bg2 = dual(torch.randn_like(x["fg_refs"]), x["bg_ref"], box, x["valid"])
    assert torch.equal(bg1, bg2)  # at init the background does not yet read the foreground


def test_gate_values_read_every_gate():
    """cc.gate_values: tanh(alpha) of the bridge's two gates (CC-Diff) or of each GLIGEN-style layer's two."""
    unet = tiny_unet()
    ours, gligen = tiny_adapter(unet), tiny_adapter(unet, mode="gligen")
    opened = math.tanh(cc.ContextBridge.GATE_INIT)
    assert cc.gate_values(ours) == pytest.approx({"resampler.bridge.alpha_attn": opened,
                                                  "resampler.bridge.alpha_dense": opened})
    assert set(cc.gate_values(gligen).values()) == {0.0}  # GLIGEN's gates start closed
    with torch.no_grad():
        ours.resampler.bridge.alpha_dense.fill_(0.5)
    assert cc.gate_values(ours)["resampler.bridge.alpha_dense"] == pytest.approx(math.tanh(0.5))
    names = cc.gate_values(gligen)
    assert len(names) == 2 * len(gligen.fusion) and all(n.endswith(("alpha_attn", "alpha_dense")) for n in names)
    assert not any("__" in n for n in names)


def _train_bridge_outputs(bridge: cc.ContextBridge) -> None:
    """Random values in the bridge's zero-initialised output layers (a 'trained' bridge)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in bridge.output_layers():
            for p in layer.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_bridge_learns_from_the_first_step():
    """The bridge's output layers start at zero behind open gates, so its first backward pass already reaches
    them; ContextBridge.output_norms reports how far they have grown."""
    dual = _dual()
    assert dual.bridge.output_norms() == {"attention": 0.0, "feed-forward": 0.0}
    x = layout_batch()
    _, bg = dual(x["fg_refs"], x["bg_ref"], torch.randn(2, 3, D), x["valid"])
    bg.square().sum().backward()
    assert dual.bridge.to_out.weight.grad.abs().sum() > 0
    _train_bridge_outputs(dual.bridge)
    assert min(dual.bridge.output_norms().values()) > 0


def test_direction_of_conditioning():
    dual = _dual()
    _train_bridge_outputs(dual.bridge)
    x = layout_batch()
    fg_refs = x["fg_refs"].requires_grad_(True)
    bg_ref = x["bg_ref"].requires_grad_(True)
    fg, bg = dual(fg_refs, bg_ref, torch.randn(2, 3, D), x["valid"])
    g_fg_ref, = torch.autograd.grad(bg.square().sum(), fg_refs, retain_graph=True)
    assert g_fg_ref.abs().sum() > 0  # d bg / d fg-ref != 0: the background reads the foreground
    g_bg_ref, = torch.autograd.grad(fg.square().sum(), bg_ref, allow_unused=True)
    assert g_bg_ref is None or g_bg_ref.abs().sum() == 0  # d fg / d bg-ref = 0
    # the background loss sends no gradient into the foreground resampler's weights
    dual.zero_grad()
    fg, bg = dual(fg_refs.detach(), bg_ref.detach(), torch.randn(2, 3, D), x["valid"])
    bg.square().sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dual.fg_resampler.parameters())
    assert dual.bridge.proj.weight.grad.abs().sum() > 0 and dual.bg_resampler.latents.grad.abs().sum() > 0
    # and the no-bridge ablation keeps the background fully independent of the foreground
    free = _dual(use_bridge=False)
    _, b1 = free(x["fg_refs"], x["bg_ref"], torch.randn(2, 3, D), x["valid"])
    _, b2 = free(torch.randn_like(x["fg_refs"]), x["bg_ref"], torch.randn(2, 3, D), x["valid"])
    assert torch.equal(b1, b2)


# ---------------------------------------------------------------------------- 7-9 the UNet with processors


def _run(unet, adapter, inputs, layout, active=None):
    x, t, text = inputs
    ctx = adapter.encode(latent_hw=(8, 8), active=active, **layout)
    with cc.fusion_hooks(unet, adapter, ctx):
        return unet(x, t, encoder_hidden_states=text).sample


@pytest.mark.parametrize("mode", ["cc_diff", "gligen"])
def test_padding_changes_nothing_and_batches_work(mode):
    unet = tiny_unet()
    adapter = tiny_adapter(unet, mode=mode)
    randomise_outputs(adapter)
    inputs = unet_inputs()
    base = layout_batch(n=2)
    padded = layout_batch(n=4, seed=5, n_valid=2)  # two padded instances full of random values
    for k, v in base.items():
        if k in ("obb", "valid", "phrase_hidden", "phrase_pooled", "fg_refs"):
            padded[k][:, :2] = v
        else:
            padded[k] = v
    with torch.no_grad():
        y = _run(unet, adapter, inputs, base)
        y_pad = _run(unet, adapter, inputs, padded)
        y0 = _run(unet, adapter, tuple(a[:1] for a in inputs), {k: v[:1] for k, v in base.items()})
        plain = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    torch.testing.assert_close(y_pad, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y0[0], y[0], atol=1e-5, rtol=1e-5)  # a batch of two = two batches of one
    assert (y - plain).abs().max() > 1e-3  # and the layout does change the output


def test_no_instances_and_zero_init_equal_plain_unet():
    unet = tiny_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        plain = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    for mode in ("cc_diff", "gligen"):
        adapter = tiny_adapter(unet, mode=mode)
        assert len(cc.fused_layers(unet, adapter)) == len(adapter.fusion)
        with torch.no_grad():
            y = _run(unet, adapter, inputs, layout_batch(n_valid=0))
        assert torch.equal(y, plain)
    with torch.no_grad():  # gligen at init (alpha = 0) is an identity even with instances
        y = _run(unet, adapter, inputs, layout_batch())
    assert torch.equal(y, plain)


def test_unconditional_rows_equal_plain_unet():
    unet = tiny_unet()
    adapter = tiny_adapter(unet)
    randomise_outputs(adapter)
    inputs = unet_inputs()
    with torch.no_grad():
        plain = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
        y = _run(unet, adapter, inputs, layout_batch(), active=torch.tensor([False, True]))
    assert torch.equal(y[0], plain[0])  # the unconditional half is the plain UNet
    assert (y[1] - plain[1]).abs().max() > 1e-3
    with torch.no_grad():  # after the call the hooks are gone: the UNet is the plain UNet again
        assert torch.equal(unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample, plain)


SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)


def test_fused_layer_counts_on_the_sd14_unet():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
        adapter = cc.CCDiffAdapter.from_unet(unet, ("mid_block", "up_blocks.1"), image_dim=1024)
    assert len(unet.attn_processors) == 32 and len(cc.fused_layers(unet, adapter)) == 4
    assert set(adapter.config.layer_channels.values()) == {1280}
    n = cc.trainable_parameter_counts(adapter)
    assert 150e6 < n["total"] < 350e6  # the paper-scale adapter: about 261M trainable parameters


# ---------------------------------------------------------------------------- 11 overfitting


def test_tiny_model_overfits_eight_images():
    unet = tiny_unet()
    adapter = tiny_adapter(unet)
    model = cc.CCDiffModel(unet, torch.nn.Identity(), adapter)
    g = torch.Generator().manual_seed(0)
    n = 8
    layout = layout_batch(b=n, n=2, seed=3)
    target = torch.randn(n, 4, 8, 8, generator=g)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.full((n,), 300)
    text = torch.randn(n, 7, D, generator=g)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        ctx = adapter.encode(latent_hw=(8, 8), **layout)
        loss = torch.nn.functional.mse_loss(model(x, t, text, ctx), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the frozen UNet's share of the loss stays: the adapter removes about a third of it (0.62-0.66x)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses[::10]
    assert all(p.grad is None for p in unet.parameters())  # the UNet stays frozen


@pytest.mark.parametrize("switch_on", ["model", "unet"])
def test_gradient_checkpointing_recomputes_the_fusion(switch_on):
    """A checkpointed UNet block is recomputed in the backward pass, after the forward's hooks are gone: the
    gradients are those of the plain forward, whether the model's or the UNet's own checkpointing was asked."""
    layout = layout_batch(b=2, n=2, seed=3)
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, D, generator=g), torch.full((2,), 300)
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet = tiny_unet()
        adapter = tiny_adapter(unet)
        model = cc.CCDiffModel(unet, torch.nn.Identity(), adapter).train()
        if checkpointing:
            (model if switch_on == "model" else unet).enable_gradient_checkpointing()
        model(x, t, text, adapter.encode(latent_hw=(8, 8), **layout)).square().mean().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6), name


def test_a_fusion_block_without_cross_attention_is_an_error():
    unet = tiny_unet()
    with pytest.raises(ValueError, match=r"no cross-attention layer under \['up_blocks.5'\] \(cc.fusion_blocks\)"):
        cc.CCDiffAdapter.from_unet(unet, ("mid_block", "up_blocks.5"), image_dim=DIMG)
