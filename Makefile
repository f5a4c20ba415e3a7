# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
# pip on this kind of machine prints a warning per missing local index folder; drop those lines
# but keep pip's exit status (process substitution, not a pipe).
QUIET_PIP = 2> >(grep -v "^WARNING: Location" >&2)
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test lint clean-demo env

env: $(STAMP)

# The environment is rebuilt when requirements change. Only the project's own files are used.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt $(QUIET_PIP)
	$(BIN)/pip install --quiet --no-deps -e . $(QUIET_PIP)
	$(BIN)/python -c "import kolors_story, diffusers, data_juicer, aesthetics_predictor, snakemake"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile demo/config.yaml
	@echo "Demo outputs: results/demo/ (story.png, scenes/, scores.json, bundle/, manifest.json)"

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile demo/config.yaml

clean-demo:
	rm -rf results/demo resources/tiny resources/demo
