"""The benchmark scripts run end to end at the tiny size (smoke preset, one repeat, CPU) and time both sides."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = ["--size", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0"]


@pytest.fixture
def bench(monkeypatch):
    """Import a script of bench/ (which imports its neighbour common.py) by name."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def _check(result: dict, benches: set[str], out: Path) -> None:
    rows = result["rows"]
    assert {(r["bench"], r["side"]) for r in rows} == {(b, s) for b in benches for s in ("ours", "reference")}
    for r in rows:
        assert r["seconds"] and all(math.isfinite(t) and t > 0 for t in r["seconds"])
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
    assert set(result["ratio_ours_over_reference"]) == benches
    assert all(math.isfinite(x) and x > 0 for x in result["ratio_ours_over_reference"].values())
    assert json.loads(out.read_text())["rows"][0]["bench"] == rows[0]["bench"]


def test_train_step(bench, tmp_path, capsys):
    out = tmp_path / "train_step.json"
    result = bench("train_step").main(TINY + ["--profile", "--profile-steps", "1", "--json", str(out)])
    _check(result, {"crs", "cc"}, out)
    assert "ours / reference" in capsys.readouterr().out


def test_sampling(bench, tmp_path):
    out = tmp_path / "sampling.json"
    result = bench("sampling").main(TINY + ["--json", str(out)])
    _check(result, {"crs sampling"}, out)
    assert result["settings"]["steps"] == 3 and result["settings"]["batch"] == 2
