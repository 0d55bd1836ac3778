"""The main job runs end to end (tiny encoder and budget) and writes its table inputs and plot."""
import os

import pytest

pytest.importorskip("matplotlib")


@pytest.mark.heavy  # the whole demo end to end
def test_demo_runs_and_writes_outputs(tmp_path):
    from kfac_fast import demo

    runs = demo.main(["--budget", "1.0", "--batch-size", "200", "--encoder", "784,32,8", "--eval-every", "0.5",
                      "--methods", "kfac,sgd,adam", "--inverse", "both", "--out", str(tmp_path)])
    assert [r.method for r in runs] == ["K-FAC blkdiag", "K-FAC tridiag", "SGD-Nesterov", "Adam"]
    for r in runs:
        assert r.iters[-1] >= 1 and len(r.errors) >= 2
    assert os.path.getsize(tmp_path / "demo_error.png") > 1000
    assert (tmp_path / "demo_curves.csv").read_text().startswith("method,seconds,iterations,train_error")
    _check_csv_metadata(tmp_path / "demo_curves.csv", runs)


def _check_csv_metadata(path, runs):
    """The data columns come first (readers keep working); then when, where and how it ran."""
    import csv
    import datetime

    import torch

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f))
    assert header == ["method", "seconds", "iterations", "train_error", "date", "cpu", "torch", "threads", "device"]
    assert len(rows) == sum(len(r.times) for r in runs)
    assert [r["method"] for r in rows] == [r.method for r in runs for _ in r.times]
    now = datetime.datetime.now(datetime.timezone.utc)
    for row in rows:
        float(row["seconds"]), int(row["iterations"]), float(row["train_error"])
        date = datetime.datetime.fromisoformat(row["date"])
        assert date.tzinfo is not None and abs((now - date).total_seconds()) < 600
        assert row["cpu"] and row["cpu"] != "unknown"
        assert row["torch"] == torch.__version__
        assert row["threads"] == str(torch.get_num_threads())
        assert row["device"] == "cpu"
    assert len({(r["date"], r["cpu"], r["torch"], r["threads"], r["device"]) for r in rows}) == 1  # one run


def test_data_and_model():
    import torch

    from kfac_fast.demo.data import load_mnist
    from kfac_fast.demo.models import deep_autoencoder, reconstruction_error

    X, source = load_mnist()
    assert X.min() >= 0 and X.max() <= 1 and X.shape[0] >= 1000
    model = deep_autoencoder((X.shape[1], 20, 5), generator=torch.Generator().manual_seed(0))
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [20, 5, 20, X.shape[1]]
    # sparse init: 15 non-zeros per row
    assert int((model[0].weight != 0).sum(1).max()) == 15
    assert reconstruction_error(model, X[:10]) > 0


def test_schedules():
    import math

    import torch

    from kfac_fast.schedules import PolyakAverage, batch_size_schedule

    assert batch_size_schedule(1, m1=1000, b=100, dataset_size=60000) == 1000
    assert batch_size_schedule(101, m1=1000, b=100, dataset_size=60000) == round(1000 * math.e)
    assert batch_size_schedule(10 ** 4, m1=1000, b=100, dataset_size=60000) == 60000
    lin = torch.nn.Linear(2, 1)
    avg = PolyakAverage(lin, decay=0.5)
    w0 = lin.weight.detach().clone()
    avg.update()  # k=1: ξ=0 -> average = θ
    torch.testing.assert_close(avg.average[0], w0)
    with torch.no_grad():
        lin.weight.add_(2.0)
    avg.update()  # k=2: ξ = min(1/2, 0.5)
    torch.testing.assert_close(avg.average[0], w0 + 1.0)
