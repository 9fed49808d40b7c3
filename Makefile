# The README's two commands: `make demo` and `make test`. Torch is installed first, pinned (TORCH_SPEC),
# so pip never resolves an unpinned torch (on a CPU-only machine that would download a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
BIN := $(abspath $(VENV))/bin
# The demo's tracking store: MLFLOW_TRACKING_URI when set (e.g. the team server of `make server`), else ./mlflow.db.
STORE := $(if $(MLFLOW_TRACKING_URI),$(MLFLOW_TRACKING_URI),sqlite:///$(abspath .)/mlflow.db)
PYTEST_ARGS ?= -q --durations=15
# Test lanes: `make test-fast` (no training, about a minute: the inner loop), `make test` (the README's command and
# CI's: everything but the end-to-end runs marked slow, within 8 minutes on 2 CPU cores) and `make test-all`
# (also MLflow Projects, multi-process, PostgreSQL team server, inductor and benchmark smoke runs).
# MLFLOW_LOGGING_LEVEL=WARNING: `mlflow run` prints its temporary folder and the whole command line otherwise;
# ldmflow prints each step's run and the result.
# Demo sizes: about 12 minutes on a 2-core CPU, chosen over 3 seeds to meet the demo's targets (benchmarks/demo_scores.py,
# docs/evaluation.md); the VAE trains at its own rate. Real runs use the entry points' defaults (256 px, 50 epochs).
DEMO_PARAMS ?= -P resolution=64 -P vae_train_batch_size=8 -P ddpm_train_batch_size=8 -P vae_epochs=50 \
	-P ddpm_epochs=600 -P vae_block_out_channels=32,32,64,64 -P ddpm_block_out_channels=64,64 -P layers_per_block=1 \
	-P num_images=8 -P learning_rate=0.001 -P vae_learning_rate=0.0003 -P lr_warmup_steps=20 -P save_images_epochs=50 \
	-P kl_weight=0.000001

export PATH := $(BIN):$(PATH)

.PHONY: install lock demo test test-fast test-all test-portable fuzz mlproject options clean server server-stop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip

# The environment is requirements.lock, exactly: torch first (TORCH_SPEC; a CUDA build satisfies the lock's
# torch==X too), then every locked package without resolving anything, then ldmflow itself. `make lock` writes
# the lock (and conda.yaml) again from pyproject.toml in a fresh environment.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m ldmflow.lock check
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $@

install: $(VENV)/.installed

LOCK_VENV := $(abspath .lock-venv)
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet $(TORCH_SPEC)
	$(LOCK_VENV)/bin/pip install --quiet ".[$(shell $(PYTHON) -c 'import sys; sys.path.insert(0, "."); from ldmflow.lock import LOCKED_EXTRAS; print(",".join(LOCKED_EXTRAS))')]"
	$(LOCK_VENV)/bin/pip freeze --exclude ldmflow | $(LOCK_VENV)/bin/python -m ldmflow.lock write \
		"$$($(LOCK_VENV)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
	rm -rf $(LOCK_VENV)
	@echo "Wrote requirements.lock and conda.yaml; review with git diff, then make install."

demo: install
	$(BIN)/ldmflow demo-data --output_dir $(DEMO_DIR)/data --num_images 128 --resolution 64 --seed 0
	$(BIN)/ldmflow check-manifest --manifest_path $(DEMO_DIR)/data/manifest.json
	MLFLOW_TRACKING_URI=$(STORE) $(BIN)/ldmflow init-store
	MLFLOW_TRACKING_URI=$(STORE) MLFLOW_LOGGING_LEVEL=WARNING $(BIN)/mlflow run . -e pipeline --env-manager local \
		--experiment-name ldmflow -P manifest_path=$(DEMO_DIR)/data/manifest.json -P output_root=$(DEMO_DIR)/outputs $(DEMO_PARAMS)
	@echo
	@echo "Done. Browse the runs, preview grids and registered models with:"
	@echo "    $(BIN)/mlflow ui --backend-store-uri $(STORE) --port 5000"
	@echo "then open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (ldmflow, and Model registry)."
	@echo "Lineage of the latent DDPM:  MLFLOW_TRACKING_URI=$(STORE) $(BIN)/ldmflow lineage models:/ldmflow-latent-ddpm/1"

test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not train and not server and not processes" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The tests that compare computed tensors (marked `portable`), under the numerics of other x86-64 CPUs: no vector
# unit beyond the baseline, and AVX2 without AVX-512 (torch's kernels and oneDNN's). CI runs PORTABLE_MARK's
# default lane; `make test-portable PORTABLE_MARK=portable` adds the slow ones.
PORTABLE_MARK ?= portable and not slow
test-portable: install
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -m "$(PORTABLE_MARK)" $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -m "$(PORTABLE_MARK)" $(PYTEST_ARGS)

# The Hypothesis suites with many more examples than CI's profile (tests/conftest.py); minutes, not seconds.
FUZZ_TESTS ?= tests/data/test_fuzz_manifest.py tests/data/test_fuzz_conditions.py \
	tests/sampling/test_fuzz_condition_input.py tests/tracking/test_fuzz_model_uri.py \
	tests/tracking/test_fuzz_pyfunc_input.py tests/workflows/test_fuzz_seeds.py tests/workflows/test_fuzz_sweep_space.py tests/data/test_fuzz_caches.py \
	tests/test_settings_bounds.py \
	tests/test_fuzz_cli.py
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest $(FUZZ_TESTS) $(PYTEST_ARGS)

# A team server on this machine: PostgreSQL + MLflow with proxied artifacts and basic auth (docs/mlflow.md).
server: install
	$(BIN)/ldmflow server --root $(abspath team-server)

server-stop:
	$(BIN)/ldmflow server-stop --root $(abspath team-server)

# MLproject is generated from ldmflow/settings.py (tests fail when it is out of date).
mlproject: install
	$(BIN)/python -m ldmflow.projects > MLproject.tmp && mv MLproject.tmp MLproject

# docs/options.md, every option of every command, is generated the same way (tests fail when it is stale).
options: install
	$(BIN)/python -m ldmflow.projects --options > docs/options.md.tmp && mv docs/options.md.tmp docs/options.md

clean:
	rm -rf $(DEMO_DIR) outputs mlflow.db mlartifacts .pytest_cache
