"""LPIPS without torchvision: published key names load, the math is LPIPS's, bad weights fail in one line.

Nothing here downloads: every test either passes a folder of fake weights or makes torch hub fail.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldmflow.models import perceptual
from ldmflow.models.perceptual import (ALEXNET_FILE, LINEAR_FILE, WEIGHTS_ENV, PerceptualWeightsUnavailable,
                                       check_lpips_weights, load_lpips)

pytestmark = pytest.mark.portable  # compares computed tensors (make test-portable)

# torchvision's alexnet().features: (index, out, in, kernel) of each conv.
CONVS = ((0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3))
CHANNELS = (64, 192, 384, 256, 256)


def backbone_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Published key names and shapes, seeded values (He-scaled so deep features stay non-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, out, inp, kernel in CONVS:
        he_std = (2 / (inp * kernel * kernel)) ** 0.5
        state[f"features.{index}.weight"] = torch.randn(out, inp, kernel, kernel, generator=generator) * he_std
        state[f"features.{index}.bias"] = torch.randn(out, generator=generator) * 0.01
    # The published file also holds the classifier: ignored (these shapes are deliberately not the real ones).
    state["classifier.1.weight"] = torch.randn(8, 16, generator=generator)
    state["classifier.1.bias"] = torch.randn(8, generator=generator)
    return state


def linear_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Non-negative per-channel weights of different sizes per layer, as the published heads are."""
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, channels, 1, 1, generator=generator) / channels
            for k, channels in enumerate(CHANNELS)}


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "lpips-weights"
    folder.mkdir()
    torch.save(backbone_state(), folder / ALEXNET_FILE)
    torch.save(linear_state(), folder / LINEAR_FILE)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: torch hub fails as it does offline, and the env var is unset."""
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    return calls


def images(seed: int, batch: int = 2, size: int = 48) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_lpips(x: torch.Tensor, y: torch.Tensor, backbone: dict, heads: dict) -> torch.Tensor:
    """LPIPS v0.1 written out step by step in float64, from the paper and the `lpips` package's code."""
    def features(image):
        w = {key: value.double() for key, value in backbone.items()}
        shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
        h = (image.double() - shift) / scale
        relu1 = F.relu(F.conv2d(h, w["features.0.weight"], w["features.0.bias"], stride=4, padding=2))
        relu2 = F.relu(F.conv2d(F.max_pool2d(relu1, 3, 2), w["features.3.weight"], w["features.3.bias"], padding=2))
        relu3 = F.relu(F.conv2d(F.max_pool2d(relu2, 3, 2), w["features.6.weight"], w["features.6.bias"], padding=1))
        relu4 = F.relu(F.conv2d(relu3, w["features.8.weight"], w["features.8.bias"], padding=1))
        relu5 = F.relu(F.conv2d(relu4, w["features.10.weight"], w["features.10.bias"], padding=1))
        return relu1, relu2, relu3, relu4, relu5

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(features(x), features(y))):
        a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        weight = heads[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((a - b) ** 2 * weight).sum(dim=1).mean(dim=(1, 2))
    return total


def test_published_key_names_load_and_classifier_keys_are_ignored(weights_dir):
    model = load_lpips(weights_dir)
    assert set(model.state_dict()) == ({f"features.{i}.{p}" for i, *_ in CONVS for p in ("weight", "bias")}
                                       | set(linear_state()))
    assert torch.equal(model.features[10].weight, backbone_state()["features.10.weight"])
    assert torch.equal(model.lin2.model[1].weight, linear_state()["lin2.model.1.weight"])


def test_matches_a_step_by_step_lpips(weights_dir):
    model = load_lpips(weights_dir)
    x, y = images(0), images(1)
    expected = reference_lpips(x, y, backbone_state(), linear_state())
    assert expected.min() > 1e-3  # every layer contributes something measurable
    torch.testing.assert_close(model(x, y).double(), expected, rtol=1e-5, atol=1e-5)


def test_uniform_heads_give_the_mean_squared_distance_of_unit_features(tmp_path):
    """With every head 1/C the distance is the sum over layers of the mean squared distance of unit vectors."""
    (tmp_path / "w").mkdir()
    heads = {f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 1.0 / c) for k, c in enumerate(CHANNELS)}
    torch.save(backbone_state(seed=3), tmp_path / "w" / ALEXNET_FILE)
    torch.save(heads, tmp_path / "w" / LINEAR_FILE)
    model = load_lpips(tmp_path / "w")
    x, y = images(2, size=64), images(3, size=64)
    torch.testing.assert_close(model(x, y).double(), reference_lpips(x, y, backbone_state(seed=3), heads),
                               rtol=1e-5, atol=1e-5)


def test_a_distance_per_image_zero_for_identical_symmetric(weights_dir):
    model = load_lpips(weights_dir)
    x, y = images(0, batch=3), images(1, batch=3)
    distance = model(x, y)
    assert distance.shape == (3,)
    assert (distance > 0).all()
    torch.testing.assert_close(model(y, x), distance)
    assert torch.equal(model(x, x), torch.zeros(3))
    assert model(x[:1], y[:1]).item() == pytest.approx(distance[0].item(), rel=1e-5)  # independent of the batch


