"""Project hygiene: dependencies agree, notebooks are clean and parameterised, presets resolve."""
import re
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml

from rslib.config import PRESET_NAMES, get_preset

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r): r.replace(" ", "") for r in py["dependencies"] + py["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert conda == declared


def test_notebooks_are_committed_without_outputs_and_have_a_parameters_cell():
    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert paths
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs: run `make notebooks-clean`"
        first = code[0]
        assert "parameters" in first.metadata.get("tags", []), f"{path.name}: first code cell must be tagged parameters"
        assert 'preset = os.environ.get("RSLIB_PRESET", "cpu")' in first.source
        assert "class " not in "".join(c.source for c in code), f"{path.name} defines a class: move it to rslib"


def test_every_notebook_takes_overrides_and_prints_how_its_settings_differ():
    """``overrides`` (dotted keys, as ``--set``) reaches every notebook's preset, and ``seed`` is the training seed."""
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert re.search(r"^overrides = \{\}", code[0], re.M) and re.search(r"^seed = 0", code[0], re.M), path.name
        # notebooks 03 and 04 keep the preset (stage one's data) beside their paper's data set (cfg.stage_data)
        assert re.search(r'^(preset_)?cfg = get_preset\(preset, \*\*\{"seed": seed, \*\*overrides\}\)', code[1], re.M), path.name
        assert re.search(r"^print\(describe_overrides\((preset_)?cfg\)\)", code[1], re.M), path.name
        assert "data.seed\": seed" not in "".join(code), f"{path.name}: seed must not regenerate the data"


def test_describe_overrides_names_each_changed_setting():
    from rslib.config import describe_overrides, diff_from_preset

    cfg = get_preset("smoke")
    assert diff_from_preset(cfg) == {} and describe_overrides(cfg) == "preset smoke, as defined in rslib/config.py"
    changed = get_preset("smoke", seed=3, **{"crs.fusion": "ff"})
    assert diff_from_preset(changed) == {"seed": (0, 3), "crs.fusion": (cfg.crs.fusion, "ff")}
    assert describe_overrides(changed) == f"preset smoke with seed=3 (preset: 0), crs.fusion='ff' (preset: {cfg.crs.fusion!r})"


def test_the_training_seed_leaves_the_data_alone():
    """``seed`` trains and samples again on the same images; ``data.seed`` draws other images."""
    from rslib.train.stage import stage_stamp, stage_train_config

    cfg = get_preset("smoke")
    reseeded, other_data = get_preset("smoke", seed=3), get_preset("smoke", **{"data.seed": 3})
    assert reseeded.synthrs_dir() == cfg.synthrs_dir() and other_data.synthrs_dir() != cfg.synthrs_dir()
    assert stage_train_config(reseeded, steps=1, batch_size=1).seed == 3
    assert stage_train_config(other_data, steps=1, batch_size=1).seed == cfg.seed
    assert stage_stamp(reseeded, "clip") != stage_stamp(cfg, "clip") != stage_stamp(other_data, "clip")


def test_parse_overrides_reads_literals_and_keeps_paths_as_text():
    from rslib.config import parse_overrides

    assert parse_overrides(["crs.steps=250", "data.root=data/rsicd", "crs.condition_maps=('lines','sketch')",
                            "cc.mode=gligen"]) == {"crs.steps": 250, "data.root": "data/rsicd",
                                                   "crs.condition_maps": ("lines", "sketch"), "cc.mode": "gligen"}
    with pytest.raises(ValueError, match="--set takes KEY=VALUE pairs, got 'crs.steps'"):
        parse_overrides(["crs.steps"])


def test_notebook_runner_passes_overrides_to_every_notebook(monkeypatch, tmp_path, capsys):
    from rslib import notebooks

    seen = []
    monkeypatch.setattr(notebooks, "execute", lambda path, out, parameters: seen.append(parameters))
    monkeypatch.setattr(notebooks, "summary", lambda cfg, timings: "")
    assert notebooks.main(["--preset", "smoke", "--only", "00", "--set", f"runs_dir={tmp_path}", "seed=3"]) == 0
    assert seen == [{"preset": "smoke", "overrides": {"runs_dir": str(tmp_path), "seed": 3}}]
    assert (tmp_path / "smoke" / "timings.json").is_file()  # the runner's own files follow runs_dir too
    with pytest.raises(SystemExit):
        notebooks.main(["--preset", "smoke", "--set", "crs.nope=1"])
    assert "nope" in capsys.readouterr().err


def test_papermill_sees_every_parameter():
    """papermill must parse each line of the parameters cell, or ``-p name value`` would be refused as unknown."""
    import papermill

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        names = [line.split("=", 1)[0].strip() for line in cell.source.splitlines()
                 if re.match(r"^[A-Za-z_]\w*\s*=", line)]
        assert list(papermill.inspect_notebook(str(path))) == names, path.name


def test_presets_resolve_and_unknown_names_fail_clearly(monkeypatch):
    for name in PRESET_NAMES:
        assert get_preset(name).name == name
    assert get_preset("cpu", **{"data.seed": 3}).data.seed == 3
    with pytest.raises(ValueError, match="unknown preset 'laptop'"):
        get_preset("laptop")
    with pytest.raises(ValueError, match="no field"):
        get_preset("cpu", **{"data.colour": 1})
    monkeypatch.setenv("RSLIB_PRESET", "gpu")
    assert get_preset().name == "gpu"
    assert get_preset("smoke").figures_dir() != get_preset("cpu").figures_dir()  # tests never overwrite the gallery


def test_train_cli_rejects_bad_overrides(capsys):
    """``python -m rslib.train`` names the bad override instead of training with a wrong preset."""
    from rslib.train.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["stage_one", "--preset", "smoke", "--set", "unet.steps"])  # no "=": argparse error
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["stage_one", "--preset", "smoke", "--set", "unet.nope=3"])
    assert exit_.value.code == 2 and "nope" in capsys.readouterr().err


