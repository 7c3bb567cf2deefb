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

.PHONY: all setup test demo bench verify-full-size package validate clean bpy42 test-bpy42

# A second Blender for the add-on tests: bpy 4.2 LTS (the oldest Blender the manifest
# allows) as a Python module in its own venv. tests/blender_helpers.py runs every Blender
# scenario with it too when this venv exists (or MULTIPLANE_BPY42_PYTHON points at one).
BPY42_VENV ?= .venv-bpy42
BPY42_SPEC ?= bpy==4.2.23
BPY42_STAMP := $(BPY42_VENV)/.multiplane-bpy42-installed

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

# The whole suite; the Blender scenarios parametrized over both Blenders (each_blender) run
# on bpy 4.2 in $(BPY42_VENV) already, so the second pass, every other add-on test with
# bpy 4.2 LTS driving the Blender side, leaves them out (`make test-bpy42` runs them all).
test: $(STAMP) $(BPY42_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	MULTIPLANE_BLENDER_PYTHON=$(abspath $(BPY42_VENV))/bin/python $(PY) -m pytest tests/test_addon_*.py -m "not each_blender" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m tools.demo --out demo

bpy42: $(BPY42_STAMP)

$(BPY42_STAMP):
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 is required for bpy 4.2"; exit 1; }
	$(PYTHON) -m venv $(BPY42_VENV)
	$(BPY42_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(BPY42_SPEC)" "numpy>=1.26,<2" pillow pytest
	$(BPY42_VENV)/bin/python -c 'import bpy; print("bpy", bpy.app.version_string)'
	touch $(BPY42_STAMP)

# Every add-on test with bpy 4.2 LTS running the Blender scenarios (the engine/server side
# still runs in $(VENV)).
test-bpy42: $(STAMP) $(BPY42_STAMP)
	MULTIPLANE_BLENDER_PYTHON=$(abspath $(BPY42_VENV))/bin/python $(PY) -m pytest tests/test_addon_*.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

# Every preset (sdxl, sd15) at its real size with random weights, from a temporary Hugging
# Face cache, through the real CLI offline; deleted afterwards. Needs ~9 GB of disk and
# ~21 GB of RAM for SDXL on a CPU (see README, "Full-size check"). Not part of `make test`.
FULL_SIZE_ARGS ?=
verify-full-size: $(STAMP)
	$(PY) -u -m tools.full_size verify $(FULL_SIZE_ARGS)

validate: $(STAMP)
	$(PY) -m tools.addon_tools validate

package: $(STAMP)
	$(PY) -m tools.addon_tools build --output-dir dist

clean:
	rm -rf $(VENV) $(BPY42_VENV) .pytest_cache dist demo
