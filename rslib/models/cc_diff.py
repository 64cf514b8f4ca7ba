"""CC-Diff: layout-to-image generation whose background is conditioned on the foreground.

Everything here sits on a frozen Stable-Diffusion-style ``UNet2DConditionModel`` and reaches it only through
forward hooks on its fused cross-attention layers, attached for the duration of a call (:func:`fusion_hooks`) and
holding the layout, the reference tokens and the region masks (a :class:`CCDiffContext`). The UNet's attention
processors are never replaced: whatever they are (PyTorch SDPA, diffusers' sliced attention, xFormers, a user's),
they compute the frozen attentions inside CC-Diff's fusion, and the UNet at rest is the stage-one UNet.

Parts (shapes at the paper scale: N <= 6 instances, Qf = 16, Qb = Qc = 8, D_img = 1024, D = 768, C = 1280):

* :class:`FourierBoxEmbed` and :class:`BoxEmbedNet`: an oriented box (8 normalised coordinates) -> one token.
* :class:`PerceiverResampler`: image tokens (M, T, D_img) -> Q learned queries (M, Q, D).
* :class:`ContextBridge`: Qc background queries attend to the (detached) foreground tokens and box tokens; its
  zero-initialised output layers make it an identity at initialisation, learned gates tanh(alpha) scale them.
* :class:`DualResampler`: foreground instance tokens (B, N, Qf, D) from reference crops, then background tokens
  (B, Qb + Qc, D) from a retrieved reference scene, queried by its own Qb queries plus the Qc bridge outputs.
  The background depends on the foreground; the foreground never sees the background.
* Region masks: :func:`rasterize_obb` (oriented-box rasters), background complement, :func:`ellipse_masks`.
* :class:`LayoutSelfAttention`: a token attends only to tokens that share one of its regions.
* :class:`ConditionalGenerationModule` (CGM): per instance, the frozen cross-attention to the instance phrase
  plus a trained attention to [phrase, reference tokens, box token], confined by the instance's soft ellipse;
  then a foreground-aware background attention and the layout self-attention.
* :class:`GatedGroundingModule`: the GLIGEN-style baseline (gated self-attention over [visual; grounding tokens]).

Padding: instances are padded to N with a boolean ``valid`` (B, N); padded instances are masked out of every
attention and every sum, so they change nothing and batches larger than one work.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

# the adapter's architectures; the no-bridge ablation is a "cc_diff" adapter without its bridge (the training
# variants, cc.mode, are rslib.config.CC_MODES)
ADAPTER_MODES = ("cc_diff", "gligen")
# bump when a change to these modules changes what a trained adapter computes: training stamps record it, so
# finished runs of the older modules are trained again (2: the no-bridge ablation's background ignores the foreground;
# 3: the context bridge starts with zero output layers and open gates instead of closed gates)
ARCHITECTURE_VERSION = 3


# ---------------------------------------------------------------------------
# Attention helper


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention: q (B, Lq, H*d), k/v (B, Lk, H*d), mask (B, Lk) or (B, Lq, Lk) bool (True = attend)."""
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)  # (B, H, Lq, d)
    k = k.view(b, lk, heads, d).transpose(1, 2)
    v = v.view(b, lk, heads, d).transpose(1, 2)
    if mask is not None:
        mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]  # (B, 1, Lq|1, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, d)
    return out.transpose(1, 2).reshape(b, lq, inner)


class CrossAttention(nn.Module):
    """Plain multi-head attention from ``query_dim`` onto ``context_dim`` keys; optionally zero-initialised output."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, zero_out: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)
        if zero_out:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Lq, query_dim), context (B, Lk, context_dim), mask (B, Lk) -> (B, Lq, query_dim)."""
        return self.to_out(attend(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask))


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


# ---------------------------------------------------------------------------
# Boxes


class FourierBoxEmbed(nn.Module):
    """Fourier features of box coordinates: (..., n_coords) -> (..., n_coords * 2 * num_freqs).

    Frequencies ``T ** (k / num_freqs)``, k = 0..num_freqs-1; the output holds, for each frequency in turn,
    ``sin(f x)`` of all coordinates then ``cos(f x)`` of all coordinates (GLIGEN's layout).
    """

    def __init__(self, num_freqs: int = 8, temperature: float = 100.0):
        super().__init__()
        self.num_freqs = num_freqs
        self.register_buffer("freqs", temperature ** (torch.arange(num_freqs) / num_freqs), persistent=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (..., n) -> (..., n * 2 * num_freqs)."""
        x = coords[..., None, :] * self.freqs.to(coords)[:, None]  # (..., F, n)
        emb = torch.stack([x.sin(), x.cos()], dim=-2)  # (..., F, 2, n)
        return emb.flatten(-3)  # (..., F * 2 * n)


class BoxEmbedNet(nn.Module):
    """Oriented boxes (B, N, 8) -> one token per box (B, N, D): Fourier features then an MLP with SiLU."""

    def __init__(self, out_dim: int, hidden: int = 512, num_freqs: int = 8, n_coords: int = 8):
        super().__init__()
        self.fourier = FourierBoxEmbed(num_freqs)
        self.mlp = nn.Sequential(nn.Linear(n_coords * 2 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, obb: torch.Tensor) -> torch.Tensor:
        """obb (B, N, 8) normalised corners -> (B, N, D)."""
        return self.mlp(self.fourier(obb))


def boxes_to_obb(boxes: torch.Tensor) -> torch.Tensor:
    """Horizontal boxes (..., 4) x1 y1 x2 y2 -> oriented boxes (..., 8): the 4 corners clockwise from top left."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2, y1, x2, y2, x1, y2], dim=-1)


def obb_to_boxes(obb: torch.Tensor) -> torch.Tensor:
    """Oriented boxes (..., 8) -> enclosing horizontal boxes (..., 4)."""
    pts = obb.unflatten(-1, (4, 2))  # (..., 4, 2)
    return torch.cat([pts.amin(-2), pts.amax(-2)], dim=-1)


# ---------------------------------------------------------------------------
# Region masks


def _grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1]: ys (h, 1), xs (1, w)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return ys[:, None], xs[None, :]


