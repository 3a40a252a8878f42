# The two commands a newcomer runs on a fresh clone: `make demo` and `make test`.
# Each creates .venv and installs the package into it on first use.
PYTHON ?= python3
# Extra pip arguments for torch, e.g. the CPU-only wheel on any machine:
#   make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from the index pip is configured with (PyPI's Linux wheel is a CUDA build; see TORCH_PIP_ARGS).
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[dev,lite]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) runs build *.egg-info
