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

.PHONY: demo test test-slurm lint clean-demo env gpu-check wheelhouse

env: $(STAMP)

# The environment is rebuilt when requirements change. Only the project's own files are used.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt $(QUIET_PIP)
	$(BIN)/pip install --quiet --no-deps -e . $(QUIET_PIP)
	$(BIN)/python -c "import kolors_story, diffusers, data_juicer, aesthetics_predictor, snakemake; from modelscope.msdatasets import MsDataset"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile demo/config.yaml
	@echo "Demo outputs: results/demo/ (story.png, scenes/, scores.json, bundle/, manifest.json)"

test: $(STAMP)
	$(BIN)/python -m pytest

# The demo through profiles/slurm on a real single-node SLURM started here (root, Debian: installs
# slurmctld/slurmd/slurmdbd/munge/mariadb-server if missing), compared byte for byte with a local
# run, then a lost node (README "Running on a SLURM cluster"). The cluster stops even on failure.
test-slurm: $(STAMP)
	@set -e; trap 'tests/slurm/cluster.sh down' EXIT; tests/slurm/cluster.sh up; \
	KOLORS_SLURM_TEST=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/slurm -s -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile demo/config.yaml

clean-demo:
	rm -rf results/demo resources/tiny resources/demo

# The real code path at full size on one CUDA GPU, no download (README "Checking a GPU host").
# With wheelhouse/ (from `make wheelhouse`) it runs on the host's own python3 + torch, offline;
# otherwise in .venv. GPU_CHECK_ARGS passes options, e.g. GPU_CHECK_ARGS="--model /data/Kolors-diffusers".
WHEELHOUSE := wheelhouse
GPU_SITE := /tmp/kolors-story-site
GPU_CHECK_ARGS ?=
gpu-check:
	@set -e; if [ -d $(WHEELHOUSE) ]; then \
	  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(WHEELHOUSE)/*.whl; \
	  export PYTHONPATH=$(GPU_SITE):$(CURDIR)/src KOLORS_TOKENIZER_DIR=$(CURDIR)/$(WHEELHOUSE)/kolors_tokenizer; PYBIN=python3; \
	elif [ -x $(BIN)/python ]; then PYBIN=$(BIN)/python; \
	else echo "gpu-check: run 'make env' (online) or copy a wheelhouse/ from 'make wheelhouse PY=3.x' first" >&2; exit 2; fi; \
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $$PYBIN -m kolors_story.gpu_check $(GPU_CHECK_ARGS)

# Wheels (torch excluded) + the Kolors tokenizer for an offline GPU host whose Python is $(PY).
PY ?= 3.12
wheelhouse: $(STAMP)
	$(BIN)/python -m kolors_story.wheelhouse --python $(PY) --out $(WHEELHOUSE) $(QUIET_PIP)
