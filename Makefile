# Convenience targets; each is one documented command.
PY ?= python

.PHONY: install test test-slow ci bench fixtures lint

install:
	pip install -e '.[test]'

test:            ## the default suite (README's test command)
	$(PY) -m pytest -q

test-slow:       ## the slow end-to-end scans of every fixture
	$(PY) -m pytest -q -m slow

ci:              ## what CI runs
	bash .ci/run

bench:           ## side-by-side benchmark -> bench/results.md
	$(PY) bench/run.py

fixtures:        ## retrain every fixture from real data (see fixtures/README.md for the data)
	$(PY) fixtures/build.py

lint:
	ruff check ncscan tests bench
