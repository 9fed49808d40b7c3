"""MLflow pyfunc wrappers, so a registered ldmflow model can be loaded with `mlflow.pyfunc.load_model` or served.

Serving formats (JSON friendly, one row per image):

- `LatentDiffusionPyfunc`: input columns are the condition components in physical units (`component_columns`
  of the model's spec, e.g. temperature, wind_0, wind_1, wind_2, wind_mag; all optional, all blank = an
  unconditional sample; some blank: only for a model trained with --cond_dropout_per_condition) plus an optional
  integer `seed`. Params: num_inference_steps, guidance_scale, condition_guidance ("temperature=4,wind=2"),
  scheduler and dtype ("fp32", "bf16" or "fp16"; fp32 on a CPU), by default `ldmflow sample`'s, and batch_size (8).
  Output: `image` (base64-encoded 8-bit RGB PNG) and the `seed` used.
- `VaePyfunc`: input column `image` (base64 PNG/TIFF/JPEG; sides multiples of the VAE's downsample factor f).
  Param mode = "reconstruct" (output `image`, base64 PNG) or "encode" (output `latent`, nested lists
  (latent_channels, H/f, W/f) of the posterior mean times the VAE's scaling_factor, i.e. what the latent DDPM
  was trained on); mode = "decode" takes such a `latent` column (nested lists or their JSON text) and returns
  `image`.
- `ProbePyfunc`: input column `image` (base64 images); output one column per condition component
  (`component_columns`) in physical units: what the condition probe reads from each image.
- `LegacyDdpmPyfunc`: one row per image with an integer `seed` column, or param num_images > 0 (then any one
  row, e.g. {"seed": 0}, and random seeds). Params: num_inference_steps, scheduler, batch_size, dtype. Output like
  the latent model.

Missing seeds are drawn at random and returned, so every image can be reproduced.

Serving limits (`SERVING_LIMITS`, each overridable by an environment variable `LDMFLOW_SERVING_MAX_<NAME>` of
the serving process) keep one request from exhausting a serving GPU: rows (images) per request,
num_inference_steps, batch_size and input image pixels. Each gives one clear error.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import random
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from ldmflow.errors import LdmflowError
from ldmflow.models.kinds import LEGACY_DDPM, PROBE, VAE
from ldmflow.sampling.condition_input import SEED_COLUMN
from ldmflow.settings import MAX_GUIDANCE_SCALE, MAX_SEED, SampleSettings, guidance_weights

IMAGE_COLUMN = "image"
LATENT_COLUMN = "latent"
SERVING_LIMITS = {"rows": 256, "num_inference_steps": 1000, "batch_size": 64, "image_pixels": 4096 * 4096}


class InputError(MlflowException, LdmflowError):
    """A bad request, as MLflow's INVALID_PARAMETER_VALUE: the scoring server answers 400 with ldmflow's message
    in `message` (any other exception becomes "Encountered an unexpected error", the message buried in the
    stack trace). Still an LdmflowError, so in-process callers catch it as before."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _input_errors(predict):
    """Raise the LdmflowErrors of `predict` (bad rows, columns, params) as InputError."""

    @functools.wraps(predict)
    def wrapper(*args, **kwargs):
        try:
            return predict(*args, **kwargs)
        except InputError:
            raise
        except LdmflowError as error:
            raise InputError(str(error)) from None

    return wrapper


def _limit(name: str) -> int:
    return int(os.environ.get(f"LDMFLOW_SERVING_MAX_{name.upper()}", SERVING_LIMITS[name]))


def _check_rows(count: int) -> None:
    if count > _limit("rows"):
        raise LdmflowError(f"{count} images in one request; this server allows {_limit('rows')} "
                           "(LDMFLOW_SERVING_MAX_ROWS). Split the request.")


