"""`ldmflow sweep` on tiny VAEs against a temporary SQLite store: trials as child runs of the study's run, pruning,
the best trial registered with its alias, the parent run's report, several workers, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import invoke
from ldmflow.data.demo import make_demo_dataset
from ldmflow.tags import (ERROR_TAG, LATENT_CACHE_DIR_TAG, LATENT_CACHE_TAG, PARENT_RUN_TAG, SWEEP_BEST_COMMAND_TAG,
                          SWEEP_PRUNED_TAG, SWEEP_STUDY_TAG, SWEEP_TRIAL_TAG, VAE_URI_TAG)
from tiny import TINY_SIZES

ROOT = Path(__file__).resolve().parents[1]
# A tiny VAE: 2 steps (one epoch of 9 images), validated once on 3 images, no preview grids after step 0.
TINY_VAE = [*TINY_SIZES, "--block_out_channels", "8,8,8,8", "--max_train_steps", "2", "--scaling_factor_batches",
            "1", "--save_images_epochs", "100"]
# 1e-9 leaves the VAE as initialised: once a 0.01 trial has finished, every 1e-9 trial falls below the median.
PRUNABLE_SPACE = "learning_rate: {choices: [0.01, 1.0e-9]}\n"


def _prepare(root: Path, patch: pytest.MonkeyPatch) -> Path:
    """A demo dataset (9 train, 3 val images) and an empty SQLite tracking store, used from `root`."""
    patch.chdir(root)
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    patch.delenv("MLFLOW_RUN_ID", raising=False)
    make_demo_dataset(root / "data", num_images=12, resolution=32, seed=0, val_fraction=0.25)
    (root / "prunable.yaml").write_text(PRUNABLE_SPACE)
    return root


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    return _prepare(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def refusing_store(tmp_path_factory):
    """One store for the bad inputs (none of them may create a run, so they can share it: one migration)."""
    with pytest.MonkeyPatch.context() as patch:
        yield _prepare(tmp_path_factory.mktemp("refused"), patch)


def sweep_args(*extra, space="prunable.yaml", study="demo"):
    return ["sweep", "--stage", "vae", "--space", space, "--study_name", study, *extra,
            "--manifest_path", "data/manifest.json", "--output_dir", "trials", *TINY_VAE]


def study_runs(study: str, numbered_by_run: bool = False):
    """(the study's parent run, its trial runs by trial number, or by run id)."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(["1"], max_results=100)
    parent = next(run for run in runs if run.info.run_name == study and PARENT_RUN_TAG not in run.data.tags)
    trials = [run for run in runs if run.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id]
    return parent, {run.info.run_id if numbered_by_run else int(run.data.tags[SWEEP_TRIAL_TAG]): run for run in trials}


@pytest.mark.train
def test_a_sweep_prunes_poor_trials_and_registers_the_best(store):
    from mlflow import MlflowClient

    result = invoke(*sweep_args("--n_trials", "4", "--pruner_startup_trials", "1", "--sampler_seed", "0"))
    assert "registered models:/ldmflow-vae/1" in result.output
    parent, trials = study_runs("demo")
    assert sorted(trials) == [0, 1, 2, 3] and parent.info.status == "FINISHED"
    statuses = {number: run.info.status for number, run in trials.items()}
    assert set(statuses.values()) <= {"FINISHED", "KILLED"}, statuses
    pruned = [run for run in trials.values() if run.info.status == "KILLED"]
    assert pruned and all(run.data.tags[SWEEP_PRUNED_TAG] == "2" for run in pruned)
    assert not [run for run in pruned if ERROR_TAG in run.data.tags]  # pruned on purpose, not a crash
    assert all(run.data.params["learning_rate"] == "1e-09" for run in pruned)
    for run in trials.values():  # params, metrics and the suggested value as a sweep.* tag
        assert run.data.tags[SWEEP_STUDY_TAG] == "demo" and "val/psnr" in run.data.metrics
        assert run.data.tags["sweep.learning_rate"] == run.data.params["learning_rate"]
    client = MlflowClient()
    version = client.get_model_version_by_alias("ldmflow-vae", "sweep-demo")
    best = max((run for run in trials.values() if run.info.status == "FINISHED"),
               key=lambda run: run.data.metrics["val/psnr"])
    assert version.run_id == best.info.run_id and best.data.params["learning_rate"] == "0.01"
    assert len(client.search_model_versions("name = 'ldmflow-vae'")) == 1  # only the best trial's
    files = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "optimization_history.png", "best_params.json", "best_command.txt"} <= files
    assert "--learning_rate 0.01" in parent.data.tags[SWEEP_BEST_COMMAND_TAG]
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(store))).read_text())
    assert len(table["data"]) == 4
    # Running the command again adds nothing: the study already has its trials, and the alias stays.
    invoke(*sweep_args("--n_trials", "4", "--pruner_startup_trials", "1"))
    assert len(study_runs("demo")[1]) == 4 and len(client.search_model_versions("name = 'ldmflow-vae'")) == 1
    # ... and its report replaces the first one: each trial once, in the state its run ended in
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(store / "again")))
                       .read_text())
    rows = {row[table["columns"].index("number")]: row[table["columns"].index("state")] for row in table["data"]}
    assert len(table["data"]) == 4 and rows == {number: "COMPLETE" if run.info.status == "FINISHED" else "PRUNED"
                                                 for number, run in trials.items()}
    params = client.get_run(parent.info.run_id).data.params
    assert params["sweep_objective"] == "val/psnr" and params["sweep_direction"] == "maximize"
    assert "learning_rate" not in params  # what the study varies is each trial's param, not the study's


