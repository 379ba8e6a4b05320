# graftfl — `make demo` runs the main job, `make test` the test suite. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION = /usr/share/datasets/fashion-mnist

.PHONY: install data demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Fashion-MNIST from Debian's package where apt is available; elsewhere torchvision downloads it.
data:
	@if [ ! -d $(FASHION) ] && command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; fi

demo: install data
	$(VENV)/bin/graftfl sim protocol=fedavg dataset=fashion_mnist num_clients=5 rounds=3

# One pytest worker per core (at most 4), whole test files per worker, the files with slow tests first
# (tests/conftest.py orders them). The slow tests partly wait on Flower's polling (deployments, Ray start),
# so two workers help even on a 2-core machine (there: 9.5 min; about 13 min serially, summed from per-file runs).
# Serially: $(PY) -m pytest -q
test: install
	$(VENV)/bin/ruff check graftfl tests benchmarks
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

bench: install data
	$(PY) benchmarks/fedavg_scale.py

clean:
	rm -rf runs multirun .pytest_cache
