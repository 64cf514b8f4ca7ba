"""Condition maps for real images: edge-like maps, model-based maps, the stacked model input."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from rslib.data.conditions import (
    LOVEDA_CLASSES,
    LOVEDA_PALETTE,
    MODEL_KINDS,
    ConditionModel,
    detect_segments,
    draw_segments,
    extract_conditions,
    line_segments,
    rgb_to_seg,
    seg_to_rgb,
    sketch,
    soft_edges,
    stack_conditions,
)
from rslib.data.formats import CONDITION_NAMES

# torch.jit is deprecated in recent torch, but TorchScript files are one of the accepted model formats
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

# ---------------------------------------------------------------------------
# synthetic images
# ---------------------------------------------------------------------------

Y0, Y1, X0, X1 = 16, 48, 20, 44  # the square occupies rows Y0..Y1-1, columns X0..X1-1


def square_image(size: int = 64, fg: int = 50, bg: int = 200) -> np.ndarray:
    img = np.full((size, size, 3), bg, np.uint8)
    img[Y0:Y1, X0:X1] = fg
    return img


def gradient_image(size: int = 64, axis: int = 1) -> np.ndarray:
    ramp = np.linspace(0, 255, size).round().astype(np.uint8)
    g = np.broadcast_to(ramp[None, :] if axis == 1 else ramp[:, None], (size, size))
    return np.repeat(g[..., None], 3, axis=2).copy()


def border_distance(size: int = 64) -> np.ndarray:
    """Distance of each pixel centre to the square's outline (which runs between pixels)."""
    yy, xx = np.mgrid[:size, :size].astype(float)
    top, bottom, left, right = Y0 - 0.5, Y1 - 0.5, X0 - 0.5, X1 - 0.5
    horizontal = [np.hypot(np.clip(xx, left, right) - xx, yy - c) for c in (top, bottom)]
    vertical = [np.hypot(np.clip(yy, top, bottom) - yy, xx - c) for c in (left, right)]
    return np.minimum.reduce(horizontal + vertical)


def on_border(mask: np.ndarray, tol: float = 1.0) -> bool:
    return bool((border_distance(mask.shape[0])[mask > 0] <= tol).all())


# ---------------------------------------------------------------------------
# palette
# ---------------------------------------------------------------------------


def test_seg_rgb_round_trip():
    labels = np.random.default_rng(0).integers(0, len(LOVEDA_CLASSES), (17, 23)).astype(np.uint8)
    rgb = seg_to_rgb(labels)
    assert rgb.shape == (17, 23, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb_to_seg(rgb), labels)
    # slightly perturbed colours (e.g. after JPEG) still map to the nearest class
    noisy = np.clip(rgb.astype(int) + np.random.default_rng(1).integers(-12, 13, rgb.shape), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb_to_seg(noisy), labels)


# ---------------------------------------------------------------------------
# soft edges
# ---------------------------------------------------------------------------


def test_soft_edges_high_on_border_low_in_flat_regions():
    img = square_image()
    e = soft_edges(img)
    assert e.shape == (64, 64) and e.dtype == np.uint8
    d = border_distance()
    assert e[d <= 1].mean() > 150  # on the border
    assert e[d >= 12].max() < 10  # flat regions far from it
    assert e[d <= 1].min() > e[d >= 6].max()  # decreasing away from the edge
    assert len(np.unique(e)) > 10  # soft, not binary
    assert soft_edges(np.full((32, 32, 3), 90, np.uint8)).max() == 0


def test_soft_edges_sees_colour_edges_of_equal_luminance():
    img = np.zeros((48, 48, 3), np.uint8)
    img[:, :24] = (200, 60, 60)
    img[:, 24:] = (60, 130, 60)
    grey = img.astype(float) @ (0.299, 0.587, 0.114)
    assert abs(grey[0, 0] - grey[0, -1]) < 5  # nearly the same brightness
    e = soft_edges(img)
    assert e[:, 22:26].mean() > 150 and e[:, :10].max() < 10


