"""Conv2d / Linear-over-positions factors against curvlinops' KFACLinearOperator (Eschenhagen et
al. 2023's KFAC-expand / KFAC-reduce), exact ("type-2") Fisher, float64.

Skipped where curvlinops is not importable: it is NOT in the `test` extra, because its
dependency backpack-for-pytorch requires torchvision, whose wheels pin an exact torch version
(installing `.[test]` could replace the CPU torch). Locally: `pip install --no-deps
curvlinops-for-pytorch backpack-for-pytorch einops einconv linear_operator opt-einsum unfoldNd`.

curvlinops backpropagates each column of the loss Hessian's square root for all loss terms at
once; that equals the exact expectation used by kfac_fast only when every layer-output row feeds
one loss term, which holds for all models here (one term per example, or a token-wise model
with a per-token loss under expand).
"""
import pytest
import torch
from torch import nn

curvlinops = pytest.importorskip("curvlinops")
KFACLinearOperator = curvlinops.KFACLinearOperator

from test_arch_factors_dense import CE, D, close, conv_data, conv_net, pooled, tokenwise  # noqa: E402


class ClassDim1(nn.Module):
    """(m, T, k) -> (m, k, T): torch's CrossEntropyLoss layout that curvlinops expects."""

    def forward(self, z):
        return z.transpose(1, 2)


def _curvlinops_factors(model, x, y, approx, num_terms=None):
    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="mean"), params, [(x, y)],
                            fisher_type="type-2", kfac_approx=approx, separate_weight_and_bias=False,
                            check_deterministic=False, num_data=x.shape[0],
                            num_per_example_loss_terms=num_terms)
    op.compute_kronecker_factors()
    return op, op._input_covariances, op._gradient_covariances


def _compare(fac, op, A, G, names):
    assert len(fac) == len(names)
    for f, n in zip(fac, names):
        close(f.A, A[n], msg=f"A of {n}")
        close(f.G, G[n], msg=f"G of {n}")
    # a public number as well: tr(KFAC) = Σ tr(A) tr(G)
    close(sum(torch.trace(f.A) * torch.trace(f.G) for f in fac), op.trace)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), ((1, 2), (2, 1), (2, 1))])
def test_conv_net_matches_curvlinops(approx, stride, padding, dilation):
    from kfac_fast.curvature import kronecker_factors
    model = conv_net(stride, padding, dilation, k=4)
    x = conv_data(m=3)
    y = torch.tensor([0, 3, 1])
    fac = kronecker_factors(model, x, CE, fisher="exact", kfac_approx=approx)
    op, A, G = _curvlinops_factors(model, x, y, approx)
    _compare(fac, op, A, G, ["0", "3"])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_linear_over_positions_matches_curvlinops(approx):
    from kfac_fast.curvature import kronecker_factors
    model = pooled()
    x = torch.randn(4, 5, 3, dtype=D)
    y = torch.tensor([0, 3, 1, 2])
    fac = kronecker_factors(model, x, CE, fisher="exact", kfac_approx=approx)
    op, A, G = _curvlinops_factors(model, x, y, approx)
    _compare(fac, op, A, G, ["0", "3"])


def test_tokenwise_sequence_loss_matches_curvlinops_expand():
    from kfac_fast.curvature import kronecker_factors
    model = tokenwise()
    x = torch.randn(3, 4, 3, dtype=D)
    y = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1], [2, 0, 1, 1]])
    fac = kronecker_factors(model, x, CE, fisher="exact", kfac_approx="expand")
    cl_model = nn.Sequential(*model, ClassDim1())
    op, A, G = _curvlinops_factors(cl_model, x, y, "expand", num_terms=4)
    _compare(fac, op, A, G, ["0", "2"])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), ((1, 2), (2, 1), (2, 1))])
def test_ref_dense_references_match_curvlinops(approx, stride, padding, dilation):
    # the independent dense references of tests/dense.py against a third implementation
    import dense as dn
    model = conv_net(stride, padding, dilation, k=4)
    x = conv_data(m=3)
    _, A, G = _curvlinops_factors(model, x, torch.tensor([0, 3, 1]), approx)
    close(dn.dense_A(model, x, "0", approx), A["0"])
    close(dn.dense_G(model, x, CE, "0", approx), G["0"])
    model = pooled()
    x = torch.randn(4, 5, 3, dtype=D)
    _, A, G = _curvlinops_factors(model, x, torch.tensor([0, 3, 1, 2]), approx)
    close(dn.dense_A(model, x, "0", approx), A["0"])
    close(dn.dense_G(model, x, CE, "0", approx), G["0"])
