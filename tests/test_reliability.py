"""Numerical safety, bad input, checkpoints, mixed precision, fuzzing and a soak run."""
import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import kfac_fast
from kfac_fast import KFAC, KFACPreconditioner
from kfac_fast.curvature import BlockDiagonal, BlockTridiagonal, kronecker_factors
from kfac_fast.optimizer import StepRejected

from dense import mlp

D = torch.float64


def _problem(seed=0, dtype=D):
    torch.manual_seed(seed)
    model = mlp([6, 9, 5, 4], nn.Tanh, seed=seed, dtype=dtype)  # factor sizes 7,9,10,5,6,4: unique
    x = torch.randn(64, 6, dtype=dtype)
    y = torch.randint(0, 4, (64,))
    return model, x, y


# ---------------------------------------------------------------- failed eigendecompositions
def test_failed_eigendecomposition_retries_in_float64(monkeypatch):
    from kfac_fast.curvature import _eigen

    model, x, y = _problem(dtype=torch.float32)
    opt = KFAC(model, loss="softmax_cross_entropy", factorization="eigh", generator=torch.Generator().manual_seed(0))
    real = _eigen.eigh

    def nan_for_one(mats, **kw):
        r = real(mats, **kw)
        r.eigenvalues[3] = torch.full_like(r.eigenvalues[3], float("nan"))
        return r

    monkeypatch.setattr(_eigen, "eigh", nan_for_one)
    s = opt.step(x, y)
    assert not s["rejected"] and s["inverse_fallbacks"] == 0  # fp64 retry fixed it
    assert all(bool(torch.isfinite(e.sG).all()) for e in opt.inverse.eig)


def test_layer_falls_back_to_last_good_inverse(monkeypatch):
    from kfac_fast.curvature import _eigen

    model, x, y = _problem()
    opt = KFAC(model, loss="softmax_cross_entropy", factorization="eigh", generator=torch.Generator().manual_seed(0))
    opt.step(x, y)
    good = opt.inverse.eig[1].QG.clone()
    bad_size = opt.layers[1].g_dim
    real_eigh, real_torch = _eigen.eigh, torch.linalg.eigh

    def failing(M, *a, **kw):
        if M.shape[-1] == bad_size:
            raise torch.linalg.LinAlgError("simulated failure")
        return real_torch(M, *a, **kw)

    def nan_for_layer1_G(mats, **kw):
        r = real_eigh(mats, **kw)
        r.eigenvalues[3] = torch.full_like(r.eigenvalues[3], float("nan"))
        return r

    monkeypatch.setattr(_eigen, "eigh", nan_for_layer1_G)
    monkeypatch.setattr(_eigen.torch.linalg, "eigh", failing)
    with pytest.warns(RuntimeWarning, match="last good inverse"):
        s = opt.step(x, y)
    assert s["inverse_fallbacks"] == 1 and not s["rejected"]
    assert torch.equal(opt.inverse.eig[1].QG, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        s = opt.step(x, y)
    assert s["inverse_fallbacks"] == 2


def test_first_refresh_failure_without_fallback_is_a_clear_error(monkeypatch):
    from kfac_fast.curvature import _eigen

    model, x, y = _problem()
    opt = KFAC(model, loss="softmax_cross_entropy", factorization="eigh")

    def boom(*a, **k):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(_eigen, "eigh", boom)
    monkeypatch.setattr(_eigen.torch.linalg, "eigh", boom)
    with pytest.raises(ValueError, match="no previous inverse"):
        opt.step(x, y)


def test_failed_cholesky_takes_the_eigendecomposition_path(monkeypatch):
    model, x, y = _problem(dtype=torch.float32)
    opt = KFAC(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0))
    opt.step(x, y)
    assert opt.inverse.factorization == "cholesky" and opt.inverse.eig is None
    real = torch.linalg.cholesky_ex

    def not_pd(M, *a, **kw):
        L, info = real(M, *a, **kw)
        return L, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", not_pd)
    s = opt.step(x, y)  # k = 1 <= 3: a refresh
    assert not s["rejected"] and s["refreshed"]
    assert opt.inverse.factorization == "eigh" and opt.inverse.eig is not None


