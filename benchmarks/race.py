"""Which optimizer reaches a given loss first on a shared CPU: K-FAC against tuned first-order
baselines at equal wall-clock budgets.

Rules (what makes the numbers comparable):
  * every method gets the same training budget (seconds of its own training time);
  * methods are interleaved: at each turn the method with the least elapsed training time runs
    one iteration, so a change of the machine's load hits all methods alike;
  * evaluation (the task's reported loss, eval mode, no grad) runs with the clock stopped, every
    budget / ``--evals`` seconds of training;
  * every seed starts every method from the same weights and feeds it the same batches;
  * the baselines' learning rates come from a short interleaved grid run, written beside the
    results (``<task>_lr_grid.csv``: every lr tried, its final loss, the one chosen); the
    K-FAC preconditioner methods run at their base optimizer's chosen lr.

Reported per task (``<task>_summary.csv`` and the printed table): the target is the best
baseline's final loss (per seed); time-to-target is the first evaluation at or below it, as a
fraction of the budget; loss at equal time is the final loss.

    PYTHONPATH=python python benchmarks/race.py --quick                    # smoke run, ~1 min
    PYTHONPATH=python python benchmarks/race.py --budget 60 --seeds 0,1    # the race
    PYTHONPATH=python python benchmarks/race.py --tasks resnet --methods sgd,kfac-pre-sgd --regrid

Writes benchmarks/results/race/<task>.csv (every evaluation), <task>.png, <task>_lr_grid.csv
and <task>_summary.csv, each row with the machine, versions and load average.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, machine_info, print_table, write_csv  # noqa: E402
from race_tasks import TASKS, RaceTask, make_task  # noqa: E402

import kfac_fast  # noqa: E402
from kfac_fast.config import KFACConfig  # noqa: E402
from kfac_fast.step_size import Graft, KLClip  # noqa: E402

BASELINES = ("sgd", "adamw")
METHODS = ("sgd", "adamw", "kfac", "kfac-pre-sgd", "kfac-pre-adamw")
#: a K-FAC preconditioner method may name its step-size rule: kfac-pre-sgd:kl, :graft or :none;
#: kfac may name KFACConfig overrides: kfac:Tq=10 (several joined by '+'); a preconditioner method
#: its own keyword overrides after the rule: kfac-pre-sgd:graft+Tf=1
CURVE_COLUMNS = ["task", "method", "seed", "lr", "seconds", "iterations", "loss", "batch_loss", "note"]
OUT_DIR = os.path.join(RESULTS_DIR, "race")


# --------------------------------------------------------------------------------------- methods
def make_step(task: RaceTask, method: str, model: torch.nn.Module, lr: Optional[float], seed: int,
              pre_kwargs: Optional[dict] = None) -> tuple[Callable, str]:
    """(step(inputs, targets) -> batch loss or None, settings) for one method on ``model``."""
    def first_order(opt):
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = task.objective(model, x, y)
            loss.backward()
            opt.step()
            return loss.detach()
        return step

    def base(kind):
        if kind == "sgd":
            return (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=task.nesterov),
                    f"SGD lr {lr:g} momentum 0.9{' nesterov' if task.nesterov else ''}")
        return torch.optim.AdamW(model.parameters(), lr=lr), f"AdamW lr {lr:g} weight decay 0.01"

    if method in BASELINES:
        opt, settings = base(method)
        return first_order(opt), settings
    gen = torch.Generator().manual_seed(seed)
    if method.split(":")[0] == "kfac":  # kfac:Tq=10+T2=40: KFACConfig overrides
        overrides = _pre_kwargs(method.partition(":")[2].replace("+", ","))
        opt = kfac_fast.KFAC(model, loss=task.loss, generator=gen, config=KFACConfig(**overrides))
        return (lambda x, y: opt.step(x, y).get("loss")), "KFAC defaults" + "".join(
            f", {k}={v}" for k, v in overrides.items())
    if method.startswith("kfac-pre-"):
        kw = dict(pre_kwargs or {})
        name, _, rule = method[len("kfac-pre-"):].partition(":")
        rule, *extra = rule.split("+")  # kfac-pre-sgd:graft+Tf=1: keyword overrides of this method
        kw.update(_pre_kwargs(",".join(extra)))
        opt, settings = base(name)
        if rule:  # the step-size rule (kfac_fast.step_size): graft, kl (KAISA's kappa 1e-3) or none
            kw["step_size"] = {"graft": Graft(), "kl": KLClip(kappa=1e-3, lr=opt), "none": None}[rule]
        pre = kfac_fast.KFACPreconditioner(model, loss=task.loss, generator=gen, **kw)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = task.objective(model, x, y)
            loss.backward()
            pre.step(x, y)
            opt.step()
            return loss.detach()
        rule = "none" if pre.step_size is None else pre.step_size.describe()
        extra = "".join(f", {k}={v}" for k, v in kw.items() if k != "step_size")
        return step, f"KFACPreconditioner defaults{extra}, step size {rule} + {settings}"
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} (kfac-pre-*: with :graft, :kl "
                     "or :none)")


# ---------------------------------------------------------------------------------------- runner
@dataclass
class Runner:
    """One (method, seed) run, advanced one iteration at a time; its clock counts training only."""

    task: RaceTask
    method: str
    seed: int
    lr: Optional[float]
    budget: float
    eval_every: float
    label: str = ""
    pre_kwargs: Optional[dict] = None
    elapsed: float = 0.0
    iterations: int = 0
    done: bool = False
    note: str = ""
    settings: str = ""
    curve: list = field(default_factory=list)

    def __post_init__(self):
        self.label = self.label or self.method
        self.model = self.task.make_model(self.seed)
        self.model.train()
        self.step, self.settings = make_step(self.task, self.method, self.model, self.lr, self.seed, self.pre_kwargs)
        self.batches = self.task.batches(self.seed)
        self.seen: list = []
        self.next_eval = self.eval_every
        self._evaluate()

    def _evaluate(self) -> None:
        loss = self.task.evaluate(self.model)
        batch = sum(self.seen) / len(self.seen) if self.seen else float("nan")
        self.seen = []
        if not math.isfinite(loss):
            self.note, self.done = self.note or "diverged", True
        self.curve.append({"seconds": self.elapsed, "iterations": self.iterations, "loss": loss,
                           "batch_loss": batch, "note": self.note})

    def advance(self) -> None:
        """One training iteration (batch drawn off the clock), then the evaluation if it is due."""
        x, y = next(self.batches)
        t0 = time.perf_counter()
        try:
            out = self.step(x, y)
            failed = None
        except (RuntimeError, ValueError, ArithmeticError) as exc:  # e.g. no targets sampled from inf logits
            failed = exc
        self.elapsed += time.perf_counter() - t0
        if failed is not None:
            finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
            if finite and math.isfinite(self.task.evaluate(self.model)):
                raise failed
            self.note = f"diverged: {str(failed).splitlines()[0][:60]}"
            self.done = True
            self._evaluate()
            return
        self.iterations += 1
        if out is not None:
            self.seen.append(float(out))
        over = self.elapsed >= self.budget
        if over or self.elapsed >= self.next_eval:
            self._evaluate()
            self.next_eval += self.eval_every
        self.done = self.done or over

    @property
    def final(self) -> float:
        return self.curve[-1]["loss"] if not self.note else float("inf")


def race(runners: list[Runner], *, on_turn: Optional[Callable[[int, list], None]] = None) -> list[Runner]:
    """Advance the runners to their budgets: each turn the unfinished runner with the least
    elapsed training time runs one iteration. ``on_turn(index, elapsed of every runner)`` is
    called before each turn (the tests check the rule with it)."""
    while True:
        live = [i for i, r in enumerate(runners) if not r.done]
        if not live:
            return runners
        i = min(live, key=lambda j: runners[j].elapsed)
        if on_turn is not None:
            on_turn(i, [r.elapsed if not r.done else math.inf for r in runners])
        runners[i].advance()


# ------------------------------------------------------------------------------------ lr grids
def read_grid(out: str, task: str) -> dict:
    """{method: chosen lr} from a committed grid file, {} if there is none."""
    import csv

    path = os.path.join(out, f"{task}_lr_grid.csv")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["method"]: float(r["lr"]) for r in csv.DictReader(f) if r["chosen"] == "True"}


def run_grid(task: RaceTask, args, info: dict) -> dict:
    """Every (baseline, lr) of the task's grid for ``args.grid_budget`` s (seed 0, interleaved);
    the chosen lr is the lowest final loss. Writes <task>_lr_grid.csv."""
    runners = [Runner(task, m, 0, lr, args.grid_budget, args.grid_budget / 4, label=f"{m}@{lr:g}")
               for m in BASELINES for lr in task.grids[m]]
    load0 = os.getloadavg()[0]
    race(runners)
    rows, chosen = [], {}
    for m in BASELINES:
        mine = [r for r in runners if r.method == m]
        best = min(mine, key=lambda r: r.final)
        chosen[m] = best.lr
        rows += [{"task": task.name, "method": m, "lr": r.lr, "seconds": round(r.elapsed, 2),
                  "iterations": r.iterations, "final_loss": r.final, "chosen": r is best, "note": r.note}
                 for r in mine]
    load = f"{load0:.2f}-{os.getloadavg()[0]:.2f}"
    write_csv(f"{task.name}_lr_grid", rows, dict(info, load_average=load), out_dir=args.out)
    print(f"{task.name}: chosen lr {chosen}")
    return chosen


# ------------------------------------------------------------------------------------- summary
def summarise(task: RaceTask, runners: list[Runner], budget: float) -> list[dict]:
    """One row per method: final loss (median over seeds), time to the best baseline's final loss."""
    seeds = sorted({r.seed for r in runners})
    targets = {}
    for s in seeds:
        base = [r.final for r in runners if r.seed == s and r.method in BASELINES]
        targets[s] = min(base) if base else math.nan
    rows = []
    for label in dict.fromkeys(r.label for r in runners):
        mine = [r for r in runners if r.label == label]
        reach = []
        for r in mine:
            hit = [c["seconds"] for c in r.curve if c["loss"] <= targets[r.seed] and not c["note"]]
            reach.append(hit[0] / budget if hit else math.inf)
        finals = [r.final for r in mine]
        its = [r.iterations for r in mine]
        ms = [1e3 * r.elapsed / max(r.iterations, 1) for r in mine]
        rows.append({"task": task.name, "method": label, "lr": mine[0].lr, "settings": mine[0].settings,
                     "seeds": len(mine), "iterations": round(statistics.mean(its)),
                     "ms_per_iteration": round(statistics.median(ms), 1),
                     "final_loss": statistics.median(finals), "final_loss_per_seed": " ".join(f"{v:.4g}" for v in finals),
                     "target": statistics.median(targets.values()),
                     "time_to_target": max(reach),  # worst seed, fraction of the budget
                     "within_0.7": all(v <= 0.7 for v in reach),
                     "diverged": sum(bool(r.note) for r in mine)})
    return rows


