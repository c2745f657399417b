# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: install demo lint test test-heavy test-slow test-shipped clean teacher arm64-runner host-runner emulators serve browser

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

SDXS := $(PY) -m sdxs_edge.cli
DEMO_PROMPT := a large cyan triangle at the bottom left on a black background

# The main job, offline: generate with the embedded one-step model on CPU, lower it to an int8
# ExecuTorch bundle (PT2E + XNNPACK, sensitivity pass), run that bundle with the ExecuTorch runtime (the
# fastest sdxs-edge CPU path for this model: benchmarks/results/default_model-64-x86-64-avx512-vnni), and print its parity
# table against PyTorch (per component, end to end, SHAPES-64 all-correct rate).
demo: install
	$(SDXS) generate "$(DEMO_PROMPT)" --seed 0 --out out/demo.png
	$(SDXS) convert sdxs_edge/default_model --target executorch --precision int8 --out out/default-pte-int8 --overwrite
	$(SDXS) run out/default-pte-int8 "$(DEMO_PROMPT)" --runtime executorch --seed 0 --out out/demo-int8.png
	$(PY) -c "from sdxs_edge import shapes; print('\n'.join(s.caption for s in shapes.eval_scenes(128, 0)))" > out/eval-prompts.txt
	$(SDXS) parity out/default-pte-int8 --runtime executorch --prompts out/eval-prompts.txt --json out/default-pte-int8-parity.json

# ruff lint and format check (rules in pyproject.toml [tool.ruff]); `make test` runs it first.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The local app: a page and an HTTP API at the printed URL (http://127.0.0.1:7860/). With no arguments it
# serves the embedded model, its canny ControlNet and its outline LoRA, converted once to int8 ExecuTorch
# into ~/.cache/sdxs-edge (a line per bundle; reused afterwards). Ctrl-C stops it. docs/app.md.
serve: install
	$(SDXS) serve $(SERVE_ARGS)

# Headless Chromium and its driver for the page's browser test (Debian packages); idempotent.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver)

# host-runner: the executorch-native runtime's tests and benchmark path run the C++ runner; browser: the
# page's test in headless Chromium; emulators: the int8 checks as an AVX2-only x86-64 CPU and as arm64
# run under qemu (sdxs_edge/cpu.py).
test: install lint host-runner browser emulators
	$(PY) -m pytest -q

# Per-test time limit of the suites whose tests take minutes (`make test`'s is in pyproject.toml).
LONG_TEST_S := 3600

# The tests that take minutes each (marker `heavy`): whole models lowered to ExecuTorch, bundles at several
# sizes, training chains, kill-and-resume runs (none needs the browser or the emulators). CI runs it after
# `make test`.
test-heavy: install host-runner
	$(PY) -m pytest -q -m heavy --timeout $(LONG_TEST_S)

test-slow: install
	$(PY) -m pytest -q -m slow --timeout $(LONG_TEST_S)

# The shipped model on every CPU runtime: ONNX fp32/fp16/int8 and ExecuTorch fp32/int8 bundles, parity
# (per component, end to end, SHAPES-64 all-correct within 3 points of fp32) on onnxruntime, executorch,
# torch, arm64-emulated and executorch-native. CI runs it after `make test` (about 15 minutes on two cores).
test-shipped: install arm64-runner host-runner
	$(PY) -m pytest -q -s -m shipped --timeout $(LONG_TEST_S)

# qemu user-mode emulators from Debian (qemu-user-static); idempotent.
emulators:
	@command -v qemu-x86_64-static >/dev/null || bash -c 'source runtimes/native/compile.sh && apt_install qemu-user-static'

# The aarch64 ExecuTorch runner for the arm64-emulated runtime (Debian cross compiler + qemu, the
# executorch aarch64 wheel from PyPI); idempotent.
arm64-runner:
	runtimes/native/build_arm64.sh

# The same runner for this machine, against the installed executorch wheel (no PyTorch in its process),
# and libsdxs + sdxs-run (docs/c-api.md; Debian's nlohmann-json3-dev and libstb-dev, installed when missing).
host-runner: install
	runtimes/native/build_host.sh

teacher: install
	$(PY) -m sdxs_edge.cli train teacher --preset shapes --out runs/shapes-teacher

clean:
	rm -rf $(VENV) out build *.egg-info