def image_to_base64_png(image: np.ndarray) -> str:
    """(H, W, 3) float in [0, 1] -> base64 of an 8-bit PNG."""
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def base64_to_image(text: str, row: int, channels: int = 3) -> np.ndarray:
    """base64 image -> (H, W, channels) float32 in [0, 1] (8- and 16-bit inputs keep their range)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    except Exception:  # noqa: BLE001 - any decoding problem is the caller's input
        raise LdmflowError(f"Row {row}: column 'image' is not a base64-encoded image.") from None
    width, height = image.size  # from the header: nothing is decoded yet
    if width * height > _limit("image_pixels"):
        raise LdmflowError(f"Row {row}: the image is {width}x{height}, over this server's limit of "
                           f"{_limit('image_pixels')} pixels (LDMFLOW_SERVING_MAX_IMAGE_PIXELS).")
    try:
        image.load()
    except Exception:  # noqa: BLE001
        raise LdmflowError(f"Row {row}: column 'image' is not a base64-encoded image.") from None
    if image.mode in ("I;16", "I;16B", "I"):
        array = np.asarray(image, dtype=np.float32) / 65535.0
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
    else:
        array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != channels:
        array = np.repeat(array[:, :, :1], channels, axis=2)
    return array


def _seeds(frame: pd.DataFrame, count: int) -> list[int]:
    """The `seed` column as ints (every row must have one), or fresh random seeds."""
    if SEED_COLUMN not in frame.columns:
        return [random.SystemRandom().randrange(2**31) for _ in range(count)]
    column = frame[SEED_COLUMN]
    if column.isna().any():
        rows = [int(i) for i in np.flatnonzero(column.isna().to_numpy())]
        raise LdmflowError(f"Column 'seed' is blank in row(s) {rows[:10]}; give every row a seed or none at all.")
    return [_seed(value, row) for row, value in enumerate(column)]


def _seed(value, row: int) -> int:
    """One row's seed: an integer in numpy's and torch's range (the conditions files' rule)."""
    from ldmflow.sampling.condition_input import seed_cell  # lazily: this module loads without pandas' readers

    try:
        return seed_cell(value)
    except ValueError as error:
        raise LdmflowError(f"Row {row}: {error}.") from None


def _device() -> str:
    from ldmflow.sampling.denoise import default_device  # lazily: this module loads without torch

    return default_device()


def _number(value, name: str, kind: type):
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise LdmflowError(f"Param {name} must be {'an integer' if kind is int else 'a number'}, "
                           f"got {str(value)[:50]!r}.") from None


def _params(params: dict | None, defaults: dict) -> dict:
    merged = {**defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        raise LdmflowError(f"Unknown param(s) {unknown}; this model accepts {sorted(defaults)}.")
    for name, kind in (("num_inference_steps", int), ("batch_size", int), ("guidance_scale", float),
                       ("num_images", int)):
        if name in merged:
            merged[name] = _number(merged[name], name, kind)
    for name in ("num_inference_steps", "batch_size"):
        if name in merged and not 1 <= int(merged[name]) <= _limit(name):
            raise LdmflowError(f"Param {name} must be between 1 and {_limit(name)} on this server "
                               f"(LDMFLOW_SERVING_MAX_{name.upper()}), got {merged[name]}.")
    if "guidance_scale" in merged and not (math.isfinite(float(merged["guidance_scale"]))
                                           and 1 <= float(merged["guidance_scale"]) <= MAX_GUIDANCE_SCALE):
        raise LdmflowError(f"Param guidance_scale must be a number in [1, {MAX_GUIDANCE_SCALE:g}], got "
                           f"{merged['guidance_scale']}.")
    if "num_images" in merged:
        _check_rows(int(merged["num_images"]))
    return merged


SERVING_BATCH_SIZE = 8  # images one request denoises together: the serving default, not `ldmflow sample`'s
# The params a served model accepts, with `ldmflow sample`'s defaults (SampleSettings) where it has the same knob.
LATENT_DEFAULTS = {"num_inference_steps": SampleSettings.num_inference_steps,
                   "guidance_scale": SampleSettings.guidance_scale, "scheduler": SampleSettings.scheduler,
                   "batch_size": SERVING_BATCH_SIZE, "dtype": SampleSettings.dtype,
                   "condition_guidance": SampleSettings.condition_guidance}
LEGACY_DEFAULTS = {"num_inference_steps": SampleSettings.num_inference_steps, "scheduler": SampleSettings.scheduler,
                   "batch_size": SERVING_BATCH_SIZE, "num_images": 0, "dtype": SampleSettings.dtype}
VAE_DEFAULTS = {"mode": "reconstruct"}
PARAM_TYPES = {int: "long", float: "double", str: "string"}  # Python type of a default -> MLflow param type


def _param_schema(defaults: dict, names: tuple[str, ...]) -> ParamSchema:
    """The signature's params, typed and defaulted as `predict` takes them (`defaults`)."""
    return ParamSchema([ParamSpec(name, PARAM_TYPES[type(defaults[name])], defaults[name]) for name in names])


