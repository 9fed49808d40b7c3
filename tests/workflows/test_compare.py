"""Replicate groups (--replicates) and `ldmflow compare`: verdicts beyond noise, on tiny VAEs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cli_runner import invoke
from fakes import tracked_folder
from ldmflow.data.conditions import ConditionSpec
from ldmflow.errors import LdmflowError
from ldmflow.evaluation.comparison import BETTER, WITHIN_NOISE, WORSE, MetricComparison, training_half_width
from ldmflow.settings import VaeSettings
from ldmflow.tags import REGISTERED_URI_TAG, REPLICATE_OF_TAG, REPLICATE_REGISTERED_TAG, REPLICATES_TAG
from ldmflow.workflows.compare import Side, check_comparable, replicate_models
from ldmflow.workflows.evaluate import EvaluatedModel
from tiny import TINY_SIZES

pytestmark = [pytest.mark.train, pytest.mark.portable]  # verdicts on computed scores: make test-portable too
VAE = [*TINY_SIZES, "--learning_rate", "2e-3", "--num_epochs", "4", "--block_out_channels", "8,8,8,8",
       "--scaling_factor_batches", "1", "--num_validations", "2"]
COMPARE = ["--manifest_path", "data/manifest.json", "--condition_spec", "none", "--num_samples", "8",
           "--batch_size", "4"]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Two replicate groups of one recipe (3 seeds and 2 seeds) and an untrained VAE, in a fresh store."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("compare")
    with tracked_folder(root):
        invoke("demo-data", "--output_dir", "data", "--num_images", "24", "--resolution", "32")
        invoke("vae", "--manifest_path", "data/manifest.json", "--output_dir", "a", *VAE, "--replicates", "3")
        invoke("vae", "--manifest_path", "data/manifest.json", "--output_dir", "b", *VAE, "--replicates", "2",
               "--seed", "10", "--registered_model_name", "vae-b")
        torch.manual_seed(0)
        AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      sample_size=32).save_pretrained(root / "untrained")
        client = MlflowClient()
        parents = {run.data.params["output_dir"]: run for run in client.search_runs(
            [client.get_experiment_by_name("ldmflow").experiment_id], f"tags.`{REPLICATES_TAG}` != ''")}
        yield root, parents["a"], parents["b"]


def test_a_replicate_group_is_a_parent_with_a_child_per_seed_and_spread_metrics(groups):
    _, parent, _ = groups
    client = MlflowClient()
    children = client.search_runs([parent.info.experiment_id], f"tags.`{REPLICATE_OF_TAG}` = '{parent.info.run_id}'")
    assert sorted(int(run.data.params["seed"]) for run in children) == [0, 1, 2]
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children)
    psnrs = [run.data.metrics["val/psnr"] for run in children]
    metrics = parent.data.metrics
    assert metrics["val/psnr"] == pytest.approx(np.mean(psnrs))
    assert metrics["val/psnr_sd"] == pytest.approx(np.std(psnrs, ddof=1))
    assert (metrics["val/psnr_min"], metrics["val/psnr_max"]) == pytest.approx((min(psnrs), max(psnrs)))
    assert parent.data.tags[REGISTERED_URI_TAG] == "models:/ldmflow-vae/1"
    assert "nearest to the group's mean" in parent.data.tags[REPLICATE_REGISTERED_TAG]
    version = client.get_model_version("ldmflow-vae", "1")
    assert version.run_id in {run.info.run_id for run in children}  # one replicate registered, not the parent
    assert len(client.search_model_versions("name = 'ldmflow-vae'")) == 1


def test_two_groups_of_one_recipe_are_within_noise_and_a_trained_model_beats_an_untrained_one(groups):
    root, a, b = groups
    with tracked_folder(root):
        same = invoke("compare", f"runs:/{a.info.run_id}", f"runs:/{b.info.run_id}", *COMPARE).output
        assert "training noise (3 and 2 replicates)" in same
        psnr = next(line for line in same.splitlines() if line.startswith("psnr "))
        assert psnr.rstrip().endswith(WITHIN_NOISE), same
        trained = invoke("compare", "models:/ldmflow-vae/1", str(root / "untrained"), *COMPARE).output
        assert next(line for line in trained.splitlines() if line.startswith("psnr ")).rstrip().endswith(BETTER)
        assert "evaluation noise only" in trained
        gate = invoke("compare", str(root / "untrained"), "models:/vae-b/1", *COMPARE, "--fail_if_worse", "psnr",
                      ok=False)
        assert gate.exit_code == 1 and "A is worse than B on psnr beyond noise" in gate.output
        client = MlflowClient()
        runs = client.search_runs([a.info.experiment_id], "tags.`ldmflow.stage` = 'compare'")
        linked = [run for run in runs if run.data.tags["ldmflow.compare.a"] == "models:/ldmflow-vae/1"]
        assert linked and linked[0].data.tags["ldmflow.compare.b"] == str(root / "untrained")
        assert linked[0].data.metrics["compare/psnr/difference"] > linked[0].data.metrics["compare/psnr/ci95"] > 0
        table = json.loads(Path(client.download_artifacts(linked[0].info.run_id, "comparison.json")).read_text())
        assert {row["metric"] for row in table["rows"]} >= {"psnr", "ssim"}


def test_a_group_whose_replicates_did_not_all_finish_is_refused_in_one_line(groups):
    root, a, _ = groups
    with tracked_folder(root):
        client = MlflowClient()
        [child, *_] = client.search_runs([a.info.experiment_id], f"tags.`{REPLICATE_OF_TAG}` = '{a.info.run_id}'")
        client.set_terminated(child.info.run_id, "FAILED")
        try:
            with pytest.raises(LdmflowError, match=rf"Replicate group {a.info.run_id} is incomplete: 3 of 3 "
                                                   rf"replicates ran, run\(s\) {child.info.run_id} did not finish"):
                replicate_models(a.info.run_id)
        finally:
            client.set_terminated(child.info.run_id, "FINISHED")


def _side(label: str, stage: str, resolution: int = 32, spec: str = "none") -> Side:
    return Side(label, [label], [EvaluatedModel(stage, None, resolution, ConditionSpec.parse(spec))], [""])


@pytest.mark.parametrize("other, message", [
    (_side("b", "latent_ddpm", spec="temperature:1"), "b is a latent_ddpm model, a a vae model; compare models of one kind"),
    (_side("b", "vae", resolution=64), "b makes 64 px images, a 32 px; compare models of one image size"),
    (_side("b", "vae", spec="temperature:1"), "b takes the conditions temperature:1, a none"),
])
def test_models_of_another_kind_size_or_condition_spec_are_refused_in_one_line(other, message):
    with pytest.raises(LdmflowError, match=message):
        check_comparable(_side("a", "vae"), other)


def test_replicates_must_be_at_least_one():
    with pytest.raises(LdmflowError, match="--replicates must be at least 1, got 0"):
        VaeSettings(manifest_path="m", output_dir="o", replicates=0)


def test_a_verdict_needs_the_whole_interval_on_one_side_of_zero():
    assert MetricComparison("psnr", 30.0, 28.0, 1.0, True).verdict == BETTER
    assert MetricComparison("temperature_mae_pct", 3.0, 5.0, 1.0, False).verdict == BETTER
    assert MetricComparison("temperature_mae_pct", 5.0, 3.0, 1.0, False).verdict == WORSE
    assert MetricComparison("psnr", 30.0, 29.5, 1.0, True).verdict == WITHIN_NOISE
    assert training_half_width([1.0], [2.0]) == 0.0  # one model a side: its training noise is unknown
    assert training_half_width([1.0, 3.0], [2.0, 4.0]) == pytest.approx(4.3027 * 2 ** 0.5, rel=1e-3)  # df = 2


def test_condition_errors_are_paired_per_request_and_a_model_that_follows_them_is_better():
    """The latent DDPM path on stand-in readings: the same requests, one model reading back what it was asked."""
    from ldmflow.evaluation.adherence import Requests
    from ldmflow.evaluation.comparison import compare_metrics, paired_half_widths
    from ldmflow.evaluation.metric_names import higher_is_better
    from ldmflow.workflows.compare import _per_sample_score
    from ldmflow.workflows.evaluate import Evaluation

    spec = ConditionSpec.parse("temperature:1,wind:3")
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 10, (64, 1)), rng.normal(size=(64, 3))], axis=1)
    requests = Requests([{}] * 64, values, np.ones((64, 2)))
    ranges = {"temperature": (0.0, 10.0), "wind": (0.0, 3.0)}

    def evaluation(readings):
        return Evaluation({}, {"eval_stage": "latent_ddpm"}, None, {}, None, np.zeros((64, 4, 4, 3)), None,
                          requests, readings)

    follows = evaluation(values + rng.normal(scale=0.1, size=values.shape))
    ignores = evaluation(values[rng.permutation(64)])
    scores = [_per_sample_score(e, spec, ranges) for e in (follows, ignores)]
    halves = paired_half_widths([scores[0]], [scores[1]], 64)
    full = np.arange(64)
    rows = {row.metric: row for row in compare_metrics({k: [v] for k, v in scores[0](full).items()},
                                                        {k: [v] for k, v in scores[1](full).items()}, halves,
                                                        higher_is_better)}
    assert rows["temperature_mae_pct"].verdict == rows["wind_angle_error_deg"].verdict == BETTER
    same = paired_half_widths([scores[0]], [scores[0]], 64)
    assert same["temperature_mae_pct"] == 0.0  # a model against itself: no noise at all when paired
