# multinorm — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SCALE  ?= default
JOBS   ?=
TEST_WORKERS ?= auto
RESUME ?=
REUSE  ?=
ARGS   ?=
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)
FIGURE_FLAGS := --scale $(SCALE) $(if $(JOBS),--jobs $(JOBS)) $(if $(RESUME),--resume) $(if $(REUSE),--reuse) $(ARGS)

.DEFAULT_GOAL := help
.PHONY: help setup test smoke figures lab e2e bench gpu data demo clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  figures variables: SCALE=default|quick (quick: into results/quick/, figures/quick/), JOBS=N (runs trained"
	@echo "    in parallel; default one per core, at most 8), RESUME=1 (train only missing or unfinished runs), REUSE=1"
	@echo "    (train and measure nothing: redraw every figure and README section from the recorded results),"
	@echo "    ARGS='...' (more options of python -m multinorm.studies figures: --only NOTEBOOK..., --set KEY=VALUE (a notebook parameter),"
	@echo "    --results-dir DIR, --figures-dir DIR, --no-readme (leave README alone); see its --help)"
	@echo "  other variables: TEST_WORKERS=auto|N (pytest-xdist), PYTHON=python3 (venv interpreter)"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install the package with every extra at the versions of constraints.txt (idempotent)

data: $(STAMP) ## build the embedded wiki-sample corpus and tokenizer cache in data/
	$(PY) -m multinorm.data --dataset wiki-sample

test: $(STAMP) ## run the unit, end-to-end and notebook smoke tests (CPU, offline)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

smoke: $(STAMP) ## run every notebook with tiny parameters into a temporary folder
	$(PY) -m multinorm.studies smoke

figures: $(STAMP) ## re-run every study notebook and regenerate figures/ and README tables (see variables)
	$(PY) -m multinorm.studies figures $(FIGURE_FLAGS)

lab: $(STAMP) ## open JupyterLab on notebooks/ (the notebooks write where make figures does)
	$(PY) -m jupyter lab --notebook-dir=notebooks $(if $(SUDO),,--allow-root)

e2e: $(STAMP) ## open the playground in headless Chromium, check its widgets render, train -> figures/playground.png
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		$(SUDO) apt-get install -y chromium chromium-driver || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; }
	$(PY) -m multinorm.studies.e2e --steps 64 --out figures/playground.png

bench: $(STAMP) ## benchmark: optimizer steps vs AdamW, floors, nano training, communication -> results/bench/
	$(PY) -m multinorm.bench --out results/bench
	$(PY) -m multinorm.bench.comm --out results/bench

gpu: ## on a GPU machine: optimizer steps, training tokens/s and memory at 350M/1B, two-process runs -> results/gpu/
	PYTHONPATH=src $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m multinorm.bench.gpu --out results/gpu $(ARGS)

demo: $(STAMP) ## a short training run: nano LLaMA, wiki-sample, AdamW
	$(PY) -m multinorm.train --model nano --dataset wiki-sample --optimizer adamw --tokens 2000000 --overwrite

clean: ## remove the virtualenv and caches (keeps results/ and figures/)
	rm -rf $(VENV) .pytest_cache src/*.egg-info