class LatentDiffusionPyfunc(mlflow.pyfunc.PythonModel):
    """Conditioned latent DDPM + its VAE: a DataFrame of conditions in, one generated image per row out."""

    def load_context(self, context):
        from ldmflow.models.saved_model import check_recorded_vae
        from ldmflow.sampling.latent import LatentSampler

        artifacts = context.artifacts
        if artifacts.get("vae_source"):
            check_recorded_vae(artifacts[VAE.artifact], artifacts["vae_source"])
        conditioning = artifacts.get("conditioning")
        self._sampler = LatentSampler.from_folders(artifacts["unet"], artifacts[VAE.artifact],
                                                   str(Path(artifacts["scheduler"]).parent),
                                                   conditioning, device=_device())

    @_input_errors
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from ldmflow.sampling.condition_input import conditions_from_frame

        options = _params(params, LATENT_DEFAULTS)
        weights = guidance_weights(str(options["condition_guidance"]), "condition_guidance") or None
        self._sampler.set_dtype(str(options["dtype"]))
        frame = pd.DataFrame(model_input)
        if frame.empty:
            raise LdmflowError("No rows: give one row per image (condition columns and/or seed).")
        _check_rows(len(frame))
        seeds = _seeds(frame, len(frame))
        spec = self._sampler.condition_spec
        conditions = conditions_from_frame(frame, spec) if not spec.is_empty else [{} for _ in range(len(frame))]
        images: list[np.ndarray | None] = [None] * len(frame)
        conditioned = [i for i, condition in enumerate(conditions) if condition]
        unconditional = [i for i, condition in enumerate(conditions) if not condition]
        for group in (conditioned, unconditional):  # the sampler takes all-conditioned or all-blank requests
            if not group:
                continue
            generated = self._sampler.generate(
                [conditions[i] for i in group] if group is conditioned else None, num_images=len(group),
                guidance_scale=float(options["guidance_scale"]),
                num_inference_steps=int(options["num_inference_steps"]), scheduler=str(options["scheduler"]),
                seeds=[seeds[i] for i in group], batch_size=int(options["batch_size"]),
                condition_guidance=weights if group is conditioned else None)
            for row, image in zip(group, generated):
                images[row] = image
        return pd.DataFrame({IMAGE_COLUMN: [image_to_base64_png(image) for image in images], SEED_COLUMN: seeds})


