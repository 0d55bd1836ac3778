"""The race harness (benchmarks/race.py): the interleaving rule and the files it writes, on the
smallest task with a tiny budget."""
import csv
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
race = pytest.importorskip("race")
pytest.importorskip("sklearn")


def test_each_turn_goes_to_the_least_elapsed_runner():
    torch.set_num_threads(1)
    task = race.make_task("tabular")
    runners = [race.Runner(task, m, 0, lr, 0.4, 0.1) for m, lr in (("sgd", 0.03), ("adamw", 1e-3), ("kfac", None))]
    turns = []
    race.race(runners, on_turn=lambda i, elapsed: turns.append((i, list(elapsed))))
    assert len(turns) > 30
    for i, elapsed in turns:
        assert elapsed[i] == min(elapsed)
    assert {i for i, _ in turns} == {0, 1, 2}
    for r in runners:  # every method used its budget (the slowest iteration's overshoot at most)
        assert r.done and r.elapsed >= 0.4
        assert r.curve[0]["seconds"] == 0 and r.curve[-1]["seconds"] >= 0.4
        # the k-th evaluation is due after k * 0.1 s of training time (the clock, not wall time)
        assert all(c["seconds"] >= 0.1 * k - 1e-9 for k, c in enumerate(r.curve))
        # at most one evaluation per 0.1 s crossed (+ the start and the end); a slow iteration on a
        # loaded machine crosses several at once, so fewer is allowed
        assert 2 <= len(r.curve) <= 6


def test_time_to_target_and_csv_columns(tmp_path):
    out = str(tmp_path)
    rows = race.main(["--tasks", "tabular", "--budget", "0.4", "--seeds", "0,1", "--grid-budget", "0.1",
                      "--methods", "sgd,adamw,kfac-pre-adamw", "--evals", "4", "--out", out])
    with open(os.path.join(out, "tabular.csv")) as f:
        curves = list(csv.DictReader(f))
    for col in race.CURVE_COLUMNS + ["torch", "cpu", "load_average", "budget"]:
        assert col in curves[0]
    assert {r["seed"] for r in curves} == {"0", "1"}
    with open(os.path.join(out, "tabular_lr_grid.csv")) as f:
        grid = list(csv.DictReader(f))
    for m in race.BASELINES:  # one chosen lr per baseline, the lowest final loss of its grid
        mine = [g for g in grid if g["method"] == m]
        assert len(mine) == len(race.make_task("tabular").grids[m])
        chosen = [g for g in mine if g["chosen"] == "True"]
        assert len(chosen) == 1 and float(chosen[0]["final_loss"]) == min(float(g["final_loss"]) for g in mine)
    assert os.path.exists(os.path.join(out, "tabular.png"))
    # time to target recomputed from the curves: per seed the best baseline's final loss, the
    # first evaluation at or below it, the worst seed, as a fraction of the budget
    by = {r["method"]: r for r in rows}
    for method in ("sgd", "adamw", "kfac-pre-adamw"):
        worst = 0.0
        for seed in ("0", "1"):
            final = {m: float([c for c in curves if c["method"] == m and c["seed"] == seed][-1]["loss"])
                     for m in race.BASELINES}
            mine = [c for c in curves if c["method"] == method and c["seed"] == seed]
            hit = [float(c["seconds"]) for c in mine if float(c["loss"]) <= min(final.values())]
            worst = max(worst, hit[0] / 0.4 if hit else math.inf)
        assert by[method]["time_to_target"] == pytest.approx(worst)
    assert min(by[m]["time_to_target"] for m in race.BASELINES) >= 1.0