def _supersample(h: int, w: int, min_side: int) -> int:
    return max(1, math.ceil(min_side / max(1, min(h, w))))


def rasterize_obb(obb: torch.Tensor, h: int, w: int, valid: torch.Tensor | None = None,
                  min_side: int = 64) -> torch.Tensor:
    """Area coverage (B, N, h, w) in [0, 1] of convex quadrilaterals obb (B, N, 8) (normalised corners).

    Rasterised at a supersampled grid of at least ``min_side`` pixels a side, then averaged down (antialiased),
    so that a small object keeps a non-zero footprint at 8 x 8. Degenerate (zero-area) or invalid boxes give 0.
    """
    ss = _supersample(h, w, min_side)
    ys, xs = _grid(h * ss, w * ss, obb.device, obb.dtype)
    pts = obb.unflatten(-1, (4, 2))  # (B, N, 4, 2)
    nxt = pts.roll(-1, dims=-2)
    ex, ey = (nxt - pts).unbind(-1)  # (B, N, 4)
    px, py = pts.unbind(-1)
    # cross product of each edge with (point - edge start): (B, N, 4, H, W)
    cross = ex[..., None, None] * (ys - py[..., None, None]) - ey[..., None, None] * (xs - px[..., None, None])
    inside = (cross >= 0).all(2) | (cross <= 0).all(2)  # (B, N, H, W)
    area = 0.5 * (px * nxt[..., 1] - nxt[..., 0] * py).sum(-1).abs()  # shoelace (B, N)
    keep = area > 1e-8
    if valid is not None:
        keep = keep & valid.bool()
    m = inside.to(obb.dtype) * keep[..., None, None].to(obb.dtype)
    if ss > 1:
        m = F.avg_pool2d(m.flatten(0, 1), ss).unflatten(0, m.shape[:2])  # (B, N, h, w)
    return m


def ellipse_masks(boxes: torch.Tensor, h: int, w: int, valid: torch.Tensor | None = None, sharpness: float = 10.0,
                  min_side: int = 64, peak_normalise: bool = False) -> torch.Tensor:
    """Soft ellipses (B, N, h, w) inscribed in horizontal boxes (B, N, 4).

    ``s = sigmoid(sharpness * (1 - ((x - cx) / (w/2))^2 - ((y - cy) / (h/2))^2))``: about 1 at the centre, 0.5 at
    the edge midpoints, about 0 outside, exactly 0 for zero-size or invalid boxes. Computed on a grid of at least
    ``min_side`` pixels a side and area-averaged to (h, w). ``peak_normalise`` rescales each mask so that its
    largest value becomes 1 (a small object then keeps one full-strength cell at a coarse layer).
    """
    ss = _supersample(h, w, min_side)
    ys, xs = _grid(h * ss, w * ss, boxes.device, boxes.dtype)
    x1, y1, x2, y2 = (t[..., None, None] for t in boxes.unbind(-1))  # (B, N, 1, 1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = ((x2 - x1) / 2).clamp_min(1e-8), ((y2 - y1) / 2).clamp_min(1e-8)
    r2 = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2  # (B, N, H, W)
    s = torch.sigmoid(sharpness * (1.0 - r2))
    keep = ((boxes[..., 2] - boxes[..., 0]) > 0) & ((boxes[..., 3] - boxes[..., 1]) > 0)
    if valid is not None:
        keep = keep & valid.bool()
    s = s * keep[..., None, None].to(s.dtype)
    if ss > 1:
        s = F.avg_pool2d(s.flatten(0, 1), ss).unflatten(0, s.shape[:2])  # (B, N, h, w)
    if peak_normalise:
        peak = s.flatten(2).amax(-1)[..., None, None]  # (B, N, 1, 1)
        s = torch.where(peak > 0, s / peak.clamp_min(1e-12), s)
    return s