class VaePyfunc(mlflow.pyfunc.PythonModel):
    """The AutoencoderKL: base64 images in; reconstructions or scaled latents out (param `mode`)."""

    def load_context(self, context):
        from diffusers import AutoencoderKL

        self._vae = AutoencoderKL.from_pretrained(context.artifacts[VAE.artifact]).to(_device()).eval()

    @_input_errors
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        mode = _params(params, VAE_DEFAULTS)["mode"]
        frame = pd.DataFrame(model_input)
        _check_rows(len(frame))
        if mode == "decode":
            return pd.DataFrame({IMAGE_COLUMN: [self._decode(value, row)
                                                for row, value in enumerate(_column(frame, LATENT_COLUMN))]})
        if mode not in ("reconstruct", "encode"):
            raise LdmflowError(f"Param mode must be 'reconstruct', 'encode' or 'decode', got {mode!r}.")
        outputs = [self._encode_or_reconstruct(str(text), row, mode)
                   for row, text in enumerate(_column(frame, IMAGE_COLUMN))]
        return pd.DataFrame({LATENT_COLUMN if mode == "encode" else IMAGE_COLUMN: outputs})

    def _encode_or_reconstruct(self, text: str, row: int, mode: str):
        import torch

        from ldmflow.models.architectures import vae_downsample_factor

        array = base64_to_image(text, row, self._vae.config.in_channels)
        factor = vae_downsample_factor(self._vae.config)
        if array.shape[0] % factor or array.shape[1] % factor:
            raise LdmflowError(f"Row {row}: image is {array.shape[1]}x{array.shape[0]}; "
                               f"both sides must be multiples of {factor} for this VAE.")
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(self._vae.device) * 2 - 1  # (1, C, H, W)
        with torch.no_grad():
            posterior = self._vae.encode(pixels).latent_dist
            if mode == "encode":
                latent = posterior.mode() * self._vae.config.scaling_factor  # (1, c, H/f, W/f)
                return latent[0].float().cpu().numpy().tolist()
            return self._to_png(self._vae.decode(posterior.mode()).sample)

    def _decode(self, value, row: int) -> str:
        """Scaled latents (c, h, w) as nested lists or their JSON text -> a base64 PNG."""
        import torch

        try:
            array = np.asarray(json.loads(value) if isinstance(value, str) else value, dtype=np.float32)
        except (TypeError, ValueError):
            raise LdmflowError(f"Row {row}: 'latent' must be a (c, h, w) nested list or its JSON text.") from None
        channels = self._vae.config.latent_channels
        if array.ndim != 3 or array.shape[0] != channels:
            raise LdmflowError(f"Row {row}: latent has shape {array.shape}; expected ({channels}, h, w).")
        latents = torch.from_numpy(array)[None].to(self._vae.device) / self._vae.config.scaling_factor
        with torch.no_grad():
            return self._to_png(self._vae.decode(latents).sample)

    @staticmethod
    def _to_png(decoded) -> str:
        image = (decoded[0].float().permute(1, 2, 0).cpu().numpy() + 1) / 2  # (H, W, C) in ~[0, 1]
        return image_to_base64_png(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame.columns:
        raise LdmflowError(f"Input needs a {name!r} column ({'base64-encoded images' if name == IMAGE_COLUMN else 'scaled latents'}).")
    return frame[name]


class LegacyDdpmPyfunc(mlflow.pyfunc.PythonModel):
    """The legacy unconditional pixel DDPM: seeds (or a count) in, images out."""

    def load_context(self, context):
        from ldmflow.sampling.legacy import LegacySampler

        self._sampler = LegacySampler.from_folder(context.artifacts[LEGACY_DDPM.artifact], device=_device())

    @_input_errors
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        options = _params(params, LEGACY_DEFAULTS)
        self._sampler.set_dtype(str(options["dtype"]))
        frame = pd.DataFrame(model_input)
        count = int(options["num_images"])
        if count > 0:
            seeds = _seeds(pd.DataFrame(), count)
        elif SEED_COLUMN in frame.columns and len(frame):
            _check_rows(len(frame))
            seeds = _seeds(frame, len(frame))
        else:
            raise LdmflowError("Give one row per image with a 'seed' column, or the param num_images.")
        images = self._sampler.generate(num_images=len(seeds), num_inference_steps=int(options["num_inference_steps"]),
                                        scheduler=str(options["scheduler"]), seeds=seeds,
                                        batch_size=int(options["batch_size"]))
        return pd.DataFrame({IMAGE_COLUMN: [image_to_base64_png(image) for image in images], SEED_COLUMN: seeds})


class ProbePyfunc(mlflow.pyfunc.PythonModel):
    """The condition probe: images in, conditions in physical units out."""

    def load_context(self, context):
        from ldmflow.models.probe import ProbeReader

        self._reader = ProbeReader.from_folder(context.artifacts[PROBE.artifact], device=_device())

    @_input_errors
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from ldmflow.sampling.condition_input import component_columns

        frame = pd.DataFrame(model_input)
        _check_rows(len(frame))
        images = [base64_to_image(str(text), row) for row, text in enumerate(_column(frame, IMAGE_COLUMN))]
        read = np.concatenate([self._reader.read(image[None]) for image in images]) if images else \
            np.zeros((0, self._reader.encoder.spec.value_dim))
        return pd.DataFrame(read, columns=component_columns(self._reader.encoder.spec))


def probe_signature(condition_spec: str) -> ModelSignature:
    from ldmflow.data.conditions import ConditionSpec
    from ldmflow.sampling.condition_input import component_columns

    columns = component_columns(ConditionSpec.parse(condition_spec))
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
                          outputs=Schema([ColSpec("double", column) for column in columns]))


def _output_schema() -> Schema:
    return Schema([ColSpec("string", IMAGE_COLUMN), ColSpec("long", SEED_COLUMN)])


def latent_signature(condition_spec: str) -> ModelSignature:
    """Inputs: one optional double per condition component and an optional seed (required if unconditional)."""
    from ldmflow.data.conditions import ConditionSpec
    from ldmflow.sampling.condition_input import component_columns

    spec = ConditionSpec.parse(condition_spec)
    inputs = [ColSpec("double", column, required=False) for column in component_columns(spec)]
    inputs.append(ColSpec("long", SEED_COLUMN, required=spec.is_empty))
    params = _param_schema(LATENT_DEFAULTS, tuple(LATENT_DEFAULTS))  # every param predict reads (dtype too)
    return ModelSignature(inputs=Schema(inputs), outputs=_output_schema(), params=params)


def vae_signature() -> ModelSignature:
    """No output schema: the output column depends on `mode` (image or latent)."""
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN, required=False),
                                         ColSpec("string", LATENT_COLUMN, required=False)]),
                          params=ParamSchema([ParamSpec("mode", "string", "reconstruct")]))


def legacy_signature() -> ModelSignature:
    params = _param_schema(LEGACY_DEFAULTS, tuple(LEGACY_DEFAULTS))
    return ModelSignature(inputs=Schema([ColSpec("long", SEED_COLUMN, required=False)]),
                          outputs=_output_schema(), params=params)


PixelDdpmPyfunc = LegacyDdpmPyfunc  # the class name that models registered before the rename were pickled with
