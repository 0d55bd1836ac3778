"""Predictive distributions R_{y|z} and their losses (paper Sec 2.1, 5; Appendix C).

Each loss is the negative log-likelihood of an exponential family with natural
parameters z (the network output), so the Fisher equals the generalised Gauss-Newton
matrix and F_R, the Fisher of R_{y|z} w.r.t. z, has a closed form used by Appendix C.

Outputs have shape (m, ..., k): every position of the leading dimensions is one **loss term**
with its own predictive distribution over the last dimension (a token of a sequence model, a
pixel of a dense prediction; for (m, k) outputs the terms are the m examples). The objective is
the MEAN over the N loss terms; ``softmax_cross_entropy`` excludes the terms whose target is
``ignore_index`` (default −100) from N, the objective, the factors, the sampled targets and the
quadratic forms, exactly as ``F.cross_entropy(..., ignore_index=)`` does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rows(z: torch.Tensor) -> torch.Tensor:
    """(m, ..., k) -> (M, k): one row per loss term (a view when z is contiguous)."""
    return z.reshape(-1, z.shape[-1])


class PredictiveDistribution:
    """Interface: per-example loss, sampling, and F_R (as vectors and as a bilinear form).

    ``loss``, ``fisher_factors`` and ``fisher_inner`` work on rows (M, k) (:func:`rows` turns
    (m, ..., k) outputs into them); ``total``, ``count``, ``sample``, ``mask`` and
    ``check_targets`` take outputs and targets in their batch shapes.
    """

    name: str = ""
    ignore_index = None

    def count(self, z: torch.Tensor, y: Optional[torch.Tensor] = None):
        """N, the number of loss terms the objective averages: an int, or a 0-d int64 tensor on
        the device when :meth:`mask` leaves terms out."""
        mask = self.mask(y)
        return rows(z).shape[0] if mask is None else mask.sum()

    def mask(self, y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(M,) bool: the loss terms that count, or None when all do."""
        return None

    def mean(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective's data term: ``total / count`` (0-d)."""
        return self.total(z, y) / self.count(z, y)

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example negative log-likelihood, shape (m,). z: (m, k)."""
        raise NotImplementedError

    def total(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over loss terms of :meth:`loss` (a 0-d tensor), computed with a fused "sum" reduction:
        no (m, k) intermediate survives into the backward pass."""
        return self.loss(rows(z), y.reshape(-1, y.shape[-1])).sum()

    def sample(self, z: torch.Tensor, generator: Optional[torch.Generator] = None,
               like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Targets of the batch's shape drawn from the model's predictive distribution (Sec 5),
        no grad. ``like``: the given targets, whose ignored terms stay ignored."""
        raise NotImplementedError

    def fisher_factors(self, z: torch.Tensor) -> torch.Tensor:
        """(K, m, k) vectors b with Σ_K b bᵀ = F_R for each example (exact expectation over y)."""
        raise NotImplementedError

    def fisher_inner(self, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-example uᵀ F_R v, shape (m,). u, v: (m, k) output-space directions (J·Δθ)."""
        raise NotImplementedError

    def check_targets(self, z: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError


def _one_output_hint(z: torch.Tensor, y: torch.Tensor) -> str:
    """The fix for targets without the output's trailing dimension of size 1 (a Hugging Face
    regression or binary head: logits (m, 1), labels (m,)), else ""."""
    if z.shape[-1] == 1 and tuple(y.shape) == tuple(z.shape[:-1]):
        return ("; the model has one output per loss term (logits (m, ..., 1)), so pass the targets as "
                "labels.unsqueeze(-1) (e.g. targets=lambda b: b['labels'].unsqueeze(-1))")
    return ""


class SoftmaxCrossEntropy(PredictiveDistribution):
    """Categorical over logits z (m, ..., k). Targets: integer class indices (m, ...); terms whose
    target is ``ignore_index`` are excluded (None: every target must be a class)."""

    name = "softmax_cross_entropy"

    def __init__(self, ignore_index: Optional[int] = -100):
        self.ignore_index = ignore_index

    def _ii(self) -> int:
        return -100 if self.ignore_index is None else self.ignore_index

    def loss(self, z, y):
        return F.cross_entropy(z, y, reduction="none", ignore_index=self._ii())

    def total(self, z, y):
        return F.cross_entropy(rows(z), y.reshape(-1), reduction="sum", ignore_index=self._ii())

    def mask(self, y):
        if self.ignore_index is None or y is None:
            return None
        return y.reshape(-1) != self.ignore_index

    def sample(self, z, generator=None, like=None):
        zr = rows(z.detach())
        p = torch.softmax(zr.float(), dim=-1)
        y = torch.multinomial(p, 1, generator=generator).squeeze(1)
        mask = self.mask(like)
        if mask is not None:
            y = torch.where(mask, y, torch.full_like(y, self.ignore_index))
        return y.reshape(z.shape[:-1])

    def fisher_factors(self, z):
        p = torch.softmax(z.detach(), dim=-1)  # (m, k)
        k = p.shape[1]
        eye = torch.eye(k, dtype=p.dtype, device=p.device)
        # sqrt(p_c) (e_c - p): Σ_c p_c (e_c - p)(e_c - p)ᵀ = diag(p) - ppᵀ
        return p.sqrt().t().unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))

    def fisher_inner(self, z, u, v):
        p = torch.softmax(z.detach(), dim=-1)
        return (p * u * v).sum(-1) - (p * u).sum(-1) * (p * v).sum(-1)

    def check_targets(self, z, y):
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"softmax_cross_entropy targets must be integer class indices, got {y.dtype}")
        if y.shape != z.shape[:-1]:
            raise ValueError(
                f"softmax_cross_entropy targets must have shape {tuple(z.shape[:-1])} (one class per loss term: "
                f"the output's shape without its last dimension), got {tuple(y.shape)}"
            )
        if not y.numel():
            return
        k = z.shape[-1]
        mask = self.mask(y)
        if mask is None:
            lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one host sync
            n = y.numel()
        else:
            yv = y.reshape(-1)
            big = torch.iinfo(yv.dtype).max
            lo, hi, n = torch.stack([torch.where(mask, yv, big).min(), torch.where(mask, yv, -1).max(),
                                     mask.sum()]).tolist()  # one host sync
        if n == 0:
            raise ValueError(f"every target is ignore_index ({self.ignore_index}): the batch has no loss term")
        if lo < 0 or hi >= k:
            extra = "" if self.ignore_index is None else f" or {self.ignore_index} (ignore_index)"
            raise ValueError(f"softmax_cross_entropy targets must lie in [0, {k}){extra}, got range [{lo}, {hi}]")


