"""Curvature blocks: one file per layer type, a registry from module types to block classes."""
from .attention import AttentionInProjBlock, AttentionOutProjBlock
from .base import (DENSE, DIAGONAL, FACTOR_KINDS, KFAC_APPROX, KRONECKER, KRONECKER_DIAG_A,
                   KRONECKER_GROUPED, CurvatureBlock,
                   FactorSpec, check_kfac_approx)
from .conv1d import Conv1dBlock
from .conv2d import Conv2dBlock
from .diagonal import DiagonalBlock
from .embedding import EmbeddingBlock
from .grouped_conv import GroupedConvBlock
from .grouped_conv_kronecker import GroupedKroneckerConvBlock
from .layer_scale import LayerScaleBlock
from .linear import LinearBlock
from .registry import (TIED_WEIGHTS, UNSUPPORTED, block_class, check_tied_weights, check_unsupported, find_blocks,
                       register_block, registered_blocks)
from .scale_shift import ScaleShiftBlock
from .transposed_linear import TransposedLinearBlock

__all__ = [
    "AttentionInProjBlock",
    "AttentionOutProjBlock",
    "Conv1dBlock",
    "Conv2dBlock",
    "CurvatureBlock",
    "DENSE",
    "DIAGONAL",
    "DiagonalBlock",
    "EmbeddingBlock",
    "FACTOR_KINDS",
    "FactorSpec",
    "GroupedConvBlock",
    "GroupedKroneckerConvBlock",
    "KFAC_APPROX",
    "KRONECKER",
    "KRONECKER_DIAG_A",
    "KRONECKER_GROUPED",
    "LayerScaleBlock",
    "LinearBlock",
    "ScaleShiftBlock",
    "TransposedLinearBlock",
    "TIED_WEIGHTS",
    "UNSUPPORTED",
    "block_class",
    "check_kfac_approx",
    "check_tied_weights",
    "check_unsupported",
    "find_blocks",
    "register_block",
    "registered_blocks",
]
