"""Requests that give some conditions only, and guidance per condition: tiny untrained latent models saved as
folders (no training), sampled through the sampler, the CLI (--condition, CSV, JSON) and the pyfunc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from cli_runner import invoke
from fuzzing import succeeds_or_one_line
from ldmflow.data.conditions import ConditionSpec, ConditionStats
from ldmflow.errors import LdmflowError
from ldmflow.models.conditioning import ConditionEncoder
from numerics import assert_computed_alike

pytestmark = pytest.mark.portable  # compares images computed along two paths (make test-portable)

SPEC = "temperature:1,wind:3,wind_mag:1"
STEPS = ["--num_inference_steps", "2", "--no_mlflow"]


def _encoder(dropout: dict[str, float] | None) -> ConditionEncoder:
    return ConditionEncoder(ConditionSpec.parse(SPEC), ConditionStats((10.0, 0.0, 0.0, 0.0, 1.0), (5.0, 1, 1, 1, 1)),
                            None, dropout)


def save_latent_model(folder: Path, dropout: dict[str, float] | None) -> Path:
    """A latent DDPM output folder (unet/, scheduler, conditioning.json, vae_source.json) of untrained weights."""
    from diffusers import DDPMScheduler

    from ldmflow.models.architectures import build_latent_unet, build_vae

    torch.manual_seed(0)
    build_vae((8, 8, 8, 8), 1, 32, 4).save_pretrained(folder / "vae")
    encoder = _encoder(dropout)
    model = folder / "latent"
    build_latent_unet((16, 16), 1, 4, 4, encoder.encoded_dim).save_pretrained(model / "unet")
    DDPMScheduler(num_train_timesteps=10).save_pretrained(model)
    encoder.save(model)
    (model / "vae_source.json").write_text(json.dumps({"vae_path": str(folder / "vae"), "condition_spec": SPEC}))
    return model


@pytest.fixture(scope="module")
def partial_model(tmp_path_factory) -> Path:
    """Trained (as recorded) with every condition dropped alone now and then: it takes any subset."""
    return save_latent_model(tmp_path_factory.mktemp("partial"), {"temperature": 0.1, "wind": 0.2, "wind_mag": 0.2})


@pytest.fixture(scope="module")
def full_model(tmp_path_factory) -> Path:
    """Saved before per-condition dropout was recorded (no key in conditioning.json): every condition or none."""
    return save_latent_model(tmp_path_factory.mktemp("full"), None)


def _sampler(model: Path):
    from ldmflow.sampling.latent import LatentSampler

    return LatentSampler.from_folders(model / "unet", model.parent / "vae", model, model / "conditioning.json")


def test_an_absent_condition_is_flag_0_and_a_condition_is_dropped_alone_with_its_probability():
    encoder = _encoder({"temperature": 0.0, "wind": 0.5, "wind_mag": 0.0})
    encoded = encoder.encode_physical([{"temperature": [12.0]}])  # (1, 5 + 3)
    assert encoded[0, 5:].tolist() == [1.0, 0.0, 0.0] and encoded[0, 1:5].abs().sum() == 0
    assert encoder.omittable == ("wind",)
    torch.manual_seed(0)
    dropped = encoder.drop_each(torch.ones(4000, 8))
    wind_kept = dropped[:, 6]
    assert (dropped[:, [0, 4, 5, 7]] == 1).all()  # temperature and wind_mag are never dropped alone
    assert (dropped[:, 1:4] == wind_kept[:, None]).all()  # wind's values go with its flag
    assert 0.45 < 1 - wind_kept.mean().item() < 0.55
    assert _encoder(None).drop_each(torch.ones(3, 8)).equal(torch.ones(3, 8))


def test_the_per_condition_dropout_is_recorded_and_an_old_record_means_none(tmp_path):
    encoder = _encoder({"temperature": 0.1, "wind": 0.0, "wind_mag": 0.3})
    loaded = ConditionEncoder.load(encoder.save(tmp_path))
    assert loaded.dropout_per_condition == {"temperature": 0.1, "wind": 0.0, "wind_mag": 0.3}
    assert loaded.omittable == ("temperature", "wind_mag")
    record = json.loads((tmp_path / "conditioning.json").read_text())
    del record["cond_dropout_per_condition"]
    (tmp_path / "conditioning.json").write_text(json.dumps(record))
    assert ConditionEncoder.load(tmp_path / "conditioning.json").omittable == ()


def test_a_condition_left_out_is_absent_not_zero(partial_model):
    sampler = _sampler(partial_model)
    absent = sampler.generate([{"temperature": 12.0}], num_inference_steps=2, seeds=[1])
    zero = sampler.generate([{"temperature": 12.0, "wind": [0, 0, 0], "wind_mag": 0.0}], num_inference_steps=2,
                            seeds=[1])
    assert np.abs(absent - zero).max() > 1e-4


def test_guidance_per_condition_equals_ordinary_guidance_when_one_condition_is_given(partial_model):
    sampler = _sampler(partial_model)
    request = [{"temperature": 12.0}, {"temperature": 4.0}]
    ordinary = sampler.generate(request, guidance_scale=3.0, num_inference_steps=3, seeds=[1, 2])
    composed = sampler.generate(request, guidance_scale=1.0, num_inference_steps=3, seeds=[1, 2],
                                condition_guidance={"temperature": 3.0})
    # the UNet's widest reduction (3x3 over 16 channels), through its layers and the VAE's
    assert_computed_alike(torch.from_numpy(composed), torch.from_numpy(ordinary), reduction=9 * 16, layers=30)
    unguided = sampler.generate(request, guidance_scale=1.0, num_inference_steps=3, seeds=[1, 2])
    assert np.abs(unguided - ordinary).max() > 1e-3  # the guidance did something to compare


def test_guidance_per_condition_weighs_each_given_condition_and_batches_rows(partial_model):
    sampler = _sampler(partial_model)
    request = [{"temperature": 12.0, "wind": [1, 0, 0]}, {"wind": [0, 2, 0]}, {"temperature": 3.0}]
    weights = {"temperature": 4.0, "wind": 2.0}
    whole = sampler.generate(request, num_inference_steps=2, seeds=[1, 2, 3], condition_guidance=weights)
    alone = sampler.generate(request[1:2], num_inference_steps=2, seeds=[2], condition_guidance=weights)
    assert_computed_alike(torch.from_numpy(alone), torch.from_numpy(whole[1:2]), reduction=9 * 16, layers=30)
    other = sampler.generate(request, num_inference_steps=2, seeds=[1, 2, 3],
                             condition_guidance={"temperature": 1.0, "wind": 2.0})
    assert np.abs(other[0] - whole[0]).max() > 1e-4 and np.abs(other[2] - whole[2]).max() > 1e-4
    blank = sampler.generate([{}], num_inference_steps=2, seeds=[4], condition_guidance=weights)
    assert_computed_alike(torch.from_numpy(blank), torch.from_numpy(sampler.generate(num_images=1, seeds=[4],
                                                                                     num_inference_steps=2)),
                          reduction=9 * 16, layers=30)  # nothing given: an unconditional sample
    with pytest.raises(LdmflowError, match=r"^--condition_guidance names humidity, which this model does not take "
                                           r"\(its conditions: temperature, wind, wind_mag\)\.$"):
        sampler.generate(request, num_inference_steps=2, condition_guidance={"humidity": 2.0})


def test_partial_rows_through_the_cli_a_csv_with_blank_cells_and_json(partial_model, tmp_path):
    def sample(folder: str, *arguments) -> list[Path]:
        invoke("sample", "--model_uri", partial_model, "--output_dir", tmp_path / folder, *arguments, *STEPS)
        return sorted((tmp_path / folder).glob("samples-*/sample_*.png"))

    assert len(sample("option", "--condition", "temperature=12", "--num_images", "2")) == 2
    (tmp_path / "partial.csv").write_text("temperature,wind_0,wind_1,wind_2,wind_mag,seed\n12,,,,,1\n,1,0,0,,2\n"
                                          "30,0,5,0,5,3\n")
    from_csv = sample("csv", "--conditions_file", tmp_path / "partial.csv", "--condition_guidance",
                      "temperature=4,wind=2")
    assert len(from_csv) == 3
    (tmp_path / "partial.json").write_text(json.dumps([{"temperature": 12}, {"wind": [1, 0, 0], "seed": 5}, {}]))
    assert len(sample("json", "--conditions_file", tmp_path / "partial.json")) == 3
    # a blank cell is the same request as leaving the condition out on the command line (seed 1 in both)
    [from_option] = sample("alone", "--condition", "temperature=12", "--num_images", "1", "--seed", "1",
                           "--condition_guidance", "temperature=4,wind=2")
    difference = np.abs(_pixels(from_option) - _pixels(from_csv[0]))
    assert difference.max() <= 1  # 8-bit files of images computed in batches of 1 and 3


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


def test_a_model_without_per_condition_dropout_refuses_partial_rows_in_one_line(full_model, tmp_path):
    result = invoke("sample", "--model_uri", full_model, "--condition", "temperature=12", "--output_dir", tmp_path,
                    *STEPS, ok=False)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: Image 0: missing condition(s) ['wind', 'wind_mag']; this model's "
                                    "condition spec is temperature:1,wind:3,wind_mag:1 and it was trained without "
                                    "per-condition dropout")
    assert "train with --cond_dropout_per_condition 0.1, an option of latent-ddpm)." in result.output
    result = invoke("sample", "--model_uri", full_model, "--condition", "temperature=12", "--condition",
                    "wind=1,0,0", "--condition_guidance", "temperature=3", "--output_dir", tmp_path, *STEPS, ok=False)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "--condition_guidance predicts each condition alone" in result.output
    assert not list(tmp_path.iterdir())
    # every condition still works, and so does a model that may leave out some only
    invoke("sample", "--model_uri", full_model, "--condition", "temperature=12", "--condition", "wind=1,0,0",
           "--num_images", "1", "--output_dir", tmp_path, *STEPS)
    some = save_latent_model(tmp_path / "some", {"temperature": 0.0, "wind": 0.1, "wind_mag": 0.1})
    with pytest.raises(LdmflowError, match=r"^Image 0: missing condition\(s\) \['temperature'\]; this model was "
                                           r"trained to do without \['wind', 'wind_mag'\] only"):
        _sampler(some).generate([{"wind": [1, 0, 0]}], num_inference_steps=2)


class _Context:
    def __init__(self, model: Path):
        self.artifacts = {"unet": str(model / "unet"), "vae": str(model.parent / "vae"),
                          "scheduler": str(model / "scheduler_config.json"),
                          "conditioning": str(model / "conditioning.json")}


def test_partial_rows_and_guidance_per_condition_through_the_pyfunc(partial_model, full_model):
    from ldmflow.tracking.pyfunc_models import InputError, LatentDiffusionPyfunc

    model = LatentDiffusionPyfunc()
    model.load_context(_Context(partial_model))
    frame = pd.DataFrame({"temperature": [12.0, None, None], "wind_0": [None, 1.0, None],
                          "wind_1": [None, 0.0, None], "wind_2": [None, 0.0, None], "seed": [1, 2, 3]})
    params = {"num_inference_steps": 2, "condition_guidance": "temperature=4,wind=2"}
    out = model.predict(None, frame, params=params)
    assert out["seed"].tolist() == [1, 2, 3] and out["image"].str.len().min() > 0
    with pytest.raises(InputError, match="^--condition_guidance names humidity"):
        model.predict(None, frame, params={**params, "condition_guidance": "humidity=2"})
    with pytest.raises(InputError, match=r"^--condition_guidance: temperature=-1 must be in \[0, 100\]\.$"):
        model.predict(None, frame, params={**params, "condition_guidance": "temperature=-1"})
    full = LatentDiffusionPyfunc()
    full.load_context(_Context(full_model))
    with pytest.raises(InputError, match=r"^Image 0: missing condition\(s\) \['wind', 'wind_mag'\]; .*"
                                         r"--cond_dropout_per_condition 0\.1"):
        full.predict(None, frame.iloc[:1], params={"num_inference_steps": 2})


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="temprauwind_=,.-0123456789e \n", max_size=30) | st.text(max_size=20))
@example(text="temperature=0.1,temperature=0.2")
@example(text="temperature=1e400")
@example(text="0.1")
def test_the_per_condition_options_take_any_text_or_say_what_is_wrong_in_one_line(text):
    from ldmflow.settings import LatentDdpmSettings, SampleSettings

    dropout = succeeds_or_one_line(LatentDdpmSettings, manifest_path="m", output_dir="o", vae_uri="v",
                                   cond_dropout_per_condition=text)
    if dropout is not None:
        probabilities = dropout.dropout_per_condition()
        assert set(probabilities) in ({"temperature", "wind", "wind_mag"}, set())
        assert all(0 <= p < 1 for p in probabilities.values())
    sample = succeeds_or_one_line(SampleSettings, model_uri="m", condition=("temperature=1",),
                                  condition_guidance=text)
    if sample is not None:
        assert all(0 <= weight <= 100 for weight in sample.guidance_weights().values())


def test_a_logged_partial_model_takes_partial_json_records_through_mlflow(partial_model, full_model, tmp_path):
    """The scoring server's path: the logged pyfunc with its signature, JSON records lacking some columns; the
    registry tells the models that take partial requests from those that do not."""
    import mlflow

    from fakes import tracked_folder
    from ldmflow.tags import OMITTABLE_CONDITIONS_TAG
    from ldmflow.tracking.registry import log_and_register

    with tracked_folder(tmp_path):
        with mlflow.start_run() as run:
            logged = log_and_register("latent_ddpm", partial_model, run.info.run_id, dataset_digest="d" * 64,
                                      register=False)
        with mlflow.start_run() as run:
            full = log_and_register("latent_ddpm", full_model, run.info.run_id, dataset_digest="d" * 64)
        client = mlflow.MlflowClient()
        assert client.get_logged_model(logged.model_id).tags[OMITTABLE_CONDITIONS_TAG] == "temperature,wind,wind_mag"
        version = client.get_model_version(full.name, full.version)
        assert version.tags[OMITTABLE_CONDITIONS_TAG] == "none" and "leave out" not in (version.description or "")
        model = mlflow.pyfunc.load_model(logged.model_uri)
        records = pd.DataFrame.from_records([{"temperature": 30.0, "seed": 7},
                                             {"wind_0": 0.0, "wind_1": 5.0, "wind_2": 0.0, "seed": 8}])
        out = model.predict(records, params={"num_inference_steps": 2, "condition_guidance": "temperature=4,wind=2"})
        assert out["seed"].tolist() == [7, 8]
