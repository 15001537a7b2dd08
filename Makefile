# `make demo` and `make test` do all the set-up on a fresh machine (Python 3.10+ with venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install browser demo test test-fast lint format bench peer faults clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls the CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# OpenAI's dall_e package, for the dVAE compatibility test (its declared deps pull torchvision)
	$(PY) -m pip install -q --no-deps DALL-E==0.1
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dalle run jobs/demo.yaml
	$(VENV)/bin/dalle status jobs/demo.yaml
	@echo "report: runs/demo/report.html"

# Debian's chromium, for the test that renders report.html headless
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
	  || { echo "make: install Debian's chromium package (apt-get install chromium) for the report test"; exit 1; }

# pytest's worker processes (xdist); the suite is timed with 2 on 2 cores (tests/README.md)
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist load

# the whole suite (CI's command); it ends with the 25 slowest tests, the slowest files and the total
test: install lint browser
	$(PYTEST) --durations=25

# the inner loop: lint and every test not marked slow (at most 3 minutes; tests/README.md)
test-fast: install lint
	$(PYTEST) -m "not slow" --durations=10

# the fault matrix (full disk, dead object store, hostile URL list, ...) as a JSON table
faults: install
	@$(PY) tests/faults.py

lint: install
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/ruff format --check pipeline tests benchmarks
	# the package's layers and no import cycles (contracts in pyproject.toml)
	$(VENV)/bin/lint-imports --no-logo

format: install
	$(VENV)/bin/ruff check --fix pipeline tests benchmarks
	$(VENV)/bin/ruff format pipeline tests benchmarks

# lucidrains' dalle-pytorch for benchmarks/peer_dalle_pytorch.py, in its own folder (.peer/), without
# its declared dependencies (torchvision, taming, DeepSpeed...; the DALLE class needs none of them)
PEER := .peer/.installed-stamp
$(PEER): $(STAMP)
	$(PY) -m pip install -q --no-deps --target .peer dalle-pytorch==1.6.6 axial-positional-embedding==0.3.12 \
	  rotary-embedding-torch==0.9.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3
	touch $(PEER)

peer: $(PEER)

bench: install peer
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/encode.py
	$(PY) benchmarks/train.py demo
	# the demo's encoded shards (a no-op once make demo ran), then the side by side with dalle-pytorch
	$(VENV)/bin/dalle run jobs/demo.yaml --until encode --no-progress
	$(PY) benchmarks/peer_dalle_pytorch.py
	$(PY) benchmarks/train_memory.py small --workers 1 --json
	$(PY) benchmarks/train_memory.py small --workers 2 --json
	$(PY) benchmarks/train_memory.py small --layers 24 --heads 16 --reduce-bucket 5e7 --workers 1 --json
	$(PY) benchmarks/train_memory.py small --layers 24 --heads 16 --reduce-bucket 5e7 --workers 2 --json
	$(PY) benchmarks/sample.py demo
	$(PY) benchmarks/storage.py
	$(PY) benchmarks/scale_data.py --rows 1000000
	$(PY) benchmarks/status_requests.py --shards 25000

clean:
	rm -rf runs .pytest_cache
