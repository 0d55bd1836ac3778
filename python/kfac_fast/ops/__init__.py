"""Kernel families, one file each: the kernel(s), launcher, ``torch.library`` custom op
with a fake (meta) implementation, and the plain-PyTorch reference (``*_ref``).

``conv_factor`` builds the Conv2d factor A straight from the layer input (implicit im2col).

The Triton families (factor updates, eigenbasis preconditioning, sandwiches, rank-m)
share one grouped GEMM kernel (``_grouped_gemm``): every GEMM stage is a single launch
for all layers of a network.

Kernels know nothing about the optimizer; the curvature code calls them.
"""
from .conv_factor import conv_factor_update, conv_factor_update_ref
from .eigen_precondition import eigen_precondition, eigen_precondition_ref
from .factor_update import cross_factor_update, cross_factor_update_ref, factor_update, factor_update_ref
from .rank_m import rank_m_is_cheaper, rank_m_precondition, rank_m_precondition_ref
from .sandwich import sandwich, sandwich_ref
from .symmetrize import symmetrize, symmetrize_ref

__all__ = [
    "conv_factor_update",
    "conv_factor_update_ref",
    "cross_factor_update",
    "cross_factor_update_ref",
    "eigen_precondition",
    "eigen_precondition_ref",
    "factor_update",
    "factor_update_ref",
    "rank_m_is_cheaper",
    "rank_m_precondition",
    "rank_m_precondition_ref",
    "sandwich",
    "sandwich_ref",
    "symmetrize",
    "symmetrize_ref",
]