class _NanMasked(PredictiveDistribution):
    """Float targets with ``ignore_nan_targets=True``: a loss term whose targets are all NaN is
    ignored (the mask of the softmax's ``ignore_index``; partly-NaN terms are an error). Off by
    default, so a NaN target stays an error instead of silently dropping a term."""

    ignore_nan_targets = False  # class default: subclasses with their own __init__ keep working

    def __init__(self, ignore_nan_targets: bool = False):
        self.ignore_nan_targets = bool(ignore_nan_targets)

    def mask(self, y):
        if not self.ignore_nan_targets or y is None:
            return None
        return ~torch.isnan(y.reshape(-1, y.shape[-1])).all(-1)

    def _split(self, z, y):
        """(targets with ignored terms zeroed, per-element weights or None)."""
        mask = self.mask(y)
        if mask is None:
            return y, None
        w = mask.reshape(y.shape[:-1]).unsqueeze(-1).to(z.dtype)
        return torch.where(w.bool(), y, torch.zeros_like(y)), w.expand_as(z)

    def _with_nans(self, y, like):
        mask = self.mask(like)
        if mask is None:
            return y
        keep = mask.reshape(like.shape[:-1]).unsqueeze(-1)
        return torch.where(keep, y, torch.full_like(y, float("nan")))

    def _check_nans(self, y) -> tuple:
        """(finite entries' min, max, terms counted) with NaN rules checked; one host sync."""
        yv = y.reshape(-1, y.shape[-1])
        nan = torch.isnan(yv)
        if not self.ignore_nan_targets:
            return tuple(torch.stack(torch.aminmax(yv)).tolist()) + (yv.shape[0],)
        partial = (nan.any(-1) & ~nan.all(-1)).any()
        fin = yv[~nan]
        lo, hi = (torch.stack(torch.aminmax(fin)) if fin.numel() else yv.new_zeros(2))
        lo, hi, part, n = torch.stack([lo.double(), hi.double(), partial.double(), (~nan.all(-1)).sum().double()]
                                      ).tolist()
        if part:
            raise ValueError(f"{self.name}: a loss term mixes NaN and numbers in its targets; with "
                             "ignore_nan_targets=True a term is ignored only when all its k targets are NaN")
        if n == 0:
            raise ValueError(f"{self.name}: every loss term's targets are NaN: the batch has no loss term")
        return lo, hi, int(n)


