# Two commands do everything on a fresh machine:
#   make reproduce   run every notebook at the cpu preset (writes runs/ and figures/)
#   make test        the test suite, notebooks included (smoke preset)
# Both create .venv and install what they need the first time.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PRESET ?= cpu
ARCH   := $(shell uname -m)
# torch builds that install offline here; on other machines pip fetches the matching wheels.
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast test-paper reproduce notebooks-clean bench gpu-check gpu-check-dry clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import shutil; free = shutil.disk_usage('.').free / 2**30; free < 8 and print(f'warning: {free:.1f} GiB free on this disk; the environment takes about 6 GiB (torch) and make reproduce about 2 more')"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

test: install
	RSLIB_PRESET=smoke $(BIN)/python -m pytest -q tests --nbmake notebooks --durations=15

test-fast: install
	RSLIB_PRESET=smoke $(BIN)/python -m pytest -q tests -x

# the paper path alone: the paper preset's settings, every stage on real-format data sets, notebooks 02-05 at
# RSLIB_PRESET=paper on them (tiny stand-in weights in the real formats; make test runs these too)
test-paper: install
	RSLIB_PRESET=smoke $(BIN)/python -m pytest -q tests/test_paper_preset.py tests/test_paper_path.py \
		tests/test_paper_real_data.py tests/test_paper_notebooks.py

reproduce: install
	$(BIN)/python -m rslib.notebooks --preset $(PRESET)

notebooks-clean: install
	$(BIN)/python -m rslib.notebooks --strip

# results to stdout and runs/bench/*.json; bench/RESULTS.md changes only when a script is given --record
bench: install
	$(BIN)/python bench/synthrs_throughput.py --json runs/bench/synthrs_throughput.json
	$(BIN)/python bench/train_step.py --size small --repeats 5 --json runs/bench/train_step.json
	$(BIN)/python bench/sampling.py --size small --repeats 5 --json runs/bench/sampling.json

# one GPU, under 8 minutes on an H100: the gpu preset's stages, sample grids (figures/gpu) and the SD 1.5-size
# benchmarks, summarised in runs/gpu_check/gpu_check.{json,md} (bench/gpu_check.py; GPU_CHECK_ARGS=--record also
# appends the summary to bench/RESULTS.md). gpu-check-dry runs the same code on the CPU at toy sizes (make test
# runs it too, in tests/test_bench.py)
gpu-check: install
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-dry: install
	$(BIN)/python bench/gpu_check.py --dry-run $(GPU_CHECK_ARGS)

clean:
	rm -rf runs data/synthrs .pytest_cache
