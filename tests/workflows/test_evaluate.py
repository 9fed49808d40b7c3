"""`ldmflow evaluate` and `ldmflow probe`: metrics, the probe, MLflow links, and bad input, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_runner import invoke
from ldmflow.data.conditions import ConditionSpec
from ldmflow.evaluation.adherence import condition_errors, diversity, shuffled_baseline
from tiny import TINY_SIZES
from fakes import tracked_folder

pytestmark = pytest.mark.train  # most tests here train a tiny model; `make test-fast` skips them

TINY = [*TINY_SIZES,
        "--learning_rate", "1e-3", "--logging_steps", "2"]
QUICK = ["--num_samples", "6", "--num_inference_steps", "2", "--batch_size", "4", "--probe_epochs", "2"]



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracked tiny VAE and latent DDPM (registered v1 each) in a temporary SQLite store."""
    root = tmp_path_factory.mktemp("evaluate")
    with tracked_folder(root) as patch:
        invoke("demo-data", "--output_dir", "data", "--num_images", "24", "--resolution", "32")
        invoke("vae", "--manifest_path", "data/manifest.json", "--output_dir", "vae", *TINY, "--num_epochs", "2",
               "--block_out_channels", "16,16,16,16", "--scaling_factor_batches", "2")
        invoke("latent-ddpm", "--manifest_path", "data/manifest.json", "--vae_uri", "models:/ldmflow-vae/1",
               "--output_dir", "ldm", *TINY, "--block_out_channels", "32,32", "--num_preview_images", "2",
               "--preview_inference_steps", "2", "--num_epochs", "1", "--use_ema")
        yield root, patch


def _table(output: str) -> dict[str, list[str]]:
    """The evaluation table's rows: name -> cells (columns are separated by two spaces or more)."""
    import re

    rows = [re.split(r"\s{2,}", line.strip()) for line in output.splitlines() if line.strip()]
    return {row[0]: row[1:] for row in rows}


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _runs(stage: str):
    client = _client()
    experiment = client.get_experiment_by_name("ldmflow")
    return client.search_runs([experiment.experiment_id], f"tags.`ldmflow.stage` = '{stage}'")