def region_masks(obb: torch.Tensor, h: int, w: int, valid: torch.Tensor | None = None,
                 min_side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance rasters (B, N, h, w) and the background complement (B, h, w) = 1 - union (soft union)."""
    inst = rasterize_obb(obb, h, w, valid, min_side)
    union = 1.0 - (1.0 - inst).prod(1)  # (B, h, w)
    return inst, 1.0 - union


def region_membership(inst: torch.Tensor, background: torch.Tensor, rel: float = 0.5) -> torch.Tensor:
    """Hard region membership (B, N + 1, h*w) bool: instance i holds the cells covering at least ``rel`` of its
    best-covered cell; the background (last row) holds cells with background > 0.5 or in no instance."""
    b, n = inst.shape[:2]
    cov = inst.flatten(2)  # (B, N, HW)
    peak = cov.amax(-1, keepdim=True)  # (B, N, 1)
    member = (cov > 0) & (cov >= rel * peak)
    bg = (background.flatten(1) > 0.5) | ~member.any(1)  # (B, HW)
    return torch.cat([member, bg[:, None]], dim=1)


def layout_attention_mask(membership: torch.Tensor) -> torch.Tensor:
    """(B, R, HW) bool membership -> (B, HW, HW) bool: p may attend q iff they share a region (and p == q)."""
    m = membership.to(torch.float32)
    share = torch.einsum("brp,brq->bpq", m, m) > 0  # (B, HW, HW)
    eye = torch.eye(share.shape[-1], dtype=torch.bool, device=share.device)
    return share | eye


# ---------------------------------------------------------------------------
# Resamplers and the context bridge


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs ; latents] (Flamingo / IP-Adapter style)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim), latents (B, Q, dim), mask (B, T) over x -> (B, Q, dim)."""
        x, lat = self.norm_x(x), self.norm_latents(latents)
        kv_in = torch.cat([x, lat], dim=1)  # (B, T + Q, dim)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        if mask is not None:
            mask = torch.cat([mask.bool(), torch.ones(lat.shape[:2], dtype=torch.bool, device=lat.device)], 1)
        return self.to_out(attend(self.to_q(lat), k, v, self.heads, mask))


class PerceiverResampler(nn.Module):
    """Image tokens (M, T, in_dim) [+ extra queries (M, Qe, dim)] -> (M, Q + Qe, out_dim)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, num_queries: int, in_dim: int, out_dim: int,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim, ff_mult)]) for _ in range(depth))
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor, extra_queries: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, T, in_dim), extra_queries (M, Qe, dim), mask (M, T) -> (M, Q + Qe, out_dim)."""
        lat = self.latents.expand(x.shape[0], -1, -1)
        if extra_queries is not None:
            lat = torch.cat([lat, extra_queries.to(lat.dtype)], dim=1)  # (M, Q + Qe, dim)
        x = self.proj_in(x)  # (M, T, dim)
        for attn, ff in self.layers:
            lat = attn(x, lat, mask) + lat
            lat = ff(lat) + lat
        return self.norm_out(self.proj_out(lat))


class ContextBridge(nn.Module):
    """Qc learned queries self-attend over [queries ; Linear(foreground tokens + box tokens)]; only the query
    slots are kept. ``queries + g_a * attention``, then ``+ g_d * feed-forward``, with gates g = tanh(alpha).

    The attention's and the feed-forward's last layers start at zero, so the bridge returns its queries unchanged
    at init, and the gates start open (alpha = 1). Closed gates (alpha = 0, as GLIGEN starts) would also give an
    identity, but then the layers behind a gate get no gradient until it opens, and a gate only opens when the
    untrained layers behind it happen to help: behind the adapter's zero-initialised attention outputs the
    bridge's gates were still at 1e-4 after 500 steps at the cpu preset, and the bridge did nothing."""

    GATE_INIT = 1.0

    def __init__(self, dim: int, num_queries: int, context_dim: int, heads: int, dim_head: int, ff_mult: int = 4):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj = nn.Linear(context_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.ff = FeedForward(dim, ff_mult)
        for last in self.output_layers():
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.alpha_attn = nn.Parameter(torch.full((), self.GATE_INIT))
        self.alpha_dense = nn.Parameter(torch.full((), self.GATE_INIT))

    def output_layers(self) -> tuple[nn.Linear, nn.Linear]:
        """The last layers of the attention and of the feed-forward (zero at initialisation)."""
        return self.to_out, [m for m in self.ff.modules() if isinstance(m, nn.Linear)][-1]

    def output_norms(self) -> dict[str, float]:
        """Frobenius norms of the two output layers' weights: how much the trained bridge writes into the
        background queries (0 at initialisation)."""
        attn, ff = self.output_layers()
        return {"attention": float(attn.weight.detach().norm()), "feed-forward": float(ff.weight.detach().norm())}

    def forward(self, fg: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                batch_size: int | None = None) -> torch.Tensor:
        """fg (B, N, Qf, D) foreground tokens (+ box token), valid (B, N) -> bridge queries (B, Qc, dim).

        With ``fg=None`` the plain learned queries are returned (the no-bridge ablation).
        """
        if fg is None:
            return self.queries.expand(batch_size or 1, -1, -1)
        b, n, qf, _ = fg.shape
        q = self.queries.expand(b, -1, -1)
        qc = q.shape[1]
        ctx = self.proj(fg.reshape(b, n * qf, -1))  # (B, N*Qf, dim)
        mask = torch.ones(b, qc + n * qf, dtype=torch.bool, device=q.device)
        if valid is not None:
            mask[:, qc:] = valid.bool().repeat_interleave(qf, dim=1)
        seq = self.norm(torch.cat([q, ctx], dim=1))  # (B, Qc + N*Qf, dim)
        qq, k, v = self.to_qkv(seq).chunk(3, dim=-1)
        sa = self.to_out(attend(qq[:, :qc], k, v, self.heads, mask))  # (B, Qc, dim): the query slots only
        x = q + torch.tanh(self.alpha_attn) * sa
        return x + torch.tanh(self.alpha_dense) * self.ff(x)


def _call_detached(module: nn.Module, *args: Any) -> torch.Tensor:
    """Call ``module(*args)`` with its parameters detached (gradients reach the inputs, never the weights)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = dict(module.named_buffers())
    return torch.func.functional_call(module, {**params, **buffers}, args)


class DualResampler(nn.Module):
    """Foreground instance tokens from reference crops, then background tokens from a reference scene that see
    the foreground through the context bridge.

    The bridge reads the foreground tokens with the foreground resampler's weights detached: the background loss
    sends no gradient into the foreground resampler, and nothing flows from background to foreground.
    """

    def __init__(self, image_dim: int, context_dim: int, dim: int, depth: int, heads: int, dim_head: int,
                 num_fg_queries: int, num_bg_queries: int, num_bridge_queries: int, ff_mult: int = 4,
                 use_bridge: bool = True):
        super().__init__()
        self.use_bridge = use_bridge
        self.fg_resampler = PerceiverResampler(dim, depth, heads, dim_head, num_fg_queries, image_dim, context_dim,
                                               ff_mult)
        self.bridge = ContextBridge(dim, num_bridge_queries, context_dim, heads, dim_head, ff_mult)
        self.bg_resampler = PerceiverResampler(dim, depth, heads, dim_head, num_bg_queries, image_dim, context_dim,
                                               ff_mult)

    def forward(self, fg_refs: torch.Tensor, bg_ref: torch.Tensor, box_tokens: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fg_refs (B, N, T, D_img), bg_ref (B, T', D_img), box_tokens (B, N, D), valid (B, N)
        -> fg tokens (B, N, Qf, D), bg tokens (B, Qb + Qc, D)."""
        b, n = fg_refs.shape[:2]
        fg = self.fg_resampler(fg_refs.flatten(0, 1)).unflatten(0, (b, n))  # (B, N, Qf, D)
        if self.use_bridge:
            if torch.is_grad_enabled() and fg_refs.requires_grad:  # same values, gradient to the inputs only
                fg_in = _call_detached(self.fg_resampler, fg_refs.flatten(0, 1)).unflatten(0, (b, n))
            else:
                fg_in = fg.detach()
            queries = self.bridge(fg_in + box_tokens[:, :, None], valid)  # (B, Qc, dim)
        else:
            queries = self.bridge(None, batch_size=b)
        bg = self.bg_resampler(bg_ref, extra_queries=queries)  # (B, Qb + Qc, D)
        return fg, bg


# ---------------------------------------------------------------------------
# Attention modules inside the UNet


class LayoutSelfAttention(nn.Module):
    """Self-attention over the feature map where a token attends only to tokens sharing one of its regions;
    zero-initialised output (an identity residual at init)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.attn = CrossAttention(dim, dim, heads, dim_head, zero_out=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, HW, C), mask (B, HW, HW) bool -> (B, HW, C)."""
        return self.attn(h, h, mask)


class ConditionalGenerationModule(nn.Module):
    """The CGM of one cross-attention layer (zero-initialised outputs).

    ``out = ca_global + bg + sum_i s_i * (ca_i + ea_i) + layout``, where ``ca_*`` are the frozen cross-attentions
    to the caption and to instance phrase i, ``ea_i`` attends to [phrase_i ; reference tokens_i ; box token_i],
    ``s_i`` is instance i's soft ellipse, ``bg`` attends from the foreground-aware features ``ca_global + fg``
    to [caption ; bg tokens], and ``layout`` is the layout self-attention. With ``foreground_aware_background``
    off (the no-bridge ablation) ``bg`` is queried by ``ca_global`` alone, so the background ignores the foreground.
    """

    def __init__(self, channels: int, context_dim: int, heads: int, dim_head: int, use_layout_attention: bool = True,
                 foreground_aware_background: bool = True):
        super().__init__()
        self.foreground_aware_background = foreground_aware_background
        self.norm_obj = nn.LayerNorm(channels)
        self.ea_obj = CrossAttention(channels, context_dim, heads, dim_head, zero_out=True)
        self.norm_bg = nn.LayerNorm(channels)
        self.ea_bg = CrossAttention(channels, context_dim, heads, dim_head, zero_out=True)
        self.layout = LayoutSelfAttention(channels, heads, dim_head) if use_layout_attention else None

    def forward(self, h: torch.Tensor, ca_global: torch.Tensor, ca_inst: torch.Tensor, cc: "CCDiffContext",
                hw: tuple[int, int]) -> torch.Tensor:
        """h (B, HW, C) the layer input, ca_global (B, HW, C), ca_inst (B, N, HW, C) -> (B, HW, C)."""
        b, n = cc.valid.shape
        hw_n = h.shape[1]
        s = cc.ellipses(hw).to(h.dtype)  # (B, N, HW), 0 for padding
        keys = torch.cat([cc.phrase_pooled[:, :, None], cc.fg_tokens, cc.box_tokens[:, :, None]], dim=2)
        keys = keys.to(h.dtype)  # (B, N, Qf + 2, D)
        if n:
            q = self.norm_obj(h)[:, None].expand(b, n, hw_n, h.shape[-1]).reshape(b * n, hw_n, -1)
            ea = self.ea_obj(q, keys.flatten(0, 1)).unflatten(0, (b, n))  # (B, N, HW, C)
            fg = (s[..., None] * (ca_inst + ea)).sum(1)  # (B, HW, C)
        else:
            fg = torch.zeros_like(h)
        bg_keys = torch.cat([cc.global_pooled[:, None], cc.bg_tokens], dim=1).to(h.dtype)  # (B, 1 + Qbg, D)
        bg_query = ca_global + fg if self.foreground_aware_background else ca_global
        out = ca_global + self.ea_bg(self.norm_bg(bg_query), bg_keys) + fg
        if self.layout is not None:
            out = out + self.layout(h, cc.layout_mask(hw))
        return out


class GatedGroundingModule(nn.Module):
    """GLIGEN-style baseline: gated self-attention over [visual tokens ; grounding tokens] (alpha = 0 at init)."""

    def __init__(self, channels: int, context_dim: int, heads: int, dim_head: int, ff_mult: int = 4):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.proj = nn.Linear(context_dim, channels)
        self.norm = nn.LayerNorm(channels)
        self.to_qkv = nn.Linear(channels, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, channels)
        self.ff = FeedForward(channels, ff_mult)
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_dense = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, ca_global: torch.Tensor, cc: "CCDiffContext") -> torch.Tensor:
        """h (B, HW, C), ca_global (B, HW, C), grounding tokens in ``cc`` (B, N, D) -> (B, HW, C)."""
        b, hw_n, _ = h.shape
        objs = self.proj(cc.grounding_tokens.to(h.dtype))  # (B, N, C)
        seq = self.norm(torch.cat([h, objs], dim=1))  # (B, HW + N, C)
        mask = torch.cat([torch.ones(b, hw_n, dtype=torch.bool, device=h.device), cc.valid.bool()], dim=1)
        q, k, v = self.to_qkv(seq).chunk(3, dim=-1)
        sa = self.to_out(attend(q[:, :hw_n], k, v, self.heads, mask))  # (B, HW, C)
        x = torch.tanh(self.alpha_attn) * sa
        return ca_global + x + torch.tanh(self.alpha_dense) * self.ff(h + x)


# ---------------------------------------------------------------------------
# What the fusion hooks carry


@dataclass
class CCDiffContext:
    """Layout, tokens and lazily built region masks for the UNet forwards of one batch (see :func:`fusion_hooks`).

    ``boxes`` (B, N, 4), ``obb`` (B, N, 8), ``valid`` (B, N) bool; ``phrase_hidden`` (B, N, L, D) and
    ``phrase_pooled`` (B, N, D) from the frozen text encoder; ``fg_tokens`` (B, N, Qf, D), ``box_tokens``
    (B, N, D), ``bg_tokens`` (B, Qbg, D), ``global_pooled`` (B, D) for CC-Diff; ``grounding_tokens`` (B, N, D) for
    the GLIGEN-style mode; ``latent_hw`` the UNet input size; ``active`` (B,) bool: rows with False run the
    plain UNet (the unconditional half of classifier-free guidance).
    """

    boxes: torch.Tensor
    obb: torch.Tensor
    valid: torch.Tensor
    latent_hw: tuple[int, int]
    phrase_hidden: torch.Tensor | None = None
    phrase_pooled: torch.Tensor | None = None
    fg_tokens: torch.Tensor | None = None
    box_tokens: torch.Tensor | None = None
    bg_tokens: torch.Tensor | None = None
    global_pooled: torch.Tensor | None = None
    grounding_tokens: torch.Tensor | None = None
    active: torch.Tensor | None = None
    peak_normalise: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    def level_hw(self, tokens: int) -> tuple[int, int]:
        """The (h, w) of a feature map of ``tokens`` = h*w cells at some downsampling of ``latent_hw``."""
        h, w = self.latent_hw
        while h * w > tokens and (h > 1 or w > 1):
            h, w = (h + 1) // 2, (w + 1) // 2  # a UNet downsampler halves each side, rounding up
        if h * w != tokens:
            raise ValueError(f"cannot place {tokens} tokens on a downsampling of the {self.latent_hw} latent grid")
        return h, w

    def ellipses(self, hw: tuple[int, int]) -> torch.Tensor:
        """Soft instance ellipses (B, N, h*w) at a layer's resolution (cached per resolution)."""
        key = ("ellipse", hw)
        if key not in self._cache:
            e = ellipse_masks(self.boxes.float(), *hw, valid=self.valid, peak_normalise=self.peak_normalise)
            self._cache[key] = e.flatten(2)
        return self._cache[key]

    def regions(self, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance rasters (B, N, h, w) and background (B, h, w) at a layer's resolution (cached)."""
        key = ("regions", hw)
        if key not in self._cache:
            self._cache[key] = region_masks(self.obb.float(), *hw, valid=self.valid)
        return self._cache[key]

    def layout_mask(self, hw: tuple[int, int]) -> torch.Tensor:
        """Layout self-attention mask (B, h*w, h*w) bool at a layer's resolution (cached)."""
        key = ("layout", hw)
        if key not in self._cache:
            self._cache[key] = layout_attention_mask(region_membership(*self.regions(hw)))
        return self._cache[key]

    def active_rows(self) -> tuple[torch.Tensor, "CCDiffContext"] | None:
        """(the indices of the rows that use the layout, the context of those rows alone), or None when every row
        does (cached): the fusion layers then skip the plain rows, the unconditional half of guidance."""
        if self.active is None:
            return None
        if "active_rows" not in self._cache:
            idx = self.active.nonzero()[:, 0]
            self._cache["active_rows"] = None if len(idx) == len(self.active) else (idx, self.select(idx))
        return self._cache["active_rows"]

    def _rows(self, take: Callable[[torch.Tensor], torch.Tensor],
              fields: Sequence[str] | None = None) -> "CCDiffContext":
        """A context of the same layouts whose tensors are ``take(tensor)`` (rows picked or repeated)."""
        fields = _TENSOR_FIELDS if fields is None else fields
        return CCDiffContext(**{k: None if getattr(self, k) is None else take(getattr(self, k)) for k in fields},
                             latent_hw=self.latent_hw, peak_normalise=self.peak_normalise)

    def select(self, idx: torch.Tensor) -> "CCDiffContext":
        """The context of the rows ``idx`` alone (every row of it active)."""
        return self._rows(lambda t: t[idx.to(t.device)], [k for k in _TENSOR_FIELDS if k != "active"])

    def repeat(self, times: int) -> "CCDiffContext":
        """The context for a batch repeated ``times`` times along the batch (e.g. several samples per layout)."""
        return self._rows(lambda t: t.repeat_interleave(times, dim=0))


_TENSOR_FIELDS = ("boxes", "obb", "valid", "phrase_hidden", "phrase_pooled", "fg_tokens", "box_tokens", "bg_tokens",
                  "global_pooled", "grounding_tokens", "active")


def concat_contexts(contexts: Sequence[CCDiffContext]) -> CCDiffContext:
    """Concatenate contexts along the batch (same N; e.g. [unconditional rows ; conditional rows])."""
    first = contexts[0]
    out = {}
    for k in _TENSOR_FIELDS:
        vals = [getattr(c, k) for c in contexts]
        if all(v is None for v in vals):
            out[k] = None
        elif k == "active":
            out[k] = torch.cat([v if v is not None else torch.ones(c.valid.shape[0], dtype=torch.bool,
                                                                    device=c.valid.device)
                                for v, c in zip(vals, contexts)])
        else:
            out[k] = torch.cat(vals)
    return CCDiffContext(**out, latent_hw=first.latent_hw, peak_normalise=first.peak_normalise)


# ---------------------------------------------------------------------------
# The trainable adapter and the fusion hooks


def fusion_layer_names(unet: UNet2DConditionModel, blocks: Sequence[str]) -> list[str]:
    """Names of the cross-attention modules (``...attn2``) under the given block prefixes, in UNet order."""
    names = [n[: -len(".processor")] for n in unet.attn_processors]
    return [n for n in names if n.endswith("attn2") and any(n == b or n.startswith(b + ".") for b in blocks)]


def _key(name: str) -> str:
    return name.replace(".", "__")


class CCDiffAdapter(ModelMixin, ConfigMixin):
    """Every trainable part of CC-Diff (or of the GLIGEN-style baseline): box net, dual resampler with the context
    bridge, and one fusion module per chosen cross-attention layer of the UNet.

    ``use_bridge=False`` is the no-bridge ablation, in which the background is independent of the foreground in
    both places where CC-Diff couples them: the background tokens are resampled without the context bridge, and
    each CGM queries its background attention without the foreground features."""

    @register_to_config
    def __init__(self, layer_channels: dict[str, int], context_dim: int, image_dim: int, mode: str = "cc_diff",
                 use_bridge: bool = True, use_layout_attention: bool = True, resampler_dim: int = 1280,
                 resampler_depth: int = 4, resampler_heads: int = 20, resampler_dim_head: int = 64,
                 num_fg_queries: int = 16, num_bg_queries: int = 8, num_bridge_queries: int = 8, ff_mult: int = 4,
                 fusion_heads: int = 8, fusion_dim_head: int = 160, box_hidden: int = 512, fourier_freqs: int = 8):
        super().__init__()
        if mode not in ADAPTER_MODES:
            raise ValueError(f"mode must be one of {ADAPTER_MODES}, not {mode!r}")
        self.mode = mode
        self.box_net = BoxEmbedNet(context_dim, box_hidden, fourier_freqs)
        if mode == "cc_diff":
            self.resampler = DualResampler(image_dim, context_dim, resampler_dim, resampler_depth, resampler_heads,
                                           resampler_dim_head, num_fg_queries, num_bg_queries, num_bridge_queries,
                                           ff_mult, use_bridge)
            self.fusion = nn.ModuleDict({
                _key(name): ConditionalGenerationModule(c, context_dim, fusion_heads, fusion_dim_head,
                                                        use_layout_attention, foreground_aware_background=use_bridge)
                for name, c in layer_channels.items()})
        else:  # GLIGEN: grounding token = MLP([phrase ; Fourier(box)])
            self.grounding = nn.Sequential(
                nn.Linear(context_dim + 16 * fourier_freqs, box_hidden), nn.SiLU(), nn.Linear(box_hidden, box_hidden),
                nn.SiLU(), nn.Linear(box_hidden, context_dim))
            self.fusion = nn.ModuleDict({
                _key(name): GatedGroundingModule(c, context_dim, fusion_heads, fusion_dim_head, ff_mult)
                for name, c in layer_channels.items()})

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, blocks: Sequence[str], image_dim: int, **kwargs: Any) -> "CCDiffAdapter":
        """An adapter with one fusion module per ``attn2`` under ``blocks`` (channels read from the UNet)."""
        mods = dict(unet.named_modules())
        names = fusion_layer_names(unet, blocks)
        missing = [b for b in blocks if not fusion_layer_names(unet, [b])]
        if not names or missing:
            raise ValueError(f"no cross-attention layer under {missing or list(blocks)} (cc.fusion_blocks); UNet "
                             f"attention blocks: {sorted({n.split('.attentions')[0] for n in unet.attn_processors})}")
        channels = {n: int(mods[n].to_q.in_features) for n in names}
        return cls(layer_channels=channels, context_dim=int(unet.config.cross_attention_dim), image_dim=image_dim,
                   **kwargs)

    def module_for(self, layer: str) -> nn.Module:
        """The fusion module of one cross-attention layer (name without ``.processor``)."""
        return self.fusion[_key(layer)]

    def encode(self, obb: torch.Tensor, valid: torch.Tensor, phrase_hidden: torch.Tensor, phrase_pooled: torch.Tensor,
               global_pooled: torch.Tensor, latent_hw: tuple[int, int], fg_refs: torch.Tensor | None = None,
               bg_ref: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
               active: torch.Tensor | None = None) -> CCDiffContext:
        """Build the UNet context: obb (B, N, 8), valid (B, N), phrase_hidden (B, N, L, D), phrase_pooled (B, N, D),
        global_pooled (B, D), fg_refs (B, N, T, D_img), bg_ref (B, T', D_img) (both CC-Diff only).

        It is the adapter's ``forward``, so that the offload hooks diffusers attaches to the adapter see it."""
        return self(obb, valid, phrase_hidden, phrase_pooled, global_pooled, latent_hw, fg_refs, bg_ref, boxes, active)

    def forward(self, obb: torch.Tensor, valid: torch.Tensor, phrase_hidden: torch.Tensor,
                phrase_pooled: torch.Tensor, global_pooled: torch.Tensor, latent_hw: tuple[int, int],
                fg_refs: torch.Tensor | None = None, bg_ref: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None, active: torch.Tensor | None = None) -> CCDiffContext:
        """The UNet context of a batch of layouts (see :meth:`encode`)."""
        valid = valid.bool()
        boxes = obb_to_boxes(obb) if boxes is None else boxes
        box_tokens = self.box_net(obb)  # (B, N, D)
        ctx = CCDiffContext(boxes=boxes, obb=obb, valid=valid, latent_hw=tuple(latent_hw), phrase_hidden=phrase_hidden,
                            phrase_pooled=phrase_pooled, box_tokens=box_tokens, global_pooled=global_pooled,
                            active=active)
        if self.mode == "cc_diff":
            if fg_refs is None or bg_ref is None:
                raise ValueError("CC-Diff needs reference tokens: fg_refs (B, N, T, D_img) and bg_ref (B, T, D_img)")
            ctx.fg_tokens, ctx.bg_tokens = self.resampler(fg_refs, bg_ref, box_tokens, valid)
        else:
            four = self.box_net.fourier(obb)  # (B, N, 16F)
            ctx.grounding_tokens = self.grounding(torch.cat([phrase_pooled, four], dim=-1))  # (B, N, D)
        return ctx


class FusionHook:
    """A forward hook on one fused cross-attention layer (``attn2``) of the UNet: CC-Diff's CGM (or the
    GLIGEN-style gated attention) on top of the frozen cross-attention's output.

    The layer's own processor computes that output and, for CC-Diff, the cross-attention to each instance
    phrase (with the call's ``cross_attention_kwargs``); rows with ``context.active == False`` keep the plain
    output (the unconditional half of guidance) and cost no fusion compute.
    """

    def __init__(self, module: nn.Module, context: CCDiffContext):
        self.module = module
        self.context = context

    def __call__(self, attn: nn.Module, args: tuple, kwargs: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, HW, C), encoder_hidden_states (B, L, D), the layer's output (B, HW, C) -> (B, HW, C)."""
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None) is None:
            return out
        extra = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "encoder_hidden_states",
                                                                "attention_mask")}
        subset = self.context.active_rows()
        if subset is None:
            return self.fuse(attn, hidden_states, out, self.context, extra)
        idx, cc = subset
        idx = idx.to(out.device)
        return out.index_copy(0, idx, self.fuse(attn, hidden_states[idx], out[idx], cc, extra))

    def fuse(self, attn: nn.Module, hidden_states: torch.Tensor, out: torch.Tensor, cc: CCDiffContext,
             extra: dict[str, Any]) -> torch.Tensor:
        """The fused output of rows that all use the layout ``cc``."""
        if isinstance(self.module, GatedGroundingModule):
            return self.module(hidden_states, out, cc)
        b, n = cc.valid.shape
        h_rep = hidden_states[:, None].expand(b, n, *hidden_states.shape[1:]).flatten(0, 1)  # (B*N, HW, C)
        phr = cc.phrase_hidden.flatten(0, 1).to(hidden_states.dtype)  # (B*N, L, D)
        # the layer's own attention (its processor, the call's cross_attention_kwargs), without this hook
        ca_inst = attn.forward(h_rep, encoder_hidden_states=phr, **extra).unflatten(0, (b, n)) if n else None
        return self.module(hidden_states, out, ca_inst, cc, cc.level_hw(hidden_states.shape[1]))


