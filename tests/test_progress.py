"""What `make reproduce` shows while it runs: section lines, throttled training progress, a closing summary."""
from __future__ import annotations

import json

import nbformat
import torch
from torch import nn

from rslib import notebooks, progress
from rslib.config import get_preset
from rslib.train.loop import TrainConfig, run_label, train_loop


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_step_reporter_writes_at_most_one_line_per_interval_and_estimates_the_time_left():
    clock, lines = FakeClock(), []
    rep = progress.StepReporter("stage_one", 100, clock=clock, write=lines.append, force=True)
    for step in range(1, 51):
        clock.now = step * 0.5  # 0.5 s a step: 25 s for 50 steps
        rep.update(step, loss=0.25)
    # the first step, then one line per 10 s: at 10.5 s and 20.5 s
    assert [ln.split(",")[0] for ln in lines] == ["stage_one: step 1/100", "stage_one: step 21/100",
                                                  "stage_one: step 41/100"]
    assert "loss 0.25" in lines[1] and "10s elapsed" in lines[1] and "about 40s left" in lines[1]
    rep.close(100, loss=0.125)
    assert lines[-1].startswith("stage_one: step 100/100") and "left" not in lines[-1]


def test_step_reporter_is_silent_unless_asked(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    lines = []
    rep = progress.StepReporter("x", 10, write=lines.append)
    rep.update(1, loss=1.0)
    rep.close(10)
    assert lines == []


def test_a_resumed_run_says_where_it_resumes_and_times_only_its_own_steps():
    clock, lines = FakeClock(), []
    rep = progress.StepReporter("crs_diff", 100, start=60, clock=clock, write=lines.append, force=True)
    clock.now = 10.0
    rep.update(70)
    assert lines[0] == "crs_diff: resuming at step 60/100"
    assert "about 30s left" in lines[1]  # 10 steps in 10 s, 30 to go


def test_durations_read_like_a_clock():
    assert [progress.duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]


def test_runs_are_named_after_their_stage():
    assert run_label("runs/cpu/crs_diff/training") == "crs_diff"
    assert run_label("runs/cpu/text_encoder") == "text_encoder"


def test_train_loop_streams_progress_to_the_terminal(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(progress.ENV, "1")
    model = nn.Linear(2, 1)
    data = [torch.randn(2) for _ in range(8)]

    def loss_fn(m, batch, generator):
        return m(batch).pow(2).mean()

    train_loop(model, loss_fn, data, TrainConfig(steps=3, batch_size=4), tmp_path / "toy" / "training",
               progress=False)
    err = capfd.readouterr().err
    assert "toy: step 1/3, loss" in err and "toy: step 3/3, loss" in err


def test_section_titles_come_from_level_two_headings():
    cell = nbformat.v4.new_markdown_cell("# 02 · Stage one\n\n## 2. The objective\ntext\n## 3. More")
    assert notebooks.section_titles(cell) == ["2. The objective", "3. More"]
    assert notebooks.section_titles(nbformat.v4.new_code_cell("## not a heading")) == []


def test_a_notebook_run_announces_its_sections_without_kernel_warnings(tmp_path, capfd):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("preset = 'smoke'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_markdown_cell("## 1. First"),
        nbformat.v4.new_code_cell("import os\nprint(os.environ['RSLIB_PROGRESS'])"),
        nbformat.v4.new_markdown_cell("## 2. Second"),
        nbformat.v4.new_code_cell("x = 1"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "toy.ipynb"
    nbformat.write(nb, src)
    notebooks.execute(src, tmp_path / "out.ipynb", {"preset": "smoke"})
    out = capfd.readouterr()
    assert "toy · 1. First" in out.out and "toy · 2. Second" in out.out
    assert "without encryption" not in out.out + out.err
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert executed.cells[3].outputs[0]["text"].strip() == "1"  # the kernel saw RSLIB_PROGRESS


def test_summary_reports_times_measures_with_intervals_and_where_outputs_went(tmp_path):
    cfg = get_preset("smoke", runs_dir=str(tmp_path))
    (cfg.run_dir("stage_one")).mkdir(parents=True)
    (cfg.run_dir("stage_one") / "eval.json").write_text(json.dumps(
        {"scene_agreement": 0.8425, "fid_rsclip": 0.074, "ci": {"scene_agreement": [0.80, 0.88]}}))
    (cfg.run_dir("cc_diff")).mkdir(parents=True)
    (cfg.run_dir("cc_diff") / "eval.json").write_text(json.dumps(
        {"rows": [{"method": "real test images", "map50": 48.0}, {"method": "cc_diff", "map50": 14.0, "context": 0.4}]}))
    measures = {label: v for _, label, v in notebooks.key_measures(cfg)}
    assert measures["stage one scene agreement"] == (0.8425, 0.80, 0.88)
    assert measures["CC-Diff YOLOScore mAP50"] == 14.0 and measures["real images' mAP50"] == 48.0
    assert "CRS-Diff road IoU, road map alone" not in measures  # notebook 03 has not run
    text = notebooks.summary(cfg, {"00_data": 61.0, "02_stage_one": 924.0})
    assert "15m24s" in text and "16m25s" in text  # 02's time and the total
    assert "0.8425 [0.8, 0.88]" in text and "executed notebooks:" in text
