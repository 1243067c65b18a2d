# Every target that needs the environment builds it first, so each is one command on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
TORCHVISION ?= torchvision==0.29.1
# Another package index for torch and torchvision, e.g. a CPU-only build without the CUDA libraries:
# make setup TORCH=torch==2.9.1 TORCHVISION=torchvision==0.24.1 TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PY := $(VENV)/bin/python

.PHONY: setup demo train test bench tables analyze docs clean

setup: $(VENV)/.installed

# pip prints errors only (-qq): a failed install still says why.
$(VENV)/.installed: pyproject.toml
	@echo "Setting up $(VENV) with $(TORCH), $(TORCHVISION) and gnp (a few minutes the first time)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --upgrade pip
	@$(PY) -m pip install -qq $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)" "$(TORCHVISION)"
	@$(PY) -m pip install -qq -e ".[dev,slurm]"
	@touch $@
	@echo "$(VENV) is ready"

demo: setup
	$(PY) scripts/demo.py

train: setup
	$(PY) train.py $(ARGS)

# One test process per core (TEST_PROCESSES=0: all in this one); a module's tests stay in one process, which
# builds the module's fixtures once, and the modules of most slow tests start first (tests/conftest.py).
TEST_PROCESSES ?= auto
test: setup
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

# Speed of the training loop against its limits (docs/speed.md); on CUDA also the end-to-end checks.
bench: setup
	$(PY) scripts/benchmark.py $(ARGS)

# The paper's tables and figures from the runs in $(RUNS) (results/tables/, results/figures/).
RUNS ?= runs
tables: setup
	$(PY) scripts/make_tables.py $(RUNS) $(ARGS)

# The flatness of the finished runs in $(RUNS) (docs/flatness.md): their analysis.json.
analyze: setup
	$(PY) -m gnp.analysis $(RUNS) $(ARGS)

# The generated method settings (conf/method/settings/) and the parts of docs/ generated from conf/,
# results/benchmarks/ and conf/table/ (tests fail while one is stale).
docs: setup
	$(PY) scripts/method_settings.py
	$(PY) scripts/docs.py
	$(PY) scripts/benchmark.py --docs
	$(PY) scripts/reproduce.py --docs

clean:
	rm -rf outputs multirun wandb .pytest_cache