@pytest.mark.train
def test_a_latent_ddpm_sweep_encodes_the_dataset_once(store, caplog):
    from mlflow import MlflowClient

    common = ["--manifest_path", "data/manifest.json", "--resolution", "32", "--train_batch_size", "4",
              "--layers_per_block", "1", "--max_train_steps", "2", "--lr_warmup_steps", "0", "--save_images_epochs",
              "100"]
    invoke("vae", *common, "--output_dir", "vae", "--block_out_channels", "8,8,8,8", "--scaling_factor_batches", "1",
           "--no_mlflow")
    (store / "latent.yaml").write_text("learning_rate: {choices: [0.001, 0.002]}\n")
    caplog.set_level("INFO")
    invoke("sweep", "--stage", "latent-ddpm", "--space", "latent.yaml", "--n_trials", "2", "--pruner", "none",
           *common, "--output_dir", "trials", "--vae_uri", "vae", "--cache_latents", "--block_out_channels", "16,16",
           "--num_preview_images", "1", "--preview_inference_steps", "1")
    assert caplog.text.count("Encoding 9 images into the latent cache") == 1  # the second trial reads the cache
    assert caplog.text.count("(9 images): nothing to encode") == 1
    client = MlflowClient()
    version = client.get_model_version_by_alias("ldmflow-latent-ddpm", "sweep-latent-ddpm-latent")
    assert version.tags[VAE_URI_TAG] == "vae"
    trial = client.get_run(version.run_id)
    cache = Path(trial.data.tags[LATENT_CACHE_DIR_TAG])
    assert cache.name == trial.data.tags[LATENT_CACHE_TAG] and (cache / "index.json").is_file()
    assert [d.dataset.digest for d in trial.inputs.dataset_inputs if "latent cache" in d.dataset.name] == [cache.name]


BAD_SPACES = [
    ("unknown setting", "no_such_setting: {low: 1, high: 2}\n", "'no_such_setting' is not a setting of this stage"),
    ("fixed setting", "output_dir: {choices: [a, b]}\n", "'output_dir' is fixed for a sweep"),
    ("low > high", "learning_rate: {low: 0.01, high: 0.001}\n", "learning_rate has low 0.01 > high 0.001"),
    ("wrong choice type", "layers_per_block: {choices: [1, two]}\n", "layers_per_block takes integer values"),
    ("bool choice type", "random_flip: {choices: [yes please]}\n", "random_flip takes true/false values"),
    ("empty", "", "is empty"),
    ("refused value", "learning_rate: {low: 0.1, high: 2.0}\n", "learning_rate = 2.0 is refused by the stage"),
]


@pytest.mark.parametrize("space,expected", [case[1:] for case in BAD_SPACES], ids=[case[0] for case in BAD_SPACES])
def test_a_bad_space_is_refused_in_one_line_before_any_run(refusing_store, space, expected):
    (refusing_store / "bad.yaml").write_text(space)
    result = invoke(*sweep_args("--n_trials", "1", space="bad.yaml"), ok=False)
    assert_refused(result, expected, refusing_store)


def assert_refused(result, expected: str, store: Path) -> None:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.output
    assert "Traceback" not in result.output
    if (store / "mlflow.db").exists():
        from mlflow import MlflowClient

        assert not MlflowClient().search_runs(["0", "1"])  # no run, in the default experiment or ldmflow's


@pytest.mark.parametrize("sweep_options,stage_options,expected", [
    (["--objective", "val/fid"], [], "--objective val/fid: vae never logs it"),
    (["--objective", "val/psnr"], ["--eval_epochs", "0"], "is a validation metric"),
    (["--objective", "val/recon/condition_error_pct"], [], "needs this dataset's registered condition probe"),
    (["--storage", "not-a-url"], [], "--storage not-a-url: Could not parse"),
    ([], ["--no_such_option", "1"], "No such option"),
    (["--stage_options", "--kl_weight -1"], [], "--kl_weight must be in [0, inf]"),
    ([], ["--learning_rate", "0.001"], "--learning_rate is given on the command line and searched by the space"),
    (["--stage_options", "--learning_rate 0.001"], [], "--learning_rate is given on the command line and searched"),
], ids=["objective never logged", "objective without validation", "objective without a probe", "bad storage",
        "unknown stage option", "bad stage option", "option also searched", "stage_options also searched"])
