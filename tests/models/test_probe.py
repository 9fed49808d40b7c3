"""The condition probe's model: vectors read as axes, probes saved before --norm and --axis_outputs still load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ldmflow.data.conditions import ConditionSpec, ConditionStats
from ldmflow.models.conditioning import ConditionEncoder
from ldmflow.models.probe import AxisOutputs, ConditionProbe, ProbeReader

DIMS = (1, 3, 1)  # temperature:1,wind:3,wind_mag:1
MEAN, STD = torch.tensor([10.0, 0.3, -0.2, 0.0, 5.0]), torch.tensor([17.0, 4.0, 4.0, 1.0, 2.9])


def test_axis_outputs_round_trip_every_vector_up_to_its_sign():
    axes = AxisOutputs(DIMS, MEAN, STD)
    angles = torch.linspace(0.0, 2.0 * math.pi, 13)
    values = torch.stack([torch.full_like(angles, 25.0), 7 * angles.cos(), 7 * angles.sin(), 0 * angles,
                          torch.full_like(angles, 7.0)], dim=1)  # (13, 5)
    encoded = axes.encode(values)
    assert encoded.shape == (13, 1 + 6 + 1) and AxisOutputs.width(DIMS) == 8
    decoded = axes.decode(encoded)
    torch.testing.assert_close(decoded[:, [0, 4]], values[:, [0, 4]])
    assert torch.minimum((decoded[:, 1:4] - values[:, 1:4]).abs().amax(dim=1),
                         (decoded[:, 1:4] + values[:, 1:4]).abs().amax(dim=1)).max() < 1e-4
    torch.testing.assert_close(axes.encode(-values)[:, 1:7], encoded[:, 1:7])  # v and -v: one target
    # no jump: a small turn of the wind is a small change of the target, also across 180 degrees
    turn = values.clone()
    turn[:, 1:3] = torch.stack([7 * (angles + 0.01).cos(), 7 * (angles + 0.01).sin()], dim=1)
    assert (axes.encode(turn) - encoded).abs().max() < 0.1
    assert axes.decode(axes.encode(torch.zeros(1, 5)))[0, 1:4].abs().max() < 1e-6  # no wind: a zero vector


def test_a_probe_saved_before_norm_and_axis_outputs_loads_as_it_was_trained(tmp_path):
    spec = ConditionSpec.parse("temperature:1,wind:3,wind_mag:1")
    stats = ConditionStats(tuple(MEAN.tolist()), tuple(STD.tolist()))
    torch.manual_seed(0)
    old = ConditionProbe(spec.value_dim, (8, 16), 16)
    old.save_pretrained(tmp_path)
    ConditionEncoder(spec, stats).save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("norm", "condition_dims"):  # what a probe of an earlier ldmflow wrote
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reader = ProbeReader.from_folder(tmp_path)
    assert isinstance(reader.probe.body[1], torch.nn.GroupNorm) and reader.probe.head.out_features == 5
    images = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = old.eval()(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1) * STD + MEAN
    np.testing.assert_allclose(reader.read(images), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_an_axis_probe_reads_physical_values_in_the_spec_layout(tmp_path, norm):
    spec = ConditionSpec.parse("temperature:1,wind:3,wind_mag:1")
    probe = ConditionProbe(spec.value_dim, (8, 16), 16, norm, spec.dims)
    assert probe.head.out_features == 8 and not any(isinstance(m, torch.nn.GroupNorm) for m in probe.modules())
    probe.save_pretrained(tmp_path)
    ConditionEncoder(spec, ConditionStats(tuple(MEAN.tolist()), tuple(STD.tolist()))).save(tmp_path)
    reader = ProbeReader.from_folder(tmp_path)
    assert tuple(reader.probe.config.condition_dims) == spec.dims and reader.probe.config.norm == norm
    read = reader.read(np.zeros((3, 16, 16, 3), np.float32))
    assert read.shape == (3, 5) and np.isfinite(read).all()


def test_a_batch_norm_probe_trains_on_one_image_whose_last_level_is_one_pixel():
    probe = ConditionProbe(5, (8, 16), 4, "batch", DIMS).train()
    probe(torch.zeros(1, 3, 4, 4)).sum().backward()  # (1, 16, 1, 1) at the last level
