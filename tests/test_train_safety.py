"""Training runs turned against their user: resuming with changed settings, the preset the command line picks,
checkpoints left by a killed run, permissions."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rslib import utils
from rslib.train import TrainConfig, loop, stage, train_loop
from rslib.train import text_encoder

REPO = Path(__file__).resolve().parents[1]


def _data(n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return list(zip(x, x.sum(1, keepdim=True)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def _mse(model: nn.Module, batch, generator: torch.Generator) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


CFG = TrainConfig(steps=8, batch_size=8, lr=1e-2)


def _train(folder: Path, stop_after: int | None = None, resume: bool = True) -> loop.TrainResult:
    return train_loop(_mlp(), _mse, _data(), CFG, folder, stop_after=stop_after, resume=resume, progress=False)


def _step(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["step"]


def _tag_checkpoint(checkpoint: Path) -> None:
    """Mark the first logged loss in a checkpoint folder: a run that resumes from it reports the mark."""
    state_file = checkpoint / "state.json"
    state = json.loads(state_file.read_text())
    state["history"][0]["loss"] = 123.0
    state_file.write_text(json.dumps(state))


def _resumed(result: loop.TrainResult) -> bool:
    return result.history[0]["loss"] == 123.0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


STAMP = {"preset": "smoke", "data": {"seed": 0}, "lr_decay": "constant", "clip": {"steps": 8, "lr": 0.0001}}
OTHER = {**STAMP, "clip": {"steps": 20, "lr": 0.001}}


# ------------------------------------------------------------------------------ resume only with the same settings

def test_unfinished_run_with_other_settings_is_refused_and_kept(tmp_path):
    folder = tmp_path / "stage"
    start = lambda stamp, force=False: stage.begin(folder, stamp, force)  # noqa: E731
    work = start(STAMP)
    assert work == folder / "training"
    _train(work, stop_after=4)  # killed at step 4 of 8
    before = _files(folder)
    with pytest.raises(stage.ResumeRefused) as err:
        start(OTHER)
    message = str(err.value)
    for piece in (str(work), "unfinished run (step 4 of 8)", "clip.lr 0.0001 -> 0.001", "clip.steps 8 -> 20",
                  "nothing was deleted", "--force", "--set clip.lr=0.0001 clip.steps=8"):
        assert piece in message, (piece, message)
    assert _files(folder) == before  # a refused resume deletes nothing
    start(STAMP)  # the settings it was started with: it resumes
    _tag_checkpoint(work / "checkpoint")
    assert _resumed(_train(work))
    start(OTHER, force=True)  # --force: from scratch
    assert not (work / "checkpoint").exists()
    assert json.loads((work / "stamp.json").read_text()) == OTHER


def test_a_finished_run_of_other_settings_trains_again(tmp_path):
    """As before: a finished result of other settings is no run to resume, so it is replaced."""
    folder = tmp_path / "stage"
    work = stage.begin(folder, STAMP, False)
    result = _train(work)
    stage.finish(folder, STAMP, result, 0.0)
    assert stage.is_finished(folder, STAMP) and not stage.is_finished(folder, OTHER)
    assert stage.begin(folder, OTHER, False) == work and not (work / "checkpoint").exists()
    assert not stage.is_finished(folder)  # no longer finished once a training of other settings began


def test_changed_inputs_can_only_be_forced(tmp_path):
    work = tmp_path / "training"
    stamp = {**STAMP, "stage_one": {"path": "runs/smoke/stage_one", "digest": "aaaa"}}
    stage.prepare_work_dir(work, stamp)
    _train(work, stop_after=2)
    with pytest.raises(stage.ResumeRefused, match=r"stage_one.digest 'aaaa' -> 'bbbb'.*stage_one.digest cannot "
                                                  r"be set back .* --force"):
        stage.prepare_work_dir(work, {**stamp, "stage_one": {"path": "runs/smoke/stage_one", "digest": "bbbb"}})


def test_a_run_that_recorded_no_settings_is_refused(tmp_path):
    """An unfinished run started before the settings were recorded: unknown settings, so only --force goes on."""
    folder = tmp_path / "stage"
    _train(folder / "training", stop_after=4)
    with pytest.raises(stage.ResumeRefused, match="recorded no settings"):
        stage.begin(folder, STAMP, False)
    assert _step(folder / "training" / "checkpoint") == 4


def _text_encoder_argv(runs: Path, *extra: str) -> list[str]:
    return ["text_encoder", "--preset", "smoke", "--set", f"runs_dir={runs}", "clip.steps=6", *extra]


class Killed(BaseException):
    """Stands for the process being killed after a checkpoint."""


def test_resume_with_changed_settings_from_the_command_line(tmp_path, monkeypatch, capsys):
    from rslib.train.__main__ import main

    runs = tmp_path / "runs"
    folder = runs / "smoke" / "text_encoder"
    real_loop = text_encoder.train_loop

    def killed_after_step_2(*args, **kwargs):
        real_loop(*args, **{**kwargs, "stop_after": 2})
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(text_encoder, "train_loop", killed_after_step_2)
        with pytest.raises(Killed):
            main(_text_encoder_argv(runs))
    lr = json.loads((folder / "training" / "stamp.json").read_text())["clip"]["lr"]  # the preset's
    before = _files(folder)
    capsys.readouterr()
    assert main(_text_encoder_argv(runs, "clip.lr=1e-3")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 2 of 6" in err and f"clip.lr {lr!r} -> 0.001" in err
    assert "--force" in err and f"--set clip.lr={lr!r}" in err
    assert _files(folder) == before and not (folder / "training.json").exists()

    assert main(_text_encoder_argv(runs)) == 0  # the old settings: resumed and finished
    info = json.loads((folder / "training.json").read_text())
    assert info["stamp"]["clip"]["lr"] == lr and info["steps"] == 6
    whole = tmp_path / "whole"  # an uninterrupted run of the same settings gives the same weights
    assert main(_text_encoder_argv(whole)) == 0
    resumed, uninterrupted = (load_file(str(d / "smoke" / "text_encoder" / "model.safetensors")) for d in (runs, whole))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    assert main(_text_encoder_argv(runs, "clip.lr=1e-3")) == 0  # a finished run of other settings: trains again
    assert json.loads((folder / "training.json").read_text())["stamp"]["clip"]["lr"] == 0.001


# ------------------------------------------------------------------------------ the preset of python -m rslib.train

@pytest.fixture
def stage_calls(monkeypatch):
    """Replace the text-encoder stage by a recorder of the preset it gets."""
    calls: list = []
    monkeypatch.setattr(text_encoder, "train_text_encoder", lambda cfg, force: calls.append(cfg) or "done")
    return calls


@pytest.mark.parametrize("env,argv,expected", [
    ("smoke", [], "smoke"),
    ("smoke", ["--preset", "cpu"], "cpu"),  # an explicit --preset wins
    (None, [], "cpu"),
])
def test_rslib_preset_is_honoured(monkeypatch, stage_calls, env, argv, expected):
    from rslib.train.__main__ import main

    if env is None:
        monkeypatch.delenv("RSLIB_PRESET", raising=False)
    else:
        monkeypatch.setenv("RSLIB_PRESET", env)
    assert main(["text_encoder", *argv]) == 0
    assert [cfg.name for cfg in stage_calls] == [expected]


def test_print_config_prints_the_resolved_configuration_and_trains_nothing(monkeypatch, stage_calls, capsys):
    from rslib.train.__main__ import main

    monkeypatch.setenv("RSLIB_PRESET", "smoke")
    assert main(["cc_diff", "--print-config", "--set", "clip.steps=7", "cc.mode=gligen"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["stage"] == "cc_diff" and printed["config"]["cc"]["mode"] == "gligen"
    assert printed["config"]["name"] == "smoke" and printed["config"]["clip"]["steps"] == 7
    assert printed["config"]["data"]["image_size"] == 32 and stage_calls == []


@pytest.mark.parametrize("argv,piece", [
    (["text_encoder", "--preset", "huge"], "unknown preset 'huge'"),
    (["text_encoder", "--set", "clip.steps"], "--set takes KEY=VALUE pairs"),
    (["text_encoder", "--set", "clip.stepz=3"], "preset has no field 'stepz'"),
    (["cc_diff", "--mode", "gligen"], "unrecognized arguments: --mode gligen"),  # ablations are settings
    (["cc_diff", "--set", "cc.mode=glide"], "cc.mode must be one of cc_diff, no_bridge, gligen, not 'glide'"),
    (["crs_diff", "--set", "crs.fusion=concat"], "crs.fusion must be one of aff, ff, sum, not 'concat'"),
    (["stage_two"], "invalid choice: 'stage_two'"),
])
def test_train_command_line_errors_exit_2_in_one_line(stage_calls, capsys, argv, piece):
    from rslib.train.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and piece in err and err.count("\n") == 1 and stage_calls == []


def test_missing_inputs_exit_1_in_one_line(tmp_path, capsys):
    from rslib.train.__main__ import main

    assert main(["stage_one", "--preset", "smoke", "--set", f"runs_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notebook 01" in err


# ------------------------------------------------------------------------------ checkpoint leftovers

def test_an_old_checkpoint_left_beside_is_never_resumed(tmp_path):
    """After --force removed checkpoint/, an earlier version's .checkpoint.old-* (superseded) must not be resumed."""
    _train(tmp_path, stop_after=4)
    _tag_checkpoint(tmp_path / "checkpoint")
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old-k3j2h1g0")
    assert loop._find_checkpoint(tmp_path) is None
    res = _train(tmp_path)
    assert not _resumed(res) and len(res.history) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "history.json"]


