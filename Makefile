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

.PHONY: demo test browser test-slurm lint check-config clean-demo env gpu-check wheelhouse rehearsal

env: $(STAMP)

# The environment is rebuilt when requirements change. Only the project's own files are used, and
# the real Qwen tokenizer's ranks (qwen.tiktoken, for the tiny prompt-writer model of the demo and
# the tests: kolors_story.models.random_qwen) taken from the dashscope wheel, checked by its sha256
# (the wheel is not installed: its many dependencies are not needed for one file).
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt $(QUIET_PIP)
	$(BIN)/pip install --quiet --no-deps -e . $(QUIET_PIP)
	$(BIN)/python -m kolors_story.models.random_qwen --fetch-ranks $(QUIET_PIP)
	$(BIN)/python -c "import kolors_story, diffusers, data_juicer, aesthetics_predictor, snakemake; from modelscope.msdatasets import MsDataset"
	touch $(STAMP)

DEMO_CONFIG := demo/config.yaml demo/sweep.yaml
demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile $(DEMO_CONFIG)
	@echo "Demo outputs: results/demo/, results/demo-scale0.5/, results/demo-outline/, results/demo-captions/ and"
	@echo "results/demo-compile/ (the first scene through a torch.compile'd UNet) (story.png,"
	@echo "scenes/, scores.json, bundle/, manifest.json; prompts.yaml: the outline's scene prompts, written by the tiny local"
	@echo "Qwen; data/captions.html: the captions the tiny BLIP wrote through Data-Juicer),"
	@echo "ranked in results/leaderboard.csv and .png; the report: $(BIN)/snakemake --report report.html --configfile $(DEMO_CONFIG)"

# Debian packages the tests use: chromium + CJK fonts for the report's browser check (installed
# when missing and root with apt-get; otherwise that one test is skipped, saying why).
BROWSER_PACKAGES := chromium fonts-noto-cjk
browser:
	@if [ -x /usr/bin/chromium ] && fc-list :lang=zh | grep -q .; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null; \
	else echo "note: no chromium; the report's browser test will be skipped (apt-get install -y $(BROWSER_PACKAGES))"; fi

# The suite in up to 4 processes (one per core): most tests hold one core (one torch thread), and a
# file's tests stay in one process, so a file's module fixtures (the demo run) are built once.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(STAMP) browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The demo through profiles/slurm on a real single-node SLURM started here (root, Debian: installs
# slurmctld/slurmd/slurmdbd/munge/mariadb-server if missing), compared byte for byte with a local
# run, then a lost node (docs/cluster.md). The cluster stops even on failure.
test-slurm: $(STAMP)
	@set -e; trap 'tests/slurm/cluster.sh down' EXIT; tests/slurm/cluster.sh up; \
	KOLORS_SLURM_TEST=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/slurm -s -p no:cacheprovider

# Config files read strictly: a YAML error with its file, line and column (Snakemake's message for a
# --configfile names neither), a key given twice. make check-config CONFIGS="demo/config.yaml my.yaml"
CONFIGS ?= config.yaml
check-config: $(STAMP)
	$(BIN)/kolors-story-check-config $(CONFIGS)

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile demo/config.yaml

clean-demo:
	rm -rf results/demo results/demo-scale0.5 results/demo-outline results/demo-captions results/demo-compile \
	  results/shared results/leaderboard.* \
	  resources/tiny resources/demo resources/cache/llm resources/cache/captions results/.seals/demo \
	  results/.seals/demo-scale0.5 results/.seals/demo-outline results/.seals/demo-captions results/.seals/demo-compile \
	  results/.seals/shared results/.seals/leaderboard.* resources/.seals

# The real code path at full size on one CUDA GPU, no download (docs/gpu-host.md, "Checking a GPU host").
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
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $$PYBIN -m kolors_story.tools.gpu_check $(GPU_CHECK_ARGS)

# The real DAG (snakemake itself) on full-size random Kolors weights at 256 px on this CPU: each
# job's time and peak memory beside the weights it holds (bench/rehearsal.py; docs/gpu-host.md).
# Not in CI (~45 min, 24 GB); its tiny twin runs in make test. REHEARSAL_ARGS="--precision bf16" etc.
REHEARSAL_ARGS ?=
rehearsal: $(STAMP)
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $(BIN)/python bench/rehearsal.py $(REHEARSAL_ARGS)

# Wheels (torch excluded) + the Kolors tokenizer for an offline GPU host whose Python is $(PY).
PY ?= 3.12
wheelhouse: $(STAMP)
	$(BIN)/kolors-story-wheelhouse --python $(PY) --out $(WHEELHOUSE) $(QUIET_PIP)