def test_measurements_live_in_one_dated_log_not_in_the_presets():
    """config.py keeps a line of rationale per setting; the measurements are in docs/measurements.md, each entry
    dated and naming its SynthRS version, and the README links the log."""
    comments = [line for line in (ROOT / "rslib" / "config.py").read_text().splitlines() if "#" in line]
    measured = re.compile(r"(IoU|mAP50|FID|PSNR|agreement|CLIPScore|coherence)[^(]{0,30}\d\.?\d|ms a step")
    assert not [c for c in comments if measured.search(c)], "measurements in config.py"
    log = (ROOT / "docs" / "measurements.md").read_text()
    entries = [line for line in log.splitlines() if line.startswith("- **")]
    assert entries and all(re.match(r"- \*\*\d{4}-\d\d-\d\d, SynthRS \d\.\d", e) for e in entries), entries
    assert "(docs/measurements.md)" in (ROOT / "README.md").read_text()


def test_no_module_imports_a_private_name_of_another():
    """What one module needs of another is public: ``from rslib.x import _name`` is a concept in the wrong place."""
    private = re.compile(r"^\s*from rslib[\w.]* import ([^#\n]*)", re.M)
    found = [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for path in sorted((ROOT / "rslib").rglob("*.py"))
             for m in private.finditer(path.read_text())
             if any(name.strip(" ()").startswith("_") for name in m.group(1).split(","))]
    assert not found, found


def test_gallery_shows_only_figures_that_exist():
    """Every image and table figures/README.md links to is committed beside it."""
    text = (ROOT / "figures" / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert len(images) >= 20
    missing = [p for p in images if not (ROOT / "figures" / p).is_file()]
    assert not missing, f"figures/README.md shows figures that do not exist: {missing}"


def test_importing_rslib_in_a_notebook_kernel_prints_no_tqdm_warning():
    """In Jupyter, tqdm.auto warns at import ("IProgress not found ... update jupyter and ipywidgets" without
    ipywidgets): rslib imports it first, quietly, so no notebook opens with that advice. The subprocess makes
    tqdm believe it runs in a Jupyter kernel, records every warning, and imports rslib then tqdm.auto (as diffusers
    and transformers do after it)."""
    import subprocess
    import sys

    code = "\n".join([
        "import sys, types, warnings",
        "import IPython",
        "sys.modules['ipykernel.zmqshell'] = types.ModuleType('ipykernel.zmqshell')",
        "IPython.get_ipython = lambda: type('ZMQInteractiveShell', (), {})()",
        "with warnings.catch_warnings(record=True) as caught:",
        "    warnings.simplefilter('always')",
        "    import rslib",
        "    import tqdm.auto",
        "print([str(w.message) for w in caught if 'tqdm' in str(w.message) or 'IProgress' in str(w.message)])",
    ])
    without = subprocess.run([sys.executable, "-c", code.replace("import rslib", "pass")], capture_output=True,
                             text=True, cwd=ROOT, check=True)
    assert "IProgress" in without.stdout or "tqdm" in without.stdout  # the check can fail: tqdm does warn
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.strip() == "[]", run.stdout
