# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow clean teacher

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: `torch==2.13.0` is the CPU build (a loose `torch` would pull the CUDA build).
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	# Only the CLIP BPE vocabulary file of open-clip-torch is used; its dependencies (torchvision) are not.
	$(PY) -m pip install -q -c constraints.txt --no-deps open-clip-torch
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m sdxs_edge.cli generate "a large cyan triangle at the bottom left on a black background" --seed 0 --out out/demo.png

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

teacher: install
	$(PY) -m sdxs_edge.cli train teacher --preset shapes --out runs/shapes-teacher

clean:
	rm -rf $(VENV) out build *.egg-info
