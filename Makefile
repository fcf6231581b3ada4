# Two entry points: `make demo` (the main job on the built-in data) and `make test`.
# Both are idempotent: they create .venv, install latentgen with its dev extras, and fetch
# Debian's emoji font when it is missing and we are root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

.PHONY: demo test test-slow install fonts

demo: install fonts
	$(PY) -m pipelines.demo $(ARGS)

test: install fonts
	$(PY) -m pytest -q $(ARGS)

test-slow: install fonts
	$(PY) -m pytest -q -m slow $(ARGS)

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

fonts:
	@if [ -f $(EMOJI_FONT) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's fonts-noto-color-emoji for the emoji dataset"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null; \
	else \
		echo "MISSING: the emoji dataset needs Debian's fonts-noto-color-emoji: run 'sudo apt-get install fonts-noto-color-emoji'"; \
	fi
