"""Curvature blocks: one file per layer type, a registry from module types to block classes."""
from .base import (DENSE, DIAGONAL, FACTOR_KINDS, KRONECKER, KRONECKER_DIAG_A, CurvatureBlock, FactorSpec,
                   factor_rows)
from .linear import LinearBlock
from .registry import block_class, find_blocks, register_block, registered_blocks

__all__ = [
    "CurvatureBlock",
    "DENSE",
    "DIAGONAL",
    "FACTOR_KINDS",
    "FactorSpec",
    "KRONECKER",
    "KRONECKER_DIAG_A",
    "LinearBlock",
    "block_class",
    "factor_rows",
    "find_blocks",
    "register_block",
    "registered_blocks",
]
