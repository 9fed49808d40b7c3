"""Every MLflow tag name ldmflow sets or reads, each with where it goes; MLflow's own ones are here too.

Search filters spell tags through these names (f"tags.`{STAGE_TAG}` = ..."), so a tag is renamed in one place.
The version tags are also set on the training run that registered the version, and on its logged model.
"""

# Runs
STAGE_TAG = "ldmflow.stage"  # every run: the kind it trains (vae, latent_ddpm, ...), or sample, evaluate, pipeline
DATASET_DIGEST_TAG = "dataset_digest"  # training and evaluate runs, and versions: the manifest's content digest
REGISTERED_URI_TAG = "ldmflow.registered_model_uri"  # a training run: the version it registered (models:/name/v)
CODE_VERSION_TAG = "ldmflow.code_version"  # a pipeline run and its steps: digest of the code that ran them
PIPELINE_TAG_PREFIX = "ldmflow.pipeline."  # a pipeline run: + vae_run_id, latent_ddpm_uri, ...: its steps
SAMPLE_MODEL_URI_TAG = "ldmflow.model_uri"  # sample and evaluate runs: the model they used, as it was given
SAMPLE_MODEL_NAME_TAG = "ldmflow.model_name"  # sample and evaluate runs: that model's registered name
SAMPLE_MODEL_VERSION_TAG = "ldmflow.model_version"  # sample and evaluate runs: its registered version
SAMPLE_MODEL_ID_TAG = "ldmflow.model_id"  # sample and evaluate runs: its logged model (m-...)
SAMPLE_MODEL_RUN_TAG = "ldmflow.model_run_id"  # sample and evaluate runs: the run that trained it
LAST_CHECKPOINT_TAG = "ldmflow.last_checkpoint"  # a training run: its newest checkpoint folder
LAST_CHECKPOINT_STEP_TAG = "ldmflow.last_checkpoint_step"  # a training run: that checkpoint's step
BEST_CHECKPOINT_STEP_TAG = "ldmflow.best_checkpoint_step"  # a training run: the step of checkpoint-best
BEST_CHECKPOINT_METRIC_TAG = "ldmflow.best_checkpoint_metric"  # a training run: its score there, `metric=value`
LATENT_CACHE_TAG = "ldmflow.latent_cache"  # a latent DDPM run with --cache_latents: the cache key's digest
LATENT_CACHE_DIR_TAG = "ldmflow.latent_cache_dir"  # that run: the cache's folder
RESUMED_FROM_CHECKPOINT_TAG = "ldmflow.resumed_from_checkpoint"  # a resumed training run: the checkpoint
RESUMED_FROM_STEP_TAG = "ldmflow.resumed_from_step"  # a resumed training run: that checkpoint's step
RESUMED_FROM_RUN_TAG = "ldmflow.resumed_from_run_id"  # a resumed training run: the run that wrote the checkpoint
RESUMED_BY_RUN_TAG = "ldmflow.resumed_by_run_id"  # a run that another one resumed: that run
ERROR_TAG = "ldmflow.error"  # a FAILED run: the error that ended it, `<Type>: <message>` (traceback artifact)
EVAL_SKIPPED_TAG = "ldmflow.eval_skipped"  # an evaluate run: the scores it could not compute, and why
ENTRY_POINT_TAG = "mlflow.project.entryPoint"  # MLflow's, on `mlflow run` runs: the entry point (pipeline reuse)
RUN_NAME_TAG = "mlflow.runName"  # MLflow's: a run's name (ldmflow's replaces the random one `mlflow run` gives)
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's: nests a run under another (a probe trained for an evaluation)
ENV_TAG_PREFIX = "ldmflow.env."  # every run: + python, torch, ..., lock, lock_match, cpu, cpu_capability, threads,
#                                  cuda_device, ...: the environment it ran in (ldmflow/environment.py)
ENV_LOCK_TAG = ENV_TAG_PREFIX + "lock"  # every run, and registered versions: requirements.lock's digest (12 hex)
COMPARE_A_TAG = "ldmflow.compare.a"  # a compare run: model (or replicate group) A as it was given
COMPARE_B_TAG = "ldmflow.compare.b"  # a compare run: B as it was given
COMPARE_A_RUNS_TAG = "ldmflow.compare.a_runs"  # a compare run: the training runs of A's models, comma-separated
COMPARE_B_RUNS_TAG = "ldmflow.compare.b_runs"  # a compare run: those of B's
REPLICATES_TAG = "ldmflow.replicates"  # a replicate group's parent run: how many replicates (seeds) it holds
REPLICATE_OF_TAG = "ldmflow.replicate_of"  # a replicate's run: its group's parent run
REPLICATE_MODEL_TAG = "ldmflow.replicate.model_uri"  # a replicate's run: the model it logged (models:/<id>)
REPLICATE_REGISTERED_TAG = "ldmflow.replicate.registered"  # a group's parent: the replicate registered, and why
REPLICATE_GROUP_TAG = "ldmflow.replicate.group"  # --replicate_group: the group's name, on its parent run
REPLICATE_INDEX_TAG = "ldmflow.replicate.index"  # a replicate's run: which seed of its group it trains (0, 1, ...)

