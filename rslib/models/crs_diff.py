"""CRS-Diff stage two: the condition branch around a frozen stage-one UNet (CRS-Diff §3.2-3.3).

Three kinds of control reach the frozen ``UNet2DConditionModel``:

* **metadata** (7 fields in [0, 1]) -> :class:`MetadataEncoder` -> a vector added to the UNet's time embedding
  through ``class_embed_type="identity"`` / ``class_labels`` (and, by default, to the adapter's time embedding);
* **content image** -> CLIP image embedding -> :class:`ContentTokenizer` -> K extra context tokens appended to the
  text tokens (``global_strength`` scales them; a learned null stands for "no content");
* **six condition maps** (18 channels) -> :class:`LocalFeatureExtractor` -> features at every UNet level, fused
  into a trainable copy of the UNet encoder (:class:`CRSLocalAdapter`) by FF / AFF blocks; the copy's
  zero-initialised 1x1 outputs enter the frozen UNet as ``down_block_additional_residuals`` /
  ``mid_block_additional_residual``, each scaled by ``control_scale``.

Choices where the upstream code and these notes differ (see ``reference/crs-diff.md`` §6-7):

* the metadata encoder has a learned null per field (dropped or unknown fields), and its linear maps start at
  zero, so a fresh model leaves the stage-one UNet unchanged;
* the metadata vector also enters the adapter's time embedding (``metadata_to_adapter``; upstream: UNet only);
* the self-attention of AFF scales its logits by 1/sqrt(d) and its value projection starts at zero (upstream:
  no scaling, random init), so a fresh AFF block is the identity;
* the FF denormalisation keeps the copied GroupNorm's affine weights and modulates them,
  ``GN(x) * (1 + gamma(f)) + beta(f)``, with gamma/beta biases starting at zero: a fresh FDN resnet computes
  exactly what the copied resnet did.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn
from torch import nn

from rslib.config import FUSIONS
from rslib.utils import finite_numbers

N_METADATA = 7
N_MAPS = 6


# ---------------------------------------------------------------------------
# Global conditions: metadata and content


def metadata_sinusoids(values: torch.Tensor, dim: int, max_value: float = 1000.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Interleaved sin/cos embedding of every field at once: (B, F) in [0, 1] -> (B, F, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    arg = values.float()[..., None] * max_value * freqs  # (B, F, half)
    emb = torch.stack([arg.sin(), arg.cos()], dim=-1).flatten(-2)  # (B, F, 2 * half), sin/cos interleaved
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


NULL_CONDITIONS = ("learned", "zero")


def check_null_conditions(kind: str) -> str:
    """``kind`` if it names what stands for a dropped content image or metadata field, else a ValueError."""
    if kind not in NULL_CONDITIONS:
        raise ValueError(f"null_conditions must be one of {', '.join(NULL_CONDITIONS)}, not {kind!r} "
                         f"(crs.null_conditions)")
    return kind


def zero_dropped(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CRS-Diff's dropped conditions without learned nulls: the dropped rows of ``values`` (content embeddings
    (B, D) with ``keep`` (B,), or metadata (B, F) with ``keep`` (B, F)) set to zero and every row kept, so that
    zeros go through the encoder (``crs.null_conditions = "zero"``)."""
    mask = keep.to(values.device).bool()
    mask = mask[:, None] if mask.ndim < values.ndim else mask
    return values * mask.to(values.dtype), torch.ones_like(keep, dtype=torch.bool)