# ---------------------------------------------------------------- rejected steps
def test_non_finite_statistics_reject_step_naming_the_layer(monkeypatch):
    model, x, y = _problem()
    opt = KFAC(model, loss="softmax_cross_entropy")
    opt.step(x, y)
    A0 = opt.factors.current[0].A.clone()
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(opt.loss, "total", lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="sum")
                        * (float("nan") if z.shape[0] < 64 else 1.0))
    with pytest.warns(RuntimeWarning, match="output derivatives of layer model.0"):
        s = opt.step(x, y)
    assert s["rejected"]
    assert torch.equal(opt.factors.current[0].A, A0)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b.detach())


def test_consecutive_rejections_raise():
    model, x, y = _problem()
    opt = KFAC(model, loss="softmax_cross_entropy", max_rejections=3)
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.warns(RuntimeWarning):
        opt.step(bad, y)
        opt.step(bad, y)
        with pytest.raises(StepRejected, match="3 consecutive.*non-finite loss"):
            opt.step(bad, y)
    opt.rejections = 0
    opt.step(x, y)  # still usable afterwards


# ---------------------------------------------------------------- bad input
def test_bad_input_is_refused_without_state_change():
    model, x, y = _problem()
    opt = KFAC(model, loss="softmax_cross_entropy")
    opt.step(x, y)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="empty batch"):
        opt.step(x[:0], y[:0])
    with pytest.raises(ValueError, match="are on meta"):
        opt.step(x.to("meta"), y)
    with pytest.raises(ValueError, match="rows but targets"):
        opt.step(x, y[:10])
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen after KFAC was built"):
        opt.step(x, y)
    model[0].weight.requires_grad_(True)
    assert opt.k == state["k"]
    torch.testing.assert_close(opt.factors.current[0].A, state["factors"]["factors"][0]["A"])


def test_weight_sharing_is_refused_by_the_optimizer():
    lin = nn.Linear(4, 4).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    opt = KFAC(model, loss="squared_error")
    with pytest.raises(ValueError, match="called 2 times"):
        opt.step(torch.randn(16, 4, dtype=D), torch.randn(16, 4, dtype=D))


def test_checkpoint_is_versioned_and_weights_only_loadable():
    model, x, y = _problem()
    opt = KFAC(model, loss="softmax_cross_entropy", inverse="block_tridiagonal")
    for _ in range(3):
        opt.step(x, y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["version"] == 4
    opt2 = KFAC(model, loss="softmax_cross_entropy", inverse="block_tridiagonal")
    opt2.load_state_dict(state)
    # version 3 (before blocks of other kinds): the inverse state is the bare tridiagonal one
    v3 = copy.deepcopy(state)
    v3["version"], v3["inverse"] = 3, v3["inverse"]["kron"]
    opt3b = KFAC(model, loss="softmax_cross_entropy", inverse="block_tridiagonal")
    opt3b.load_state_dict(v3)
    V = [torch.randn(l.g_dim, l.a_dim, dtype=opt2.inverse_dtype) for l in opt2.layers]
    for a, b in zip(opt2.inverse.apply(V), opt3b.inverse.apply(V)):
        assert torch.equal(a, b)
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        opt2.load_state_dict(state)
    # version 1 (before the Cholesky factorisation existed: eigenbases always, no config key) still loads
    v1 = KFAC(model, loss="softmax_cross_entropy", factorization="eigh")
    v1.step(x, y)
    old = v1.state_dict()
    old["version"] = 1
    del old["config"]["factorization"]
    opt3 = KFAC(model, loss="softmax_cross_entropy")
    opt3.load_state_dict(old)
    assert opt3.inverse.eig is not None and not opt3.step(x, y)["rejected"]
    # version 2 (before step rejection): resumes without rejection, as it was trained
    old = opt.state_dict()
    old["version"] = 2
    for key in ("reject_steps", "rho_min"):
        del old["config"][key]
    del old["nu"]
    opt4 = KFAC(model, loss="softmax_cross_entropy", inverse="block_tridiagonal")
    opt4.load_state_dict(old)
    assert opt4.config.reject_steps is False and opt4.nu == 2.0


# ---------------------------------------------------------------- mixed precision
def test_bf16_model_trains_with_fp32_factors():
    torch.manual_seed(0)
    model = mlp([8, 16, 4], nn.Tanh, dtype=torch.bfloat16)
    x = torch.randn(256, 8).bfloat16()
    y = x[:, :4].float().argmax(1)
    opt = KFAC(model, loss="softmax_cross_entropy", generator=torch.Generator().manual_seed(0))
    losses = [opt.step(x, y)["loss"] for _ in range(15)]
    assert opt.factors.current[0].A.dtype == torch.float32
    assert opt.inverse.Ainv[0].dtype == torch.float32
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]