def test_gradients_reach_the_inputs_and_never_the_weights(weights_dir):
    model = load_lpips(weights_dir)
    x, y = images(0).requires_grad_(), images(1)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_stays_in_eval_mode_so_dropout_never_applies(weights_dir):
    model = load_lpips(weights_dir)
    parent = torch.nn.ModuleDict({"lpips": model}).train()
    assert not model.training and not model.lin0.model[0].training
    x, y = images(0), images(1)
    assert torch.equal(parent["lpips"](x, y), parent["lpips"](x, y))


def test_fp32_under_autocast(weights_dir):
    model = load_lpips(weights_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = model(images(0), images(1))
    assert distance.dtype == torch.float32
    torch.testing.assert_close(distance, model(images(0), images(1)))


def test_too_small_or_mismatched_images_are_refused(weights_dir):
    model = load_lpips(weights_dir)
    with pytest.raises(ValueError, match="at least 31 px"):
        model(images(0, size=24), images(1, size=24))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(images(0, size=32), images(1, size=40))


def test_the_environment_variable_names_the_folder(weights_dir, monkeypatch, offline):
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_dir))
    check_lpips_weights()
    assert load_lpips()(images(0), images(1)).shape == (2,)
    assert not offline  # never tried to download


def test_the_argument_wins_over_the_environment_variable(weights_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing"))
    check_lpips_weights(weights_dir)


def test_download_goes_to_the_hub_cache_without_progress(weights_dir, monkeypatch):
    seen = []

    def fake_hub(url, **kwargs):
        seen.append((url, kwargs))
        name = ALEXNET_FILE if url == perceptual.ALEXNET_URL else LINEAR_FILE
        return torch.load(weights_dir / name, map_location="cpu", weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    load_lpips()
    assert [url for url, _ in seen] == [perceptual.ALEXNET_URL, perceptual.LINEAR_URL]
    assert all(kw["weights_only"] and not kw["progress"] and kw["map_location"] == "cpu" and kw["file_name"]
               for _, kw in seen)
    assert seen[0][1]["file_name"] == ALEXNET_FILE and seen[0][1]["check_hash"]


def test_offline_without_a_folder_is_one_actionable_line(offline):
    with pytest.raises(PerceptualWeightsUnavailable) as caught:
        check_lpips_weights()
    message = str(caught.value)
    assert "\n" not in message
    assert "--perceptual_weights" in message and WEIGHTS_ENV in message
    assert ALEXNET_FILE in message and LINEAR_FILE in message and "name resolution" in message
    assert offline == [perceptual.ALEXNET_URL]


def test_a_slow_network_gets_a_socket_timeout_that_is_restored(monkeypatch):
    import socket

    seen = []

    def hang(url, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise TimeoutError("timed out")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", hang)
    before = socket.getdefaulttimeout()
    with pytest.raises(PerceptualWeightsUnavailable, match="timed out"):
        load_lpips()
    assert seen == [perceptual.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before


def test_a_missing_file_is_named(weights_dir):
    (weights_dir / LINEAR_FILE).unlink()
    with pytest.raises(PerceptualWeightsUnavailable, match=f"{LINEAR_FILE} does not exist"):
        load_lpips(weights_dir)


@pytest.mark.parametrize(("name", "key", "bad"), [
    (ALEXNET_FILE, "features.3.weight", torch.zeros(192, 64, 3, 3)),
    (LINEAR_FILE, "lin4.model.1.weight", torch.zeros(1, 512, 1, 1)),  # vgg's heads saved as alex.pth
])
def test_a_wrong_shape_names_the_file_and_the_key(weights_dir, name, key, bad):
    state = torch.load(weights_dir / name, weights_only=True)
    state[key] = bad
    torch.save(state, weights_dir / name)
    with pytest.raises(PerceptualWeightsUnavailable) as caught:
        load_lpips(weights_dir)
    message = str(caught.value)
    assert str(weights_dir / name) in message and key in message and "\n" not in message


def test_a_missing_key_and_a_corrupt_file_are_named(weights_dir):
    state = torch.load(weights_dir / ALEXNET_FILE, weights_only=True)
    del state["features.8.bias"]
    torch.save(state, weights_dir / ALEXNET_FILE)
    with pytest.raises(PerceptualWeightsUnavailable, match="lacks the tensor features.8.bias"):
        load_lpips(weights_dir)
    (weights_dir / ALEXNET_FILE).write_bytes(b"not a torch file")
    with pytest.raises(PerceptualWeightsUnavailable, match=f"{ALEXNET_FILE} is not a readable weights file"):
        load_lpips(weights_dir)


class _Payload:
    """Unpickling this opens (creates) `marker`: what a malicious weights file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_weights_file_that_would_run_code_is_refused(weights_dir, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"lin0.model.1.weight": _Payload(marker)}, weights_dir / LINEAR_FILE)
    with pytest.raises(PerceptualWeightsUnavailable, match=f"{LINEAR_FILE} is not a readable weights file") as caught:
        load_lpips(weights_dir)
    assert "\n" not in str(caught.value)
    assert not marker.exists()
    torch.load(weights_dir / LINEAR_FILE, weights_only=False)  # the payload is live: a plain unpickle runs it
    assert marker.exists()
