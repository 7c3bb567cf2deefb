# Multiplane: the two everyday commands are `make demo` and `make test`.
# Everything installs into a local virtual environment ($(VENV)) from nothing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned and installed first. On a machine without CUDA, point TORCH_INDEX_URL at
# PyTorch's CPU wheel index so pip cannot pick a multi-GB CUDA build; a local wheel found by
# pip (e.g. via PIP_FIND_LINKS) is used as is.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
OPEN_CLIP_SPEC ?= open_clip_torch==3.3.0
STAMP := $(VENV)/.multiplane-installed
PYTEST_ARGS ?=

.PHONY: all setup test demo bench package validate clean

all: test

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt Makefile
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 is required (python3.11 not found)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || \
		{ echo "error: $(PYTHON) is not Python 3.11 (bpy 5.0 wheels exist only for 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(PY) -c 'import torch; print("torch", torch.__version__)' > $(VENV)/torch-installed.txt
	$(PY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/constraints.txt
	$(PIP) install -q --disable-pip-version-check -c $(VENV)/constraints.txt -r requirements.txt -r requirements-dev.txt
	# Only for the CLIP BPE vocabulary it ships (offline tokenizer for the tiny model); its
	# dependencies (torchvision...) are not needed and break beside the CPU torch.
	$(PIP) install -q --disable-pip-version-check --no-deps "$(OPEN_CLIP_SPEC)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m server demo --out demo

bench: $(STAMP)
	$(PY) -m bench

validate: $(STAMP)
	$(PY) -m addon_tools validate

package: $(STAMP)
	$(PY) -m addon_tools build --output-dir dist

clean:
	rm -rf $(VENV) .pytest_cache dist demo
