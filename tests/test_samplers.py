"""Targets sampled from the model (Sec 5: y ~ R_{y|z}) have the predictive distribution's first
and second moments. N draws per row, fixed seeds; each moment is compared with a tolerance of
5 standard errors of its Monte-Carlo estimate, the standard error computed from the model's own
distribution (not from the samples)."""
import math

import pytest
import torch

from kfac_fast.curvature import get_loss

D = torch.float64
N = 20000  # draws per row
Z_SIGMAS = 5.0


def _z(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows with probabilities far from 1/2 (and from uniform): a flipped distribution is visible
    return torch.stack([torch.linspace(-2.0, 1.5, k, dtype=D), 1.5 * torch.randn(k, dtype=D, generator=g)])


def _draw(loss, z, seed):
    zz = z.repeat_interleave(N, 0)  # (rows·N, k): row r's draws are rows r·N … (r+1)·N − 1
    y = get_loss(loss).sample(zz, torch.Generator().manual_seed(seed))
    return y.reshape(z.shape[0], N, *y.shape[1:])


def test_softmax_samples_are_categorical_p():
    z = _z(5)
    y = _draw("softmax_cross_entropy", z, seed=1)
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 5
    for r in range(z.shape[0]):
        p = torch.exp(z[r] - z[r].max())
        p = p / p.sum()
        onehot = torch.nn.functional.one_hot(y[r], 5).to(D)  # (N, 5)
        freq = onehot.mean(0)  # E[e_y] = p
        se = (p * (1 - p) / N).sqrt()
        assert bool(((freq - p).abs() <= Z_SIGMAS * se).all()), (r, freq, p)
        # second moment E[e_y e_yᵀ] = diag(p): off-diagonal products vanish exactly for one-hot draws
        second = onehot.t() @ onehot / N
        assert float((second - torch.diag(second.diagonal())).abs().max()) == 0.0


def test_sigmoid_samples_are_bernoulli_p():
    z = _z(6)
    y = _draw("sigmoid_cross_entropy", z, seed=2)
    assert y.dtype == D and set(torch.unique(y).tolist()) <= {0.0, 1.0}
    p = 1.0 / (1.0 + torch.exp(-z))  # (rows, k)
    mean = y.mean(1)
    se = (p * (1 - p) / N).sqrt()
    assert bool(((mean - p).abs() <= Z_SIGMAS * se).all()), (mean, p)
    # second moments: E[y_i y_j] = p_i p_j for i ≠ j (independent units), = p_i on the diagonal
    for r in range(z.shape[0]):
        second = y[r].t() @ y[r] / N
        expected = torch.outer(p[r], p[r])
        expected.diagonal().copy_(p[r])
        var = expected * (1 - expected)  # y_i y_j is Bernoulli(expected)
        assert bool(((second - expected).abs() <= Z_SIGMAS * (var / N).sqrt()).all()), r


def test_gaussian_samples_have_mean_z_and_unit_covariance():
    z = _z(4)
    y = _draw("squared_error", z, seed=3)
    assert y.dtype == D
    e = y - z.unsqueeze(1)  # (rows, N, k): noise
    mean = y.mean(1)
    assert bool(((mean - z).abs() <= Z_SIGMAS / math.sqrt(N)).all()), (mean, z)
    for r in range(z.shape[0]):
        cov = e[r].t() @ e[r] / N  # about the known mean z
        eye = torch.eye(4, dtype=D)
        # Var[e_i²] = 2, Var[e_i e_j] = 1 (i ≠ j) for independent standard normals
        se = torch.where(eye.bool(), math.sqrt(2.0 / N), math.sqrt(1.0 / N))
        assert bool(((cov - eye).abs() <= Z_SIGMAS * se).all()), (r, cov)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error"])
def test_sampling_follows_the_generator(loss):
    z = _z(3).repeat(50, 1)
    L = get_loss(loss)
    a = L.sample(z, torch.Generator().manual_seed(7))
    b = L.sample(z, torch.Generator().manual_seed(7))
    c = L.sample(z, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
