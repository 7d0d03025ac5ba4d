# Two commands: `make demo` (train the embedded default) and `make test` (the suite).
# Both start from the same idempotent setup step (tools/setup.sh); the tests start with the
# linter and the format check (ruff, configured in pyproject.toml) and the documentation site's
# strict build (a broken link or a missing page fails it); the suite runs on every core, the tests
# that start torchrun one at a time (xdist_group "processes"). `make docs` builds the site in site/.
PY := .venv/bin/python
# mkdocs-material's notice about its successor, printed on every build
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup demo test docs
setup:
	@./tools/setup.sh

demo: setup
	$(PY) train.py

docs: setup
	$(PY) -m mkdocs build --strict

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mkdocs build --strict --quiet
	$(PY) -m pytest -q -n auto --dist loadgroup
