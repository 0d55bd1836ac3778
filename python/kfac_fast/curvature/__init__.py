"""The curvature core (paper Sec 2-5, 6.3, Appendix B): curvature blocks per layer type,
their factors, and the block-diagonal / block-tridiagonal approximate inverses. Plain PyTorch here is the
``torch`` backend and the reference for every kernel."""
from .block_diagonal import BlockDiagonal
from .block_inverse import BlockInverse
from .block_tridiagonal import BlockTridiagonal
from .blocks import (Conv2dBlock, CurvatureBlock, DiagonalBlock, EmbeddingBlock, LinearBlock, ScaleShiftBlock,
                     find_blocks, register_block)
from .coverage import Coverage, CoverageEntry, coverage
from .damping import pi_trace
from .batch_factors import block_factors, kronecker_factors
from .factors import BlockFisher, KroneckerFactors
from .kron_sum import KronSumInverse, kron_sum_inverse, kron_sum_inverse_identity
from .layers import LinearLayer, find_layers
from .losses import LOSSES, PredictiveDistribution, causal_lm_targets, get_loss

__all__ = [
    "Coverage",
    "CoverageEntry",
    "coverage",
    "BlockDiagonal",
    "BlockFisher",
    "BlockInverse",
    "Conv2dBlock",
    "DiagonalBlock",
    "EmbeddingBlock",
    "ScaleShiftBlock",
    "block_factors",
    "BlockTridiagonal",
    "CurvatureBlock",
    "KroneckerFactors",
    "KronSumInverse",
    "LOSSES",
    "LinearBlock",
    "LinearLayer",
    "PredictiveDistribution",
    "find_blocks",
    "find_layers",
    "get_loss",
    "kron_sum_inverse",
    "kron_sum_inverse_identity",
    "kronecker_factors",
    "causal_lm_targets",
    "pi_trace",
    "register_block",
]