def test_evaluating_a_latent_ddpm_logs_linked_metrics_and_trains_the_probe_once(store):
    result = invoke("evaluate", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--manifest_path",
                    "data/manifest.json", "--feature_extractor", "probe", *QUICK)
    table = _table(result.output)
    assert table["eval/..."] == ["model", "guidance 1", "shuffled", "VAE reconstructions", "real images"]
    for name in ("fid", "kid", "temperature_mae_pct", "wind_angle_error_deg", "diversity_within", "diversity_across"):
        assert name in table
    assert len(table["temperature_mae"]) == 5  # model, guidance 1, shuffled, VAE reconstructions, real images
    assert " ± " in table["temperature_mae"][0] and " ± " in table["fid"][0]  # bootstrap intervals
    assert "fid: not comparable: " in result.output  # 2 val images for the probe's 128 features
    client = _client()
    probe = client.get_model_version("ldmflow-probe", "1")
    assert probe.tags["stage"] == "probe" and probe.tags["condition_spec"] == "temperature:1,wind:3,wind_mag:1"
    [run] = _runs("evaluate")
    assert run.data.tags["ldmflow.model_name"] == "ldmflow-latent-ddpm" and run.data.tags["ldmflow.model_version"] == "1"
    assert run.data.params["eval_feature_extractor"] == "probe:models:/ldmflow-probe/1"
    assert run.data.params["eval_num_samples"] == "6"
    assert {"eval/fid", "eval/kid", "eval/wind_angle_error_deg"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "evaluation_samples.json" in artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation_samples.json")).read_text())
    assert {"seed", "image", "requested_temperature", "probed_temperature"} <= set(table["columns"])
    assert len(table["data"]) == 6
    version = client.get_model_version("ldmflow-latent-ddpm", "1")
    assert float(version.tags["eval/fid"]) == pytest.approx(run.data.metrics["eval/fid"], rel=1e-4)
    assert version.tags["eval_run_id"] == run.info.run_id
    [note] = [line for line in version.description.splitlines() if line.startswith("Evaluated in run")]
    assert f"/runs/{run.info.run_id})" in note and f"fid {run.data.metrics['eval/fid']:.4g}" in note
    assert "temperature_mae_pct" in note and "guidance1" not in note
    from ldmflow.tracking.model_uri import version_model_id

    model = client.get_logged_model(version_model_id(version))
    assert any(m.key == "eval/fid" for m in model.metrics)
    # the model's lineage lists the evaluation; `models` shows its FID
    chain = json.loads(invoke("lineage", "models:/ldmflow-latent-ddpm/1", "--json").output)
    assert chain["evaluations"] == [run.info.run_id]
    assert invoke("lineage", "models:/ldmflow-latent-ddpm/1").output.strip().endswith("1 evaluation")
    table_text = invoke("models").output
    assert "EVAL_FID" in table_text and "ldmflow-probe v1" in table_text
    # a second evaluation reuses the registered probe of this dataset
    invoke("evaluate", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--manifest_path", "data/manifest.json",
           "--feature_extractor", "probe", *QUICK)
    assert len(client.search_model_versions("name = 'ldmflow-probe'")) == 1
    described = client.get_model_version("ldmflow-latent-ddpm", "1").description
    assert described.count("Evaluated in run") == 2  # one line per evaluation
    first, second = sorted(_runs("evaluate"), key=lambda r: r.info.start_time)
    scores = [{k: v for k, v in run.data.metrics.items() if k.startswith("eval/")} for run in (first, second)]
    assert len(scores[0]) > 40 and scores[0] == scores[1]  # same requests, seeds and probe: identical numbers


def test_a_latent_ddpm_trained_after_a_probe_exists_scores_adherence_while_training(store):
    from ldmflow.data.manifest import load_manifest
    from ldmflow.tracking.registry import registered_probe_uri

    manifest = load_manifest("data/manifest.json")
    if registered_probe_uri(manifest.digest, str(manifest.spec)) is None:  # when run alone
        invoke("probe", "--manifest_path", "data/manifest.json", "--output_dir", "probe", "--num_epochs", "2")
    invoke("latent-ddpm", "--manifest_path", "data/manifest.json", "--vae_uri", "models:/ldmflow-vae/1",
           "--output_dir", "ldm2", *TINY, "--block_out_channels", "32,32", "--num_preview_images", "2",
           "--preview_inference_steps", "2", "--num_epochs", "1", "--registered_model_name", "adherence-check")
    version = _client().get_model_version("adherence-check", "1")
    run = _client().get_run(version.run_id)
    assert {"val/temperature_mae_pct", "val/wind_angle_error_deg", "val/denoise_loss"} <= set(run.data.metrics)
    assert version.tags["checkpoint_metric"] == "val/condition_error_pct"  # registered by what users care about


def test_a_vae_validates_how_well_its_reconstructions_keep_the_conditions_once_a_probe_exists(store):
    from ldmflow.data.manifest import load_manifest
    from ldmflow.tracking.registry import registered_probe_uri

    vae = [*TINY, "--num_epochs", "2", "--block_out_channels", "16,16,16,16", "--scaling_factor_batches", "2"]
    if registered_probe_uri(load_manifest("data/manifest.json").digest, None) is None:  # when run alone
        invoke("probe", "--manifest_path", "data/manifest.json", "--output_dir", "probe", "--num_epochs", "2")
    invoke("vae", "--manifest_path", "data/manifest.json", "--output_dir", "vae2", *vae,
           "--checkpoint_metric", "val/recon/condition_error_pct", "--registered_model_name", "recon-check")
    version = _client().get_model_version("recon-check", "1")
    run = _client().get_run(version.run_id)
    assert {"val/psnr", "val/recon/temperature_mae_pct", "val/recon/wind_angle_error_deg"} <= set(run.data.metrics)
    assert version.tags["checkpoint_metric"] == "val/recon/condition_error_pct"


def test_a_condition_checkpoint_metric_without_a_probe_is_one_line_and_no_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    invoke("demo-data", "--output_dir", "data", "--num_images", "12", "--resolution", "32")
    result = invoke("vae", "--manifest_path", "data/manifest.json", "--output_dir", "vae", *TINY, "--num_epochs", "1",
                    "--block_out_channels", "16,16,16,16", "--checkpoint_metric", "val/recon/wind_mag_mae_pct",
                    ok=False)
    assert result.exit_code == 1 and result.output.count("Error:") == 1
    assert "this run validates val/psnr, val/ssim. Condition metrics need this dataset's registered condition " \
           "probe" in result.output
    from mlflow import MlflowClient

    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])


