"""Presets (smoke | cpu | gpu | paper) as frozen dataclasses.

Every notebook resolves one preset with :func:`get_preset` and passes it to
the library. A preset only holds numbers and paths; no code reads global state.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

PRESET_NAMES = ("smoke", "cpu", "gpu", "paper")
REPO_ROOT = Path(__file__).resolve().parent.parent
FUSIONS = ("aff", "ff", "sum")  # crs.fusion: AFF (CRS-Diff), FF, plain sum (no fusion block)
CC_MODES = ("cc_diff", "no_bridge", "gligen")  # cc.mode: CC-Diff, without the context bridge, GLIGEN-style baseline


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """A ValueError naming the setting when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data set lives and how much of SynthRS to generate."""

    image_size: int = 64
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    seed: int = 0  # SynthRS's seed: which images the splits hold (training and sampling use the preset's seed)
    root: str = ""  # folder of a real data set in the record format; "" = SynthRS
    max_objects: int = 12  # boxes per image after padding


@dataclass(frozen=True)
class ClipConfig:
    """RS-CLIP: a small CLIPModel trained contrastively on captions (or a local folder at the paper preset)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    patch: int = 8
    projection_dim: int = 128
    max_length: int = 77
    steps: int = 800
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    augment: bool = True  # brightness / contrast jitter of the training images
    checkpoint_every: int = 250
    pretrained: str = ""  # local transformers CLIP folder (text and vision towers), e.g. clip-vit-large-patch14


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL: trained here at small presets, SD's from a local folder at the paper preset."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)  # len - 1 downsamplings: (32, 64, 64) -> f = 4
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 16
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6  # on the KL per latent value / pixel value, as in Stable Diffusion's autoencoder loss
    mse_weight: float = 1.0  # reconstruction loss: L1 + mse_weight * MSE
    # + edge_weight * L1 of the image gradients (neighbouring-pixel differences): thin roads and building
    # outlines are few pixels but many edges. 0 = Stable Diffusion's pixel loss (its perceptual and GAN terms
    # need pretrained networks)
    edge_weight: float = 0.0
    # weight of the pixels inside object boxes in the reconstruction terms (others: 1; 1 = Stable Diffusion's):
    # small objects (planes, courts) are a few % of the pixels and come out as blobs otherwise
    object_weight: float = 1.0
    crop_size: int = 0  # train on random crops of this side (0 = whole images); the model is fully convolutional
    mixed_precision: str = ""  # "" = the preset's; "bf16": autocast, which speeds up CPU convolutions
    warmup_steps: int = 50
    checkpoint_every: int = 250
    pretrained: str = ""  # local diffusers AutoencoderKL folder (or an SD folder with vae/)


