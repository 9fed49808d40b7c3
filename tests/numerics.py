"""Comparing tensors that two code paths computed (another batch split, process, thread count, memory format or
vector unit): the last bits differ legitimately, so never compare them bit for bit.

The bound is the classic one for floating-point sums: a reduction of n terms is off by at most n * eps of its
largest magnitude, per layer it passes through. Bit-exact asserts stay for values copied or stored, not
recomputed (a checkpoint's weights, a resumed state).
"""

from __future__ import annotations

import torch


def assert_computed_alike(actual: torch.Tensor, expected: torch.Tensor, *, reduction: int, layers: int = 1,
                          rounded_to: torch.dtype | None = None) -> None:
    """`actual` equals `expected` within what floating point allows for `layers` reductions of `reduction`
    terms each (a 3x3 convolution over C channels: 9 * C) in expected's dtype; `rounded_to` (float16 storage,
    say) adds one unit in the last place of that dtype, which a difference at a rounding boundary can flip."""
    eps = torch.finfo(expected.dtype).eps
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    atol = reduction * layers * eps * max(scale, 1e-30)
    rtol = torch.finfo(rounded_to).eps if rounded_to is not None else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