def test_evaluating_a_vae_scores_reconstructions_and_names_what_was_skipped(store, caplog):
    caplog.set_level("WARNING")
    result = invoke("evaluate", "--model_uri", "models:/ldmflow-vae/1", "--manifest_path", "data/manifest.json",
                    *QUICK, "--no_mlflow")
    rows = _table(result.output)
    for name in ("psnr", "ssim", "rfid", "rkid"):
        assert name in rows
    assert "VAE reconstructions" in result.output and len(rows["temperature_mae_pct"]) == 2  # recon, real images
    assert "rfid: not comparable" in result.output
    skipped = [r.message for r in caplog.records if r.message.startswith("Skipped")]
    assert len(skipped) == 1
    assert "Inception features (torch-fidelity is not installed)" in skipped[0]
    assert "LPIPS" in skipped[0] and "--inception_weights PATH" in skipped[0]


def test_inception_without_weights_is_one_line_and_the_rest_is_computed(store, caplog):
    caplog.set_level("WARNING")
    result = invoke("evaluate", "--model_uri", "ldm", "--manifest_path", "data/manifest.json", *QUICK,
                    "--feature_extractor", "inception", "--inception_weights", "missing.pth", "--no_mlflow")
    rows = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert "fid" not in rows and "temperature_mae" in rows
    [line] = [r.message for r in caplog.records if r.message.startswith("Skipped")]
    assert "the Inception weights file missing.pth does not exist" in line and "so FID/KID" in line


@pytest.mark.parametrize("args, message", [
    (["--model_uri", "models:/ldmflow-probe/1"], "evaluate takes a vae, latent_ddpm or legacy_ddpm model"),
    (["--num_samples", "0"], "--num_samples must be at least 2, got 0"),
    (["--split", "test"], "--split test:"),
    (["--guidance_scale", "0.5"], "--guidance_scale must be in [1, 100.0], got 0.5"),
])
def test_bad_input_is_one_line_and_leaves_no_run(store, args, message):
    before = len(_runs("evaluate"))
    arguments = ["evaluate", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--manifest_path",
                 "data/manifest.json", *QUICK, *args]
    result = invoke(*arguments, ok=False)
    assert result.exit_code == 1 and message in result.output
    assert result.output.count("Error:") == 1
    assert len(_runs("evaluate")) == before


def test_a_manifest_without_the_models_conditions_is_refused(store, tmp_path):
    root, _ = store
    entries = json.loads((root / "data" / "manifest.json").read_text())
    items = entries["items"] if isinstance(entries, dict) else entries
    for item in items:
        item["metadata"].pop("temperature", None)
    stripped = root / "data" / "no_temperature.json"
    stripped.write_text(json.dumps(entries))
    result = invoke("evaluate", "--model_uri", "ldm", "--manifest_path", str(stripped), *QUICK, "--no_mlflow",
                    ok=False)
    assert result.exit_code == 1 and "has no value of temperature" in result.output