@dataclass(frozen=True)
class UNetConfig:
    """The stage-one denoiser (UNet2DConditionModel) and its training and sampling knobs."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    heads: int = 4
    norm_groups: int = 16
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 0
    caption_dropout: float = 0.1
    timestep_sampling: str = "uniform"  # as crs.timestep_sampling: "uniform" (Stable Diffusion) | "cubic"
    x0_weight_max: float = 5.0  # as crs.x0_weight_max; 1 = plain noise MSE (Stable Diffusion)
    # offset noise (AdapterTimesteps), also used by the adapters trained on this UNet; 0 = Gaussian noise (Stable
    # Diffusion), with which stage one draws images far darker than real ones (docs/measurements.md)
    noise_offset: float = 0.1
    ema_decay: float | None = 0.999
    # "" = the preset's; "bf16": autocast (on CPU the loop keeps group norms in float32 and attention on its matmul
    # kernel: rslib.train.loop.cpu_bf16_kernels)
    mixed_precision: str = ""
    sample_steps: int = 25
    guidance_scale: float = 4.0
    eval_images: int = 0  # generated test images for notebook 02's measures (0: the whole test split)
    pretrained: str = ""  # local Stable Diffusion 1.x diffusers folder (paper preset)


@dataclass(frozen=True)
class CRSDiffConfig:
    """CRS-Diff stage two: sizes of the condition branch, its training, and notebook 03's evaluation."""

    # the record-format data set CRS-Diff trains and is measured on, with its condition maps (python -m rslib.data
    # conditions); "" = data.root, stage one's (the paper's stage-two data are not published; e.g. fMoW)
    data_root: str = ""
    stem_channels: tuple[int, ...] = (16, 32)  # feature-extractor stem; log2(VAE factor) entries
    inject_channels: tuple[int, ...] = (32, 64, 128)  # extractor features, one per UNet level
    metadata_dim: int = 64  # sinusoid size per metadata field (320 in the paper)
    content_tokens: int = 4  # context tokens from the content image
    fusion: str = "aff"  # aff | ff | sum (FUSIONS)
    # the maps training and sampling use (the others are zero maps); a subset trains on a data set that lacks
    # some, e.g. ("lines", "soft_edges", "sketch"), the three computed from pixels without models
    condition_maps: tuple[str, ...] = ("lines", "soft_edges", "sketch", "road", "depth", "segmentation")
    use_metadata: bool = True
    use_content: bool = True
    # the content image a training item is given: "self", its own image (Uni-ControlNet's rule; the content tokens
    # then learn to carry what the image looks like), or "record", the one its record names (another image of
    # its scene in SynthRS: it shares only the scene type with the item, which the caption already gives)
    content_source: str = "self"
    metadata_to_adapter: bool = True  # the metadata vector also enters the adapter's time embedding
    timestep_sampling: str = "cubic"  # "uniform" | "cubic": favour noisy steps, where layout is decided
    x0_weight_max: float = 20.0  # a sample's MSE weight: clamp(1/SNR(t), 1, this); 1 = plain noise MSE (paper)
    # loss weight of the latent cells the road map covers (others: 1; 1 = paper): roads are a few % of the loss
    road_loss_weight: float = 20.0
    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 20
    checkpoint_every: int = 200
    mixed_precision: str = ""  # as unet.mixed_precision
    sample_steps: int = 20
    guidance_scale: float = 4.0
    control_scale: float = 1.0
    map_guidance: bool = True  # CFG's unconditional branch sees no maps (False: the same maps, as CRS-Diff does)
    # CFG's unconditional branch keeps the metadata (as CRS-Diff does); False: every field dropped
    guidance_keeps_metadata: bool = False
    # what stands for a dropped content image or metadata field, in training and in CFG's unconditional branch:
    # "learned" null vectors, or "zero": a zero content embedding and zero metadata values through their encoders
    # (CRS-Diff has no learned nulls)
    null_conditions: str = "learned"
    negative_prompt: str = ""  # the unconditional branch's prompt (CRS-Diff: "Low resolution, cropped, ...")
    eval_images: int = 48  # generated test images per setting in notebook 03's table

    def __post_init__(self) -> None:
        _check_choice("crs.fusion", self.fusion, FUSIONS)


