# The README's two commands: `make demo` and `make test`. Torch is installed first, pinned (TORCH_SPEC),
# so pip never resolves an unpinned torch (on a CPU-only machine that would download a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
BIN := $(abspath $(VENV))/bin
STORE := sqlite:///$(abspath .)/mlflow.db
PYTEST_ARGS ?= -q

export PATH := $(BIN):$(PATH)

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ldmflow demo-data --output_dir $(DEMO_DIR)/data --num_images 96 --resolution 32 --seed 0
	$(BIN)/ldmflow check-manifest --manifest_path $(DEMO_DIR)/data/manifest.json
	MLFLOW_TRACKING_URI=$(STORE) $(BIN)/ldmflow init-store
	MLFLOW_TRACKING_URI=$(STORE) $(BIN)/mlflow run . -e pipeline --env-manager local --experiment-name ldmflow \
		-P manifest_path=$(DEMO_DIR)/data/manifest.json -P output_root=$(DEMO_DIR)/outputs -P preset=demo
	@echo
	@echo "Done. Browse the runs, preview grids and registered models with:"
	@echo "    $(BIN)/mlflow ui --backend-store-uri $(STORE) --port 5000"
	@echo "then open http://127.0.0.1:5000 (Experiments > ldmflow, and Models)."
	@echo "Lineage of the latent DDPM:  MLFLOW_TRACKING_URI=$(STORE) $(BIN)/ldmflow lineage models:/ldmflow-latent-ddpm/1"

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DIR) outputs mlflow.db mlartifacts .pytest_cache
