"""python -m rslib.compare: two runs folders compared weights by tensor, JSON by number, figures by pixel."""
import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from rslib.compare import canonical_name, compare_runs, main


def _run(root, weight=1.0, loss=0.5, seconds=3.0, pixel=0, table="a,b\n1,2\n"):
    """A small runs folder: weights, a completion file, a figure and a table."""
    (root / "stage_one" / "unet").mkdir(parents=True)
    save_file({"w": torch.full((2, 2), weight)}, str(root / "stage_one" / "unet" / "model.safetensors"))
    (root / "stage_one" / "training.json").write_text(json.dumps({"final_loss": loss, "seconds": seconds}))
    (root / "figures" / "tables").mkdir(parents=True)
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0, 0] = pixel
    Image.fromarray(image).save(root / "figures" / "grid.png")
    (root / "figures" / "tables" / "t.csv").write_text(table)
    return root


def test_identical_runs_are_reported_identical_whatever_their_wall_times(tmp_path, capsys):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b", seconds=9.0)
    report = compare_runs(a, b)
    assert report.all_identical and len(report.identical) == 4 and report.volatile == {"stage_one/training.json": 1}
    assert main([str(a), str(b)]) == 0 and capsys.readouterr().out.strip().endswith("all identical")


def test_each_kind_of_difference_is_named(tmp_path, capsys):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", weight=1.5, loss=0.25, pixel=9, table="a,b\n1,3\n")
    report = compare_runs(a, b)
    assert report.different == {
        "stage_one/unet/model.safetensors": "w: values differ (largest difference 0.5)",
        "stage_one/training.json": "final_loss: 0.5 vs 0.25",
        "figures/grid.png": "1 pixels differ",
        "figures/tables/t.csv": "line 2: '1,2' vs '1,3'",
    }
    (b / "figures" / "extra.png").write_bytes((b / "figures" / "grid.png").read_bytes())
    assert compare_runs(a, b).only_b == ["figures/extra.png"]
    assert main([str(a), str(b)]) == 1 and capsys.readouterr().out.strip().endswith("NOT identical")


def test_files_of_the_earlier_layout_are_matched_to_their_new_names(tmp_path):
    assert canonical_name("stage_one/stage_one.json") == "stage_one/training.json"
    assert canonical_name("ablation/crs_diff_ff_1/crs_diff.json") == "ablation/crs_diff_ff_1/training.json"
    assert canonical_name("text_encoder/checkpoint/model.safetensors") == "text_encoder/training/checkpoint/model.safetensors"
    assert canonical_name("engine/detector_real/history.json") == "engine/detector_real/training/history.json"
    old, new = _run(tmp_path / "old"), _run(tmp_path / "new")
    (old / "stage_one" / "training.json").rename(old / "stage_one" / "stage_one.json")
    assert compare_runs(old, new).all_identical