@dataclass(frozen=True)
class CCDiffConfig:
    """CC-Diff: sizes of the adapter (resamplers, context bridge, fusion modules), its references, training and
    notebook 04's evaluation. ``mode``: "cc_diff" | "no_bridge" (the background ignores the foreground) |
    "gligen" (GLIGEN-style gated self-attention over phrase + box tokens, no references)."""

    mode: str = "cc_diff"
    data_root: str = ""  # the data set CC-Diff trains and is measured on (DIOR-RSVG, DOTA); "" = data.root
    use_layout_attention: bool = True
    fusion_blocks: tuple[str, ...] = ("mid_block", "up_blocks.1")  # UNet blocks whose attn2 get a fusion module
    resampler_dim: int = 128
    resampler_depth: int = 1
    resampler_heads: int = 4
    resampler_dim_head: int = 32
    num_fg_queries: int = 4  # tokens per instance reference (16 in the paper)
    num_bg_queries: int = 4  # background queries (8)
    num_bridge_queries: int = 4  # context-bridge queries (8)
    ff_mult: int = 2
    fusion_heads: int = 4
    fusion_dim_head: int = 32
    box_hidden: int = 128
    max_instances: int = 8  # objects per image (the largest kept)
    # references
    image_encoder: str = "rs_clip"  # "rs_clip" (the RS-CLIP vision tower) | "dinov2" (a local Dinov2Model folder)
    dino_path: str = ""  # local transformers Dinov2Model folder (e.g. dinov2-large) when image_encoder = "dinov2"
    dino_size: int = 224  # DINOv2 input side (224 -> 16 x 16 patches + CLS = 257 tokens)
    bank_per_class: int = 64  # reference crops kept per class (the paper: the 200 largest)
    crop_margin: float = 0.15  # a crop is its box grown by this fraction of its size on each side
    sam_checkpoint: str = ""  # local SAM checkpoint (e.g. sam_vit_h_4b8939.pth): SAM-masked crops; "" = box crops
    fg_ref_grid: int = 2  # reference tokens: CLS + a grid x grid pooling of the patch tokens (0 = all tokens)
    bg_ref_grid: int = 4  # same for the retrieved background scene
    retrieval_pool: int = 0  # training images in the background retrieval index (0 = all)
    ref_dtype: str = "float32"  # how reference tokens are stored ("float16" halves the pipeline's size)
    # training
    steps: int = 250
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0  # AdamW's (1e-2 in the paper)
    warmup_steps: int = 20
    checkpoint_every: int = 100
    mixed_precision: str = ""  # as unet.mixed_precision
    timestep_sampling: str = "cubic"  # as crs.timestep_sampling: "uniform" (paper) | "cubic"
    x0_weight_max: float = 20.0  # as crs.x0_weight_max; 1 = plain noise MSE (paper)
    # loss weight of the latent cells the boxes cover (others: 1; 1 = paper): small objects are a few % of the loss
    object_loss_weight: float = 5.0
    # the caption a training step reads: "any" of the record's (drawn per step), or the "first" (the paper: the
    # global caption, which the DIOR-RSVG converter writes first; the referring expressions follow)
    caption: str = "any"
    instance_dropout: float = 0.1  # all instances of a sample dropped (caption-only generation)
    caption_dropout: float = 0.1  # caption replaced by ""
    # the frozen model the adapter is trained on: "" = this preset's stage one (notebook 02), else a local Stable
    # Diffusion 1.x diffusers folder, used as it is (the paper: SD 1.4) and never trained here
    base_model: str = ""
    # sampling and evaluation
    sampler: str = "ddim"  # "ddim" | "euler" (the paper's EulerDiscreteScheduler)
    sample_steps: int = 20
    guidance_scale: float = 4.0
    negative_prompt: str = ""  # the unconditional branch's prompt (the paper: "worst quality, low quality, ...")
    eval_images: int = 48  # generated test layouts per variant in notebook 04's table

    def __post_init__(self) -> None:
        _check_choice("cc.mode", self.mode, CC_MODES)


@dataclass(frozen=True)
class SegmenterConfig:
    """The small LoveDA-class segmentation network of the fidelity measures (trained on real images)."""

    channels: tuple[int, ...] = (32, 64, 128)  # per level; each further level halves the resolution
    norm: bool = False  # GroupNorm after every conv (off: half the CPU time, trains fine at these depths)
    patch: int = 1  # space-to-depth factor: layers run at 1/patch of the image resolution (patch^2 cheaper)
    crop_size: int = 0  # train on random crops of this side (0 = whole images); the network is fully convolutional
    mixed_precision: str = ""  # "" = the preset's; "bf16": autocast, which speeds up CPU convolutions
    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3


