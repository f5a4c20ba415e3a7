# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test lint clean-demo env

env: $(STAMP)

# The environment is rebuilt when requirements change. Only the project's own files are used.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install --quiet --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
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
