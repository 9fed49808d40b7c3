"""Optimizer steps with a non-finite loss or gradient, skipped and counted on the device.

A loss spike that overflows gives an inf or NaN gradient, which would poison the weights. Reading the
gradient norm back every step to decide would stall a GPU's queue once per step, so the decision stays on
the device: fused AdamW takes a `found_inf` tensor (the mechanism PyTorch's GradScaler uses) and, when it
is 1, leaves weights, moments and step count as they were. The skips are counted on the device too and
read when the metrics are (every --logging_steps, at checkpoints, at the end).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


def fused_adamw_available(device: torch.device) -> bool:
    """Devices whose fused AdamW kernel honours `found_inf` (CUDA and, since torch 2.4, the CPU)."""
    return device.type in ("cuda", "cpu")


class SkippedSteps:
    """Counts non-finite steps on the device: the total, the current streak and the longest streak since the
    last `read`, so a streak between two reads is never missed."""

    def __init__(self, device: torch.device, total: int = 0):
        self._counts = torch.tensor([total, 0, 0], dtype=torch.long, device=device)
        self._total_read = total

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, accelerator: Accelerator) -> torch.Tensor:
        """Whether this step is finite, as a device bool: the gradient norm (all-reduced, so the same on every
        rank) when there is one and no GradScaler, whose own inf gradients are its normal calibration; else
        the loss on every rank (an all-reduce, still no host sync)."""
        if accelerator.scaler is None and grad_norm is not None:
            finite = torch.isfinite(torch.as_tensor(grad_norm, device=self._counts.device))
        else:
            finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), reduction="mean")[0] == 1
        bad = (~finite).long().reshape(())
        streak = (self._counts[1] + 1) * bad
        self._counts = torch.stack([self._counts[0] + bad, streak, torch.maximum(self._counts[2], streak)])
        return finite.reshape(())

    def read(self) -> tuple[int, int, int]:
        """(total, skipped since the last read, longest streak since the last read): one host sync."""
        total, streak, longest = self._counts.tolist()
        new, self._total_read = total - self._total_read, total
        self._counts = torch.stack([self._counts[0], self._counts[1], self._counts[1]])
        return total, new, longest