# ---------------------------------------------------------------------------
# sketch
# ---------------------------------------------------------------------------


def test_sketch_is_binary_thin_and_on_the_border():
    s = sketch(square_image())
    assert s.shape == (64, 64) and s.dtype == np.uint8
    assert set(np.unique(s)) == {0, 255}
    assert on_border(s)
    white = s > 0
    # thin: a line crosses each side once, and there is no 2x2 white block
    assert white[32].sum() == 2 and white[:, 32].sum() == 2
    assert not (white[:-1, :-1] & white[1:, :-1] & white[:-1, 1:] & white[1:, 1:]).any()
    # the whole outline is there
    assert white.sum() >= 2 * ((Y1 - Y0) + (X1 - X0)) - 8


def test_sketch_is_empty_on_flat_and_smooth_images():
    assert sketch(np.full((40, 40, 3), 123, np.uint8)).max() == 0
    assert sketch(gradient_image()).max() == 0


# ---------------------------------------------------------------------------
# line segments
# ---------------------------------------------------------------------------


def test_draw_segments():
    m = draw_segments(np.array([[2, 3, 9, 3], [5, 0, 5, 100]], np.float32), (10, 12))
    assert m.shape == (10, 12) and m.dtype == np.uint8
    expected = np.zeros((10, 12), np.uint8)
    expected[3, 2:10] = 255
    expected[:, 5] = 255  # clipped to the image
    np.testing.assert_array_equal(m, expected)
    assert draw_segments(np.zeros((0, 4)), (5, 6)).max() == 0


@pytest.mark.parametrize("method", ["lsd", "hough"])
def test_line_segments_find_the_sides_of_a_rectangle(method):
    img = square_image()
    m = line_segments(img, method=method)
    assert m.shape == (64, 64) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    assert on_border(m)  # every white pixel lies on the rectangle's border
    white = m > 0
    # each side is found along most of its length (within 1 px of the boundary)
    sides = [white[Y0 - 1:Y0 + 1, X0:X1].any(0), white[Y1 - 1:Y1 + 1, X0:X1].any(0),
             white[Y0:Y1, X0 - 1:X0 + 1].any(1), white[Y0:Y1, X1 - 1:X1 + 1].any(1)]
    for side in sides:
        assert side.mean() > 0.6
    segs = detect_segments(img, method=method)
    assert segs.shape[1] == 4 and segs.dtype == np.float32
    dx, dy = np.abs(segs[:, 2] - segs[:, 0]), np.abs(segs[:, 3] - segs[:, 1])
    assert (np.minimum(dx, dy) <= 1.5).all()  # axis-aligned


@pytest.mark.parametrize("method", ["lsd", "hough"])
def test_line_segments_ignore_smooth_gradients_and_short_segments(method):
    for axis in (0, 1):
        assert line_segments(gradient_image(axis=axis), method=method).max() == 0
    img = square_image()  # sides of 24 and 32 px
    assert line_segments(img, min_length=0.6, method=method).max() == 0  # 0.6 x 64 px = 38 px
    assert len(detect_segments(img, min_length=12, method=method)) >= 4  # an absolute length in pixels


def test_line_segments_follow_a_diagonal_bar():
    img = np.full((64, 64, 3), 210, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    img[np.abs(yy - xx) <= 3] = 30
    segs = detect_segments(img)
    assert len(segs) >= 2
    angle = np.degrees(np.arctan2(segs[:, 3] - segs[:, 1], segs[:, 2] - segs[:, 0])) % 180
    assert np.all(np.abs(angle - 45) < 5)
    length = np.hypot(segs[:, 2] - segs[:, 0], segs[:, 3] - segs[:, 1])
    assert length.max() > 40


def test_edge_maps_keep_size_on_non_square_images():
    img = np.random.default_rng(0).integers(0, 256, (40, 72, 3)).astype(np.uint8)
    for fn in (soft_edges, sketch, line_segments):
        out = fn(img)
        assert out.shape == (40, 72) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="uint8"):
        soft_edges(img.astype(np.float32))
    with pytest.raises(ValueError, match="RGB"):
        sketch(img[..., 0])


