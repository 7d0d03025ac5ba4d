# Two commands: `make demo` (train the embedded default) and `make test` (the suite).
# Both start from the same idempotent setup step (tools/setup.sh).
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	@./tools/setup.sh

demo: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest -q
