"""One source of truth: the settings dataclasses. MLproject, the CLI and the pipeline agree with them, and the
original scripts' README (../shared/seeds/) flags and defaults are accepted."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from ldmflow.cli import cli
from ldmflow.projects import ENTRY_POINTS, normalise_arguments, project_parameters, render_mlproject
from ldmflow.settings import (LatentDdpmSettings, LegacyDdpmSettings, PipelineSettings, SampleSettings,
                              TrainSettings, VaeSettings, param_value, setting_fields)

ROOT = Path(__file__).resolve().parents[1]
SEED_README = sorted((ROOT.parent / "shared" / "seeds").glob("*.txt"))
REQUIRED = {"manifest_path": "manifest.json", "output_dir": "out", "vae_uri": "models:/ldmflow-vae/1",
            "model_uri": "models:/ldmflow-latent-ddpm/1", "stage": "vae", "space": "space.yaml"}
# Where ldmflow deliberately differs from a value the original README shows in an example command.
DELIBERATE = {
    "mixed_precision": "fp16 needs CUDA: the default runs anywhere; pass fp16 or bf16 on a GPU",
    "use_ema": "a flag, off as in the original script; the pipeline turns it on",
    "enable_xformers_memory_efficient_attention": "an optional extra; PyTorch SDPA is the default",
}


def _settings_from_cli(command_name: str, args: list[str]):
    command = cli.commands[command_name]
    context = command.make_context(command_name, list(args))
    settings_class = {name: cls for name, cls in ENTRY_POINTS.values()}[command_name]
    return settings_class(**context.params)


def _required_for(settings_class) -> dict[str, str]:
    return {item.name: REQUIRED[item.name] for item, _, _ in setting_fields(settings_class)
            if item.default is dataclasses.MISSING}


def test_mlproject_is_generated_from_the_settings():
    assert (ROOT / "MLproject").read_text() == render_mlproject(), "MLproject is out of date: run `make mlproject`"


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_mlproject_parameters_have_the_settings_names_types_and_defaults(entry_point):
    """Read with MLflow's own loader, so YAML quirks (an unquoted `no`, `1e-06` read as a string) show up."""
    from mlflow.projects._project_spec import load_project

    declared = load_project(str(ROOT)).get_entry_point(entry_point).parameters
    command_name, settings_class = ENTRY_POINTS[entry_point]
    for item, kind, metadata in setting_fields(settings_class):
        if not metadata.get("project", True) or item.default is None:
            assert item.name not in declared
            continue
        parameter = declared[item.name]
        expected_type = "float" if kind is float else "string"
        assert parameter.type == expected_type, item.name
        if item.default is dataclasses.MISSING:
            assert parameter.default is None or item.name == "output_dir", item.name
        elif kind is float:
            assert float(parameter.default) == item.default, item.name
        else:
            assert str(parameter.default) == param_value(item.default), item.name
    assert set(declared) == set(project_parameters(entry_point))


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_an_entry_point_run_with_its_defaults_gets_the_cli_defaults(entry_point):
    """MLflow's command line for the defaults, parsed by the CLI, gives exactly the settings' defaults."""
    from mlflow.projects._project_spec import load_project

    command_name, settings_class = ENTRY_POINTS[entry_point]
    required = _required_for(settings_class)
    declared = load_project(str(ROOT)).get_entry_point(entry_point)
    argv = shlex.split(declared.compute_command(required, storage_dir=None))
    assert argv[:3] == ["python", "-m", f"entrypoints.{entry_point}"]
    assert (ROOT / "entrypoints" / f"{entry_point}.py").is_file()
    command = cli.commands[command_name]
    assert _settings_from_cli(command_name, normalise_arguments(command, argv[3:])) == settings_class(**required)


@pytest.mark.parametrize("settings_class", [VaeSettings, LatentDdpmSettings, LegacyDdpmSettings, SampleSettings,
                                            PipelineSettings])
def test_cli_defaults_are_the_settings_defaults(settings_class):
    command_name = next(name for name, cls in ENTRY_POINTS.values() if cls is settings_class)
    args = [part for name, value in _required_for(settings_class).items() for part in (f"--{name}", value)]
    assert _settings_from_cli(command_name, args) == settings_class(**_required_for(settings_class))


def test_every_cli_option_of_a_stage_is_a_setting():
    """Nothing reaches a trainer except through its settings (so nothing escapes MLflow's params)."""
    for command_name, settings_class in ENTRY_POINTS.values():
        options = {param.name for param in cli.commands[command_name].params}
        assert options == {item.name for item in dataclasses.fields(settings_class)}, command_name


def test_pipeline_defaults_are_the_steps_defaults():
    pipeline = PipelineSettings(manifest_path="m.json")
    vae, latent, sample = (VaeSettings(manifest_path="m", output_dir="o"),
                           LatentDdpmSettings(manifest_path="m", output_dir="o", vae_uri="v"),
                           SampleSettings(model_uri="u"))
    pairs = {"resolution": [vae.resolution, latent.resolution], "vae_train_batch_size": [vae.train_batch_size],
             "ddpm_train_batch_size": [latent.train_batch_size], "vae_epochs": [vae.num_epochs],
             "ddpm_epochs": [latent.num_epochs], "layers_per_block": [vae.layers_per_block, latent.layers_per_block],
             "vae_block_out_channels": [param_value(vae.block_out_channels)],
             "ddpm_block_out_channels": [param_value(latent.block_out_channels)], "kl_weight": [vae.kl_weight],
             "learning_rate": [vae.learning_rate, latent.learning_rate], "condition_spec": [latent.condition_spec],
             "num_images": [sample.num_images], "num_inference_steps": [sample.num_inference_steps],
             "guidance_scale": [sample.guidance_scale, latent.guidance_scale], "seed": [vae.seed, sample.seed]}
    for name, step_values in pairs.items():
        assert all(getattr(pipeline, name) == value for value in step_values), name
    assert pipeline.use_ema and not latent.use_ema  # deliberate: documented in docs/training.md


def test_the_pipeline_passes_only_parameters_its_steps_declare():
    from ldmflow.workflows.pipeline import _step_parameters

    steps = _step_parameters(PipelineSettings(manifest_path="m.json"))
    assert list(steps) == ["vae", "latent_ddpm", "sample", "evaluate"]
    for entry_point, parameters in steps.items():
        assert set(parameters) <= set(project_parameters(entry_point)), entry_point
    rates = _step_parameters(PipelineSettings(manifest_path="m.json", learning_rate=1e-3, vae_learning_rate=3e-4))
    assert (rates["vae"]["learning_rate"], rates["latent_ddpm"]["learning_rate"]) == ("0.0003", "0.001")
    partial = _step_parameters(PipelineSettings(manifest_path="m.json", cond_dropout_per_condition="wind=0.2"))
    assert partial["latent_ddpm"]["cond_dropout_per_condition"] == "wind=0.2"
    validated = _step_parameters(PipelineSettings(manifest_path="m.json", num_validations=5, eval_epochs=3))
    for trained in ("vae", "latent_ddpm"):  # validation settings reach both trainings
        assert validated[trained]["num_validations"] == "5" and validated[trained]["eval_epochs"] == "3"


def test_original_flag_names_are_accepted_as_aliases():
    settings = _settings_from_cli("latent-ddpm", ["--manifest_path", "m", "--output_dir", "o", "--vae_path", "v"])
    assert settings.vae_uri == "v"
    pipeline = _settings_from_cli("pipeline", ["--manifest_path", "m", "--unet_block_out_channels", "32,32"])
    assert pipeline.ddpm_block_out_channels == "32,32"


def _readme_commands(text: str) -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands.append(shlex.split(block.replace("\\\n", " ")))
    return commands


@pytest.mark.skipif(not SEED_README, reason="../shared/seeds/ (the original README) is not beside this checkout")
def test_the_original_readme_commands_run_and_their_values_are_the_defaults():
    text = SEED_README[0].read_text()
    modules = {"train.vae": "vae", "train.latent_diffusion": "latent-ddpm"}
    commands = _readme_commands(text)
    assert [argv[2] for argv in commands] == list(modules)
    for argv in commands:
        command_name = modules[argv[2]]
        settings = _settings_from_cli(command_name, argv[3:])  # every original flag is accepted
        defaults = type(settings)(**{name: getattr(settings, name) for name in ("manifest_path", "output_dir")},
                                  **({"vae_uri": settings.vae_uri} if command_name == "latent-ddpm" else {}))
        flags = [arg[2:] for arg in argv[3:] if arg.startswith("--")]
        aliases = {"vae_path": "vae_uri"}
        for flag in (aliases.get(flag, flag) for flag in flags):
            if flag in DELIBERATE or flag in ("manifest_path", "output_dir", "vae_uri"):
                continue
            assert getattr(defaults, flag) == getattr(settings, flag), f"{command_name} --{flag}"


@pytest.mark.skipif(not SEED_README, reason="../shared/seeds/ (the original README) is not beside this checkout")
def test_the_defaults_the_original_readme_states_are_ours():
    text = SEED_README[0].read_text()
    stated = dict(re.findall(r"`--(\w+)`,? \(?default ([\w.-]+)\)?", text))
    assert stated == {"kl_weight": "1e-4", "save_images_epochs": "5"}
    vae = VaeSettings(manifest_path="m", output_dir="o")
    assert vae.kl_weight == float(stated["kl_weight"]) and vae.save_images_epochs == int(stated["save_images_epochs"])
    spec = re.search(r"Default condition spec: `([^`]+)`", text).group(1)
    latent = LatentDdpmSettings(manifest_path="m", output_dir="o", vae_uri="v")
    assert latent.condition_spec == spec
    blocks = re.search(r"Default UNet blocks `\(([\d,]+)\)`", text).group(1)
    assert latent.block_out_channels == tuple(int(c) for c in blocks.split(","))


def test_legacy_defaults_differ_only_where_documented():
    legacy, base = LegacyDdpmSettings(manifest_path="m", output_dir="o"), TrainSettings(manifest_path="m",
                                                                                        output_dir="o")
    assert legacy.resolution == 64 and base.resolution == 256
    assert "64" in (ROOT / "docs" / "training.md").read_text().split("## Defaults")[1]


TRAIN = {"manifest_path": "m", "output_dir": "o"}


@pytest.mark.parametrize("settings_class, values, message", [
    (VaeSettings, {"max_nonfinite_steps": 0}, "--max_nonfinite_steps must be at least 1, got 0"),
    (VaeSettings, {"checkpoints_total_limit": 0}, "--checkpoints_total_limit must be at least 1, got 0"),
    (VaeSettings, {"max_train_steps": 0}, "--max_train_steps must be at least 1, got 0"),
    (VaeSettings, {"lr_warmup_steps": -1}, "--lr_warmup_steps must be at least 0, got -1"),
    (VaeSettings, {"dataloader_num_workers": -2}, "--dataloader_num_workers must be at least 0, got -2"),
    (VaeSettings, {"scaling_factor_batches": 0}, "--scaling_factor_batches must be at least 1, got 0"),
    (VaeSettings, {"mixed_precision": "fp8"}, "--mixed_precision must be one of no, fp16, bf16, got 'fp8'"),
    (VaeSettings, {"lr_scheduler": "warp"}, "--lr_scheduler must be one of linear, cosine"),
    (LatentDdpmSettings, {"vae_uri": ""}, "--vae_uri is required"),
    (LatentDdpmSettings, {"vae_uri": "v", "cond_dropout_prob": 1.0}, "--cond_dropout_prob must be in [0, 1)"),
    (VaeSettings, {"downsample_factor": 3}, "--downsample_factor must be 4, 8 or 16, got 3"),
    (VaeSettings, {"kl_weight": -1.0}, "--kl_weight"),
    (LegacyDdpmSettings, {"resolution": 72, "block_out_channels": (8,) * 5}, "Resolution 72 cannot be"),
    (LegacyDdpmSettings, {"prediction_type": "x0"}, "--prediction_type must be one of epsilon, v_prediction"),
    (LegacyDdpmSettings, {"ddpm_beta_schedule": "cubic"}, "--ddpm_beta_schedule must be one of linear"),
])
def test_bad_training_settings_are_refused_with_the_flag_named(settings_class, values, message):
    from ldmflow.errors import LdmflowError

    with pytest.raises(LdmflowError, match=re.escape(message)):
        settings_class(**TRAIN, **values)


@pytest.mark.parametrize("settings_class, values, message", [
    (SampleSettings, {"model_uri": "u", "num_images": 0}, "--num_images must be at least 1, got 0"),
    (SampleSettings, {"model_uri": "u", "scheduler": "euler"}, "--scheduler must be one of ddpm, ddim, dpm_solver"),
    (SampleSettings, {"model_uri": "u", "output_format": "jpg"}, "--output_format must be one of png, png16"),
    (PipelineSettings, {"manifest_path": "m", "resolution": 30}, "Pipeline step vae: --resolution must be a"),
    (PipelineSettings, {"manifest_path": "m", "ddpm_block_out_channels": "32,x"},
     "--ddpm_block_out_channels must be a comma list of integers"),
    (PipelineSettings, {"manifest_path": "m", "ddpm_learning_rate": 0.0}, "--ddpm_learning_rate must be in (0, 1]"),
    (PipelineSettings, {"manifest_path": "m", "num_inference_steps": 0},
     "Pipeline step sample: --num_inference_steps must be at least 1"),
])
def test_bad_sample_and_pipeline_settings_are_refused(settings_class, values, message):
    from ldmflow.errors import LdmflowError

    with pytest.raises(LdmflowError, match=re.escape(message)):
        settings_class(**values)


def test_a_bad_value_is_one_error_line_from_the_cli_before_anything_runs(tmp_path):
    from cli_runner import invoke

    result = invoke("pipeline", "--manifest_path", str(tmp_path / "missing.json"),
                    "--vae_epochs", "0", ok=False)
    assert result.exit_code == 1
    assert result.output.strip() == "Error: Pipeline step vae: --num_epochs must be at least 1, got 0."