@dataclass(frozen=True)
class DetectorConfig:
    """The YOLOScore / trainability detector: torchvision FCOS on a small FPN backbone, trained from scratch, or
    (``kind="faster_rcnn_r50_fpn"``) torchvision's Faster R-CNN R50-FPN, the paper's trainability detector."""

    kind: str = "fcos_tiny"  # fcos_tiny | faster_rcnn_r50_fpn (channels, strides, fpn_channels, head_convs: FCOS only)
    # Faster R-CNN: local torchvision ResNet-50 ImageNet weights (resnet50-0676ba61.pth), "" = from scratch
    backbone_weights: str = ""
    channels: tuple[int, ...] = (32, 64, 128)  # backbone stages, one per FPN level
    strides: tuple[int, ...] = (2, 4, 8)  # of each level on the network input (powers of two, doubling)
    fpn_channels: int = 48
    head_convs: int = 1  # conv layers per FCOS head branch (4 in the FCOS paper)
    # box distances: softplus keeps every regression output trainable; torchvision's relu can die on small data
    box_activation: str = "softplus"  # softplus | relu
    input_size: int = 0  # images are resized to this side inside the model (0 = keep the image size)
    min_box_px: float = 2.0  # boxes smaller (sqrt of area, image pixels) are ignore regions: not learned, not scored
    steps: int = 500
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass(frozen=True)
class EvalConfig:
    """The measuring instruments: at the small presets models trained here (RS-CLIP, the project's detector),
    at the paper preset the papers' own, each from a local file ("" = the small presets' instrument)."""

    # torch-fidelity's InceptionV3 FID weights: FID and Inception Score as both papers measure them
    inception_weights: str = ""
    # transformers CLIP folder (clip-vit-large-patch14): CRS-Diff's CLIPScore, clamped at 0 as torchmetrics does
    clip_score_folder: str = ""
    # open_clip checkpoint file and model name: CC-Diff's CLIPScore (raw cosine x 100, global and local)
    open_clip_checkpoint: str = ""
    open_clip_model: str = "ViT-L-14"  # or the path of an open_clip model config JSON
    # ultralytics YOLOv8 model trained on the real training split: CC-Diff's YOLOScore. Needs the optional
    # ``yolo`` extra (pip install ultralytics); without it the project's detector scores, labelled as such
    yolo_weights: str = ""


@dataclass(frozen=True)
class Preset:
    """One named preset: every knob a notebook needs, resolved once."""

    name: str
    seed: int = 0  # training and sampling (initial weights, batches, noise); the data has its own, data.seed
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    crs: CRSDiffConfig = field(default_factory=CRSDiffConfig)
    cc: CCDiffConfig = field(default_factory=CCDiffConfig)
    seg: SegmenterConfig = field(default_factory=SegmenterConfig)
    det: DetectorConfig = field(default_factory=DetectorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # "no" | "bf16" (autocast; "bf16" on GPU). The autoencoder, stage one, CRS-Diff, CC-Diff and the segmenter can set
    # their own (vae., unet., crs., cc., seg.mixed_precision); the text encoder and the detector use this
    mixed_precision: str = "no"
    lr_decay: str = "cosine"  # LR after warm-up in every stage: "cosine" (to 0 at the last step) | "constant"
    runs_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | mps
    num_workers: int = 0

    def run_dir(self, stage: str) -> Path:
        """Folder of one stage's artifact, e.g. runs/cpu/stage_one."""
        return resolve_path(self.runs_dir) / self.name / stage

    def data_run_dir(self, stage: str) -> Path:
        """Folder of an instrument trained on this configuration's data set (the segmenter, the detector):
        runs/<preset>/<stage> on SynthRS, runs/<preset>/<stage>_<data folder name> on a real one, so that each
        paper's data set keeps its own."""
        return self.run_dir(f"{stage}_{resolve_path(self.data.root).name}" if self.data.root else stage)

    def stage_data(self, part: str) -> "Preset":
        """This preset with ``<part>.data_root`` ("crs" or "cc") as its data set, where that is set: each paper's
        second stage may train on another data set than stage one and RS-CLIP (``data.root``)."""
        root = getattr(self, part).data_root
        return replace(self, data=replace(self.data, root=root)) if root and root != self.data.root else self

    def synthrs_dir(self) -> Path:
        """Folder of the SynthRS splits for this preset's image size and seed."""
        return REPO_ROOT / "data" / "synthrs" / f"{self.data.image_size}px_seed{self.data.seed}"

    def data_dir(self) -> Path:
        """Folder holding the train/val/test splits (SynthRS or a real data set)."""
        return resolve_path(self.data.root) if self.data.root else self.synthrs_dir()

    def figures_dir(self) -> Path:
        """Where notebooks save figures: figures/ for the cpu preset (the committed gallery), else runs/<preset>/figures."""
        return REPO_ROOT / "figures" if self.name == "cpu" else self.run_dir("figures")

    def split_sizes(self) -> dict[str, int]:
        """Number of SynthRS images per split."""
        return {"train": self.data.n_train, "val": self.data.n_val, "test": self.data.n_test}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for printing and for saving next to artifacts)."""
        return asdict(self)


def resolve_path(path: str | os.PathLike) -> Path:
    """Relative paths are taken from the repository root, so notebooks run from anywhere."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


_PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        data=DataConfig(image_size=32, n_train=48, n_val=16, n_test=16, max_objects=8),
        clip=ClipConfig(hidden=32, layers=1, heads=2, vision_hidden=32, vision_layers=1, vision_heads=2,
                        projection_dim=32, steps=4, batch_size=16),
        vae=VAEConfig(block_out_channels=(16, 32, 32), norm_groups=8, steps=4, batch_size=8),
        unet=UNetConfig(block_out_channels=(16, 32, 32), heads=2, norm_groups=8, steps=4, batch_size=8,
                        ema_decay=0.9, sample_steps=3),
        crs=CRSDiffConfig(stem_channels=(8, 16), inject_channels=(16, 32, 32), metadata_dim=16, steps=4,
                          batch_size=8, warmup_steps=0, sample_steps=3, eval_images=4),
        cc=CCDiffConfig(resampler_dim=16, resampler_heads=2, resampler_dim_head=8, num_fg_queries=2,
                        num_bg_queries=2, num_bridge_queries=2, fusion_heads=2, fusion_dim_head=8, box_hidden=16,
                        max_instances=4, bank_per_class=4, fg_ref_grid=1, bg_ref_grid=2, steps=4, batch_size=8,
                        warmup_steps=0, checkpoint_every=2, sample_steps=3, eval_images=4),
        seg=SegmenterConfig(channels=(8, 16), steps=4, batch_size=8),
        det=DetectorConfig(channels=(8, 16), strides=(2, 4), fpn_channels=16, steps=4, batch_size=4, warmup_steps=0),
    ),
    "cpu": Preset(
        name="cpu",
        data=DataConfig(image_size=64, n_train=4000, n_val=400, n_test=400),
        # the measurements behind each setting below: docs/measurements.md
        clip=ClipConfig(max_length=32, patch=16, steps=300),  # captions fit in 32 tokens; 16-px patches are cheap
        # edges keep thin roads; kl_weight 3e-3 lets the decoder tolerate the noisy latents stage one draws
        vae=VAEConfig(crop_size=32, steps=2000, mixed_precision="bf16", edge_weight=3.0, kl_weight=3e-3),
        unet=UNetConfig(steps=2000, guidance_scale=2.0),  # fewer steps cost CRS-Diff its map following
        crs=CRSDiffConfig(lr=1e-3, steps=1500),  # maps followed far better than after 600 or 1000 steps
        # batch 16 halves the time; 750 steps beat 250 and 500; 200 layouts: at 48 the mAP50 (a mean over 8
        # classes) rested on 2 ground track fields
        cc=CCDiffConfig(batch_size=16, steps=750, eval_images=200),
        seg=SegmenterConfig(crop_size=32, steps=900),  # crops: 5.6x cheaper a step; fp32 (the measuring instrument)
        det=DetectorConfig(),
    ),
    "gpu": Preset(
        name="gpu",
        data=DataConfig(image_size=256, n_train=20000, n_val=1000, n_test=1000, max_objects=24),
        clip=ClipConfig(hidden=256, layers=6, heads=8, vision_hidden=256, vision_layers=6, vision_heads=8, patch=16,
                        projection_dim=256, steps=4000, batch_size=256),
        vae=VAEConfig(block_out_channels=(64, 128, 256, 256), steps=8000, batch_size=32),
        unet=UNetConfig(block_out_channels=(128, 256, 384, 384), attention_levels=(False, True, True, True),
                        layers_per_block=2, heads=8, norm_groups=32, steps=20000, batch_size=64, lr=1e-4,
                        sample_steps=50, guidance_scale=7.5),
        crs=CRSDiffConfig(stem_channels=(32, 64, 128), inject_channels=(128, 256, 384, 384), metadata_dim=128,
                          steps=10000, batch_size=64, lr=1e-4, warmup_steps=200, checkpoint_every=1000,
                          sample_steps=50, guidance_scale=7.5, eval_images=500),
        cc=CCDiffConfig(resampler_dim=384, resampler_depth=2, resampler_heads=6, resampler_dim_head=64,
                        num_fg_queries=8, num_bg_queries=4, num_bridge_queries=4, ff_mult=4, fusion_heads=8,
                        fusion_dim_head=48, box_hidden=256, max_instances=12, bank_per_class=128, fg_ref_grid=4,
                        bg_ref_grid=8, retrieval_pool=5000, ref_dtype="float16", steps=8000, batch_size=32,
                        lr=1e-4, warmup_steps=200, checkpoint_every=1000, sample_steps=50, guidance_scale=7.5,
                        eval_images=500),
        seg=SegmenterConfig(channels=(32, 64, 128, 256), steps=4000, batch_size=32, lr=1e-3),
        det=DetectorConfig(channels=(32, 64, 128, 256), strides=(4, 8, 16, 32), fpn_channels=96, head_convs=2,
                           min_box_px=3.0, steps=4000, batch_size=32, lr=1e-3, warmup_steps=200),
        mixed_precision="bf16",
        num_workers=4,
    ),
    "paper": Preset(
        name="paper",
        data=DataConfig(image_size=512, n_train=0, n_val=0, n_test=0, max_objects=24),
        clip=ClipConfig(hidden=768, layers=12, heads=12, vision_hidden=1024, vision_layers=24, vision_heads=16,
                        patch=14, projection_dim=768, steps=0, pretrained="weights/clip-vit-large-patch14"),
        vae=VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_groups=32, steps=0,
                      pretrained="weights/stable-diffusion-v1-5"),
        unet=UNetConfig(block_out_channels=(320, 640, 1280, 1280), attention_levels=(True, True, True, False),
                        layers_per_block=2, heads=8, norm_groups=32, steps=50000, batch_size=4, lr=1e-5,
                        caption_dropout=0.1, x0_weight_max=1.0, noise_offset=0.0, ema_decay=None, sample_steps=50,
                        guidance_scale=7.5, pretrained="weights/stable-diffusion-v1-5"),
        crs=CRSDiffConfig(stem_channels=(32, 64, 128), inject_channels=(192, 256, 384, 512), metadata_dim=320,
                          steps=100000, batch_size=4, lr=1e-5, warmup_steps=0, checkpoint_every=500,
                          sample_steps=50, guidance_scale=7.5, eval_images=1000, timestep_sampling="uniform",
                          x0_weight_max=1.0, road_loss_weight=1.0, metadata_to_adapter=False, map_guidance=False,
                          guidance_keeps_metadata=True, null_conditions="zero",
                          negative_prompt="Low resolution, cropped, worst quality, low quality"),
        cc=CCDiffConfig(resampler_dim=1280, resampler_depth=4, resampler_heads=20, resampler_dim_head=64,
                        num_fg_queries=16, num_bg_queries=8, num_bridge_queries=8, ff_mult=4, fusion_heads=8,
                        fusion_dim_head=160, box_hidden=512, max_instances=6, image_encoder="dinov2",
                        dino_path="weights/dinov2-large", bank_per_class=200, crop_margin=0.0,
                        sam_checkpoint="weights/sam_vit_h_4b8939.pth", fg_ref_grid=0,
                        bg_ref_grid=0, retrieval_pool=5000, ref_dtype="float16", steps=30000, batch_size=1,
                        grad_accum=40, lr=1e-4, weight_decay=1e-2, warmup_steps=0, checkpoint_every=300,
                        instance_dropout=0.0, timestep_sampling="uniform", x0_weight_max=1.0, object_loss_weight=1.0,
                        caption="first", caption_dropout=0.0, base_model="weights/stable-diffusion-v1-4",
                        sampler="euler", sample_steps=50, guidance_scale=7.5,
                        negative_prompt="worst quality, low quality, bad anatomy, watermark, text, blurry",
                        eval_images=1000),
        seg=SegmenterConfig(channels=(64, 128, 256, 512), steps=20000, batch_size=16, lr=1e-3),
        det=DetectorConfig(kind="faster_rcnn_r50_fpn", backbone_weights="weights/resnet50-0676ba61.pth",
                           channels=(64, 128, 256, 512), strides=(8, 16, 32, 64), fpn_channels=128, head_convs=4,
                           input_size=800, min_box_px=0.0, steps=30000, batch_size=16, lr=1e-3, warmup_steps=500),
        eval=EvalConfig(inception_weights="weights/pt_inception-2015-12-05-6726825d.pth",
                        clip_score_folder="weights/clip-vit-large-patch14",
                        open_clip_checkpoint="weights/CLIP-ViT-L-14-laion2B-s32B-b82K/open_clip_pytorch_model.bin",
                        yolo_weights="weights/yolov8n-dior-rsvg.pt"),
        mixed_precision="bf16",
        lr_decay="constant",
        num_workers=8,
    ),
}