def test_condition_errors_in_units_percent_and_axes():
    spec = ConditionSpec.parse("temperature:1,wind:3")
    requested = np.array([[10.0, 4, 0, 0], [20.0, 0, 4, 0], [30.0, 0.1, 0, 0]])
    read = np.array([[12.0, -4, 0, 0], [20.0, 4, 0, 0], [27.0, 0, 0, 0]])
    present = np.ones((3, 2), bool)
    ranges = {"temperature": (0.0, 50.0), "wind": (0.0, 4.0)}
    errors = condition_errors(spec, requested, present, read, ranges)
    assert errors["temperature_mae"] == pytest.approx(5 / 3)
    assert errors["temperature_mae_pct"] == pytest.approx(100 * (5 / 3) / 50)
    assert errors["wind_angle_error_deg"] == pytest.approx(45.0)  # 0 (opposite = same axis) and 90; short one skipped
    assert errors["wind_length_mae"] == pytest.approx(0.1 / 3)
    present[0, 0] = False  # an absent condition is not scored
    assert condition_errors(spec, requested, present, read, ranges)["temperature_mae"] == pytest.approx(1.5)
    order = np.random.default_rng(0).permutation(3)
    assert list(order) != [0, 1, 2]
    baseline = shuffled_baseline(spec, requested, np.ones((3, 2), bool), requested, ranges, seed=0)
    assert baseline == condition_errors(spec, requested[order], np.ones((3, 2), bool), requested, ranges)
    assert baseline["temperature_mae"] > 0  # the requests themselves, shuffled, no longer match


def test_adherence_scores_name_each_comparison_and_skip_the_missing_ones():
    from ldmflow.evaluation.adherence import Requests
    from ldmflow.evaluation.scoring import AdherenceReadings, Scorer, adherence_scores

    spec = ConditionSpec.parse("temperature:1")
    values, present = np.array([[0.0], [5.0], [10.0]]), np.ones((3, 1), bool)
    requests, ranges = Requests([{}] * 3, values, present), {"temperature": (0.0, 10.0)}
    scorer = Scorer(spec, ranges, seed=0)
    plain = adherence_scores(scorer, AdherenceReadings(requests, values + 1.0))
    assert plain["temperature_mae_pct"] == pytest.approx(10.0) and "temperature_mae_pct_ci95" in plain
    assert "shuffled/temperature_mae" in plain and not any(k.startswith(("guidance1/", "recon/")) for k in plain)
    full = adherence_scores(scorer, AdherenceReadings(requests, values, unguided=values + 2.0, truth=requests,
                                                      reconstructions=values + 3.0))
    assert (full["guidance1/temperature_mae"], full["recon/temperature_mae"]) == (pytest.approx(2.0),
                                                                                 pytest.approx(3.0))


def test_diversity_separates_collapse_from_variety():
    groups = np.repeat([0, 1], 3)
    collapsed = np.array([[0.0, 0], [0, 0], [0, 0], [5, 0], [5, 0], [5, 0]])
    scores = diversity(collapsed, groups)
    assert scores["diversity_within"] == 0 and scores["diversity_across"] == pytest.approx(5.0)


class DemoRenderer:
    """A stand-in latent model that draws demo images: for the requested conditions (an oracle, the best a
    model can do), or for fixed ones (a model that ignores its conditions)."""

    def __init__(self, spec: ConditionSpec, ignore_conditions: bool = False, vae=None):
        self.condition_spec, self.ignore_conditions, self.vae = spec, ignore_conditions, vae
        self.encoder = None  # a LatentSampler's ConditionEncoder: none, so no partial requests

    def generate(self, conditions=None, *, num_images=None, guidance_scale=3.0, num_inference_steps=25,
                 scheduler="ddim", seeds=None, batch_size=None, dtype=None, progress=None):
        from ldmflow.data.demo import render_demo_image
        from ldmflow.workflows.evaluate import _reconstruct

        images = []
        for condition, seed in zip(conditions, seeds):
            if self.ignore_conditions:
                condition = {"temperature": [10.0], "wind": [3.0, 3.0, 0.0]}
            rng = np.random.default_rng(seed)
            images.append(render_demo_image(condition["temperature"][0], condition["wind"][:2], 32, rng))
        images = np.stack(images).astype(np.float32)
        return images if self.vae is None else _reconstruct(self.vae, images, 16)  # decoded by its first stage