# ---------------------------------------------------------------------------
# stacked model input
# ---------------------------------------------------------------------------


def constant_maps(h: int = 8, w: int = 10) -> dict[str, np.ndarray]:
    maps = {name: np.full((h, w), 10 * (i + 1), np.uint8) for i, name in enumerate(CONDITION_NAMES[:-1])}
    maps["segmentation"] = np.broadcast_to(np.array([255, 195, 128], np.uint8), (h, w, 3)).copy()
    return maps


def test_stack_conditions_shape_order_and_missing_maps():
    maps = constant_maps()
    x = stack_conditions(maps)
    assert x.shape == (18, 8, 10) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    for i, name in enumerate(CONDITION_NAMES[:-1]):
        np.testing.assert_allclose(x[3 * i:3 * i + 3], 10 * (i + 1) / 255.0)  # grey replicated
    np.testing.assert_allclose(x[15:18, 0, 0], np.array([255, 195, 128]) / 255.0)  # RGB order
    del maps["sketch"]
    maps["depth"] = None
    y = stack_conditions(maps)
    assert y.shape == (18, 8, 10)
    assert (y[6:9] == 0).all() and (y[12:15] == 0).all()  # dropped conditions are zeros
    np.testing.assert_array_equal(y[:6], x[:6])
    z = stack_conditions(maps, names=("road", "segmentation"))
    assert z.shape == (6, 8, 10)
    np.testing.assert_array_equal(z, x[9:12].tolist() + x[15:18].tolist())


def test_stack_conditions_resizes_per_kind():
    maps = {name: np.zeros((64, 64), np.uint8) for name in ("lines", "soft_edges", "road")}
    maps["lines"][:, 21] = 255  # a 1-px line on an odd column
    maps["soft_edges"][:] = np.linspace(0, 255, 64).astype(np.uint8)[None]
    maps["road"][:, 30:40] = 255
    labels = np.zeros((64, 64), np.uint8)
    labels[:, 32:] = 3
    maps["segmentation"] = seg_to_rgb(labels)
    x = stack_conditions(maps, size=32)
    assert x.shape == (18, 32, 32)
    assert set(np.unique(x[0:3])) == {0.0, 1.0} and x[0, :, 10].all()  # the thin line survives
    assert len(np.unique(x[3])) > 10  # soft map interpolated
    assert set(np.unique(x[9:12])) == {0.0, 1.0}  # road stays binary
    seg = (x[15:18].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert {tuple(c) for c in seg.reshape(-1, 3)} == {tuple(LOVEDA_PALETTE[0]), tuple(LOVEDA_PALETTE[3])}
    assert stack_conditions({"depth": np.zeros((4, 4), np.uint8)}, size=(16, 8)).shape == (18, 16, 8)


def test_stack_conditions_errors():
    with pytest.raises(ValueError, match="size"):
        stack_conditions({"lines": np.zeros((8, 8), np.uint8), "road": np.zeros((4, 4), np.uint8)})
    with pytest.raises(ValueError, match="size"):
        stack_conditions({})
    assert stack_conditions({}, size=4).shape == (18, 4, 4)


# ---------------------------------------------------------------------------
# model-based maps
# ---------------------------------------------------------------------------


class TinyHead(nn.Module):
    """A 1x1 conv with fixed weights on a half-resolution image: logits from brightness."""

    def __init__(self, weight: list[list[float]], bias: list[float]):
        super().__init__()
        self.conv = nn.Conv2d(3, len(bias), 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(weight).view(len(bias), 3, 1, 1))
            self.conv.bias.copy_(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.avg_pool2d(x, 2))  # (B, C, H/2, W/2)


HEADS = {
    # channel 1 ("road") wins where the image is bright
    "road": ([[0.0] * 3, [1.0] * 3], [0.0, -2.25]),
    # depth = brightness
    "depth": ([[1.0] * 3], [0.0]),
    # three classes: dark -> 0, mid -> 1, bright -> 2
    "segmentation": ([[-1.0] * 3, [0.0] * 3, [1.0] * 3], [1.0, 0.0, -1.9]),
}


def three_level_image() -> np.ndarray:
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, 16:32] = 128
    img[:, 32:] = 255
    return img


