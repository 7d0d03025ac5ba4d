# Two commands: `make demo` (train the embedded default) and `make test` (the suite).
# Both start from the same idempotent setup step (tools/setup.sh); the tests start with the
# linter and the format check (ruff, configured in pyproject.toml).
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	@./tools/setup.sh

demo: setup
	$(PY) train.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q