class StandInVae:
    """A first stage that keeps each image's mean colour and scales its contrast (1: identity)."""

    def __init__(self, contrast: float):
        import torch

        self.contrast, self.device = contrast, torch.device("cpu")

    def encode(self, pixels):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: pixels))

    def decode(self, latents):
        from types import SimpleNamespace

        mean = latents.mean(dim=(2, 3), keepdim=True)
        return SimpleNamespace(sample=mean + self.contrast * (latents - mean))


@pytest.fixture(scope="module")
def demo_probe(tmp_path_factory):
    """A 64-image demo manifest and a probe trained on it (about 5 s)."""
    from ldmflow.models.probe import ProbeReader
    from ldmflow.settings import ProbeSettings
    from ldmflow.workflows.train import run_training

    root = tmp_path_factory.mktemp("demo-probe")
    invoke("demo-data", "--output_dir", str(root / "data"), "--num_images", "64", "--resolution", "32",
           "--val_fraction", "0.25")
    manifest = str(root / "data" / "manifest.json")
    outcome, _ = run_training(ProbeSettings(manifest_path=manifest, output_dir=str(root / "probe"), resolution=32,
                                            block_out_channels=(16, 32, 64), num_epochs=60, no_mlflow=True))
    return manifest, ProbeReader.from_folder(outcome.model_dir)


def _scores(manifest: str, reader, model, first_stage=None, train_records=None) -> dict[str, float]:
    """evaluate()'s metrics of `model` on the val split; `train_records` picks the training records it sees."""
    import dataclasses

    from ldmflow.data.manifest import load_manifest
    from ldmflow.settings import EvaluateSettings
    from ldmflow.workflows.evaluate import EvaluatedModel, evaluate

    settings = EvaluateSettings(model_uri="unused", manifest_path=manifest, num_samples=32, no_mlflow=True,
                                guidance_scale=1.0, feature_extractor="probe")
    real, train = (load_manifest(manifest, split=split) for split in ("val", "train"))
    if train_records is not None:
        train = dataclasses.replace(train, records=[r for r in train.records if train_records(r)])
    evaluated = EvaluatedModel("latent_ddpm", model, 32, real.spec, first_stage)
    return evaluate(settings, evaluated, real, train, reader).metrics


@pytest.mark.portable
def test_the_probe_reads_demo_conditions_within_five_percent(demo_probe):
    manifest, reader = demo_probe
    scores = _scores(manifest, reader, DemoRenderer(reader.encoder.spec))
    assert scores["probe/temperature_mae_pct"] <= 5.0 and scores["probe/wind_mag_mae_pct"] <= 5.0


@pytest.mark.portable
def test_adherence_scores_a_model_that_follows_its_conditions_far_above_chance(demo_probe):
    manifest, reader = demo_probe
    follows = _scores(manifest, reader, DemoRenderer(reader.encoder.spec))
    ignores = _scores(manifest, reader, DemoRenderer(reader.encoder.spec, ignore_conditions=True))
    assert follows["temperature_mae_pct"] <= 10.0 and follows["wind_angle_error_deg"] <= 20.0
    assert follows["temperature_mae_pct"] < 0.5 * follows["shuffled/temperature_mae_pct"]
    assert follows["wind_angle_error_deg"] < 0.5 * follows["shuffled/wind_angle_error_deg"]
    assert ignores["temperature_mae_pct"] > 0.7 * ignores["shuffled/temperature_mae_pct"]
    assert follows["fid"] < ignores["fid"]  # FID on the probe's features sees the wrong images too
    assert follows["diversity_across"] > follows["diversity_within"]


def test_a_vae_that_flattens_contrast_is_named_as_the_ceiling_and_an_identity_vae_is_not(demo_probe):
    from ldmflow.evaluation.report import ceiling_lines

    manifest, reader = demo_probe
    spec = reader.encoder.spec
    flat = StandInVae(contrast=0.3)
    capped = _scores(manifest, reader, DemoRenderer(spec, vae=flat), first_stage=flat)
    assert capped["recon/wind_mag_mae_pct"] > 2 * capped["probe/wind_mag_mae_pct"]  # the VAE lost the contrast
    [line] = [line for line in ceiling_lines(capped) if line.startswith("wind_mag:")]
    assert f"reconstructions {capped['recon/wind_mag_mae_pct']:.3g}% vs samples" in line
    identity = StandInVae(contrast=1.0)
    kept = _scores(manifest, reader, DemoRenderer(spec, vae=identity), first_stage=identity)
    assert kept["recon/wind_mag_mae_pct"] == pytest.approx(kept["probe/wind_mag_mae_pct"], abs=1e-3)
    assert ceiling_lines(kept) == []


