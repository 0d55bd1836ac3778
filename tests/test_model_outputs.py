"""Model outputs as libraries return them: an object with ``.logits`` (Hugging Face's
``ModelOutput``, an OrderedDict with attribute access) is read as the outputs z, and
``causal_lm_targets`` aligns labels-style targets with a causal LM's logits."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_fast
from kfac_fast.curvature import block_factors, causal_lm_targets
from arch_models import TinyLM


class FakeModelOutput(OrderedDict):
    """The shape of transformers' ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class HFStyleLM(nn.Module):
    """input_ids (m, T) [+ labels] -> FakeModelOutput(logits (m, T, V)[, loss]) with the
    shift inside the loss, as a ``*ForCausalLM``."""

    def __init__(self):
        super().__init__()
        self.lm = TinyLM()

    def forward(self, input_ids, labels=None):
        logits = self.lm(input_ids)
        out = FakeModelOutput(logits=logits)
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return out


class TensorLM(nn.Module):
    def __init__(self, inner: HFStyleLM):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids).logits


def _batch(m=5, T=6, V=11):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (m, T), generator=g)
    labels = ids.clone()
    labels[0, 2:] = -100
    return ids, labels


def test_causal_lm_targets_shift_by_hand():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert causal_lm_targets(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]
    assert causal_lm_targets(labels, ignore_index=-1)[:, -1].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="integer labels of shape"):
        causal_lm_targets(torch.zeros(3, 4))


def test_mean_loss_with_shifted_targets_equals_the_models_own_loss():
    torch.manual_seed(0)
    model = HFStyleLM().double()
    ids, labels = _batch()
    out = model(ids, labels=labels)
    z = out.logits
    ours = F.cross_entropy(z.flatten(0, 1), causal_lm_targets(labels).flatten(), ignore_index=-100)
    torch.testing.assert_close(ours, out["loss"], rtol=1e-12, atol=0)


def test_factors_from_a_model_output_equal_those_of_the_plain_tensor_model():
    torch.manual_seed(0)
    model = HFStyleLM().double()
    ids, labels = _batch()
    y = causal_lm_targets(labels)
    a = block_factors(model, {"input_ids": ids}, "softmax_cross_entropy", fisher="empirical", targets=y)
    b = block_factors(TensorLM(model), {"input_ids": ids}, "softmax_cross_entropy", fisher="empirical", targets=y)
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        for key in ("A", "G", "F"):
            if hasattr(ra, key) and getattr(ra, key) is not None:
                torch.testing.assert_close(getattr(ra, key), getattr(rb, key), rtol=1e-12, atol=0)


@pytest.mark.parametrize("capture", ["pass", "hooks"])
def test_preconditioner_trains_a_model_returning_model_output(capture):
    torch.manual_seed(0)
    model = HFStyleLM()
    ids, labels = _batch(m=8)
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", damping=0.1, capture=capture,
                                       fisher="empirical")
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = model(ids, labels=labels)
        out["loss"].backward()
        losses.append(out["loss"].item())
        if capture == "hooks":
            pre.step(targets=causal_lm_targets(labels))
        else:
            pre.step({"input_ids": ids}, causal_lm_targets(labels))
        opt.step()
    assert losses[-1] < losses[0]


def test_kfac_trains_a_model_returning_model_output():
    torch.manual_seed(0)
    model = HFStyleLM()
    ids, labels = _batch(m=8)
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy")
    y = causal_lm_targets(labels)
    losses = [float(opt.step({"input_ids": ids}, y)["loss"]) for _ in range(20)]
    assert losses[-1] < losses[0]


class _RegressionHead(nn.Module):
    """A Hugging Face regression head's shapes: logits (m, 1) in a ModelOutput, labels (m,)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return FakeModelOutput(logits=self.body(x))


@pytest.mark.parametrize("loss", ["squared_error", "sigmoid_cross_entropy"])
def test_one_output_targets_without_the_trailing_dim_name_the_fix(loss):
    torch.manual_seed(0)
    model = _RegressionHead()
    x, y = torch.randn(8, 4), torch.rand(8)
    opt = kfac_fast.KFAC(model, loss=loss)
    with pytest.raises(ValueError, match=r"got \(8,\); the model has one output.*labels.unsqueeze\(-1\)"):
        opt.step(x, y)
    opt.step(x, y.unsqueeze(-1))
    pre = kfac_fast.KFACPreconditioner(model, loss=loss, capture="hooks", fisher="empirical")
    model.zero_grad()
    F.mse_loss(model(x).logits, y.unsqueeze(-1)).backward()
    with pytest.raises(ValueError, match=r"labels.unsqueeze\(-1\)"):
        pre.step(targets=y)
