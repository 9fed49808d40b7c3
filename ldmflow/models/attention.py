"""Attention backend choice: xformers when asked for and usable, otherwise PyTorch SDPA (the default)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def enable_memory_efficient_attention(model: torch.nn.Module, requested: bool) -> str:
    """Switch `model` to xformers if requested and it works; never fails the run. Returns the backend used."""
    if not requested:
        return "sdpa"
    try:
        import xformers  # noqa: F401

        model.enable_xformers_memory_efficient_attention()
        return "xformers"
    except Exception as error:  # ImportError, or xformers built for another torch/CUDA
        logger.warning("xformers memory-efficient attention is not usable here (%s); using PyTorch SDPA.",
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        return "sdpa"