class PartialRenderer(DemoRenderer):
    """A stand-in latent model trained with per-condition dropout: a wind left out of a request is drawn like the
    demo data's (uniform direction and speed from the image's seed), or always the same one (`collapse`)."""

    def __init__(self, spec: ConditionSpec, collapse: bool = False):
        from types import SimpleNamespace

        super().__init__(spec)
        self.encoder, self.collapse = SimpleNamespace(omittable=("wind", "wind_mag")), collapse

    def generate(self, conditions=None, *, seeds=None, **options):
        filled = []
        for condition, seed in zip(conditions, seeds):
            rng = np.random.default_rng(10**6 + (0 if self.collapse else seed))
            angle, speed = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.0, 10.0)
            filled.append({"wind": [speed * np.cos(angle), speed * np.sin(angle), 0.0], **condition})
        return super().generate(filled, seeds=seeds, **options)


def test_a_model_asked_for_temperature_alone_is_scored_on_it_and_its_winds_spread_compared_with_the_data(demo_probe):
    from ldmflow.evaluation.report import format_metrics

    manifest, reader = demo_probe
    varied = _scores(manifest, reader, PartialRenderer(reader.encoder.spec))
    assert varied["only_temperature/temperature_mae_pct"] <= 10.0
    assert not any(key.startswith("only_temperature/wind_") and "spread" not in key for key in varied)
    assert 0.6 < varied["only_temperature/wind_spread_ratio"] < 1.6
    assert 0.6 < varied["only_temperature/wind_mag_spread_ratio"] < 1.6
    collapsed = _scores(manifest, reader, PartialRenderer(reader.encoder.spec, collapse=True))
    assert collapsed["only_temperature/wind_spread_ratio"] < 0.2
    assert "only_temperature/temperature_mae_pct" not in _scores(manifest, reader, DemoRenderer(reader.encoder.spec))
    header, *rows = format_metrics({f"eval/{key}": value for key, value in varied.items()}).splitlines()
    assert header.split("  ")[-1].strip() == "temperature only"
    [ratio] = [row for row in rows if row.startswith("wind_spread_ratio")]
    assert ratio.split()[1] == f"{varied['only_temperature/wind_spread_ratio']:.4g}"


def test_the_left_out_winds_spread_is_measured_against_the_training_images_not_the_few_val_ones(demo_probe):
    """The reference is the data the model learnt: training images whose winds blow one way (a narrower data)
    make the same samples' spread relatively wider."""
    manifest, reader = demo_probe
    model = PartialRenderer(reader.encoder.spec)
    everything = _scores(manifest, reader, model)["only_temperature/wind_spread_ratio"]
    eastward = _scores(manifest, reader, model, train_records=lambda r: r.conditions[1] > abs(r.conditions[2]))
    assert eastward["only_temperature/wind_spread_ratio"] > 1.3 * everything


def test_intervals_cover_the_sampling_noise_and_shrink_with_more_samples():
    from ldmflow.evaluation.intervals import bootstrap_ci95

    rng = np.random.default_rng(0)

    def width(count: int) -> float:
        errors = np.abs(rng.normal(0.0, 1.0, count))
        return bootstrap_ci95(lambda rows: {"mae": float(errors[rows].mean())}, (count,))["mae_ci95"]

    # the mean of |N(0, 1)| has standard deviation 0.60 / sqrt(n): a 95% half-width of about 1.18 / sqrt(n)
    assert width(400) == pytest.approx(1.18 / 20, rel=0.25)
    assert width(25) > 3 * width(400)
    same = np.abs(rng.normal(size=50))
    draws = [bootstrap_ci95(lambda rows: {"mae": float(same[rows].mean())}, (50,), seed=3) for _ in range(2)]
    assert draws[0] == draws[1]  # seeded: an evaluation repeats exactly