def fused_layers(unet: UNet2DConditionModel, adapter: CCDiffAdapter) -> dict[str, nn.Module]:
    """The UNet's attention modules that the adapter fuses, by name (an error when the UNet lacks one)."""
    modules = dict(unet.named_modules())
    missing = sorted(set(adapter.config.layer_channels) - set(modules))
    if missing:
        raise ValueError(f"the adapter has fusion layers the UNet lacks: {missing[:3]}")
    return {name: modules[name] for name in adapter.config.layer_channels}


@contextmanager
def fusion_hooks(unet: UNet2DConditionModel, adapter: CCDiffAdapter, context: CCDiffContext) -> Iterator[None]:
    """CC-Diff's conditioning on ``unet`` while the block runs: one :class:`FusionHook` per fused layer, all
    removed at the end (also on an error), so that the UNet and its attention processors are left as found."""
    handles = [attn.register_forward_hook(FusionHook(adapter.module_for(name), context), with_kwargs=True)
               for name, attn in fused_layers(unet, adapter).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------
# The model the training loop sees


class CCDiffModel(nn.Module):
    """Frozen UNet and text encoder beside the trainable adapter (one module, as ``train_loop`` wants)."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module, adapter: CCDiffAdapter):
        super().__init__()
        self.unet = unet.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.adapter = adapter
        self._context: CCDiffContext | None = None  # the running forward's (read by _checkpoint)
        fused_layers(self.unet, adapter)  # the adapter fits this UNet

    def enable_gradient_checkpointing(self) -> None:
        """Gradient checkpointing of the frozen UNet's blocks with the fusion inside them.

        The fusion hooks live for one forward only, and a checkpointed block is recomputed later, in the
        backward pass: diffusers' default checkpointing would recompute it without them (other activations,
        an error). :meth:`_checkpoint` enters the hooks of the forward that saved the block again while it is
        recomputed. ``forward`` switches a UNet whose own checkpointing was enabled to this one.
        """
        self.unet.enable_gradient_checkpointing(self._checkpoint)

    def _checkpoint(self, module: nn.Module, *args: Any) -> Any:
        context = self._context

        def contexts():  # (around the forward, around the recomputation)
            again = fusion_hooks(self.unet, self.adapter, context) if context is not None else nullcontext()
            return nullcontext(), again

        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

    def _checkpointing_without_fusion(self) -> bool:
        funcs = {getattr(m, "_gradient_checkpointing_func", None) for m in self.unet.modules()
                 if getattr(m, "gradient_checkpointing", False)}
        return bool(funcs - {self._checkpoint})

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, text_hidden: torch.Tensor,
                context: CCDiffContext | None) -> torch.Tensor:
        """noisy latents (B, C, h, w), t (B,), text_hidden (B, L, D) -> predicted noise (B, C, h, w)."""
        if context is None:
            return self.unet(noisy, t, encoder_hidden_states=text_hidden).sample
        if self._checkpointing_without_fusion():
            self.enable_gradient_checkpointing()
        self._context = context
        try:
            with fusion_hooks(self.unet, self.adapter, context):
                return self.unet(noisy, t, encoder_hidden_states=text_hidden).sample
        finally:
            self._context = None


def trainable_parameter_counts(adapter: CCDiffAdapter) -> dict[str, int]:
    """Parameter counts of the adapter's parts (box net, resampler, fusion modules, grounding MLP)."""
    out = {name: sum(p.numel() for p in mod.parameters()) for name, mod in adapter.named_children()}
    out["total"] = sum(out.values())
    return out


def gate_values(adapter: CCDiffAdapter) -> dict[str, float]:
    """tanh(alpha) of every gate (the context bridge's, or the GLIGEN-style layers'), by parameter name.

    A GLIGEN-style gate starts at 0, where its branch adds nothing; the bridge's start at tanh(1) = 0.76, in front
    of output layers that start at zero (see :meth:`ContextBridge.output_norms`).
    """
    return {name.removeprefix("fusion.").replace("__", "."): float(torch.tanh(p.detach()))
            for name, p in adapter.named_parameters() if name.rsplit(".", 1)[-1].startswith("alpha_")}
