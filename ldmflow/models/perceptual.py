"""LPIPS (v0.1, AlexNet) as a training loss, built without torchvision.

torchvision cannot be installed beside the pinned torch, and torchmetrics' LPIPS and the `lpips` package
both import it, so the network is written here with the published state-dict key names: torchvision's
AlexNet file (`features.*`) and the LPIPS v0.1 linear heads (`lin<k>.model.1.weight`) load unchanged.
Both files are read with `weights_only=True`, so a weights file can never run code.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmflow.errors import LdmflowError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
LINEAR_FILE = "alex.pth"
LINEAR_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
LINEAR_CACHE_NAME = "lpips-v0.1-alex.pth"  # torch hub's cache is shared: "alex.pth" alone says too little
WEIGHTS_ENV = "LDMFLOW_LPIPS_WEIGHTS"
WHERE_TO_PUT_THEM = (f"Put {ALEXNET_FILE} and {LINEAR_FILE} in a folder and pass --perceptual_weights DIR or set "
                     f"{WEIGHTS_ENV}")
DOWNLOAD_TIMEOUT_S = 30.0
MIN_IMAGE_SIZE = 31  # smaller inputs shrink to nothing before AlexNet's second max-pool
TAP_CHANNELS = (64, 192, 384, 256, 256)  # outputs of the ReLUs at features.1, 4, 7, 9, 11
_TAPS = (1, 4, 7, 9, 11)


class PerceptualWeightsUnavailable(LdmflowError):
    """The LPIPS weights could be neither read from the given folder nor downloaded (one-line message);
    `problem` is the reason alone, for callers that phrase the advice themselves."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


class _Head(torch.nn.Module):
    """The `lpips` package's NetLinLayer: Dropout then a 1x1 conv, hence the key lin<k>.model.1.weight."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, difference: torch.Tensor) -> torch.Tensor:
        return self.model(difference)


class LPIPS(torch.nn.Module):
    """LPIPS distance between image batches (B, 3, H, W) in [-1, 1] -> (B,), one value per image pair.

    Frozen and always in eval mode (`train()` is ignored, so a parent's `.train()` cannot switch on the
    heads' dropout); gradients flow to the inputs only. It computes in fp32 even under autocast: squared
    feature norms overflow fp16.
    """

    def __init__(self):
        super().__init__()
        # torchvision's alexnet().features, same indices, so its state-dict keys match the published file.
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), torch.nn.ReLU(),
            torch.nn.MaxPool2d(kernel_size=3, stride=2),
            torch.nn.Conv2d(64, 192, kernel_size=5, padding=2), torch.nn.ReLU(),
            torch.nn.MaxPool2d(kernel_size=3, stride=2),
            torch.nn.Conv2d(192, 384, kernel_size=3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(384, 256, kernel_size=3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(256, 256, kernel_size=3, padding=1), torch.nn.ReLU(),
        )
        for index, channels in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{index}", _Head(channels))
        # lpips' ScalingLayer: [-1, 1] images to ImageNet-normalised ones. Constants, not weights.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        taps, hidden = [], (images - self.shift) / self.scale
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in _TAPS:
                taps.append(hidden)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares two (B, 3, H, W) batches, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < MIN_IMAGE_SIZE:
            raise ValueError(f"LPIPS needs images of at least {MIN_IMAGE_SIZE} px, got {tuple(x.shape[-2:])}")
        dtype = self.shift.dtype
        with _without_autocast(x.device):
            distance = x.new_zeros(x.shape[0], dtype=dtype)
            for index, (a, b) in enumerate(zip(self._taps(x.to(dtype)), self._taps(y.to(dtype)))):
                difference = (_unit_channels(a) - _unit_channels(b)) ** 2
                distance = distance + getattr(self, f"lin{index}")(difference).mean(dim=(1, 2, 3))
        return distance


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """lpips' normalize_tensor: each position's channel vector divided by its L2 norm."""
    return features / (torch.sqrt(torch.sum(features ** 2, dim=1, keepdim=True)) + eps)


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def load_lpips(weights_dir: str | os.PathLike | None = None, download: bool = True) -> LPIPS:
    """LPIPS with the published weights, from `weights_dir`, else $LDMFLOW_LPIPS_WEIGHTS, else downloaded.

    The download happens once, into torch hub's cache (`torch.hub.get_dir()`), as torchvision would do it.
    With `download=False` (an optional metric, which must not fetch 230 MB unasked) only that cache counts.
    Any failure raises PerceptualWeightsUnavailable with one line saying how to provide the files.
    """
    folder = weights_dir or os.environ.get(WEIGHTS_ENV) or None
    if folder is not None:
        folder = Path(folder)
        sources = [(folder / name, _read(folder / name)) for name in (ALEXNET_FILE, LINEAR_FILE)]
    elif download:
        sources = [(ALEXNET_URL, _download(ALEXNET_URL, ALEXNET_FILE, check_hash=True)),
                   (LINEAR_URL, _download(LINEAR_URL, LINEAR_CACHE_NAME, check_hash=False))]
    else:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        sources = [(cache / name, _read(cache / name)) for name in (ALEXNET_FILE, LINEAR_CACHE_NAME)]
    model = LPIPS()
    expected = model.state_dict()
    loaded = {}
    for (source, state), prefix in zip(sources, ("features.", "lin")):
        loaded.update(_matching(state, {key: value for key, value in expected.items() if key.startswith(prefix)},
                                source))
    model.load_state_dict(loaded, strict=True)
    return model


def check_lpips_weights(weights_dir: str | os.PathLike | None = None) -> None:
    """Fail now, before an MLflow run opens, if load_lpips would fail; a first download fills the cache.

    It loads the weights once (about a second from disk), so a corrupt or mismatched file is caught too.
    """
    load_lpips(weights_dir)


def _unavailable(problem: str) -> PerceptualWeightsUnavailable:
    return PerceptualWeightsUnavailable(
        f"--perceptual_weight needs the LPIPS weights (AlexNet + LPIPS v0.1 heads): {problem}. "
        f"{WHERE_TO_PUT_THEM}.", problem)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _read(path: Path) -> object:
    if not path.is_file():
        raise _unavailable(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated, or a pickle that would need code to load
        raise _unavailable(f"{path} is not a readable weights file ({_first_line(error)})") from None


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """urllib (which torch hub uses) waits forever on a dead network without a default socket timeout."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(url: str, file_name: str, check_hash: bool) -> object:
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=check_hash,
                                                      file_name=file_name, weights_only=True)
    except Exception as error:  # offline, HTTP error, hash mismatch, corrupt cache file
        raise _unavailable(f"could not download them ({_first_line(error)})") from None


def _matching(state: object, expected: Mapping[str, torch.Tensor], source: Path | str) -> dict[str, torch.Tensor]:
    """The entries of `state` that `expected` names, each checked for presence and shape; others are ignored."""
    if not isinstance(state, Mapping):
        raise _unavailable(f"{source} does not hold a state dict")
    found = {}
    for key, reference in expected.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            raise _unavailable(f"{source} lacks the tensor {key}")
        if value.shape != reference.shape:
            raise _unavailable(f"{source} has {key} of shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
        found[key] = value
    return found
