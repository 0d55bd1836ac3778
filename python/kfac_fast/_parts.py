"""What ``KFAC`` and ``KFACPreconditioner`` set up the same way (written once): the device and
default factor dtype of a layer set, and the default RNG."""
from __future__ import annotations

from typing import Sequence

import torch

from .curvature.blocks import CurvatureBlock


def model_device(blocks: Sequence[CurvatureBlock]) -> torch.device:
    return blocks[0].params()[0].device


def default_factor_dtype(blocks: Sequence[CurvatureBlock]) -> torch.dtype:
    """float64 factors for a float64 model, float32 otherwise."""
    return torch.float64 if blocks[0].params()[0].dtype == torch.float64 else torch.float32


def default_generator(device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from torch's global RNG (``torch.manual_seed`` makes runs
    reproducible)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
    return generator