# Sweeps (ldmflow sweep): the study is a parent run, each trial a child run of it (mlflow.optuna.MlflowStorage)
OPTUNA_STUDY_DIRECTION_TAG = "optuna.study_direction"  # MlflowStorage's: marks a study's run, with its direction
SWEEP_STUDY_TAG = "ldmflow.sweep.study"  # a study run and its trial runs: the study's name
SWEEP_TRIAL_TAG = "ldmflow.sweep.trial"  # a trial run: its trial number
SWEEP_PARAM_TAG_PREFIX = "sweep."  # a trial run: + a setting's name, the value the sampler suggested
SWEEP_PRUNED_TAG = "ldmflow.sweep.pruned_at_step"  # a pruned trial's run (ends KILLED): the step it stopped at
SWEEP_HEARTBEAT_TAG = "ldmflow.sweep.heartbeat"  # a running trial's run: its worker's last sign of life (epoch s)
SWEEP_BEST_TRIAL_TAG = "ldmflow.sweep.best_trial"  # a study run: the best trial's number so far
SWEEP_BEST_RUN_TAG = "ldmflow.sweep.best_run_id"  # a study run: that trial's run
SWEEP_BEST_VALUE_TAG = "ldmflow.sweep.best_value"  # a study run: its objective value
SWEEP_BEST_COMMAND_TAG = "ldmflow.sweep.best_command"  # a study run: the command that trains the best trial again
SWEEP_STUDY_RUN_TAG = "ldmflow.sweep.study_run_id"  # an `mlflow run -e sweep` run: the study run it worked on

# Registered model versions (and their logged models and training runs)
STAGE_VERSION_TAG = "stage"  # the kind of model: vae, latent_ddpm, legacy_ddpm or probe (`ldmflow models`)
CONDITION_SPEC_TAG = "condition_spec"  # a latent DDPM or probe: the conditions it takes or reads
OMITTABLE_CONDITIONS_TAG = "omittable_conditions"  # a latent DDPM: those a request may leave out, or "none"
VAE_URI_TAG = "vae_uri"  # a latent DDPM: the VAE it was trained on, as it was given
VAE_MODEL_NAME_TAG = "vae_model_name"  # a latent DDPM: that VAE's registered name
VAE_MODEL_VERSION_TAG = "vae_model_version"  # a latent DDPM: that VAE's registered version
VAE_RUN_TAG = "vae_run_id"  # a latent DDPM: the run that trained that VAE
LATENT_CHANNELS_TAG = "latent_channels"  # a VAE: its latent channels
DOWNSAMPLE_FACTOR_TAG = "downsample_factor"  # a VAE: its spatial downsampling factor
VAE_SHAPE_TAG_PREFIX = "vae_"  # a latent DDPM: + latent_channels and downsample_factor, those of its VAE
CHECKPOINT_TAG = "checkpoint"  # which weights: best or last
CHECKPOINT_STEP_TAG = "checkpoint_step"  # the step of those weights
CHECKPOINT_METRIC_TAG = "checkpoint_metric"  # best weights: the validation metric that picked them
CHECKPOINT_METRIC_VALUE_TAG = "checkpoint_metric_value"  # best weights: that metric's value
DOWNSTREAM_TAG = "latent_ddpm_versions"  # a VAE: the latent DDPM versions trained on it, `name/version,...`
EVAL_RUN_TAG = "eval_run_id"  # the version's latest evaluate run, which also tags it with its scores (eval/fid, ...)

# Dataset inputs of training runs
SPLIT_INPUT_TAG = "ldmflow.split"  # the manifest's split that was trained on
DIGEST_INPUT_TAG = "ldmflow.dataset_digest"  # the manifest's content digest

# Experiments
EXPERIMENT_NOTE_TAG = "mlflow.note.content"  # MLflow's: an experiment's description
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow's: which UI mode opens an experiment
