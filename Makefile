# The two set-up commands of the README: `make pipeline` (main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/jaxdistill: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: test pipeline
# One pytest worker per core (pytest-xdist): most of the suite's time is XLA compiling, one
# thread per compilation, so a second worker uses the second core. `worksteal`: an idle worker
# takes pending tests from a busy one, so a few minute-long tests do not end the run alone.
test: $(BIN)/jaxdistill
	$(BIN)/python -m pytest -q -n auto --dist worksteal tests

pipeline: $(BIN)/jaxdistill
	$(BIN)/jaxdistill pipeline configs/job_search/pipeline.yaml --preset laptop
