# mmgrow: the two set-up commands of the README.
#   make demo  - create .venv, install mmgrow, train the quickstart recipe on CPU, print where the GIFs are
#   make test  - create .venv if needed, install the dev, video and text extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmgrow-installed
RUN    ?= runs/quickstart

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.1"
	$(PY) -m pip install --quiet -e ".[dev,video,text]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mmgrow fit --config recipes/quickstart.yaml --trainer.default_root_dir $(RUN)
	@echo ""
	@echo "Run directory: $(RUN)"
	@echo "Generated videos for held-out captions: $$(ls $(RUN)/samples/*.gif | head -n 8 | tr '\n' ' ')"
	@echo "Summary: $(RUN)/summary.json   Loss plot: $(RUN)/plots/loss.png"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check mmgrow tests plugins benchmarks

bench: $(STAMP)
	$(PY) benchmarks/loop_overhead.py

clean:
	rm -rf runs .pytest_cache
