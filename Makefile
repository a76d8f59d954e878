# ddim-serve: `make serve` starts the service with the bundled model, `make test` runs the tests.
PYTHON ?= python3
# extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" where the
# default index would give a CUDA build
TORCH_PIP_ARGS ?=
# the package's extras: dev by default; CI adds ray (EXTRAS=dev,ray) so that the Ray Serve tests run
EXTRAS ?= dev
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma  := ,

.PHONY: install serve test bench bench-ray lint clean fuzz soak

# The first run downloads torch and the dependencies (pip shows each download); later runs skip this.
$(STAMP): pyproject.toml
	@echo "==> [1/4] creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] upgrading pip"
	$(BIN)/pip install --quiet --upgrade pip
	@echo "==> [3/4] installing torch==2.13.0 first, so that nothing pulls another build (a large download: minutes)"
	$(BIN)/pip install --progress-bar on $(TORCH_PIP_ARGS) torch==2.13.0
	@echo "==> [4/4] installing ddim-serve and its dependencies"
	$(BIN)/pip install --progress-bar on -e '.[$(EXTRAS)]'
	@# CLIP's BPE file for the tests' tiny pipelines (harness/pipelines.py); no deps: its torchvision would replace torch
	$(BIN)/pip install --progress-bar on --no-deps open_clip_torch
	touch $(STAMP)
	@echo "==> installed; 'make serve' and 'make test' start at once from now on"

install: $(STAMP)

serve: $(STAMP)
	@echo "==> starting ddim-serve on http://127.0.0.1:8000 (it holds this terminal: Ctrl-C stops it);"
	@echo "    ready when http://127.0.0.1:8000/readyz answers 200 (the log line 'model ... ready')"
	$(BIN)/ddim-serve

# -rs lists every skipped test with its reason
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

bench: $(STAMP)  # docs/benchmarks.md; with the ray extra (EXTRAS=dev,ray) also its Ray Serve section (about 30 min)
	$(BIN)/python -m benchmarks.features
	$(BIN)/python -m benchmarks.studies.text_pipeline  # issue 26 §6: a tiny SD pipeline, served against a plain CFG loop
	@if $(BIN)/python -c 'import ray.serve' 2>/dev/null; then $(BIN)/python -m benchmarks.ray_bench; \
	else echo "==> skipping the Ray Serve bench: no ray extra (make bench EXTRAS=dev,ray)"; fi
	$(BIN)/python -m benchmarks.run

bench-ray:  # the Ray Serve path against the direct server (docs/ray.md); needs EXTRAS=dev,ray
	$(MAKE) install EXTRAS=dev,ray
	$(BIN)/python -m benchmarks.ray_bench
	$(BIN)/python -m benchmarks.report benchmarks/results.json docs/benchmarks.md

fuzz: $(STAMP)  # schema fuzzing of every operation against a live server (docs/reliability.md)
	$(BIN)/python -m tests.fuzz --examples 200

soak: $(STAMP)  # 2x this machine's capacity for 5 minutes, loopback only (SOAK_SECONDS=300)
	$(BIN)/python -m benchmarks.soak --seconds $(or $(SOAK_SECONDS),300)

lint: $(STAMP)
	$(BIN)/ruff check app tests benchmarks clients harness
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache
