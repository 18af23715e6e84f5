# changecam: `make train` (quickstart) and `make test` set everything up in .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# where torch comes from: empty, pip's configured index (a CPU build on the project's machines);
# elsewhere on Linux PyPI's torch is the CUDA build, so for the CPU one:
#   make train TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install train test test-slow test-all lint format bench bench-zoo bench-real bench-full bench-scene clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: install
	$(PY) train.py experiment=quickstart

# the everyday suite; the tests marked `slow` (DDP, sweeps, kill-and-resume, longer CLI runs
# on real data) run in `make test-slow`, and CI (.ci/run) runs both
test: install
	$(PY) -m pytest -q -m "not slow" --durations=10

test-slow: install
	$(PY) -m pytest -q -m slow --durations=10

test-all: install
	$(PY) -m pytest -q --durations=15

lint: install
	$(VENV)/bin/ruff check src tests benchmarks *.py
	$(VENV)/bin/ruff format --check src tests benchmarks *.py

format: install
	$(VENV)/bin/ruff format src tests benchmarks *.py
	$(VENV)/bin/ruff check --fix src tests benchmarks *.py

bench: install
	$(PY) benchmarks/run_all.py

# every architecture of conf/model/ trained briefly on the quickstart data (see benchmarks/zoo.py)
bench-zoo: install
	$(PY) benchmarks/zoo.py

# experiment=real_small on the six shared LEVIR-CD images: scratch, fine-tuned from the
# synthetic quickstart checkpoint (levir style), synthetic only, and both trainings with the
# synthetic training split joined (see benchmarks/real_small.py)
bench-real: install
	$(PY) benchmarks/real_small.py

# LEVIR-CD's exact structure (synthetic), experiment=siamese_unet for a few batches, the CAM
# callback's share of a full epoch (see benchmarks/full_scale.py)
bench-full: install
	$(PY) benchmarks/full_scale.py

# whole georeferenced scenes: peak RSS of predict.py on an 8192² GeoTIFF pair (--large: and
# 16384²), GeoTIFF vs PNG path throughput side by side on 2048², the explanation's cost
# (see benchmarks/scene.py; `make bench-scene ARGS=--large`)
bench-scene: install
	$(PY) benchmarks/scene.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