class MetadataEncoder(ModelMixin, ConfigMixin):
    """Seven metadata fields -> one vector for the UNet time embedding (sinusoid + a Linear per field, summed).

    ``forward(values (B, F) in [0, 1], keep (B, F) bool) -> (B, out_dim)``; a field with ``keep=False``
    (dropped or unknown) contributes its learned null vector instead. Every weight starts at zero.
    """

    @register_to_config
    def __init__(self, num_fields: int = N_METADATA, embed_dim: int = 320, out_dim: int = 1280,
                 max_value: float = 1000.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_fields, embed_dim, out_dim))  # one Linear per field
        self.bias = nn.Parameter(torch.zeros(num_fields, out_dim))
        self.null = nn.Parameter(torch.zeros(num_fields, out_dim))  # learned "no value" per field

    def field_embeddings(self, values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Per-field embeddings (B, F, out_dim) before the sum."""
        c = self.config
        sin = metadata_sinusoids(values, c.embed_dim, c.max_value).to(self.weight.dtype)  # (B, F, d)
        emb = torch.einsum("bfd,fde->bfe", sin, self.weight) + self.bias  # (B, F, E): the 7 Linears at once
        if keep is not None:
            emb = torch.where(keep.to(emb.device).bool()[..., None], emb, self.null.expand_as(emb))
        return emb

    def forward(self, values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, F) normalised metadata and keep mask -> (B, out_dim)."""
        return self.field_embeddings(values, keep).sum(1)


class ContentTokenizer(ModelMixin, ConfigMixin):
    """CLIP image embedding -> K context tokens (LN, GEGLU-FF, LN, GEGLU-FF, reshape), with a learned null.

    ``forward(embeds (B, D), keep (B,) bool, global_strength) -> (B, K, C)``: kept rows give
    ``global_strength * tokens``, dropped rows (no content image) give the learned null tokens.
    """

    @register_to_config
    def __init__(self, in_dim: int = 768, context_dim: int = 768, num_tokens: int = 4, dropout: float = 0.0):
        super().__init__()
        out = num_tokens * context_dim
        hidden = out // 2
        self.norm1 = nn.LayerNorm(in_dim)
        self.ff1 = FeedForward(in_dim, dim_out=hidden, mult=4, dropout=dropout, activation_fn="geglu")
        self.norm2 = nn.LayerNorm(hidden)
        self.ff2 = FeedForward(hidden, dim_out=out, mult=4, dropout=dropout, activation_fn="geglu")
        self.null = nn.Parameter(torch.zeros(num_tokens, context_dim))

    def forward(self, embeds: torch.Tensor | None, keep: torch.Tensor | None = None,
                global_strength: float = 1.0, batch_size: int | None = None) -> torch.Tensor:
        """Embeddings (B, D) (or None = no content) -> tokens (B, K, C)."""
        c = self.config
        if embeds is None:
            b = batch_size or 1
            return self.null[None].expand(b, -1, -1)
        h = self.ff1(self.norm1(embeds.to(self.null.dtype)))  # (B, hidden)
        tokens = self.ff2(self.norm2(h)).view(-1, c.num_tokens, c.context_dim)  # (B, K, C)
        tokens = global_strength * tokens
        if keep is not None:
            tokens = torch.where(keep.to(tokens.device).bool()[:, None, None], tokens, self.null[None])
        return tokens


# ---------------------------------------------------------------------------
# Local conditions: features, FF / AFF fusion, the adapter


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (ControlNet's zero convolutions); returns it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class LocalFeatureExtractor(nn.Module):
    """Condition stack (B, 18, H, W) -> one feature map per UNet level, [(B, L_i, H / (f 2^i), W / (f 2^i))].

    A stem of 3x3 convs brings the maps down to half the latent resolution (``downscale`` f is the VAE's
    factor), then one stride-2 stage per level; each stage ends in a 3x3 conv. These output convs are *not*
    zero-initialised: the adapter's zero convolutions already make a fresh model equal to stage one, and zero
    features as well would starve both of gradient (each would wait for the other to grow), so the fused
    states must carry the maps from the first step.

    Every conv starts Kaiming-normal (gain for ReLU-like activations, zero bias). PyTorch's default init
    shrinks the signal by about 2x per layer, so after the eight-layer path the features came out with a
    standard deviation of 0.02-0.03 against unit-variance UNet activations: the maps were almost silent in
    the fused states and the adapter took hundreds of steps to start using them. With Kaiming init they
    start at 0.06-0.12 and an adapter overfitting 64 road maps separates them from no maps about 13x sooner.
    """

    def __init__(self, in_channels: int = 18, stem_channels: Sequence[int] = (32, 64, 128),
                 inject_channels: Sequence[int] = (192, 256, 384, 512), downscale: int = 8):
        super().__init__()
        n_down = int(round(math.log2(downscale)))
        if 2 ** n_down != downscale:
            raise ValueError(f"downscale must be a power of two, not {downscale}")
        stem_strides = max(n_down - 1, 0)  # the first stage adds the last halving
        if len(stem_channels) != stem_strides + 1:
            raise ValueError(f"a downscale of {downscale} needs {stem_strides + 1} stem channels, got {stem_channels}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, stem_channels[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(stem_channels[:-1], stem_channels[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1), nn.SiLU()]
        self.stem = nn.Sequential(*layers)
        self.stages = nn.ModuleList()
        self.outs = nn.ModuleList()
        prev = stem_channels[-1]
        for i, ch in enumerate(inject_channels):
            stride = 2 if (i > 0 or n_down > 0) else 1
            self.stages.append(nn.Sequential(nn.Conv2d(prev, ch, 3, padding=1, stride=stride), nn.SiLU()))
            self.outs.append(nn.Conv2d(ch, ch, 3, padding=1))
            prev = ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, conditions: torch.Tensor) -> list[torch.Tensor]:
        """(B, 18, H, W) -> [(B, L_i, h_i, w_i) for each level]."""
        h = self.stem(conditions)  # (B, S, 2 h_0, 2 w_0)
        feats = []
        for stage, out in zip(self.stages, self.outs):
            h = stage(h)  # (B, L_i, h_i, w_i)
            feats.append(out(h))
        return feats


class SpatialSelfAttention2d(nn.Module):
    """x + V softmax(Q^T K / sqrt(d)): single-head self-attention over the pixels of (B, C, H, W).

    Q and K are 1x1 convs C -> C/8, V a 1x1 conv C -> C that starts at zero (a fresh block is the identity).
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        d = max(1, channels // reduction)
        self.q = nn.Conv2d(channels, d, 1)
        self.k = nn.Conv2d(channels, d, 1)
        self.v = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, d)
        k = self.k(x).flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, d)
        v = self.v(x).flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + out[:, 0].transpose(1, 2).reshape(b, c, h, w)


class FeatureDenorm2d(nn.Module):
    """FF block (feature denormalisation, SPADE-like): ``GN(x) * (1 + gamma(f)) + beta(f)``.

    ``norm`` is the GroupNorm of the copied resnet (affine weights kept); gamma and beta are 3x3 convs from
    the L feature channels to C with biases starting at zero, so with f = 0 the block is the plain GroupNorm.
    """

    def __init__(self, norm: nn.GroupNorm, feat_channels: int):
        super().__init__()
        self.norm = norm
        c = norm.num_channels
        self.gamma = nn.Conv2d(feat_channels, c, 3, padding=1)
        self.beta = nn.Conv2d(feat_channels, c, 3, padding=1)
        nn.init.zeros_(self.gamma.bias)
        nn.init.zeros_(self.beta.bias)

    def modulation(self, f: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta), each (B, C, h, w), from features (B, L, h', w') resized to ``size``."""
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="nearest")
        return self.gamma(f), self.beta(f)

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w), f (B, L, h, w) -> (B, C, h, w)."""
        gamma, beta = self.modulation(f, x.shape[-2:])
        return self.norm(x) * (1 + gamma) + beta


class AttnFeatureDenorm2d(FeatureDenorm2d):
    """AFF block: self-attention over the hidden state, then feature denormalisation, FDN(SelfAttn(x), f)."""

    def __init__(self, norm: nn.GroupNorm, feat_channels: int, reduction: int = 8):
        super().__init__(norm, feat_channels)
        self.attn = SpatialSelfAttention2d(norm.num_channels, reduction)

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w), f (B, L, h, w) -> (B, C, h, w)."""
        return super().forward(self.attn(x), f)


