"""Kernel families, one file each: the kernel(s), launcher, ``torch.library`` custom op
with a fake (meta) implementation, and the plain-PyTorch reference (``*_ref``).

Kernels know nothing about the optimizer; the curvature code calls them.
"""
from .symmetrize import symmetrize, symmetrize_ref

__all__ = ["symmetrize", "symmetrize_ref"]