def save_script(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.pt"
    torch.jit.script(TinyHead(*HEADS[kind])).save(str(path))
    return str(path)


def check_maps(road: np.ndarray, depth: np.ndarray, seg: np.ndarray) -> None:
    assert road.shape == (32, 48) and road.dtype == np.uint8
    assert (road[:, :30] == 0).all() and (road[:, 34:] == 255).all()
    assert depth.shape == (32, 48) and depth.dtype == np.uint8
    assert depth.min() == 0 and depth.max() == 255 and depth[0, 0] < depth[0, 24] < depth[0, 40]
    assert seg.shape == (32, 48, 3) and seg.dtype == np.uint8
    labels = rgb_to_seg(seg)
    assert labels[0, 4] == LOVEDA_CLASSES.index("water")
    assert labels[0, 24] == LOVEDA_CLASSES.index("forest")
    assert labels[0, 44] == LOVEDA_CLASSES.index("building")


LABEL_MAP = {0: "water", 1: "forest", 2: 1}


def test_condition_model_from_torchscript(tmp_path):
    img = three_level_image()
    road = ConditionModel.load("road", save_script(tmp_path, "road"))(img)
    depth = ConditionModel.load("depth", save_script(tmp_path, "depth"))(img)
    seg_model = ConditionModel.load("segmentation", save_script(tmp_path, "segmentation"), label_map=LABEL_MAP)
    check_maps(road, depth, seg_model(img))
    # without a label map, class ids are LoveDA ids
    plain = rgb_to_seg(ConditionModel.load("segmentation", save_script(tmp_path, "segmentation"))(img))
    assert plain[0, 4] == 0 and plain[0, 24] == 1 and plain[0, 44] == 2


def test_condition_model_from_callables():
    img = three_level_image()
    heads = {k: TinyHead(*v).eval() for k, v in HEADS.items()}

    def depth_numpy(x: torch.Tensor) -> np.ndarray:  # (B, H, W) depth as an array
        return heads["depth"](x)[:, 0].numpy()

    def road_prob(x: torch.Tensor) -> torch.Tensor:  # one channel, a probability
        return x.mean(1, keepdim=True)

    road = ConditionModel("road", heads["road"])(img)
    depth = ConditionModel("depth", depth_numpy)(img)
    seg = ConditionModel("segmentation", heads["segmentation"], label_map=[3, 5, 1])(img)
    check_maps(road, depth, seg)
    np.testing.assert_array_equal(ConditionModel("road", road_prob, threshold=0.75)(img), road)
    inverted = ConditionModel("depth", depth_numpy, invert_depth=True)(img)
    assert inverted[0, 0] == 255 and inverted[0, 40] == 0
    assert ConditionModel("depth", lambda x: torch.ones(1, 1, 4, 4))(img).max() == 0  # flat depth
    many = ConditionModel("segmentation", lambda x: torch.randn(1, 9, 8, 8))
    with pytest.raises(ValueError, match="label_map"):
        many(img)
    with pytest.raises(TypeError, match="callable"):
        ConditionModel("road", "not callable")


def test_condition_model_errors_name_condition_path_and_fix(tmp_path):
    missing = tmp_path / "no_such_model"
    empty = tmp_path / "empty"
    empty.mkdir()
    for kind in MODEL_KINDS:
        for path in (None, "", missing, empty):
            with pytest.raises(FileNotFoundError) as err:
                ConditionModel.load(kind, path)
            msg = str(err.value)
            assert f"{kind} maps need" in msg and f"{kind}_model=" in msg and "data/README.md" in msg
            if path:
                assert str(path) in msg
    assert "road-extraction model" in str(pytest.raises(FileNotFoundError, ConditionModel.load, "road", missing).value)
    with pytest.raises(ValueError, match="road, depth, segmentation"):
        ConditionModel.load("edges", missing)
    with pytest.raises(ValueError, match="road, depth, segmentation"):
        ConditionModel("edges", lambda x: x)
    not_script = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, not_script)
    with pytest.raises(ValueError, match="TorchScript"):
        ConditionModel.load("depth", not_script)