def test_autocast_and_float64_inverses():
    torch.manual_seed(0)
    model = mlp([8, 16, 4], nn.Tanh, dtype=torch.float32)
    x = torch.randn(128, 8)
    y = x[:, :4].argmax(1)
    opt = KFAC(model, loss="softmax_cross_entropy", inverse_dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [opt.step(x, y)["loss"] for _ in range(10)]
    assert opt.inverse.Ainv[0].dtype == torch.float64
    assert losses[-1] < losses[0]


def test_preconditioner_with_grad_scaler_matches_unscaled():
    torch.manual_seed(0)
    x = torch.randn(32, 5)
    y = torch.randint(0, 3, (32,))

    def run(scale):
        model = mlp([5, 7, 3], nn.Tanh, seed=3, dtype=torch.float32)
        pre = KFACPreconditioner(model, loss="softmax_cross_entropy", fisher="empirical", tau1=1.0)
        (scale * nn.functional.cross_entropy(model(x), y)).backward()
        pre.step(x, y)
        return [p.grad / scale for p in model.parameters()]

    for a, b in zip(run(1.0), run(1024.0)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_preconditioner_leaves_non_finite_grads_for_the_scaler():
    model = mlp([5, 7, 3], nn.Tanh, dtype=torch.float32)
    pre = KFACPreconditioner(model, loss="softmax_cross_entropy")
    x = torch.randn(32, 5)
    model(x).sum().backward()
    model[0].weight.grad[0, 0] = float("inf")
    pre.step(x)
    assert math.isinf(float(model[0].weight.grad[0, 0]))  # GradScaler will see the overflow and skip


# ---------------------------------------------------------------- fuzzing
# A fixed grid (drawn once from a seeded RNG, so every run checks the same 28 cases): random
# widths, batch sizes, losses, bias and seeds, each crossed with every (dtype, damping) pair.
# Every backend is compared with a float64 reference computed from the SAME factors and
# directions, with a bound relative to the output norm that does not depend on the damping.
# Forward error of a damped solve grows like eps·cond, so float32 is only asked for dampings
# where that is small (γ ≥ 1e-2, measured worst ≈ 5e-6 relative); float64 down to γ = 1e-6
# (measured worst ≈ 2e-7, the native Jacobi eigensolver on the tridiagonal inverse).
_FUZZ_TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
_FUZZ_DAMPINGS = {torch.float64: (1e-6, 1e-3, 1.0, 10.0), torch.float32: (1e-2, 1.0, 10.0)}


def _fuzz_cases():
    import random

    rnd = random.Random(20150601)
    cases = []
    for _ in range(4):
        for dtype, dampings in _FUZZ_DAMPINGS.items():
            for damping in dampings:
                widths = [rnd.randint(1, 6) for _ in range(rnd.randint(2, 4))]
                cases.append(pytest.param(
                    widths, rnd.randint(1, 12), damping, dtype,
                    rnd.choice(["softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error"]),
                    rnd.random() < 0.5, rnd.randint(0, 1000),
                    id=f"{'-'.join(map(str, widths))}-{str(dtype)[6:]}-{damping:g}-{len(cases)}"))
    return cases


def _as_float64(fac):
    from kfac_fast.curvature import KroneckerFactors

    def c(t):
        return None if t is None else t.double()

    return [KroneckerFactors(A=c(f.A), G=c(f.G), A_next=c(f.A_next), G_next=c(f.G_next), name=f.name,
                             homogeneous=f.homogeneous) for f in fac]


@pytest.mark.parametrize("widths,m,damping,dtype,loss,bias,seed", _fuzz_cases())
def test_fuzz_inverses_are_finite_and_backends_agree(widths, m, damping, dtype, loss, bias, seed):
    model = mlp(widths, nn.Tanh, bias=bias, seed=seed, dtype=dtype)
    x = torch.randn(m, widths[0], dtype=dtype, generator=torch.Generator().manual_seed(seed))
    fac = kronecker_factors(model, x, loss, fisher="mc", tridiagonal=True, generator=torch.Generator().manual_seed(seed))
    V = [torch.randn(f.G.shape[0], f.A.shape[0], dtype=dtype) for f in fac]
    fac64, V64 = _as_float64(fac), [v.double() for v in V]
    status = kfac_fast.available_backends()
    # Triton kernels take float32/16-bit tensors (float64 is refused with a clear TypeError)
    backends = [b for b in ("torch", "native", "triton") if status[b].available
                and not (b == "triton" and dtype == torch.float64)]
    for cls in (BlockDiagonal, BlockTridiagonal):
        try:
            ref = torch.cat([r.reshape(-1) for r in cls(fac64, damping=damping, backend="torch").apply(V64)])
        except ValueError as exc:  # only the documented "not positive definite" refusal is allowed
            assert "positive definite" in str(exc) and cls is BlockTridiagonal
            ref = None
        for b in backends:
            try:
                out = cls(fac, damping=damping, backend=b).apply(V)
            except ValueError as exc:
                assert "positive definite" in str(exc) and cls is BlockTridiagonal
                continue
            for u in out:
                assert u.dtype == dtype and bool(torch.isfinite(u).all())
            if ref is None:
                continue
            got = torch.cat([u.double().reshape(-1) for u in out])
            err = float((got - ref).norm() / ref.norm())
            assert err <= _FUZZ_TOL[dtype], (b, cls.__name__, err)


# ---------------------------------------------------------------- soak
@pytest.mark.slow
@pytest.mark.heavy
def test_soak_autoencoder_2000_iterations():
    from kfac_fast.demo.data import load_mnist
    from kfac_fast.demo.models import deep_autoencoder, reconstruction_error

    X, _ = load_mnist()
    model = deep_autoencoder((X.shape[1], 64, 16), generator=torch.Generator().manual_seed(0))
    opt = KFAC(model, loss="sigmoid_cross_entropy", generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    errors, rejected_late, rho_rejected = [], 0, 0
    for k in range(2000):
        idx = torch.randint(0, X.shape[0], (250,), generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            s = opt.step(X[idx], X[idx])
        # a step whose objective rose (ρ < 0) is undone by design; anything else is a failure
        by_rho = s["rejected"] and s["reason"].startswith("ρ")
        rho_rejected += int(by_rho)
        rejected_late += int(s["rejected"] and not by_rho and k >= 10)
        if (k + 1) % 250 == 0:
            errors.append(reconstruction_error(model, X))
    assert rejected_late == 0
    assert rho_rejected <= 200, rho_rejected  # routine, not the rule
    assert all(math.isfinite(e) for e in errors)
    # monotone trend: every 500-iteration window ends lower than the one before
    assert errors[-1] < errors[3] < errors[0], errors
