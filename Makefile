# ddim-serve: `make serve` starts the service with the bundled model, `make test` runs the tests.
PYTHON ?= python3
# extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>" where the
# default index would give a CUDA build
TORCH_PIP_ARGS ?=
# the package's extras: dev by default; CI adds ray (EXTRAS=dev,ray) so that the Ray Serve tests run
EXTRAS ?= dev
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma  := ,

.PHONY: install serve test bench bench-ray lint clean fuzz soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU build of torch first, so that nothing pulls a CUDA build (see README for GPUs)
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/ddim-serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.features
	$(BIN)/python -m benchmarks.run

bench-ray:  # the Ray Serve path against the direct server (docs/ray.md); needs EXTRAS=dev,ray
	$(MAKE) install EXTRAS=dev,ray
	$(VENV)/bin/python -m benchmarks.ray_bench --clients 8 --n 2 --steps 10 --seconds 30 --out benchmarks/ray_results.json

fuzz: $(STAMP)  # schema fuzzing of every operation against a live server (docs/reliability.md)
	$(BIN)/python -m tests.fuzz --examples 200

soak: $(STAMP)  # 2x this machine's capacity for 5 minutes, loopback only (SOAK_SECONDS=300)
	$(BIN)/python -m benchmarks.soak --seconds $(or $(SOAK_SECONDS),300)

lint: $(STAMP)
	$(BIN)/ruff check app tests benchmarks clients
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache
