"""The `ldmflow` command line: one click group; heavy imports live inside the commands so --help is instant."""

from __future__ import annotations

import json
import logging
import sys

import click

from ldmflow.errors import LdmflowError

from ldmflow.data import DEFAULT_CONDITION_SPEC

IMAGE_FORMATS = ("png", "png16", "tiff16", "tiff32")  # = image_io.IMAGE_FORMATS, kept here so --help stays fast


class _Command(click.Command):
    """Turns LdmflowError (bad input, explained in its message) into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LdmflowError as error:
            raise click.ClickException(str(error)) from None
        except Exception as error:
            if type(error).__module__.startswith("mlflow."):  # server errors, failed project steps
                raise click.ClickException(f"MLflow: {str(error).splitlines()[0] if str(error) else error!r}") from None
            raise


class _Group(click.Group):
    command_class = _Command


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; only warnings from the chatty libraries ldmflow builds on."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("urllib3", "alembic", "git", "PIL", "matplotlib", "accelerate", "httpx", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _comma_ints(ctx, param, value):
    if value is None or isinstance(value, tuple):
        return value
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of integers such as 32,64, got {value!r}") from None


def _options(*decorators):
    """Bundle click options so each group of flags is declared once and shared by the commands using it."""

    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


data_options = _options(
    click.option("--manifest_path", required=True, help="JSON manifest of images (see docs/manifest.md)."),
    click.option("--split", default="train", show_default=True, help="metadata.split value to train on."),
    click.option("--val_split", default="val", show_default=True, help="Split used for validation, if present."),
    click.option("--data_root", default=None, help="Folder output_rel is relative to (default: the manifest's)."),
    click.option("--allow_outside_root", is_flag=True, help="Accept output_rel paths outside the data root."),
    click.option("--resolution", default=256, show_default=True, type=int, help="Square training size (multiple of 8)."),
    click.option("--random_crop", is_flag=True, help="Random instead of center crop."),
    click.option("--random_flip", is_flag=True, help="Random horizontal flips."),
    click.option("--preserve_input_precision", is_flag=True, help="Keep 16-bit/float precision instead of 8-bit."),
)

training_options = _options(
    click.option("--output_dir", required=True, help="Where weights, checkpoints and previews go."),
    click.option("--train_batch_size", default=8, show_default=True, type=int),
    click.option("--eval_batch_size", default=4, show_default=True, type=int),
    click.option("--num_epochs", default=50, show_default=True, type=int),
    click.option("--max_train_steps", default=None, type=int, help="Stop after this many optimizer steps."),
    click.option("--learning_rate", default=1e-4, show_default=True, type=float),
    click.option("--lr_scheduler", default="cosine", show_default=True,
                 type=click.Choice(["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                    "constant_with_warmup"])),
    click.option("--lr_warmup_steps", default=500, show_default=True, type=int),
    click.option("--adam_weight_decay", default=1e-6, show_default=True, type=float),
    click.option("--gradient_accumulation_steps", default=1, show_default=True, type=int),
    click.option("--max_grad_norm", default=1.0, show_default=True, type=float),
    click.option("--mixed_precision", default="no", show_default=True, type=click.Choice(["no", "fp16", "bf16"])),
    click.option("--seed", default=0, show_default=True, type=int),
    click.option("--dataloader_num_workers", default=0, show_default=True, type=int),
    click.option("--checkpointing_steps", default=500, show_default=True, type=int),
    click.option("--checkpoints_total_limit", default=None, type=int, help="Keep only the newest N checkpoints."),
    click.option("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder."),
    click.option("--save_images_epochs", default=5, show_default=True, type=int, help="Preview every N epochs."),
    click.option("--logging_steps", default=10, show_default=True, type=int, help="Log metrics every N steps."),
    click.option("--max_nonfinite_steps", default=5, show_default=True, type=int,
                 help="Stop after this many non-finite losses in a row."),
    click.option("--layers_per_block", default=2, show_default=True, type=int),
    click.option("--enable_xformers_memory_efficient_attention", is_flag=True,
                 help="Use xformers when installed and usable; otherwise PyTorch SDPA."),
)

tracking_options = _options(
    click.option("--experiment_name", default="ldmflow", show_default=True),
    click.option("--run_name", default=None),
    click.option("--no_mlflow", is_flag=True, help="Do not track this run in MLflow."),
    click.option("--registered_model_name", default=None, help="Registry name (default ldmflow-<stage>)."),
    click.option("--register_alias", default=None, help="Set this alias (e.g. candidate) on the new version."),
)

ddpm_options = _options(
    click.option("--use_ema", is_flag=True, help="Keep an EMA of the weights (used for previews and saving)."),
    click.option("--ema_max_decay", default=0.9999, show_default=True, type=float),
    click.option("--ema_inv_gamma", default=1.0, show_default=True, type=float),
    click.option("--ema_power", default=0.75, show_default=True, type=float),
    click.option("--prediction_type", default="epsilon", show_default=True,
                 type=click.Choice(["epsilon", "v_prediction"])),
    click.option("--snr_gamma", default=None, type=float, help="Min-SNR loss weighting gamma (5.0 is typical)."),
    click.option("--ddpm_num_steps", default=1000, show_default=True, type=int),
    click.option("--ddpm_beta_schedule", default="linear", show_default=True,
                 type=click.Choice(["linear", "scaled_linear", "squaredcos_cap_v2"])),
    click.option("--num_preview_images", default=8, show_default=True, type=int),
    click.option("--preview_inference_steps", default=25, show_default=True, type=int,
                 help="DDIM steps for preview grids."),
)


def _block_channels_option(default: str):
    return click.option("--block_out_channels", default=default, show_default=True, callback=_comma_ints,
                        help="Channels per resolution level, comma separated.")


@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "LDMFLOW", "help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Train a VAE, a conditioned latent DDPM and a pixel DDPM from an image manifest, tracked in MLflow."""
    setup_logging(verbose)


@cli.command("check-manifest")
@click.option("--manifest_path", required=True)
@click.option("--split", default="train", show_default=True, help="Split to check ('all' for every entry).")
@click.option("--condition_spec", default=DEFAULT_CONDITION_SPEC, show_default=True)
@click.option("--data_root", default=None)
@click.option("--allow_outside_root", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
def check_manifest_command(manifest_path, split, condition_spec, data_root, allow_outside_root, as_json):
    """Validate a manifest before a long training: counts, missing and unreadable files, condition stats."""
    from ldmflow.data.check import check_manifest, format_report
    from ldmflow.data.manifest import NothingUsableError

    try:
        report, usable = check_manifest(manifest_path, split, condition_spec, data_root, allow_outside_root), True
    except NothingUsableError as error:
        report, usable = error.report.to_dict(), False
        click.echo(f"Error: {error}", err=True)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not usable:
        sys.exit(1)


@cli.command("demo-data")
@click.option("--output_dir", required=True)
@click.option("--num_images", default=64, show_default=True, type=int)
@click.option("--resolution", default=64, show_default=True, type=int)
@click.option("--image_format", default="png", show_default=True, type=click.Choice(IMAGE_FORMATS))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--val_fraction", default=0.1, show_default=True, type=float)
def demo_data_command(output_dir, num_images, resolution, image_format, seed, val_fraction):
    """Write a synthetic, condition-dependent dataset and its manifest.json (nothing is downloaded)."""
    from ldmflow.data.demo import make_demo_dataset

    manifest = make_demo_dataset(output_dir, num_images=num_images, resolution=resolution,
                                 image_format=image_format, seed=seed, val_fraction=val_fraction)
    click.echo(str(manifest))


@cli.command("vae")
@data_options
@training_options
@tracking_options
@_block_channels_option("128,256,512,512")
@click.option("--kl_weight", default=1e-4, show_default=True, type=float)
@click.option("--scaling_factor_batches", default=50, show_default=True, type=int,
              help="Training batches used to measure the latent scaling factor after training.")
def vae_command(**options):
    """Train an AutoencoderKL (4 latent channels, x8) and save it in diffusers format at --output_dir."""
    from ldmflow.training.run import run_training
    from ldmflow.training.settings import VaeSettings

    run_training(VaeSettings(**options))


@cli.command("latent-ddpm")
@data_options
@training_options
@tracking_options
@ddpm_options
@_block_channels_option("256,256,256")
@click.option("--vae_path", required=True, help="VAE folder or MLflow URI (runs:/, models:/name/version, ...).")
@click.option("--condition_spec", default=DEFAULT_CONDITION_SPEC, show_default=True,
              help="Comma list of name:dim, or 'none' for unconditional.")
@click.option("--cond_dropout_prob", default=0.1, show_default=True, type=float,
              help="Probability of training a sample with the null condition (classifier-free guidance).")
@click.option("--cache_latents", is_flag=True, help="Encode the dataset once, then train from the cache.")
@click.option("--guidance_scale", default=3.0, show_default=True, type=float, help="Guidance for previews.")
def latent_ddpm_command(**options):
    """Train a conditioned UNet2DConditionModel on a VAE's latents; writes unet/, scheduler, vae_source.json."""
    from ldmflow.training.run import run_training
    from ldmflow.training.settings import LatentDdpmSettings

    run_training(LatentDdpmSettings(**options))


@cli.command("legacy-ddpm")
@data_options
@training_options
@tracking_options
@ddpm_options
@_block_channels_option("128,128,256,256,512,512")
def legacy_ddpm_command(**options):
    """Train the original unconditional pixel-space UNet2DModel; saved as a DDPMPipeline folder."""
    from ldmflow.training.run import run_training
    from ldmflow.training.settings import PixelDdpmSettings

    run_training(PixelDdpmSettings(**options))


@cli.command("sample")
@click.option("--model_uri", required=True,
              help="Output folder, runs:/..., models:/name/version, models:/name@alias or models:/<model_id>.")
@click.option("--output_dir", default="outputs/samples", show_default=True)
@click.option("--num_images", default=8, show_default=True, type=int)
@click.option("--condition", multiple=True, help="name=value, repeatable: --condition temperature=12.5 "
              "--condition wind=1,0,0 (every image gets them).")
@click.option("--conditions_file", default=None, help="CSV or JSON list: one row of conditions (and seed) per image.")
@click.option("--guidance_scale", default=3.0, show_default=True, type=float)
@click.option("--num_inference_steps", default=25, show_default=True, type=int)
@click.option("--scheduler", default="ddim", show_default=True, type=click.Choice(["ddpm", "ddim", "dpm_solver"]))
@click.option("--seed", default=0, show_default=True, type=int, help="Image i uses seed + i.")
@click.option("--output_format", default="png", show_default=True, type=click.Choice(IMAGE_FORMATS))
@click.option("--experiment_name", default="ldmflow", show_default=True)
@click.option("--run_name", default=None)
@click.option("--no_mlflow", is_flag=True)
def sample_command(**options):
    """Generate images (and grid.png) from a trained model; logged as a run linked to the model."""
    from ldmflow.sampling.run import run_sampling
    from ldmflow.training.settings import SampleSettings

    click.echo(str(run_sampling(SampleSettings(**options))))


@cli.command("pipeline")
@click.option("--manifest_path", required=True)
@click.option("--output_root", default="outputs/pipeline", show_default=True)
@click.option("--resolution", default=256, show_default=True, type=int)
@click.option("--train_batch_size", default=8, show_default=True, type=int)
@click.option("--vae_block_out_channels", default="128,256,512,512", show_default=True)
@click.option("--unet_block_out_channels", default="256,256,256", show_default=True)
@click.option("--layers_per_block", default=2, show_default=True, type=int)
@click.option("--vae_epochs", default=50, show_default=True, type=int)
@click.option("--ddpm_epochs", default=50, show_default=True, type=int)
@click.option("--learning_rate", default=1e-4, show_default=True, type=float)
@click.option("--lr_warmup_steps", default=500, show_default=True, type=int)
@click.option("--save_images_epochs", default=5, show_default=True, type=int)
@click.option("--checkpointing_steps", default=500, show_default=True, type=int)
@click.option("--condition_spec", default=DEFAULT_CONDITION_SPEC, show_default=True)
@click.option("--kl_weight", default=1e-4, show_default=True, type=float)
@click.option("--use_ema/--no_ema", default=True, show_default=True)
@click.option("--cache_latents/--no_cache_latents", default=True, show_default=True)
@click.option("--num_images", default=8, show_default=True, type=int)
@click.option("--num_inference_steps", default=25, show_default=True, type=int)
@click.option("--guidance_scale", default=3.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--experiment_name", default="ldmflow", show_default=True)
def pipeline_command(**options):
    """vae -> latent_ddpm -> sample as child runs of one parent run; unchanged finished steps are reused."""
    from ldmflow.tracking.pipeline import PipelineSettings, run_pipeline

    summary = run_pipeline(PipelineSettings(**options))
    click.echo(json.dumps(summary, indent=2))


@cli.command("lineage")
@click.argument("model_uri")
@click.option("--json", "as_json", is_flag=True)
def lineage_command(model_uri, as_json):
    """Print dataset -> VAE -> UNet -> sample runs for a registered model version."""
    from ldmflow.tracking.lineage import format_lineage, lineage
    from ldmflow.tracking.store import use_tracking_store

    use_tracking_store()
    chain = lineage(model_uri)
    click.echo(json.dumps(chain, indent=2) if as_json else format_lineage(chain))


@cli.command("models")
@click.option("--json", "as_json", is_flag=True)
def models_command(as_json):
    """List registered ldmflow model versions with their stage, lineage and key metrics."""
    from ldmflow.tracking.lineage import format_models, list_models
    from ldmflow.tracking.store import use_tracking_store

    use_tracking_store()
    rows = list_models()
    click.echo(json.dumps(rows, indent=2) if as_json else format_models(rows))


@cli.command("init-store")
@click.option("--experiment_name", default="ldmflow", show_default=True)
def init_store_command(experiment_name):
    """Create the tracking store and experiment (artifacts next to a SQLite store) and print the store URI."""
    from ldmflow.tracking.store import ensure_experiment, use_tracking_store

    uri = use_tracking_store()
    ensure_experiment(experiment_name)
    click.echo(uri)


def main() -> None:
    """Console script `ldmflow`."""
    cli(prog_name="ldmflow")


def train_legacy_ddpm_main() -> None:
    """Console script `train-legacy-ddpm`: the original script's name for `ldmflow legacy-ddpm`."""
    setup_logging()
    legacy_ddpm_command(prog_name="train-legacy-ddpm")