class SigmoidCrossEntropy(_NanMasked):
    """Independent Bernoulli over logits z (the paper's autoencoders). Targets in [0, 1], shape (m, k)."""

    name = "sigmoid_cross_entropy"

    def loss(self, z, y):
        y0, w = self._split(z, y)
        return F.binary_cross_entropy_with_logits(z, y0, weight=w, reduction="none").sum(-1)

    def total(self, z, y):
        y0, w = self._split(z, y)
        return F.binary_cross_entropy_with_logits(z, y0, weight=w, reduction="sum")

    def sample(self, z, generator=None, like=None):
        p = torch.sigmoid(z.detach())
        return self._with_nans(torch.bernoulli(p, generator=generator), like)

    def fisher_factors(self, z):
        p = torch.sigmoid(z.detach())
        w = (p * (1 - p)).sqrt()  # (m, k)
        k = z.shape[-1]
        eye = torch.eye(k, dtype=z.dtype, device=z.device)
        return eye.unsqueeze(1) * w.t().unsqueeze(-1)  # (k, m, k)

    def fisher_inner(self, z, u, v):
        p = torch.sigmoid(z.detach())
        return (p * (1 - p) * u * v).sum(-1)

    def check_targets(self, z, y):
        if not y.is_floating_point():
            raise TypeError(f"sigmoid_cross_entropy targets must be floating point in [0, 1], got {y.dtype}")
        if y.shape != z.shape:
            raise ValueError(f"sigmoid_cross_entropy targets must have the output's shape {tuple(z.shape)}, "
                             f"got {tuple(y.shape)}" + _one_output_hint(z, y))
        lo, hi, _ = self._check_nans(y) if y.numel() else (0.0, 1.0, 0)  # one host sync
        if not (0 <= lo and hi <= 1):  # NaN fails too (unless ignored as a whole term)
            raise ValueError("sigmoid_cross_entropy targets must lie in [0, 1] (probabilities/intensities)")


class SquaredError(_NanMasked):
    """Gaussian with unit variance: L = ½‖y − z‖². Targets: floats of the output's shape."""

    name = "squared_error"

    def loss(self, z, y):
        y0, w = self._split(z, y)
        d = (y0 - z).pow(2)
        return 0.5 * (d if w is None else d * w).sum(-1)

    def total(self, z, y):
        y0, w = self._split(z, y)
        d = (y0 - z).pow(2)
        return 0.5 * (d if w is None else d * w).sum()

    def sample(self, z, generator=None, like=None):
        zd = z.detach()
        return self._with_nans(zd + torch.randn(zd.shape, generator=generator, dtype=zd.dtype, device=zd.device), like)

    def fisher_factors(self, z):
        k = z.shape[-1]
        eye = torch.eye(k, dtype=z.dtype, device=z.device)
        return eye.unsqueeze(1).expand(k, z.shape[0], k)

    def fisher_inner(self, z, u, v):
        return (u * v).sum(-1)

    def check_targets(self, z, y):
        if not y.is_floating_point():
            raise TypeError(f"squared_error targets must be floating point, got {y.dtype}")
        if y.shape != z.shape:
            raise ValueError(f"squared_error targets must have the output's shape {tuple(z.shape)}, "
                             f"got {tuple(y.shape)}" + _one_output_hint(z, y))
        if self.ignore_nan_targets and y.numel():
            self._check_nans(y)


def sample_targets(loss: PredictiveDistribution, z: torch.Tensor, generator=None, like=None) -> torch.Tensor:
    """``loss.sample`` keeping the ignored terms of ``like`` ignored (losses written before the
    ``like`` argument existed are called without it when nothing is ignored)."""
    if loss.mask(like) is None:
        return loss.sample(z, generator)
    return loss.sample(z, generator, like=like)


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, SigmoidCrossEntropy, SquaredError)}


def get_loss(loss, *, ignore_index: Optional[int] = -100, ignore_nan_targets: bool = False) -> PredictiveDistribution:
    """A :class:`PredictiveDistribution` from its name (or pass one through).
    ``ignore_index`` applies to ``softmax_cross_entropy`` (None: no target is ignored);
    ``ignore_nan_targets`` to the two float losses (a term whose targets are all NaN is ignored)."""
    if isinstance(loss, PredictiveDistribution):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(sorted(LOSSES))}")
    if loss == SoftmaxCrossEntropy.name:
        return SoftmaxCrossEntropy(ignore_index=ignore_index)
    return LOSSES[loss](ignore_nan_targets=ignore_nan_targets)


def check_output(z: torch.Tensor, loss: PredictiveDistribution) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{loss.name} expects the model to return one tensor of shape (m, ..., k), "
                        f"got {type(z).__name__} (an object with a tensor attribute `logits`, such as Hugging Face's "
                        f"ModelOutput, is accepted); wrap the model so that it returns the outputs")
    if z.dim() < 2:
        raise ValueError(f"{loss.name} expects model outputs of shape (m, ..., k), got {tuple(z.shape)}")




def causal_lm_targets(labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Targets aligned with a causal LM's outputs from Hugging Face-style ``labels``.

    A ``*ForCausalLM`` model given ``labels`` (m, T) scores position t's logits against
    ``labels[:, t + 1]`` (it shifts inside its loss). K-FAC reads one target per output
    position, so the targets are the labels shifted left by one, with ``ignore_index`` at the
    last position (no next token): ``targets[:, t] = labels[:, t + 1]``, shape (m, T), for
    ``loss="softmax_cross_entropy"`` with the same ``ignore_index``.

    Example::

        batch = {"input_ids": ids, "attention_mask": mask}
        opt.step(batch, kfac_fast.causal_lm_targets(labels))   # model returns .logits (m, T, V)
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.is_floating_point():
        raise ValueError("causal_lm_targets expects integer labels of shape (m, T), got "
                         f"{type(labels).__name__ if not isinstance(labels, torch.Tensor) else (labels.dtype, tuple(labels.shape))}")
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out
