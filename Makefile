# Developer entry points. `make test` is the test command CI runs.
PYTHON ?= python3

.PHONY: deps build test lint demo bench clean

deps:            ## system packages + Python packages (editable install)
	bash scripts/install-deps.sh
	$(PYTHON) -m pip install --quiet -e '.[test,cluster]'
	$(PYTHON) setup.py --quiet build_ext --inplace

build:           ## (re)build the native extension in place
	$(PYTHON) setup.py --quiet build_ext --inplace

test: build      ## the whole suite against real registries on loopback
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check fastpull tests benchmarks
	$(PYTHON) -m ruff format --check fastpull tests benchmarks

demo: build      ## start a loopback registry, push a sample image, pull it with fastpull
	$(PYTHON) -m scripts.demo

bench: build     ## pull benchmark vs curl/aria2c/skopeo on a loopback registry (BENCH_ARGS="--quick")
	$(PYTHON) -m benchmarks.bench_pull $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastpull/*.so .pytest_cache .hypothesis