def test_force_deletes_the_checkpoint_and_every_copy_of_it(tmp_path):
    folder = tmp_path / "stage"
    work = stage.begin(folder, STAMP, False)
    _train(work, stop_after=4)
    (work / ".checkpoint.old-a1b2c3d4").mkdir()  # superseded copies from killed writers
    (work / ".checkpoint.prev-a1b2c3d4e5f6").mkdir()
    stage.begin(folder, STAMP, True)
    assert sorted(p.name for p in work.iterdir()) == ["stamp.json"]  # the old run's history went with it


def test_leftovers_are_cleaned_by_the_next_run_but_not_a_running_writer(tmp_path):
    _train(tmp_path, stop_after=2)
    for name in (".checkpoint.part-0123456789ab", ".checkpoint.tmp-x8y9z7w6", ".checkpoint.trash-0123456789ab",
                 ".checkpoint.part-ffffffffffff"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "big.bin").write_bytes(b"0" * 1000)
    held = utils._lock(tmp_path / ".checkpoint.part-ffffffffffff")  # a writer still running holds its lock
    try:
        _train(tmp_path, stop_after=4)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.part-ffffffffffff", "checkpoint",
                                                               "history.json"]
    finally:
        utils._unlock(held)
    _train(tmp_path, stop_after=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "history.json"]


KILL_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import test_train_safety as t
folder = Path(sys.argv[1])
real_replace = os.replace
def logged_steps():
    return len(json.loads((folder / "history.json").read_text()))
def replace(src, dst, *a, **k):  # SIGKILL between the two renames of the step-6 checkpoint: no clean-up runs
    if Path(dst) == folder / "checkpoint" and Path(src).name.startswith(".checkpoint.") and logged_steps() == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
t._train(folder, stop_after=6)
"""


def test_a_kill_between_the_renames_of_a_checkpoint_resumes_exactly(tmp_path):
    folder = tmp_path / "run"
    _train(folder, stop_after=4)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(folder), str(REPO / "tests")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (folder / "checkpoint").exists()  # the step-4 checkpoint is only beside it, renamed aside
    [aside] = [p for p in folder.iterdir() if (p / "state.json").is_file() and _step(p) == 4]
    _tag_checkpoint(aside)
    resumed = _train(folder)
    assert _resumed(resumed)  # put back and resumed from step 4
    whole = _train(tmp_path / "whole")
    assert [h["loss"] for h in resumed.history[1:]] == [h["loss"] for h in whole.history[1:]]
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", "history.json"]


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _train(tmp_path / "run", stop_after=2)
        _train(tmp_path / "run", stop_after=4)  # a replacement too
    finally:
        os.umask(old)
    modes = {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777)
             for p in [tmp_path / "run", *(tmp_path / "run").rglob("*")]}
    assert modes == {("dir", 0o755), ("file", 0o644)}


def test_stamps_leave_out_every_sampling_only_setting():
    """Changing how a trained model samples never retrains it: none of these is in a training stamp."""
    from rslib.config import get_preset

    sampling = {"sample_steps", "guidance_scale", "control_scale", "map_guidance", "guidance_keeps_metadata",
                "negative_prompt", "eval_images"}
    assert sampling <= set(stage.SAMPLING_ONLY)
    cfg = get_preset("smoke")
    for part in ("crs", "cc"):
        assert not sampling & set(stage.stage_stamp(cfg, part)[part])
