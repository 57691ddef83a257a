PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
FASHION ?= /usr/share/datasets/fashion-mnist

.PHONY: install data demo test lint bench

install:
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	$(MAKE) data

# Fashion-MNIST ships as a Debian package; install it when missing and apt is usable.
data:
	@if [ ! -f $(FASHION)/train-images-idx3-ubyte.gz ] && [ ! -f $(FASHION)/train-images-idx3-ubyte ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "could not install dataset-fashion-mnist; put the IDX files in $(FASHION) or set data.root"; \
	  else echo "Fashion-MNIST not found in $(FASHION): install the Debian package dataset-fashion-mnist or set data.root"; fi; \
	fi

demo:
	$(PY) -m hawq.quantize --config configs/fashion_resnet.yaml

test:
	$(PY) -m pytest -q -x --durations=15

lint:
	$(PY) -m ruff check hawq tests scripts

bench:
	$(PY) -m pip install -q -e ".[bench]"  # PyHessian and BackPACK, the sensitivity baselines
	$(PY) scripts/bench_sensitivity.py  # 1 thread; --cases KEY,... for a subset (--list)
	$(PY) scripts/bench_search.py
	$(PY) scripts/bench_integer.py