def plot(name: str, curves: list[dict], path: str, budget: float) -> None:
    """Reported loss against training seconds, one line per (method, seed); the y axis stops at
    10× the starting loss (a diverged run leaves the frame instead of squashing the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors, labelled = {}, set()
    runs: dict = {}
    for c in curves:
        runs.setdefault((c["method"], c["seed"]), []).append((float(c["seconds"]), float(c["loss"])))
    finite = [l for pts in runs.values() for _, l in pts if math.isfinite(l) and l > 0]
    start = max(pts[0][1] for pts in runs.values())
    for (method, seed), pts in runs.items():
        col = colors.setdefault(method, f"C{len(colors)}")
        pts = [(t, l) for t, l in pts if math.isfinite(l) and l > 0]  # a loss of exactly 0 is off the log axis
        ax.plot(*zip(*pts), color=col, lw=1.4, alpha=0.85, label=None if method in labelled else method)
        labelled.add(method)
    ax.set_yscale("log")
    ax.set_ylim(0.8 * min(finite), 10 * start)
    ax.set_xlim(0, budget)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("reported loss (eval mode)")
    ax.set_title(f"race: {name} ({len({k[1] for k in runs})} seeds, interleaved)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(out: str, tag: str = "") -> None:
    """Redraw every <task><tag>.png from its committed CSV."""
    import csv

    for name in TASKS:
        path = os.path.join(out, f"{name}{tag}.csv")
        if os.path.exists(path):
            with open(path) as f:
                rows = list(csv.DictReader(f))
            plot(name, rows, os.path.join(out, f"{name}{tag}.png"), float(rows[0]["budget"]))


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=60.0, help="training seconds per method and seed")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--evals", type=int, default=20, help="evaluations per run (every budget/evals seconds)")
    p.add_argument("--grid-budget", type=float, default=15.0, help="seconds per lr of the baselines' grid run")
    p.add_argument("--regrid", action="store_true", help="rerun the lr grid even if <task>_lr_grid.csv exists")
    p.add_argument("--report", action="store_true", help="print the committed summaries as a markdown table")
    p.add_argument("--grid-only", action="store_true", help="run (or rerun with --regrid) the lr grids and stop")
    p.add_argument("--pre", default="", help="KFACPreconditioner keyword overrides, e.g. 'damping=0.1'")
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. an ablation's name)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s budget, 1 seed, no files written")
    p.add_argument("--out", default=OUT_DIR)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.seeds, args.grid_budget, args.evals = 3.0, "0", 1.0, 4
    return args


def _pre_kwargs(spec: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        k, _, v = item.partition("=")
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"none": None, "true": True, "false": False}.get(v.lower(), v)
    return out


def report(out: str, tasks: list[str], tag: str = "") -> str:
    """The committed <task>_summary.csv files as one markdown table (docs/race.md)."""
    import csv

    lines = ["| task | method | lr | iterations | ms / iteration | final loss (median; per seed) | time to target / budget (worst seed) | load |",
             "|---|---|---|---|---|---|---|---|"]
    for name in tasks:
        path = os.path.join(out, f"{name}_summary{tag}.csv")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                ttt = float(r["time_to_target"])
                lines.append(f"| {name} | {r['method']} | {r['lr']} | {r['iterations']} | {r['ms_per_iteration']} | "
                             f"{float(r['final_loss']):.4g} ({r['final_loss_per_seed']}) | "
                             f"{'never' if math.isinf(ttt) else f'{ttt:.2f}'} | {r['load_average']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.report:
        replot(args.out, args.tag)
        print(report(args.out, [t.strip() for t in args.tasks.split(",")], args.tag))
        return []
    torch.set_num_threads(args.threads)
    info = machine_info()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m.split(":")[0] not in METHODS or (m.partition(":")[2].split("+")[0] not in ("", "graft", "kl", "none")
                                               and m.split(":")[0] != "kfac"):
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    pre_kw = _pre_kwargs(args.pre)
    os.makedirs(args.out, exist_ok=True)
    summary = []
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task = make_task(name)
        print(f"== {name}: {task.description}", flush=True)
        lrs = {} if args.regrid or args.quick else read_grid(args.out, name)
        if any(b not in lrs for b in BASELINES):
            lrs = {m: task.grids[m][len(task.grids[m]) // 2] for m in BASELINES} if args.quick \
                else run_grid(task, args, info)
        if args.grid_only:
            continue
        runners = []
        for seed in seeds:
            for m in methods:
                lr = None if m.split(":")[0] == "kfac" else lrs[m.split(":")[0].split("-")[-1]]
                runners.append(Runner(task, m, seed, lr, args.budget, args.budget / args.evals,
                                      pre_kwargs=pre_kw if m.startswith("kfac-pre") else None))
        load0 = os.getloadavg()[0]
        race(runners)
        load = f"{load0:.2f}-{os.getloadavg()[0]:.2f}"
        rows = summarise(task, runners, args.budget)
        for r in rows:
            r["load_average"] = load
        print_table(rows, ["method", "lr", "iterations", "ms_per_iteration", "final_loss", "time_to_target",
                           "within_0.7", "diverged"])
        summary += rows
        if args.quick:
            continue
        write_csv(f"{name}_summary{args.tag}", rows, dict(info, budget=args.budget), out_dir=args.out)
        curves = [dict({"task": name, "method": r.label, "seed": r.seed, "lr": r.lr}, **c) for r in runners
                  for c in r.curve]
        write_csv(f"{name}{args.tag}", curves, dict(info, load_average=load, budget=args.budget), out_dir=args.out)
        plot(name, curves, os.path.join(args.out, f"{name}{args.tag}.png"), args.budget)
    return summary


if __name__ == "__main__":
    main()