def get_preset(name: str | None = None, **overrides: Any) -> Preset:
    """Return the named preset (default: $RSLIB_PRESET or "cpu"), with top-level or
    dotted overrides, e.g. ``get_preset("cpu", **{"data.seed": 3})``."""
    name = name or os.environ.get("RSLIB_PRESET", "cpu")
    if name not in _PRESETS:
        raise ValueError(
            f"unknown preset {name!r}: choose one of {', '.join(PRESET_NAMES)} "
            f"(set it in the notebook's parameters cell or with RSLIB_PRESET)"
        )
    return with_overrides(_PRESETS[name], overrides)


def with_overrides(cfg: Preset, overrides: Mapping[str, Any]) -> Preset:
    """``cfg`` with settings replaced by dotted key, as ``--set`` and a notebook's ``overrides`` give them, e.g.
    ``with_overrides(cfg, {"crs.fusion": "ff", "crs.steps": 250})``."""
    for key, value in overrides.items():
        cfg = _override(cfg, key.split("."), value)
    return cfg


def _override(obj: Any, keys: list[str], value: Any) -> Any:
    head, *rest = keys
    if not hasattr(obj, head):
        raise ValueError(f"preset has no field {head!r} (fields: {', '.join(asdict(obj))})")
    old = getattr(obj, head)
    if not rest and isinstance(old, tuple) and isinstance(value, list):  # JSON (papermill, --set) has no tuples
        value = tuple(value)
    new = _override(old, rest, value) if rest else value
    return replace(obj, **{head: new})


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["crs.steps=250", "data.root=data/rsicd"]`` as ``{"crs.steps": 250, "data.root": "data/rsicd"}``: each value
    read as a Python literal where it is one, else kept as text (a path). A ValueError names a pair without ``=``."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE pairs, got {item!r}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def flat_settings(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting of a preset (or of one of its parts) by dotted key, e.g. ``{"crs.steps": 600, ...}``."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        out.update(flat_settings(value, key + ".") if is_dataclass(value) else {key: value})
    return out


def diff_from_preset(cfg: Preset) -> dict[str, tuple[Any, Any]]:
    """The settings of ``cfg`` that differ from its named preset: ``{dotted key: (preset's value, cfg's value)}``."""
    own, mine = flat_settings(_PRESETS[cfg.name]), flat_settings(cfg)
    return {k: (own[k], v) for k, v in mine.items() if own[k] != v}


def describe_overrides(cfg: Preset) -> str:
    """One line: the preset's name and how ``cfg`` differs from it (what a notebook's parameters changed)."""
    changed = diff_from_preset(cfg)
    if not changed:
        return f"preset {cfg.name}, as defined in rslib/config.py"
    return f"preset {cfg.name} with " + ", ".join(f"{k}={new!r} (preset: {old!r})" for k, (old, new) in changed.items())
