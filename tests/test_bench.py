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


def test_sampling(bench, tmp_path, monkeypatch):
    results = bench("results")
    committed = (BENCH / "RESULTS.md").read_bytes()
    monkeypatch.setattr(results, "RESULTS_MD", tmp_path / "RESULTS.md")
    out = tmp_path / "sampling.json"
    result = bench("sampling").main(TINY + ["--json", str(out), "--record"])
    _check(result, {"crs sampling"}, out)
    assert result["settings"]["steps"] == 3 and result["settings"]["batch"] == 2
    text = (tmp_path / "RESULTS.md").read_text()  # --record: a section in (here, the patched) RESULTS.md
    assert "## sampling (tiny size, float32)" in text and "| crs sampling | ours |" in text
    assert "`python bench/sampling.py --size tiny" in text and "--record" not in text
    assert (BENCH / "RESULTS.md").read_bytes() == committed


def test_synthrs_throughput_writes_no_committed_file(bench, tmp_path, monkeypatch):
    results = bench("results")
    committed = (BENCH / "RESULTS.md").read_bytes()
    monkeypatch.setattr(results, "RESULTS_MD", tmp_path / "RESULTS.md")
    out = tmp_path / "synthrs.json"
    result = bench("synthrs_throughput").main(["--n", "4", "--sizes", "32", "--json", str(out)])
    assert [(r["size"], r["n"]) for r in result["rows"]] == [(32, 4), (32, 4)]
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert (BENCH / "RESULTS.md").read_bytes() == committed
    assert not (tmp_path / "RESULTS.md").exists()
    bench("synthrs_throughput").main(["--n", "4", "--sizes", "32", "--record"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("\n## SynthRS throughput (") and "| 32 | generate + write PNGs |" in text
    assert (BENCH / "RESULTS.md").read_bytes() == committed


# ---------------------------------------------------------------------------
# bench/gpu_check.py: its dry run (the same code as on a GPU, on the CPU at toy sizes), its targets, its summary

REPO = BENCH.parent
WATCHED = ("runs", "data/synthrs", "figures", "bench/RESULTS.md")  # what a dry run must leave as it found it
GRIDS = {f"gpu_check_{p}.png" for p in ("stage_one", "crs_diff", "cc_diff")}


def _snapshot() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every watched file of the repository and every file under a watched folder (caches left out)."""
    files = {}
    for top in WATCHED:
        for f in [REPO / top, *(REPO / top).rglob("*")]:
            if f.is_file() and "__pycache__" not in f.parts:
                st = f.stat()
                files[str(f.relative_to(REPO))] = (st.st_size, st.st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the GPU check into a temporary folder: (exit status, results, out folder, scratch folder,
    repository files before, after)."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(BENCH))
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, scratch = tmp / "out", tmp / "scratch"
    before = _snapshot()
    try:
        status = importlib.import_module("gpu_check").main(["--dry-run", "--out", str(out), "--scratch", str(scratch)])
    finally:
        mp.undo()
    return status, json.loads((out / "gpu_check.json").read_text()), out, scratch, before, _snapshot()


def test_gpu_check_dry_run_trains_samples_and_benchmarks(dry_run):
    status, r, out, _, _, _ = dry_run
    assert status == 0 and r["errors"] == {} and r["complete"] and r["dry_run"]
    assert r["preset"] == "smoke" and r["device"] == "cpu"
    assert [s["stage"] for s in r["stages"]] == ["text_encoder", "autoencoder", "stage_one", "crs_diff", "cc_diff"]
    for s in r["stages"]:
        assert s["steps"] == 2 and s["images_per_s"] > 0 and math.isfinite(s["final_loss"])
    assert {s["pipeline"]: s["images"] for s in r["samples"]} == {"stage_one": 2, "crs_diff": 2, "cc_diff": 2}
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.md"} | GRIDS
    for name in GRIDS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = r["train_step"]
    assert {(row["bench"], row["side"]) for row in train["rows"]} == {(b, s) for b in ("crs", "cc")
                                                                      for s in ("ours", "reference")}
    assert all(row["gflop_per_call"] > 0 and 0 < row["mfu"] < 1 for row in train["rows"])
    assert train["peak_matmul"]["dtype"] == "float32" and train["peak_matmul"]["tflops"] > 0
    assert set(train["profiles"]) == {"crs", "cc"}
    for m in train["memory"]:  # the checkpointed steps ran; the CPU has no GPU memory to read
        assert [row["batch"] for row in m["rows"]] == [1] and m["rows"][0]["peak_gib"] is None
        assert m["largest"] is None
    assert r["sampling"]["settings"]["steps"] == 2 and len(r["sampling"]["rows"]) == 2
    assert set(r["sampling"]["profiles"]) == {"crs sampling"}


def test_gpu_check_dry_run_writes_only_its_folder(dry_run):
    _, r, _, scratch, before, after = dry_run
    assert after == before  # runs/, data/synthrs, figures/ and bench/RESULTS.md untouched
    assert list(scratch.iterdir()) == []  # the scratch SynthRS and runs are removed
    assert not (REPO / "figures" / "gpu").exists() and not (REPO / "runs" / "gpu_check").exists()
    assert all(s["folder"].startswith(str(scratch)) for s in r["stages"])


def test_gpu_check_summary_lists_every_target(dry_run, bench, monkeypatch, tmp_path):
    _, r, out, _, _, _ = dry_run
    gpu_check = bench("gpu_check")
    assert [t["key"] for t in r["targets"]] == [t.key for t in gpu_check.TARGETS]
    assert {t["status"] for t in r["targets"]} == {"not checked (dry run)"}
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (") and "Dry run" in md
    assert all(t.text in md for t in gpu_check.TARGETS)
    results = bench("results")
    monkeypatch.setattr(results, "RESULTS_MD", tmp_path / "RESULTS.md")
    assert gpu_check.main(["--summary-of", str(out / "gpu_check.json"), "--record"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## GPU check, dry run (" in text and "\n### Targets\n" in text and "\n## Targets" not in text


def _fit_rows(largest: int | None) -> list[dict]:
    """Peak memory rows of the fit search: batches up to ``largest`` fit, the next does not (None: nothing fits,
    "cpu": nothing was read)."""
    if largest == "cpu":
        return [{"batch": 1, "peak_gib": None}]
    fits = [{"batch": b, "peak_gib": 2.0 * b} for b in (1, 2, 4, 8) if largest and b <= largest]
    return fits + [{"batch": 16, "peak_gib": 30.0}]


def _results_with(train_ratio: dict, mfu: dict, largest: dict, sampling_ratio: float | None) -> dict:
    rows = [{"bench": b, "side": "ours", "mfu": m} for b, m in mfu.items()]
    result = {"dry_run": False,
              "train_step": {"ratio_ours_over_reference": train_ratio, "rows": rows,
                             "memory": [{"bench": b, "largest": None if n == "cpu" else n, "rows": _fit_rows(n)}
                                        for b, n in largest.items()],
                             "profiles": {"crs": "CRS PROFILE TABLE", "cc": "CC PROFILE TABLE"}}}
    if sampling_ratio is not None:
        result["sampling"] = {"ratio_ours_over_reference": {"crs sampling": sampling_ratio},
                              "profiles": {"crs sampling": "SAMPLING PROFILE TABLE"}}
    return result


def test_gpu_check_targets_met_missed_or_not_measured(bench):
    gpu_check = bench("gpu_check")
    r = _results_with({"crs": 0.85, "cc": 0.45}, {"crs": 0.36, "cc": 0.2}, {"crs": 8, "cc": "cpu"}, None)
    status = {t["key"]: t["status"] for t in gpu_check.evaluate_targets(r)}
    assert status == {"crs_train": "met", "cc_train": "missed", "sampling": "not measured", "mfu_crs": "met",
                      "mfu_cc": "missed", "fit_crs": "met", "fit_cc": "not measured"}
    r = _results_with({}, {}, {"crs": None}, None)  # measured, and not even batch 1 fits
    fit = next(t for t in gpu_check.evaluate_targets(r) if t["key"] == "fit_crs")
    assert (fit["value"], fit["status"]) == (0, "missed")
    r = _results_with({"crs": 0.8, "cc": 0.5}, {"crs": 0.35, "cc": 0.35}, {"crs": 1, "cc": 2}, 0.89)
    status = {t["key"]: t["status"] for t in gpu_check.evaluate_targets(r)}
    assert status == {**{k: "met" for k in status}, "sampling": "missed"}  # thresholds are inclusive


def test_gpu_check_summary_profiles_only_missed_targets(bench):
    gpu_check = bench("gpu_check")
    r = _results_with({"crs": 0.9, "cc": 0.3}, {"crs": 0.4, "cc": 0.2}, {"crs": 8, "cc": 8}, 0.95)
    r.update(date="2026-01-01", device="NVIDIA H100 80GB HBM3", command="python bench/gpu_check.py", preset="gpu",
             plan={"stage_steps": 40}, errors={})
    r["targets"] = gpu_check.evaluate_targets(r)
    md = gpu_check.summary_markdown(r)
    assert "| CC-Diff training step >= 0.5x the frozen UNet's forward + backward | 0.30x | missed |" in md
    assert md.count("CC PROFILE TABLE") == 1 and "CRS PROFILE TABLE" not in md and "SAMPLING PROFILE" not in md
    assert ("Where the time goes (train_step, cc): missed CC-Diff training step >= 0.5x the frozen UNet's forward "
            "+ backward; MFU of CC-Diff's training step >= 35% (bf16)") in md


NO_GPU = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here: the real run would start")


@NO_GPU
def test_gpu_check_real_run_needs_a_gpu(bench, tmp_path, capsys):
    assert bench("gpu_check").main(["--out", str(tmp_path / "out")]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@NO_GPU
def test_gpu_check_sh_runs_gpu_check_py(tmp_path):
    """The wrapper for a bare GPU machine finds its Python and hands its options to gpu_check.py."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--out", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "gpu_check: no CUDA device here" in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["crs", "cc"])
def test_gradient_checkpointing_saves_fewer_activations_same_step(bench, which):
    """train_step's checkpointed step of ours (the fit-in-24-GiB measurement) keeps fewer tensors for the
    backward pass and trains to the same weights."""
    import torch

    ts, common = bench("train_step"), bench("common")
    cfg, device = common.preset_for(common.SIZES["tiny"]), torch.device("cpu")
    text_encoder, tokenizer = common.build_text_encoder(cfg, device, 0)
    x = ts.bench_inputs(which, cfg, 2, text_encoder, tokenizer, device, 0)
    saved, weights = {}, {}
    for checkpointing in (False, True):
        step, model, _ = ts.SIDES[which][1](ts.Setup(cfg, device, 0, False, text_encoder, checkpointing), x)
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        saved[checkpointing] = count[0]
        weights[checkpointing] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert saved[True] < saved[False] / 2
    assert weights[True].keys() == weights[False].keys() and weights[True]
    for name, w in weights[False].items():
        assert torch.allclose(weights[True][name], w, atol=1e-6), name
