import io

import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.curvature import BlockDiagonal, kronecker_factors

from dense import mlp

D = torch.float64


def test_preconditioned_grads_equal_block_diagonal_apply():
    model = mlp([4, 6, 3], nn.Tanh)
    x, y = torch.randn(20, 4, dtype=D), torch.randint(0, 3, (20,))
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", damping=0.1, fisher="empirical", tau1=1.0,
                             step_size=None)
    nn.functional.cross_entropy(model(x), y).backward()
    raw = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for m in (model[0], model[2])]
    pre.step(x, y)
    # k = 1: ε = 0, so the running factors equal this batch's empirical factors
    fac = kronecker_factors(model, x, "softmax_cross_entropy", fisher="empirical", targets=y)
    expected = BlockDiagonal(fac, damping=0.1).apply(raw)
    for m, e in zip((model[0], model[2]), expected):
        got = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
        torch.testing.assert_close(got, e)


def test_preconditioner_trains_with_sgd():
    torch.manual_seed(0)
    model = mlp([8, 16, 4], nn.Tanh)
    x = torch.randn(256, 8, dtype=D)
    y = (x[:, :4].argmax(1))
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy", damping=0.03,
                             generator=torch.Generator().manual_seed(0), step_size=None)
    sgd = torch.optim.SGD(model.parameters(), lr=0.2)
    first = None
    for _ in range(30):
        sgd.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else float(loss)
        loss.backward()
        pre.step(x)
        sgd.step()
    assert float(loss) < 0.5 * first


def test_preconditioner_errors_and_state():
    model = mlp([3, 4, 2])
    with pytest.raises(ValueError, match="unknown fisher"):
        KFACPreconditioner(model, loss="squared_error", fisher="exact")
    with pytest.raises(ValueError, match="damping"):
        KFACPreconditioner(model, loss="squared_error", damping=0.0)
    pre = KFACPreconditioner(model, loss="squared_error", generator=torch.Generator().manual_seed(0))
    x = torch.randn(8, 3, dtype=D)
    with pytest.raises(RuntimeError, match="backward"):
        pre.step(x)
    model(x).sum().backward()
    pre.step(x)
    buf = io.BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    pre2 = KFACPreconditioner(model, loss="squared_error")
    pre2.load_state_dict(torch.load(buf, weights_only=False))
    assert pre2.k == 2
    torch.testing.assert_close(pre2.factors.current[0].A, pre.factors.current[0].A)