class FDNResnetBlock2D(nn.Module):
    """A diffusers ``ResnetBlock2D`` whose two GroupNorms are FF or AFF blocks fed by the level's features.

    Built from an existing resnet (:meth:`from_resnet`): ``conv1``, ``conv2``, ``time_emb_proj`` and
    ``conv_shortcut`` are the resnet's own modules, so names (and copied weights) match the UNet's.
    """

    def __init__(self, resnet: ResnetBlock2D, feat_channels: int, fusion: str = "aff"):
        super().__init__()
        if fusion not in ("aff", "ff"):
            raise ValueError(f"FDNResnetBlock2D fuses with 'aff' or 'ff', not {fusion!r}")
        if resnet.upsample is not None or resnet.downsample is not None or resnet.time_embedding_norm != "default":
            raise ValueError("only plain ResnetBlock2D (no up/down-sampling, default time-embedding norm) is supported")
        block = AttnFeatureDenorm2d if fusion == "aff" else FeatureDenorm2d
        self.norm1 = block(resnet.norm1, feat_channels)
        self.norm2 = block(resnet.norm2, feat_channels)
        self.conv1, self.conv2 = resnet.conv1, resnet.conv2
        self.time_emb_proj, self.conv_shortcut = resnet.time_emb_proj, resnet.conv_shortcut
        self.nonlinearity, self.dropout = resnet.nonlinearity, resnet.dropout
        self.output_scale_factor = resnet.output_scale_factor
        self.skip_time_act = resnet.skip_time_act

    def forward(self, x: torch.Tensor, temb: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, h, w), temb (B, E), f (B, L, h, w) -> (B, C_out, h, w)."""
        h = self.conv1(self.nonlinearity(self.norm1(x, f)))
        if self.time_emb_proj is not None:
            t = temb if self.skip_time_act else self.nonlinearity(temb)
            h = h + self.time_emb_proj(t)[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h, f))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


def _unet_structure(unet_config: dict[str, Any]) -> dict[str, Any]:
    """The subset of a UNet2DConditionModel config that the encoder copy needs."""
    keep = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "mid_block_type",
            "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
            "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
            "attention_head_dim", "num_attention_heads", "dual_cross_attention", "use_linear_projection",
            "only_cross_attention", "upcast_attention", "resnet_time_scale_shift", "time_embedding_type",
            "flip_sin_to_cos", "freq_shift", "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act",
            "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel", "resnet_skip_time_act",
            "resnet_out_scale_factor", "mid_block_only_cross_attention", "dropout", "attention_type")
    out = {k: unet_config[k] for k in keep if k in unet_config}
    for k, v in out.items():
        if isinstance(v, list):
            out[k] = tuple(v)
    return out


class CRSLocalAdapter(ModelMixin, ConfigMixin):
    """Trainable copy of the UNet encoder and middle block with FF / AFF fusion of the local features.

    ``forward(sample, timestep, encoder_hidden_states, conditions, metadata_emb=None, control_scale=1.0)``
    returns ``(down_residuals, mid_residual)`` for ``UNet2DConditionModel(down_block_additional_residuals=...,
    mid_block_additional_residual=...)``: one zero-initialised 1x1 conv after ``conv_in``, after every
    resnet (+ attention) and every downsampler, and one after the middle block (13 at SD 1.5 shapes).

    ``fusion``: ``"aff"`` (self-attention then feature denormalisation), ``"ff"`` (feature denormalisation)
    or ``"sum"`` (no fusion block: the features, projected by a 1x1 conv, are added to the input of the level's
    first resnet, as Uni-ControlNet / ControlNet add their hint). Build it with :meth:`from_unet`.
    """

    @register_to_config
    def __init__(self, unet_config: dict[str, Any] | None = None, condition_channels: int = 3 * N_MAPS,
                 stem_channels: Sequence[int] = (32, 64, 128), inject_channels: Sequence[int] = (192, 256, 384, 512),
                 downscale: int = 8, fusion: str = "aff", metadata_to_adapter: bool = True):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {fusion!r}")
        if unet_config is None:
            raise ValueError("CRSLocalAdapter needs the UNet's config: build it with CRSLocalAdapter.from_unet(unet)")
        structure = _unet_structure(dict(unet_config))
        levels = len(structure["block_out_channels"])
        if len(inject_channels) != levels:
            raise ValueError(f"inject_channels {tuple(inject_channels)} needs one entry per UNet level ({levels})")
        template = UNet2DConditionModel(**structure)  # built on the current default device (meta works too)
        self.conv_in = template.conv_in
        self.time_proj = template.time_proj
        self.time_embedding = template.time_embedding
        self.time_embed_act = template.time_embed_act
        self.down_blocks = template.down_blocks
        self.mid_block = template.mid_block
        del template
        self.extractor = LocalFeatureExtractor(condition_channels, stem_channels, inject_channels, downscale)
        self.feature_proj = nn.ModuleList()
        for i, block in enumerate(self.down_blocks):
            first = block.resnets[0]
            if fusion == "sum":
                proj = nn.Conv2d(inject_channels[i], first.in_channels, 1)
                nn.init.zeros_(proj.bias)  # with zero features a fresh level sees exactly its input
                self.feature_proj.append(proj)
            else:
                block.resnets[0] = FDNResnetBlock2D(first, inject_channels[i], fusion)
        chans = [structure["block_out_channels"][0]]
        for i, block in enumerate(self.down_blocks):
            c_out = structure["block_out_channels"][i]
            chans += [c_out] * len(block.resnets)
            if block.downsamplers is not None:
                chans += [c_out] * len(block.downsamplers)
        self.zero_convs = nn.ModuleList([zero_module(nn.Conv2d(c, c, 1)) for c in chans])
        c_mid = structure["block_out_channels"][-1]
        self.mid_zero_conv = zero_module(nn.Conv2d(c_mid, c_mid, 1))

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, *, stem_channels: Sequence[int] = (32, 64, 128),
                  inject_channels: Sequence[int] | None = None, downscale: int = 8, fusion: str = "aff",
                  metadata_to_adapter: bool = True, condition_channels: int = 3 * N_MAPS) -> "CRSLocalAdapter":
        """A fresh adapter whose encoder copy starts from ``unet``'s weights (zero outputs: no effect yet)."""
        inject = tuple(inject_channels) if inject_channels is not None else tuple(unet.config.block_out_channels)
        adapter = cls(unet_config=dict(unet.config), condition_channels=condition_channels,
                      stem_channels=tuple(stem_channels), inject_channels=inject, downscale=downscale, fusion=fusion,
                      metadata_to_adapter=metadata_to_adapter)
        adapter.copy_unet_weights(unet)
        return _to_like(adapter, unet)

    def copy_unet_weights(self, unet: UNet2DConditionModel) -> list[str]:
        """Copy conv_in, time embedding, down blocks and mid block weights from ``unet``; returns the names set."""
        src: dict[str, torch.Tensor] = {}
        for prefix in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            for k, v in getattr(unet, prefix).state_dict().items():
                src[f"{prefix}.{k}"] = v
        mapped = {}
        for name in self.state_dict():
            # FDN resnets keep the copied GroupNorm at resnets.0.norm{1,2}.norm
            key = re.sub(r"^(down_blocks\.\d+\.resnets\.0\.norm[12])\.norm\.", r"\1.", name)
            if key in src:
                mapped[name] = src[key]
        missing = [k for k in src if k not in {re.sub(r"^(down_blocks\.\d+\.resnets\.0\.norm[12])\.norm\.", r"\1.", n)
                                               for n in mapped}]
        if missing:
            raise KeyError(f"the adapter does not fit the UNet: {missing[:5]} ({len(missing)} weights) not copied")
        self.load_state_dict(mapped, strict=False)
        return sorted(mapped)

    @property
    def num_residuals(self) -> int:
        """Number of residuals returned: down residuals + 1 (mid)."""
        return len(self.zero_convs) + 1

    def time_embed(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """The adapter's own time embedding (B, E), as the UNet computes it."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t = t.to(sample.device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # (B, E)
        return emb

    def features(self, conditions: torch.Tensor) -> list[torch.Tensor]:
        """The extractor's features [(B, L_i, h_i, w_i) per level] of a condition stack (B, 18, H, W).

        Computed through ``forward`` (with ``sample=None``), so that the offload hooks diffusers attaches to the
        adapter see the call; a pipeline computes them once and passes them to every step (``features=``)."""
        return self(None, None, None, conditions)

    def forward(self, sample: torch.Tensor | None, timestep: torch.Tensor | float | int | None,
                encoder_hidden_states: torch.Tensor | None, conditions: torch.Tensor | None,
                metadata_emb: torch.Tensor | None = None, control_scale: float | Sequence[float] = 1.0,
                features: list[torch.Tensor] | None = None) -> Any:
        """Residuals for the frozen UNet: sample (B, C, h, w), conditions (B, 18, H, W) -> (down tuple, mid).

        ``sample=None``: only the features of ``conditions`` (see :meth:`features`)."""
        if sample is None:
            return self.extractor(conditions)
        emb = self.time_embed(sample, timestep)
        if metadata_emb is not None and self.config.metadata_to_adapter:
            emb = emb + metadata_emb.to(emb.dtype)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        feats = features if features is not None else self.extractor(conditions.to(sample.dtype))
        h = self.conv_in(sample)  # (B, C_0, h, w)
        outs = [h]
        for i, block in enumerate(self.down_blocks):
            attns = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                if j == 0 and isinstance(resnet, FDNResnetBlock2D):
                    h = resnet(h, emb, feats[i])
                else:
                    if j == 0:  # fusion "sum": the projected features are added to the level's input
                        h = h + self.feature_proj[i](feats[i])
                    h = resnet(h, emb)
                if attns is not None:
                    h = attns[j](h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
                outs.append(h)
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    h = down(h)  # (B, C_i, h / 2, w / 2)
                    outs.append(h)
        if self.mid_block is not None:
            if isinstance(self.mid_block, UNetMidBlock2DCrossAttn):
                h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h = self.mid_block(h, emb)
        scales = control_scales(control_scale, self.num_residuals)
        down = tuple(conv(o) * s for conv, o, s in zip(self.zero_convs, outs, scales[:-1]))
        mid = self.mid_zero_conv(h) * scales[-1]
        return down, mid


def _to_like(module: nn.Module, like: nn.Module) -> nn.Module:
    """Move ``module`` to the device (and, when it differs, the dtype) of ``like``."""
    p = next(like.parameters())
    module = module.to(p.device)
    if next(module.parameters()).dtype != p.dtype:
        module = module.to(p.dtype)
    return module


def control_scales(control_scale: float | Sequence[float], n: int) -> list[float]:
    """One finite scale per residual (mid last) from a number or a sequence of n numbers (else a ValueError)."""
    if isinstance(control_scale, (int, float)):
        control_scale = [control_scale] * n
    return finite_numbers(control_scale, n, "control_scale")


# ---------------------------------------------------------------------------
# The whole conditional denoiser


def load_frozen_unet(path: str, subfolder: str | None = "unet") -> UNet2DConditionModel:
    """The stage-one UNet with an identity class embedding (metadata enters through ``class_labels``)."""
    return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, class_embed_type="identity",
                                                local_files_only=True)


def with_identity_class_embedding(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of ``unet`` whose config has ``class_embed_type="identity"`` (same weights; no new parameter)."""
    if unet.config.class_embed_type == "identity":
        return unet
    if unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None:
        raise ValueError(f"the UNet already has a class embedding ({unet.config.class_embed_type!r})")
    new = UNet2DConditionModel.from_config(unet.config, class_embed_type="identity")
    new.load_state_dict(unet.state_dict())
    return _to_like(new, unet)


def join_context(text_states: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The cross-attention context: text states (B, L, D) followed by the content tokens (B, K, D), if any."""
    return text_states if tokens is None else torch.cat([text_states, tokens.to(text_states.dtype)], dim=1)


@dataclass
class CRSConditions:
    """What every denoising step of one batch needs, computed once: the ``text`` states (B, L, D) and the content
    ``tokens`` (B, K, D) (None without a content tokenizer) that make the cross-attention context, the ``metadata``
    vector (B, E) for the time embedding, the adapter's ``features`` (None: the adapter is off) and its
    per-residual ``scales``."""

    text: torch.Tensor
    tokens: torch.Tensor | None
    metadata: torch.Tensor
    features: list[torch.Tensor] | None
    scales: list[float]

    @property
    def context(self) -> torch.Tensor:
        """The cross-attention context (B, L + K, D)."""
        return join_context(self.text, self.tokens)


class CRSDiffModel(nn.Module):
    """The conditional denoiser: frozen UNet + adapter + metadata encoder + content tokenizer.

    ``forward`` predicts the noise of ``sample`` (B, C, h, w) from the text states (B, L, D), the condition
    stack (B, 18, H, W), CLIP content embeddings (B, D_img) with a keep mask, and metadata (B, 7) with a keep
    mask. ``metadata_encoder`` / ``content_tokenizer`` may be None (ablations "metadata off" / "content off").
    It is :meth:`encode` (what does not change over the denoising steps) then :meth:`denoise` (one step):
    training calls ``forward``, the pipeline ``encode`` once per call and ``denoise`` at every step.
    """

    def __init__(self, unet: UNet2DConditionModel, adapter: CRSLocalAdapter,
                 metadata_encoder: MetadataEncoder | None = None, content_tokenizer: ContentTokenizer | None = None):
        super().__init__()
        if unet.config.class_embed_type != "identity":
            raise ValueError("the frozen UNet needs class_embed_type='identity': load it with load_frozen_unet() "
                             "or wrap it with with_identity_class_embedding()")
        self.unet = unet
        self.adapter = adapter
        self.metadata_encoder = metadata_encoder
        self.content_tokenizer = content_tokenizer

    def context(self, text_states: torch.Tensor, content_embeds: torch.Tensor | None = None,
                content_keep: torch.Tensor | None = None, global_strength: float = 1.0) -> torch.Tensor:
        """Text states (B, L, D) -> cross-attention context (B, L + K, D) (just the text without a tokenizer)."""
        return join_context(text_states, self.content_tokens(text_states, content_embeds, content_keep,
                                                             global_strength))

    def content_tokens(self, text_states: torch.Tensor, content_embeds: torch.Tensor | None = None,
                       content_keep: torch.Tensor | None = None, global_strength: float = 1.0) -> torch.Tensor | None:
        """The content tokens (B, K, D) for a batch of text states (None without a content tokenizer)."""
        if self.content_tokenizer is None:
            return None
        return self.content_tokenizer(content_embeds, content_keep, global_strength, batch_size=len(text_states))

    def metadata_embedding(self, reference: torch.Tensor, metadata: torch.Tensor | None,
                           metadata_keep: torch.Tensor | None) -> torch.Tensor:
        """(B, E) vector for ``class_labels`` (B, device and, for the zeros, dtype of ``reference``): zeros without a
        metadata encoder, the learned nulls where a field is not kept (every field when ``metadata`` is None)."""
        b, dev = reference.shape[0], reference.device
        if self.metadata_encoder is None:
            e = self.unet.config.time_embedding_dim or 4 * self.unet.config.block_out_channels[0]
            return torch.zeros(b, e, device=dev, dtype=reference.dtype)
        if metadata is None:
            metadata = torch.zeros(b, N_METADATA, device=dev)
            metadata_keep = torch.zeros(b, N_METADATA, dtype=torch.bool, device=dev)
        return self.metadata_encoder(metadata, metadata_keep)

    def encode(self, text_states: torch.Tensor, conditions: torch.Tensor | None = None,
               content_embeds: torch.Tensor | None = None, content_keep: torch.Tensor | None = None,
               metadata: torch.Tensor | None = None, metadata_keep: torch.Tensor | None = None,
               control_scale: float | Sequence[float] = 1.0, global_strength: float = 1.0,
               features: list[torch.Tensor] | None = None) -> CRSConditions:
        """Everything but the noisy sample: context, metadata vector and, unless every control scale is 0, the
        adapter's features of ``conditions`` (B, 18, H, W) (or the given ``features``)."""
        tokens = self.content_tokens(text_states, content_embeds, content_keep, global_strength)  # (B, K, D)
        meta = self.metadata_embedding(text_states, metadata, metadata_keep)  # (B, E)
        scales = control_scales(control_scale, self.adapter.num_residuals)
        if not any(s != 0.0 for s in scales):
            features = None
        elif features is None:
            if conditions is None:
                raise ValueError("the adapter needs the condition maps (B, 18, H, W) or their features")
            features = self.adapter.features(conditions)
        return CRSConditions(text_states, tokens, meta, features, scales)

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, conditions: CRSConditions,
                cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """Noise prediction (B, C, h, w) of one step: the adapter's residuals (if on) into the frozen UNet."""
        c = conditions
        ctx, meta = c.context, c.metadata.to(sample.dtype)  # (B, L + K, D), (B, E)
        down, mid = None, None
        if c.features is not None:
            down, mid = self.adapter(sample, timestep, ctx, None, meta, c.scales, features=c.features)
        return self.unet(sample, timestep, encoder_hidden_states=ctx, class_labels=meta,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, text_states: torch.Tensor,
                conditions: torch.Tensor | None = None, content_embeds: torch.Tensor | None = None,
                content_keep: torch.Tensor | None = None, metadata: torch.Tensor | None = None,
                metadata_keep: torch.Tensor | None = None, control_scale: float | Sequence[float] = 1.0,
                global_strength: float = 1.0) -> torch.Tensor:
        """Noise prediction (B, C, h, w); no condition maps = all maps dropped (zeros)."""
        if conditions is None:
            h, w = sample.shape[-2:]
            f = self.adapter.config.downscale
            conditions = torch.zeros(sample.shape[0], self.adapter.config.condition_channels, h * f, w * f,
                                     device=sample.device, dtype=sample.dtype)
        encoded = self.encode(text_states, conditions.to(sample.dtype), content_embeds, content_keep, metadata,
                              metadata_keep, control_scale, global_strength)
        return self.denoise(sample, timestep, encoded)


def trainable_parameter_counts(model: CRSDiffModel) -> dict[str, int]:
    """Parameters per trainable part (adapter copy, feature extractor, fusion blocks, metadata, content)."""
    a = model.adapter
    fusion = sum(p.numel() for n, p in a.named_parameters()
                 if re.search(r"resnets\.0\.norm[12]\.(gamma|beta|attn)", n) or n.startswith("feature_proj"))
    extractor = sum(p.numel() for p in a.extractor.parameters())
    total = sum(p.numel() for p in a.parameters())
    out = {"adapter copy": total - fusion - extractor, "fusion blocks": fusion, "feature extractor": extractor}
    if model.metadata_encoder is not None:
        out["metadata encoder"] = sum(p.numel() for p in model.metadata_encoder.parameters())
    if model.content_tokenizer is not None:
        out["content tokenizer"] = sum(p.numel() for p in model.content_tokenizer.parameters())
    return out


__all__ = [
    "NULL_CONDITIONS", "check_null_conditions", "zero_dropped", "AttnFeatureDenorm2d", "CRSConditions", "CRSDiffModel", "CRSLocalAdapter", "ContentTokenizer", "FDNResnetBlock2D",
    "FeatureDenorm2d", "LocalFeatureExtractor", "MetadataEncoder", "SpatialSelfAttention2d", "control_scales",
    "join_context", "load_frozen_unet", "metadata_sinusoids", "trainable_parameter_counts",
    "with_identity_class_embedding", "zero_module",
]


@torch.no_grad()
def fusion_maps(adapter: CRSLocalAdapter, sample: torch.Tensor, timestep: int, encoder_hidden_states: torch.Tensor,
                conditions: torch.Tensor, metadata_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What the first fusion block does: its input normalised without (``before``) and with (``after``) the
    condition features, and the features themselves; each reduced to one map (B, h, w) by the channel mean of
    absolute values. Only for "ff" / "aff" adapters."""
    block = next((m for m in adapter.modules() if isinstance(m, FeatureDenorm2d)), None)
    if block is None:
        raise ValueError("this adapter has no FF/AFF block (fusion 'sum'): nothing to show")
    seen: dict[str, torch.Tensor] = {}

    def hook(module: FeatureDenorm2d, args: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> None:
        x, f = args
        x = module.attn(x) if isinstance(module, AttnFeatureDenorm2d) else x
        seen.setdefault("before", module.norm(x).abs().mean(1))
        seen.setdefault("after", out.abs().mean(1))
        seen.setdefault("features", f.abs().mean(1))

    handle = block.register_forward_hook(hook)
    try:
        adapter(sample, timestep, encoder_hidden_states, conditions, metadata_emb)
    finally:
        handle.remove()
    return seen
