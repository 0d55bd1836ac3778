"""Which modules K-FAC handles, and how their parameters map to the paper's W_i.

The answers live in :mod:`kfac_fast.curvature.blocks` (one block class per layer type, a
registry from module types to them); this module keeps the older names.
"""
from __future__ import annotations

from torch import nn

from .blocks import CurvatureBlock, LinearBlock, find_blocks

LinearLayer = LinearBlock  # the name before blocks: an nn.Linear as W_i = [weight | bias]


def find_layers(model: nn.Module, *, model_name: str = "model") -> list[CurvatureBlock]:
    """Supported layers of ``model`` in registration order (:func:`~kfac_fast.curvature.blocks.find_blocks`).

    Raises:
        ValueError: a module owning trainable parameters is not supported (K-FAC would
            silently skip its parameters), or the model has no supported layer.
    """
    return find_blocks(model, model_name=model_name)
