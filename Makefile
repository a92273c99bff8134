# Two set-up commands for a fresh machine: `make sweep` and `make test`. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: sweep test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

sweep: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(PY) run_sweep.py --method amtl --samples 4

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q --durations=20 tests

bench: $(STAMP)
	$(PY) bench/trainer.py
	$(PY) bench/balancers.py
	$(PY) bench/sweep.py

clean:
	rm -rf $(VENV) runs .cache