def test_a_probe_of_another_dataset_is_refused_in_one_line(store):
    from ldmflow.data.manifest import load_manifest
    from ldmflow.tracking.registry import registered_probe_uri

    root, _ = store
    uri = registered_probe_uri(load_manifest("data/manifest.json").digest, None)
    if uri is None:  # when run alone
        invoke("probe", "--manifest_path", "data/manifest.json", "--output_dir", "probe", "--num_epochs", "2")
        uri = "models:/ldmflow-probe/1"
    other = root / "data" / "reordered.json"
    other.write_text((root / "data" / "manifest.json").read_text() + "\n")  # other bytes: another dataset
    before = len(_runs("evaluate"))
    result = invoke("evaluate", "--model_uri", "models:/ldmflow-vae/1", "--manifest_path", str(other), *QUICK,
                    "--probe_uri", uri, ok=False)
    assert result.exit_code == 1 and result.output.count("Error:") == 1
    assert f"--probe_uri {uri} was trained on another dataset" in result.output
    assert len(_runs("evaluate")) == before


def test_the_table_shows_each_score_with_its_interval_and_logs_the_rest():
    """KID's spread over subsets and the FID image counts are logged, not rows (make demo prints the table)."""
    from ldmflow.evaluation.report import format_metrics

    table = format_metrics({"eval/kid": 0.002, "eval/kid_ci95": 0.001, "eval/kid_std": 0.01, "eval/rkid_std": 0.01,
                            "eval/fid": 11.3, "eval/fid_num_real": 200, "eval/fid_min_real": 129}).splitlines()
    assert [line.split()[0] for line in table] == ["eval/...", "fid", "kid"]
    assert table[2].split()[1:] == ["0.002", "±", "0.001"]


def test_a_score_the_probe_cannot_judge_is_named_below_the_table():
    """Issue 30's plumes: the probe misread real images' wind by 33 degrees, the samples by 35: no verdict on
    the wind; temperature, read 3x better on real images than on the samples, is the model's own."""
    from ldmflow.evaluation.report import format_metrics, probe_limit_lines

    metrics = {"eval/temperature_mae_pct": 6.0, "eval/probe/temperature_mae_pct": 2.0,
               "eval/wind_angle_error_deg": 35.0, "eval/probe/wind_angle_error_deg": 33.0,
               "eval/wind_length_mae_pct": 10.0, "eval/probe/wind_length_mae_pct": 8.5,
               "eval/recon/wind_angle_error_deg": 34.0, "eval/shuffled/wind_angle_error_deg": 40.0}
    angle, length = [line for line in format_metrics(metrics).splitlines() if "limited by the probe" in line]
    assert angle.startswith("wind angle: limited by the probe (real images 33° vs samples 35°)")
    assert length.startswith("wind length: limited by the probe (real images 8.5% vs samples 10%)")
    plain = {key.removeprefix("eval/"): value for key, value in metrics.items()}
    assert probe_limit_lines({**plain, "wind_angle_error_deg": 42.0, "wind_length_mae_pct": 10.7}) == []
    assert probe_limit_lines({"wind_angle_error_deg": 35.0}) == []  # no probe column (a probe-less table)


def test_a_probe_trained_under_mlflow_run_is_named_after_the_evaluate_runs_experiment(tmp_path):
    """`mlflow run -e evaluate --experiment-name x`: the probe's run nests under the evaluate run, in x, and its
    experiment_name param says x."""
    from ldmflow.tracking.store import ensure_experiment, use_tracking_store
    from ldmflow.workflows.evaluate import _experiment_of

    with tracked_folder(tmp_path):
        use_tracking_store()
        run = _client().create_run(ensure_experiment("entry-point"))
        assert _experiment_of(run.info.run_id) == "entry-point"
        assert _experiment_of(None) is None
