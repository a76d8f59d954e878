# ddim-serve: `make serve` starts the service with the bundled model, `make test` runs the tests.
PYTHON ?= python3
# extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" where the
# default index would give a CUDA build
TORCH_PIP_ARGS ?=
# the package's extras for test, lint, bench, fuzz and soak: dev by default; CI adds ray (EXTRAS=dev,ray) so that the
# Ray Serve tests run. `make serve` installs the package alone (no extras): what serving needs, not the dev tools.
EXTRAS ?= dev
VENV   ?= .venv
BIN     = $(VENV)/bin
comma  := ,
# one stamp for the package alone, one for each set of extras installed on top of it
BASE_STAMP = $(VENV)/.installed
STAMP      = $(if $(EXTRAS),$(VENV)/.installed-$(subst $(comma),-,$(EXTRAS)),$(BASE_STAMP))

.PHONY: install serve test bench bench-ray lint clean fuzz soak

# The first run downloads torch and the dependencies (pip shows each download); later runs skip this.
$(BASE_STAMP): pyproject.toml
	@echo "==> [1/4] creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] upgrading pip"
	$(BIN)/pip install --quiet --upgrade pip
	@echo "==> [3/4] installing torch==2.13.0 first, so that nothing pulls another build (a large download: minutes)"
	$(BIN)/pip install --progress-bar on $(TORCH_PIP_ARGS) torch==2.13.0
	@echo "==> [4/4] installing ddim-serve and what serving needs"
	$(BIN)/pip install --progress-bar on -e .
	touch $(BASE_STAMP)
	@echo "==> installed; 'make serve' starts at once from now on"

ifneq ($(EXTRAS),)
$(STAMP): $(BASE_STAMP)
	@echo "==> installing the extras [$(EXTRAS)] (the test, lint and bench tools)"
	$(BIN)/pip install --progress-bar on -e '.[$(EXTRAS)]'
	@# CLIP's BPE file for the tests' tiny pipelines (harness/pipelines.py); no deps: its torchvision would replace torch
	$(BIN)/pip install --progress-bar on --no-deps open_clip_torch
	touch $(STAMP)
	@echo "==> installed [$(EXTRAS)]; 'make test' starts at once from now on"
endif

install: $(STAMP)

# the banner's address is the server's: its Settings, read from DDIM_HOST and DDIM_PORT as the server reads them
serve: $(BASE_STAMP)
	@url=$$($(BIN)/python -c 'from app.config import Settings; s = Settings(); print(f"http://{s.host}:{s.port}")') \
	&& echo "==> starting ddim-serve on $$url (it holds this terminal: Ctrl-C stops it);" \
	&& echo "    ready when $$url/readyz answers 200 (the log line 'model ... ready')"
	$(BIN)/ddim-serve

# -rs lists every skipped test with its reason
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

bench: $(STAMP)  # docs/benchmarks.md; with the ray extra (EXTRAS=dev,ray) also its Ray Serve section (about 30 min)
	$(BIN)/python -m benchmarks.features
	$(BIN)/python -m benchmarks.solvers
	$(BIN)/python -m benchmarks.studies.idle_model  # issue 24: an idle model beside the busy one
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
