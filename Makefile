# The two set-up commands of the README: `make pipeline` (main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/jaxdistill: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: test pipeline
test: $(BIN)/jaxdistill
	$(BIN)/python -m pytest -q tests

pipeline: $(BIN)/jaxdistill
	$(BIN)/jaxdistill pipeline configs/job_search/pipeline.yaml --preset laptop
