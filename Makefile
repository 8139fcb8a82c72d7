# The two commands: `make demo` and `make test`. Each installs what is missing into .venv/ first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

# torch==2.13.0 (CPU) comes from a local wheel dir where one exists, else from the PyTorch CPU index.
# An unpinned torch would pull gigabytes of CUDA packages, so it is installed first and pinned.
TORCH_WHEELS ?= /opt/wheels
TORCH_SOURCE := $(if $(wildcard $(TORCH_WHEELS)/torch-*.whl),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
UV_INSTALL   := $(BIN)/uv pip install --python $(BIN)/python $(TORCH_SOURCE)

.PHONY: demo test test-demo install lock clean browser record

demo: $(STAMP)
	$(BIN)/lmforge up
	$(BIN)/lmforge run --source builtin

# The run record in git (dvc.lock, data.dvc and the small outputs) from `make demo` in a fresh clone of
# HEAD: commit the code first, then `make record`, then commit what it copied here.
RECORD := .record
record:
	rm -rf $(RECORD) && git clone -q . $(RECORD)
	$(MAKE) -C $(RECORD) demo; status=$$?; cd $(RECORD) && .venv/bin/lmforge down; exit $$status
	cd $(RECORD) && git ls-files --others --modified --exclude-standard | grep -E '^(dvc\.lock|data\.dvc|artifacts/)' \
	  | xargs cp --parents -t $(CURDIR)
	rm -rf $(RECORD)

# The suite on 2 pytest-xdist workers (a test module runs whole on one of them; see tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not demo"

# The demo profile trained on tinyshakespeare (6 min); `make record` runs the demo itself on the builtin corpus.
test-demo: $(STAMP)
	$(BIN)/python -m pytest -m demo

# Debian's Chromium for the Prefect UI test; where apt cannot install it, that one test skips with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the UI test will skip"

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv
	$(UV_INSTALL) --compile-bytecode torch==2.13.0
	$(UV_INSTALL) --compile-bytecode -r requirements.lock
	$(UV_INSTALL) --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

# Re-resolve the lock (only when changing dependencies in pyproject.toml).
lock:
	$(BIN)/uv pip compile pyproject.toml --extra test $(TORCH_SOURCE) --python $(BIN)/python -o requirements.lock

clean:
	$(BIN)/lmforge down || true
	rm -rf artifacts .lmforge