def test_extract_conditions(tmp_path):
    img = square_image()
    with pytest.raises(FileNotFoundError) as err:
        extract_conditions(img)
    msg = str(err.value)
    assert "road maps need a road-extraction model" in msg and "road_model=" in msg and "skip_missing" in msg
    maps = extract_conditions(img, skip_missing=True)
    assert tuple(maps) == ("lines", "soft_edges", "sketch")
    np.testing.assert_array_equal(maps["sketch"], sketch(img))
    heads = {k: TinyHead(*v).eval() for k, v in HEADS.items()}
    maps = extract_conditions(img, road_model=heads["road"],
                              depth_model=ConditionModel.load("depth", save_script(tmp_path, "depth")),
                              segmentation_model=save_script(tmp_path, "segmentation"))
    assert tuple(maps) == CONDITION_NAMES
    for name, m in maps.items():
        assert m.dtype == np.uint8 and m.shape[:2] == (64, 64)
        assert m.ndim == (3 if name == "segmentation" else 2)
    x = stack_conditions(maps)
    assert x.shape == (18, 64, 64)
    with pytest.raises(FileNotFoundError, match="depth maps need"):
        extract_conditions(img, road_model=heads["road"], depth_model=tmp_path / "nowhere", skip_missing=True)
    with pytest.raises(ValueError, match="'depth' ConditionModel"):
        extract_conditions(img, road_model=ConditionModel("depth", heads["depth"]))


# ---------------------------------------------------------------------------
# transformers model folders
# ---------------------------------------------------------------------------


def tiny_segformer(labels: list[str]):
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 1],
        patch_sizes=[3, 3], strides=[2, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    return transformers.SegformerForSemanticSegmentation(config).eval()


def test_transformers_segmentation_folder(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3)).astype(np.uint8)
    road_dir = tmp_path / "road"
    tiny_segformer(["background", "road"]).save_pretrained(road_dir)
    (road_dir / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    road_model = ConditionModel.load("road", road_dir)
    assert road_model.road_channel == 1  # found by its label name
    road = road_model(img)
    assert road.shape == (40, 56) and road.dtype == np.uint8 and set(np.unique(road)) <= {0, 255}

    seg_dir = tmp_path / "seg"
    tiny_segformer(["water", "forest", "building"]).save_pretrained(seg_dir)
    seg = ConditionModel.load("segmentation", seg_dir)(img)  # label names map to LoveDA ids
    assert seg.shape == (40, 56, 3)
    found = set(np.unique(rgb_to_seg(seg)))
    assert found and found <= {LOVEDA_CLASSES.index(n) for n in ("water", "forest", "building")}
    maps = extract_conditions(img, road_model=str(road_dir), segmentation_model=seg_dir, skip_missing=True)
    assert tuple(maps) == ("lines", "soft_edges", "sketch", "road", "segmentation")
    np.testing.assert_array_equal(maps["road"], road)


def test_transformers_depth_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.DPTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_in_index=-1,
        is_hybrid=False)
    torch.manual_seed(0)
    model = transformers.DPTForDepthEstimation(config).eval()
    with torch.no_grad():  # the default init is so small that the depth is flat: widen it
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.3)
        model.head.head[4].bias.fill_(1.0)
    model.save_pretrained(tmp_path / "dpt")
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3)).astype(np.uint8)
    depth = ConditionModel.load("depth", tmp_path / "dpt")(img)  # resized to the model's 32 x 32 and back
    assert depth.shape == (40, 56) and depth.dtype == np.uint8
    assert depth.min() == 0 and depth.max() == 255
    with pytest.raises(FileNotFoundError, match="config.json"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "notes.txt").write_text("x")
        ConditionModel.load("depth", tmp_path / "junk")