def test_bad_objectives_and_stage_options_are_refused_before_any_trial(refusing_store, sweep_options, stage_options,
                                                                       expected):
    result = invoke(*sweep_args("--n_trials", "1", *sweep_options), *stage_options, ok=False)
    assert_refused(result, expected, refusing_store)


def test_a_study_name_reused_with_another_space_is_refused(store):
    import optuna
    from mlflow import MlflowClient

    from ldmflow.tracking.store import ensure_experiment
    from ldmflow.tracking.study import open_study, sweep_storage

    definition = {"stage": "vae", "space": {"learning_rate": {"choices": [0.5]}}, "objective": "val/psnr",
                  "direction": "maximize"}
    open_study(sweep_storage(ensure_experiment("ldmflow")), "demo", definition, optuna.samplers.RandomSampler(),
               optuna.pruners.NopPruner())
    runs_before = len(MlflowClient().search_runs(["1"]))
    result = invoke(*sweep_args("--n_trials", "1"), ok=False)
    assert result.exit_code != 0 and result.output.startswith("Error: Study 'demo' exists with another space")
    assert len(result.output.strip().splitlines()) == 1
    assert len(MlflowClient().search_runs(["1"])) == runs_before


@pytest.mark.slow
def test_two_workers_share_a_study_and_a_killed_workers_trial_is_failed_and_retried(store):
    """Two processes run the same command (an Optuna RDB study on SQLite, heartbeats every second); one is killed
    with SIGKILL mid-trial. The other marks that trial and its run FAILED, retries it, and finishes the study:
    every trial is one child run with its own number, and no run is left RUNNING."""
    import optuna
    from mlflow import MlflowClient

    invoke("init-store")  # two processes migrating a new SQLite store at once would collide
    (store / "space.yaml").write_text("learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LDMFLOW_SWEEP_HEARTBEAT_SECONDS": "1"}
    storage = f"sqlite:///{store}/optuna.db"
    command = [sys.executable, "-m", "ldmflow", *sweep_args("--n_trials", "2", "--pruner", "none", "--storage",
                                                            storage, space="space.yaml", study="shared"),
               "--max_train_steps", "300"]  # seconds per trial: the kill lands mid-trial however fast the machine
    workers = [subprocess.Popen(command, cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    for line in workers[0].stdout:  # kill the first worker while it trains a trial
        if "Training 300 steps" in line:
            workers[0].kill()
            break
    output = workers[1].communicate(timeout=240)[0]
    workers[0].wait(timeout=30)
    assert workers[1].returncode == 0, output
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    states = [trial.state for trial in trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) >= 2
    assert any(trial.system_attrs.get("failed_trial") is not None for trial in trials), "the killed trial's retry"
    assert len({trial.number for trial in trials}) == len(trials)
    parent, runs = study_runs("shared", numbered_by_run=True)
    children = MlflowClient().search_runs(["1"], f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
    assert len(children) == len(trials) and len(runs) == len(trials)
    assert sorted(run.info.status for run in children) == ["FAILED"] + ["FINISHED"] * (len(trials) - 1)


@pytest.mark.train
def test_a_sweep_with_replicates_scores_a_trial_by_the_mean_of_its_seeds_and_registers_the_typical_one(store):
    from mlflow import MlflowClient

    from ldmflow.tags import BEST_CHECKPOINT_METRIC_TAG, REPLICATE_OF_TAG, REPLICATE_REGISTERED_TAG

    (store / "one.yaml").write_text("learning_rate: {choices: [0.01]}\n")
    result = invoke(*sweep_args("--n_trials", "1", "--pruner", "none", "--replicates", "2", space="one.yaml"))
    assert "registered models:/ldmflow-vae/1" in result.output
    _, trials = study_runs("demo")
    [trial] = trials.values()
    client = MlflowClient()
    children = client.search_runs(["1"], f"tags.`{REPLICATE_OF_TAG}` = '{trial.info.run_id}'")
    assert sorted(int(run.data.params["seed"]) for run in children) == [0, 1]
    assert {run.info.status for run in children} == {"FINISHED"} and trial.info.status == "FINISHED"
    best = [float(run.data.tags[BEST_CHECKPOINT_METRIC_TAG].split("=")[1]) for run in children]
    assert trial.data.metrics["val/psnr"] == pytest.approx(sum(best) / 2, rel=1e-5)  # the study's value too
    assert trial.data.metrics["val/psnr_max"] == pytest.approx(max(best), rel=1e-5)
    assert "nearest to the group's mean" in trial.data.tags[REPLICATE_REGISTERED_TAG]
    assert client.get_model_version("ldmflow-vae", "1").run_id in {run.info.run_id for run in children}
