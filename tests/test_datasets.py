"""Torch datasets: tensors, padding, metadata normalisation, the condition-dropout policy."""
import numpy as np
import pytest
import torch

from rslib.data.datasets import (ConditionDropout, RSDataset, collate, denormalise_metadata, normalise_metadata,
                                 pick_captions, segmentation_to_classes)
from rslib.data.synthrs import OBJECT_CLASSES, write_split


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("d") / "train", n=10, size=32, seed=2, workers=1)


def test_item_shapes_and_ranges(split):
    ds = RSDataset(split, max_objects=5, classes=OBJECT_CLASSES)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and -1 <= item["pixel_values"].min() <= item["pixel_values"].max() <= 1
    assert item["conditions"].shape == (18, 32, 32) and 0 <= item["conditions"].min() and item["conditions"].max() <= 1
    assert item["content"].shape == (3, 32, 32) and item["has_content"]
    assert item["metadata"].shape == (7,) and item["metadata_valid"].all()
    assert item["boxes"].shape == (5, 4) and item["obb"].shape == (5, 8)
    n = min(5, len(ds.records[0].objects))
    assert item["valid"].sum() == n and (item["labels"][n:] == -1).all() and (item["boxes"][n:] == 0).all()
    batch = collate([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and len(batch["captions"]) == 4
    assert all(isinstance(c, list) for c in batch["captions"])


def test_content_from_the_record_or_the_image_itself(split):
    record, own = RSDataset(split), RSDataset(split, content_from="self")
    for i in (0, 3):
        assert torch.equal(own[i]["content"], own[i]["pixel_values"]) and own[i]["has_content"]
        assert not torch.equal(record[i]["content"], record[i]["pixel_values"])  # another image of its scene
        assert torch.equal(record[i]["pixel_values"], own[i]["pixel_values"])
    with pytest.raises(ValueError, match=r"content_from must be one of record, self, not 'other' \(crs.content_source\)"):
        RSDataset(split, content_from="other")


def test_in_memory_matches_disk(split):
    a, b = RSDataset(split), RSDataset(split, in_memory=True)
    for i in (0, 3):
        assert torch.equal(a[i]["conditions"], b[i]["conditions"]) and torch.equal(b[i]["pixel_values"], b[i]["pixel_values"])


def test_segmentation_channels_decode_to_classes(split):
    from rslib.data.conditions import rgb_to_seg
    from PIL import Image
    ds = RSDataset(split)
    rec = ds.records[1]
    expected = rgb_to_seg(np.asarray(Image.open(split / rec.conditions["segmentation"]).convert("RGB")))
    got = segmentation_to_classes(ds[1]["conditions"][None])[0].numpy()
    assert (got == expected).all()


def test_metadata_normalisation_round_trip_and_missing_fields():
    meta = {"year": 2010, "month": 6, "day": 15, "gsd": 0.5, "cloud_cover": 20, "latitude": 45.0, "longitude": -90.0}
    v, valid = normalise_metadata(meta)
    assert valid.all() and ((v >= 0) & (v <= 1)).all()
    back = denormalise_metadata(v)
    assert all(back[k] == pytest.approx(meta[k], abs=1e-3) for k in meta)
    v2, valid2 = normalise_metadata({"year": 2010, "gsd": None})
    assert valid2.tolist() == [True] + [False] * 6 and v2[1:].sum() == 0


def test_condition_dropout_frequencies():
    policy = ConditionDropout()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    keep = policy.sample(n, g)
    local = keep["local"].float()
    p = torch.tensor(policy.drop_each)
    # marginal drop rate of map i: drop_all + (1 - keep_all - drop_all) * p_i
    expected_drop = policy.drop_all + (1 - policy.keep_all - policy.drop_all) * p
    assert torch.allclose(1 - local.mean(0), expected_drop, atol=0.006)
    all_kept = local.all(1).float().mean()
    assert all_kept == pytest.approx(policy.keep_all + 0.8 * float((1 - p).prod()), abs=0.005)
    none_kept = (~keep["local"]).all(1).float().mean()
    assert none_kept == pytest.approx(policy.drop_all + 0.8 * float(p.prod()), abs=0.005)
    assert keep["caption"].float().mean() == pytest.approx(1 - policy.drop_caption, abs=0.005)
    assert keep["global"].shape == (n, 2)


def test_dropping_a_condition_zeroes_its_channels_only():
    cond = torch.rand(2, 18, 8, 8)
    keep = torch.tensor([[True, False, True, True, True, True], [False] * 6])
    out = ConditionDropout.apply_local(cond, keep)
    assert torch.equal(out[0, 3:6], torch.zeros(3, 8, 8)) and torch.equal(out[0, :3], cond[0, :3])
    assert torch.equal(out[0, 6:], cond[0, 6:]) and out[1].abs().sum() == 0
    assert ConditionDropout.apply_captions(["a", "b"], torch.tensor([True, False])) == ["a", ""]


def test_dropout_and_caption_choice_are_seeded():
    policy = ConditionDropout()
    a = policy.sample(16, torch.Generator().manual_seed(5))
    b = policy.sample(16, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    caps = [["x", "y", "z"]] * 8
    assert pick_captions(caps, torch.Generator().manual_seed(1)) == pick_captions(caps, torch.Generator().manual_seed(1))


def test_truncation_keeps_the_largest_objects(split):
    ds = RSDataset(split, max_objects=2, classes=OBJECT_CLASSES)
    for i, rec in enumerate(ds.records):
        if len(rec.objects) > 2:
            areas = sorted(((o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]) for o in rec.objects), reverse=True)
            b = ds[i]["boxes"]
            got = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).tolist()
            assert got == pytest.approx(areas[:2], abs=1e-5)
            return
    pytest.skip("no image with more than two objects in this split")
