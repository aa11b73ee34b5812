# Fresh clone -> `make demo` / `make test`. Only Python 3.11 is needed beforehand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull the newest build, from PyPI a
	# multi-GB CUDA one. The project's machines serve a CPU build of 2.13.0; elsewhere give
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu for one.
	$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	# one worker per core (pytest-xdist): on 2 cores 6.9 minutes (2026-12-02, idle), 18.3 serially before
	$(VENV)/bin/pytest -q -n auto

demo: $(STAMP)
	rm -f example.h5
	$(VENV)/bin/hessian-cli analyze checkpoints_example/digits_mlp.pt --num-samples 512 --batch-size 64 \
		--top-k 5 --trace --density --density-probes 4 --density-steps 48 --alignment --out example.h5
	$(VENV)/bin/hessian-cli plot example.h5 -o example.png
	@echo "wrote example.h5 and example.png"

bench: $(STAMP)
	# both peers that peers.py compares against: the bench extra holds hessian-eigenthings only,
	# and without PyHessian every one of its rows failed and its targets had no ratio
	$(PY) -m pip install -q -e ".[bench]" pyhessian==0.1
	$(PY) benchmarks/peers.py

clean:
	rm -rf $(VENV) example.h5 example.png
