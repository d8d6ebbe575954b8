# Two commands set everything up from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean repro-cpu repro-cpu-seeds repro-alpha

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m actrain.demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest tests

# CPU-scale reproduction of the paper (docs/reproduction.md); resumable.
repro-cpu: $(STAMP)
	scripts/repro.sh table2

# Seeds 1 and 2 of the Table 2 runs (after repro-cpu), and a report over the three seeds.
repro-cpu-seeds: $(STAMP)
	scripts/repro.sh table2-seeds

repro-alpha: $(STAMP)
	scripts/repro.sh alpha

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs/demo-*
