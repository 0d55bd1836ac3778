"""Factored Tikhonov damping (Sec 6.3) of the blocks that are not dense Kronecker products.

A small dense / diagonal block is the Kronecker product F ⊗ [1] (a 1×1 G), so the factored
damping gives (F + πγ I)⁻¹ / (1 + γ/π) with π = sqrt(tr F / dim F) by the trace rule, one π per
block (:mod:`kfac_fast.curvature.block_inverse`); an Embedding block (diagonal Ā) gets
(Ā + πγ I)⁻¹ ⊗ (G + (γ/π) I)⁻¹. Checked by dense float64 solves of the whole block, with π far
from 1 so that the damping's scale matters (a bare γ² would not pass).
"""
from __future__ import annotations

import math

import pytest
import torch

from kfac_fast.curvature.block_inverse import BlockInverse
from kfac_fast.curvature.blocks.base import DENSE, DIAGONAL
from kfac_fast.curvature.factors import BlockFisher, KroneckerFactors


def _spd(k: int, b: int, scale: float, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(k, 3 * b, b, generator=g, dtype=torch.float64)
    return scale * X.transpose(1, 2) @ X / (3 * b)


def _dense_solve(F: torch.Tensor, V: torch.Tensor, gamma: float) -> torch.Tensor:
    """Whole-block (k·b) float64 solve of (F_block + πγ I) u = v / (1 + γ/π)."""
    k, b, _ = F.shape
    Fb = torch.block_diag(*F)
    pi = math.sqrt(float(torch.diagonal(Fb).mean()))
    u = torch.linalg.solve(Fb + pi * gamma * torch.eye(k * b, dtype=torch.float64), V.reshape(-1))
    return (u / (1 + gamma / pi)).reshape(k, b)


@pytest.mark.parametrize("gamma", [0.03, 0.7])
def test_small_dense_and_diagonal_blocks_solve_the_factored_damping(gamma):
    g = torch.Generator().manual_seed(0)
    F_dense = _spd(5, 2, 9.0, g)  # π ≈ 3
    F_diag = 0.04 * torch.rand(7, 1, 1, generator=g, dtype=torch.float64) + 0.01  # π ≈ 0.17
    recs = [BlockFisher(F=F_dense, name="norm", kind=DENSE), BlockFisher(F=F_diag, name="scale", kind=DIAGONAL)]
    inv = BlockInverse(recs, damping=gamma, backend="torch")
    V = [torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(7, 1, generator=g, dtype=torch.float64)]
    got = inv.apply(V)
    for F, v, u in zip((F_dense, F_diag), V, got):
        torch.testing.assert_close(u, _dense_solve(F, v, gamma), rtol=1e-10, atol=1e-12)


def test_embedding_block_solves_the_factored_damping():
    g = torch.Generator().manual_seed(1)
    A = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05], dtype=torch.float64)  # token frequencies, one unseen
    G = _spd(1, 3, 40.0, g)[0]
    gamma = 0.2
    inv = BlockInverse([KroneckerFactors(A=A, G=G, name="emb", homogeneous=False)], damping=gamma, backend="torch")
    V = torch.randn(3, 5, generator=g, dtype=torch.float64)
    pi = math.sqrt(float(A.mean()) / float(torch.diagonal(G).mean()))
    # vec(U) = [(Ā + πγ)⁻¹ ⊗ (G + γ/π)⁻¹] vec(V), vec stacking columns
    K = torch.kron(torch.diag(A + pi * gamma), G + gamma / pi * torch.eye(3, dtype=torch.float64))
    u = torch.linalg.solve(K, V.T.reshape(-1)).reshape(5, 3).T
    torch.testing.assert_close(inv.apply([V])[0], u, rtol=1e-10, atol=1e-12)
