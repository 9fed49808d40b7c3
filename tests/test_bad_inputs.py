"""Bad input, command by command: one clear line, a non-zero exit, no traceback, no half-written output, and
no FAILED or RUNNING run left behind. A new case is one line of CASES."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_runner import invoke
from tiny import TINY_SIZES
from fakes import tracked_folder

TINY = [*TINY_SIZES]
VAE = ["vae", "--manifest_path", "{data}", "--output_dir", "{out}", *TINY, "--block_out_channels", "8,8,8,8"]
LATENT = ["latent-ddpm", "--manifest_path", "{data}", "--vae_uri", "{vae}", "--output_dir", "{out}", *TINY,
          "--block_out_channels", "16,16"]
LEGACY = ["legacy-ddpm", "--manifest_path", "{data}", "--output_dir", "{out}", *TINY, "--block_out_channels", "16,16"]
PROBE = ["probe", "--manifest_path", "{data}", "--output_dir", "{out}", "--resolution", "32"]
SAMPLE = ["sample", "--model_uri", "{latent}", "--output_dir", "{out}", "--num_inference_steps", "2"]
EVALUATE = ["evaluate", "--model_uri", "{latent}", "--manifest_path", "{data}", "--output_dir", "{out}"]
PIPELINE = ["pipeline", "--manifest_path", "{data}", "--output_root", "{out}"]
CACHE = ["cache-latents", "--manifest_path", "{data}", "--resolution", "32", "--latent_cache_dir", "{out}",
         "--vae_uri"]
SWEEP = ["sweep", "--stage", "vae", "--manifest_path", "{data}", "--output_dir", "{out}", "--space"]

CASES = [  # (id, arguments, fragment of the one error line)
    ("check-manifest: no such file", ["check-manifest", "--manifest_path", "{tmp}/missing.json"], "missing.json"),
    ("check-manifest: a folder", ["check-manifest", "--manifest_path", "{tmp}"], "is a folder; expected a file"),
    ("sweep: space is a device", [*SWEEP, "/dev/zero"], "--space /dev/zero is a device of more than 1 MiB"),
    ("sample: conditions file is a folder", [*SAMPLE, "--conditions_file", "{tmp}"], "is a folder"),
    ("check-manifest: every pixel NaN", ["check-manifest", "--manifest_path", "{all_nan}", "--condition_spec", "none"],
     "all 64 pixels are NaN or infinite"),
    ("check-manifest: broken JSON", ["check-manifest", "--manifest_path", "{broken}"], "line 1"),
    ("check-manifest: bad spec", ["check-manifest", "--manifest_path", "{data}", "--condition_spec", "wind:x"],
     "dimension of 'wind' must be an integer"),
    ("demo-data: a file", ["demo-data", "--output_dir", "{broken}"], "is a file"),
    ("demo-data: not empty", ["demo-data", "--output_dir", "{data_dir}"], "is not empty"),
    ("demo-data: no images", ["demo-data", "--output_dir", "{out}", "--num_images", "0"], "--num_images"),
    ("demo-data: val fraction", ["demo-data", "--output_dir", "{out}", "--val_fraction", "1.5"], "--val_fraction"),
    ("vae: resolution", [*VAE, "--resolution", "30"], "--resolution must be a positive multiple of 8"),
    ("vae: gradient ascent", [*VAE, "--max_grad_norm", "-1"], "--max_grad_norm must be in (0, inf]"),
    ("vae: nan learning rate", [*VAE, "--learning_rate", "nan"], "--learning_rate must be a finite number"),
    ("vae: a replicate group of one", [*VAE, "--replicate_group", "g"],
     "--replicate_group 'g' names a group of --replicates 2 or more (got --replicates 1)"),
    ("pipeline: VAE learning rate of zero", [*PIPELINE, "--vae_learning_rate", "0"],
     "--vae_learning_rate must be in (0, 1]"),
    ("pipeline: latent DDPM learning rate above one", [*PIPELINE, "--ddpm_learning_rate", "2"],
     "--ddpm_learning_rate must be in (0, 1]"),
    ("vae: negative KL", [*VAE, "--kl_weight", "-1"], "--kl_weight must be in [0, inf]"),
    ("vae: negative adversarial weight", [*VAE, "--disc_weight", "-0.5"], "--disc_weight must be in [0, inf]"),
    ("vae: negative perceptual weight", [*VAE, "--perceptual_weight", "-1"], "--perceptual_weight must be in"),
    ("vae: discriminator never starts", [*VAE, "--disc_weight", "0.5", "--disc_start", "100000"],
     "--disc_start 100000 is not before the end of this run"),
    ("vae: unknown adversarial loss", [*VAE, "--disc_loss", "wasserstein"], "wasserstein"),
    ("vae: checkpoint limit", [*VAE, "--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be at"),
    ("vae: three levels", [*VAE, "--block_out_channels", "8,8,8"], "--downsample_factor 8 needs 4 --block_out_channels"),
    ("vae: factor 3", [*VAE, "--downsample_factor", "3"], "--downsample_factor must be 4, 8 or 16"),
    ("vae: channels not numbers", [*VAE, "--block_out_channels", "a,b"], "comma list of integers"),
    ("vae: reserved alias", [*VAE, "--register_alias", "latest"], "reserved by MLflow"),
    ("vae: no checkpoint", [*VAE, "--resume_from_checkpoint", "{tmp}/nothing"], "not a complete ldmflow checkpoint"),
    ("vae: damaged checkpoint", [*VAE, "--resume_from_checkpoint", "{damaged}"],
     "is damaged (model.safetensors is missing)"),
    ("vae: val leaks into train", [*VAE, "--split", "all"], "share"),
    ("vae: unknown checkpoint metric", [*VAE, "--checkpoint_metric", "val/fid"], "--checkpoint_metric val/fid"),
    ("vae: precision", [*VAE, "--mixed_precision", "fp8"], "'fp8' is not one of"),
    ("vae: no manifest", [*VAE[:2], "{tmp}/missing.json", *VAE[3:]], "missing.json"),
    ("vae: eval epochs", [*VAE, "--eval_epochs", "-1"], "--eval_epochs must be at least 0"),
    ("vae: no validations", [*VAE, "--num_validations", "0"], "--num_validations must be at least 1"),
    ("vae: no replicates", [*VAE, "--replicates", "0"], "--replicates must be at least 1, got 0"),
    ("vae: replicates untracked", [*VAE, "--replicates", "2", "--no_mlflow"], "--replicates needs MLflow"),
    ("pipeline: no replicates", [*PIPELINE, "--replicates", "0"], "--replicates must be at least 1, got 0"),
    ("compare: a VAE with a latent DDPM", ["compare", "{vae}", "{latent}", "--manifest_path", "{data}",
                                           "--output_dir", "{out}"], "compare models of one kind"),
    ("compare: no such gate metric", ["compare", "{vae}", "{vae}/.", "--manifest_path", "{data}", "--output_dir",
                                      "{out}", "--fail_if_worse", "fid_score"], "--fail_if_worse fid_score: not a metric"),
    ("compare: a model with itself", ["compare", "{vae}", "{vae}", "--manifest_path", "{data}", "--output_dir",
                                      "{out}"], "compare two different models"),
    ("compare: no such model", ["compare", "{tmp}/nothing", "{vae}", "--manifest_path", "{data}", "--output_dir",
                                "{out}"], "nothing"),
    ("latent: zero SNR with epsilon", [*LATENT, "--rescale_betas_zero_snr"],
     "--rescale_betas_zero_snr needs --prediction_type v_prediction"),
    ("latent: time embedding", [*LATENT, "--time_embedding_dim", "0"], "--time_embedding_dim must be at least 1"),
    ("vae: workers", [*VAE, "--dataloader_num_workers", "-1"], "--dataloader_num_workers must be at least 0"),
    ("vae: register what", [*VAE, "--register", "sometimes"], "'sometimes' is not one of"),
    ("vae: pixel limit", [*VAE, "--max_image_pixels", "0"], "--max_image_pixels must be at least 1"),
    ("vae: output under a file", [*VAE[:4], "{broken}/out", *VAE[5:]], "Cannot write to the output folder"),
    ("latent: no VAE there", [*LATENT[:4], "{tmp}/no_vae", *LATENT[5:]], "does not exist"),
    ("latent: not a VAE", [*LATENT[:4], "{data_dir}", *LATENT[5:]], "vae"),
    ("latent: empty spec", [*LATENT, "--condition_spec", ""], "--condition_spec is empty"),
    ("latent: flip without rule", [*LATENT, "--random_flip"], "has no flip rule"),
    ("latent: dropout", [*LATENT, "--cond_dropout_prob", "1"], "--cond_dropout_prob must be in [0, 1)"),
    ("latent: negative per-condition dropout", [*LATENT, "--cond_dropout_per_condition", "temperature=-0.1"],
     "--cond_dropout_per_condition: temperature=-0.1 must be in [0, 1)"),
    ("latent: per-condition dropout of no condition", [*LATENT, "--cond_dropout_per_condition", "humidity=0.1"],
     "--cond_dropout_per_condition names humidity, not in --condition_spec"),
    ("latent: per-condition dropout not a number", [*LATENT, "--cond_dropout_per_condition", "wind=often"],
     "--cond_dropout_per_condition: 'wind=often' is not a number"),
    ("latent: EMA gamma", [*LATENT, "--ema_inv_gamma", "0"], "--ema_inv_gamma must be in (0, inf]"),
    ("latent: min-SNR", [*LATENT, "--snr_gamma", "-5"], "--snr_gamma must be in (0, inf]"),
    ("latent: guidance", [*LATENT, "--guidance_scale", "0.5"], "--guidance_scale must be in [1, 100.0]"),
    ("latent: too deep", [*LATENT, "--resolution", "40"], "--resolution 40 must be a multiple of"),
    ("latent: spec vs data", [*LATENT, "--condition_spec", "temperature:1,wind:2"], "wind"),
    ("legacy: preview steps", [*LEGACY, "--ddpm_num_steps", "10"], "cannot exceed --ddpm_num_steps"),
    ("legacy: prediction type", [*LEGACY, "--prediction_type", "x0"], "'x0' is not one of"),
    ("legacy: val timesteps", [*LEGACY, "--val_timesteps", "0"], "--val_timesteps must be at least 1"),
    ("legacy: EMA decay", [*LEGACY, "--ema_max_decay", "2"], "--ema_max_decay must be in [0, 1]"),
    ("legacy: EMA stride", [*LEGACY, "--ema_update_every", "0"], "--ema_update_every must be at least 1"),
    ("legacy: head size", [*LEGACY, "--block_out_channels", "16,32,32", "--attention_head_dim", "24"],
     "--attention_head_dim 24 must divide"),
    ("legacy: compile backend", [*LEGACY, "--compile_backend", "tvm"], "'tvm' is not one of"),
    ("legacy: compile mode of eager", [*LEGACY, "--compile_mode", "max-autotune", "--compile_backend", "eager"],
     "--compile_mode max-autotune needs --compile_backend inductor"),
    ("legacy: compile mode", [*LEGACY, "--compile_mode", "fastest"], "'fastest' is not one of"),
    ("vae: no discriminator layers", [*VAE, "--disc_layers", "0"], "--disc_layers must be at least 1"),
    ("vae: LPIPS folder without weights", [*VAE, "--perceptual_weight", "1", "--perceptual_weights", "{tmp}"],
     "--perceptual_weights DIR"),
    ("probe: no conditions", [*PROBE, "--condition_spec", "none"], "nothing to learn"),
    ("probe: flips without a rule", [*PROBE, "--random_flip"], "the vector condition 'wind' has no flip rule"),
    ("sample: no model", ["sample", "--model_uri", "{tmp}/nothing", "--output_dir", "{out}"], "does not exist"),
    ("sample: batch of none", [*SAMPLE, "--batch_size", "0"], "--batch_size must be at least 1"),
    ("sample: precision", [*SAMPLE, "--dtype", "fp8"], "'fp8' is not one of"),
    ("sample: no images", [*SAMPLE, "--num_images", "0"], "--num_images must be at least 1"),
    ("sample: condition not a number", [*SAMPLE, "--condition", "temperature=warm"], "temperature"),
    ("sample: unknown condition", [*SAMPLE, "--condition", "pressure=1"], "pressure"),
    ("sample: scheduler", [*SAMPLE, "--scheduler", "euler"], "'euler' is not one of"),
    ("sample: guidance of no use", [*SAMPLE, "--guidance_scale", "1e30"], "--guidance_scale must be in [1, 100.0]"),
    ("sample: nan guidance", [*SAMPLE, "--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
    ("sample: too many steps", [*SAMPLE, "--num_inference_steps", "5000"], "5000"),
    ("sample: guidance of no condition", [*SAMPLE, "--condition", "temperature=1", "--condition", "wind=1,0,0",
                                          "--condition_guidance", "humidity=2"],
     "--condition_guidance names humidity, which this model does not take"),
    ("sample: negative guidance of a condition", [*SAMPLE, "--condition", "temperature=1", "--condition_guidance",
                                                  "temperature=-2"], "--condition_guidance: temperature=-2 must be in"),
    ("sample: guidance of a condition without conditions", [*SAMPLE, "--condition_guidance", "temperature=2"],
     "--condition_guidance weighs the conditions asked for"),
    ("sample: partial request to a model without per-condition dropout", [*SAMPLE, "--condition", "temperature=1"],
     "trained without per-condition dropout"),
    ("evaluate: one sample", [*EVALUATE, "--num_samples", "1"], "--num_samples must be at least 2"),
    ("evaluate: probe epochs", [*EVALUATE, "--probe_epochs", "0"], "--probe_epochs must be at least 1"),
    ("evaluate: features", [*EVALUATE, "--feature_extractor", "clip"], "'clip' is not one of"),
    ("evaluate: no probe there", [*EVALUATE, "--probe_uri", "{tmp}/no_probe"], "does not exist"),
    ("evaluate: probe of a VAE", [*EVALUATE, "--probe_uri", "{vae}"], "is not a probe model"),
    ("evaluate: empty split", [*EVALUATE, "--split", "test"], "--split test"),
    ("evaluate: no model", ["evaluate", "--model_uri", "{tmp}/nothing", "--manifest_path", "{data}"],
     "does not exist"),
    ("pipeline: no epochs", [*PIPELINE, "--vae_epochs", "0"], "Pipeline step vae: --num_epochs must be at least 1"),
    ("pipeline: channels", [*PIPELINE, "--ddpm_block_out_channels", "3,x"], "comma list of integers"),
    ("sweep: no trials", [*SWEEP, "{space}", "--n_trials", "0"], "--n_trials must be at least 1"),
    ("sweep: low above high", [*SWEEP, "{inverted_space}"], "learning_rate has low 0.01 > high 0.0001"),
    ("sweep: stage options", ["sweep", "--stage", "vae", "--space", "{space}"], "Missing option '--manifest_path'"),
    ("server: clear text beyond loopback", ["server", "--root", "{out}", "--host", "0.0.0.0"],
     "Refusing to serve passwords in clear text on 0.0.0.0"),
    ("server: a role with no server", ["server", "set-role", "rita", "--role", "editor", "--root", "{out}"],
     "No server was started in"),  # a reader training against a server: tests/server/test_secure_server.py
    ("lineage: unknown model", ["lineage", "models:/no-such-model/1"], "no-such-model"),
    ("lineage: a name with both quotes", ["lineage", "models:/it's \"x\"/1"], "does not exist"),
    ("cache-latents: no VAE there", [*CACHE, "{tmp}/no_vae"], "does not exist"),
    ("cache-latents: not a VAE", [*CACHE, "{data_dir}"], "is not a vae model"),
    ("cache-latents: dtype", [*CACHE, "{tmp}/no_vae", "--latent_cache_dtype", "int8"], "'int8' is not one of"),
    ("cache-latents: folder is a file", [*CACHE[:6], "{broken}", "--vae_uri", "{vae}"],
     "Cannot write the latent cache"),
    ("cache-latents: broken manifest", [*CACHE, "{tmp}/no_vae", "--manifest_path", "{broken}"], "line 1"),
    ("latent: cache dtype", [*LATENT, "--cache_latents", "--latent_cache_dtype", "bfloat16"], "'bfloat16' is not one"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A demo manifest, a broken one, and a tracking store to watch for runs."""
    root = tmp_path_factory.mktemp("bad-inputs")
    with tracked_folder(root):
        assert invoke("demo-data", "--output_dir", "data", "--num_images", "16", "--resolution",
                      "32", "--val_fraction", "0.25", ok=False).exit_code == 0
        (root / "broken.json").write_text('{"items": [')
        import numpy as np
        import tifffile

        (root / "nan").mkdir()
        tifffile.imwrite(root / "nan" / "a.tiff", np.full((8, 8, 3), np.nan, np.float32))
        (root / "nan" / "manifest.json").write_text(json.dumps({"items": [{"output_rel": "a.tiff", "metadata": {"split": "train"}}]}))
        (root / "damaged").mkdir()
        (root / "damaged" / "checkpoint_files.json").write_text('{"model.safetensors": 10}')
        (root / "space.yaml").write_text("learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
        (root / "inverted.yaml").write_text("learning_rate: {low: 1.0e-2, high: 1.0e-4}\n")
        values = {"tmp": str(root), "data": str(root / "data" / "manifest.json"), "data_dir": str(root / "data"),
                  "broken": str(root / "broken.json"),
                  "all_nan": str(root / "nan" / "manifest.json"), "damaged": str(root / "damaged"),
                  "space": str(root / "space.yaml"), "inverted_space": str(root / "inverted.yaml"), "vae": str(root / "vae"), "latent": str(root / "latent")}
        yield root, values


@pytest.fixture(scope="module")
def trained_models(inputs):
    """A tiny VAE and latent DDPM, for the cases that name them ({vae}, {latent})."""
    root, _ = inputs
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        common = [*TINY, "--no_mlflow", "--max_train_steps", "1", "--save_images_epochs", "100"]
        assert invoke("vae", "--manifest_path", "data/manifest.json", "--output_dir", "vae", *common,
                      "--block_out_channels", "8,8,8,8", "--scaling_factor_batches", "1", ok=False).exit_code == 0
        assert invoke("latent-ddpm", "--manifest_path", "data/manifest.json", "--vae_uri", "vae",
                      "--output_dir", "latent", *common, "--block_out_channels", "16,16",
                      "--num_preview_images", "1", "--preview_inference_steps", "1", ok=False).exit_code == 0


def _case(case_id: str, arguments: list[str], fragment: str):
    """A CASES row as a test parameter; a row that needs the trained models trains (once) and is marked so."""
    needs_models = any("{vae}" in argument or "{latent}" in argument for argument in arguments)
    return pytest.param(case_id, arguments, fragment, id=case_id,
                        marks=[pytest.mark.train] if needs_models else [])


def _open_or_failed_runs() -> list:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status != 'FINISHED'") if experiments else []
    return [(run.info.run_name, run.info.status) for run in runs]


@pytest.mark.parametrize("case_id, arguments, fragment", [_case(*case) for case in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing_behind(inputs, request, case_id, arguments, fragment):
    root, values = inputs
    if any("{vae}" in argument or "{latent}" in argument for argument in arguments):
        request.getfixturevalue("trained_models")
    out = root / "out" / case_id.replace(":", "").replace(" ", "_")
    args = [argument.format(**values, out=out) for argument in arguments]
    result = invoke(*args, ok=False)
    assert isinstance(result.exception, SystemExit), f"{case_id}: raised {result.exception!r}"  # no traceback
    assert result.exit_code != 0, case_id
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert fragment in result.output, f"{case_id}: {result.output}"
    assert "Traceback" not in result.output
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".png")] \
        if out.exists() else []
    assert not written, f"{case_id} left {written}"
    assert _open_or_failed_runs() == [], case_id


def test_the_table_covers_every_command():
    commands = {arguments[0] for _, arguments, _ in CASES}
    assert len(CASES) >= 40
    assert {"check-manifest", "demo-data", "vae", "latent-ddpm", "legacy-ddpm", "probe", "sample", "evaluate",
            "pipeline", "lineage", "sweep", "server", "cache-latents", "compare"} <= commands


@pytest.mark.train
def test_an_error_inside_a_data_loader_worker_is_one_line(tmp_path):
    from ldmflow.data.demo import make_demo_dataset

    manifest = make_demo_dataset(tmp_path / "data", num_images=4, resolution=32)
    for image in (tmp_path / "data" / "images").iterdir():  # damaged inside: the header check passes, decoding fails
        data = bytearray(image.read_bytes())
        data[60:70] = b"\xff" * 10
        image.write_bytes(bytes(data))
    result = invoke("legacy-ddpm", "--manifest_path", str(manifest), "--output_dir",
                    str(tmp_path / "out"), *TINY, "--block_out_channels", "16,16", "--no_mlflow",
                    "--dataloader_num_workers", "1", "--split", "all", "--val_split", "", ok=False)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("Error: None of the 4 images in the dataset could be read"), result.output
