# Two entry points: `make demo` (the main job on the built-in data) and `make test` (the linter, then the
# test suite: the command CI runs). `make lint` runs the linter alone (ruff, configured in pyproject.toml).
# Both are idempotent: they create .venv, install latentgen at the tested versions of constraints.txt
# (`make demo` its runtime dependencies only, `make test` also the dev extras: the peers, gradio, the
# browser driver, ...), and fetch Debian's emoji font when it is missing and we are root (`make test` also
# fetches Debian's chromium and chromium-driver, the headless browser of the web app's test).
# `make install CONSTRAINTS=` (or `export CONSTRAINTS=`) installs without the pins, in a fresh .venv.
PYTHON ?= python3
CONSTRAINTS ?= constraints.txt
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

.PHONY: demo lint test test-slow install install-dev fonts browser constraints

demo: install fonts
	$(PY) -m pipelines.demo $(ARGS)

# Pyflakes, import order and 120-column lines; `$(PY) -m ruff check --fix .` fixes most findings.
lint: install-dev
	$(PY) -m ruff check .

test: lint fonts browser
	$(PY) -m pytest -q $(ARGS)

test-slow: install-dev fonts
	$(PY) -m pytest -q -m slow $(ARGS)

install: $(STAMP)
install-dev: $(DEV_STAMP)

# A change to setup.cfg, pyproject.toml or the constraints file reinstalls. The demo needs no dev extra,
# so a first `make demo` does not spend its minutes installing diffusers, gradio, pyarrow, ...
$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(PY) -m pip install -q -e . --config-settings editable_mode=compat $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(DEV_STAMP)

# Rewrite constraints.txt from a fresh venv: the newest releases that setup.cfg's bounds allow. Then run
# `make test` (which reinstalls .venv at the new pins) before committing it.
constraints:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "resolving in a fresh venv ($$tmp) without constraints ..."; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q -e '.[dev]' --config-settings editable_mode=compat; \
	"$$tmp/venv/bin/python" -m common.environment --constraints > "$$tmp/constraints.txt"; \
	mv "$$tmp/constraints.txt" constraints.txt; \
	echo "wrote constraints.txt ($$(grep -c '==' constraints.txt) pins)"

fonts:
	@if [ -f $(EMOJI_FONT) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's fonts-noto-color-emoji for the emoji dataset"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null; \
	else \
		echo "MISSING: the emoji dataset needs Debian's fonts-noto-color-emoji: run 'sudo apt-get install fonts-noto-color-emoji'"; \
	fi

# tests/test_app_browser.py drives the web app in Debian's chromium through its chromedriver (and skips,
# saying why, without them).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium and chromium-driver for the web app's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "MISSING: the web app's browser test needs chromium and chromedriver: run 'sudo apt-get install chromium chromium-driver' (it skips without them)"; \
	fi
