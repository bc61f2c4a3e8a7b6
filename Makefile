# The two commands of the README. Both install into a local virtual environment first.
#   make demo   - K-FAC vs SGD on the digits data, 2 CPU processes
#   make test   - the test suite
#   make docs   - the documentation site, built in strict mode into site/
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# A pinned CPU build keeps the install small and reproducible; the package itself takes a range.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint docs install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,docs]"
	touch $@

demo: install
	$(PY) examples/digits_demo.py

test: install
	$(PY) -m pytest -q

# ruff (lint and format) and mypy, as CI runs them before the tests
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# the site, into site/ (ignored); strict: a broken link, a missing include or reference, or a
# docstring that does not render is an error. The banner variable quiets Material's notice.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info site
