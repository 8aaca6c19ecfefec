# qready: `make demo` and `make test` are all the set-up a fresh machine needs.
#   TORCH_SPEC  the torch requirement installed when no torch is importable (default: torch==2.13.0,
#               CPU wheel). For a CUDA build, e.g.: make test TORCH_SPEC="torch==2.13.0 --index-url URL"
#   PYTHON      the interpreter used to create .venv (default: python3)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qready-installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
		if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
			echo "using the torch already importable by $(PYTHON)"; \
			$(PYTHON) -m venv --system-site-packages $(VENV); \
		else \
			$(PYTHON) -m venv $(VENV); \
		fi; \
	fi
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "installing $(TORCH_SPEC)"; \
		$(PY) -m pip install --quiet $(TORCH_SPEC); \
	fi
	$(PY) -m pip install --quiet -e ".[data,plots,export,hf,coreml,images,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qready demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
