"""Checkpoints and memory accounting of :class:`kfac_fast.optimizer.KFAC` (everything Algorithm 2 keeps between
iterations: the running factors of Sec 5, the inverse of Sec 4 and 6.3, λ and γ of Sec 6.5-6.6,
δ₀ of Sec 7, the RNG streams and the rejection counts).

Functions of the optimizer, not a part with its own state: a checkpoint is by definition the
whole state. The layout of the dict (keys, order, nesting) is the format versioned in
:mod:`kfac_fast.checkpoint`; change it only together with ``STATE_VERSION``.
"""
from __future__ import annotations

import torch

from ..checkpoint import READABLE_VERSIONS, STATE_VERSION
from ..config import KFACConfig
from ..curvature.inverses import inverse_state, load_inverse
from ..distributed import rank_generator
from .._parts import memory_report_of, state_bytes, tensors_in
from ..rules import NU_INIT

__all__ = ["load_state_dict", "memory_report", "state_dict"]


def memory_report(opt) -> dict[str, int]:
    """Bytes of K-FAC state by kind, each storage counted once (views share storage).

    ``factors``: the running Ā, G (and cross factors) in two buffers (current and pending,
    so a rejected step leaves the current ones untouched); ``inverse``: the damped inverses,
    eigenbases or Appendix B matrices plus the factor snapshot they were built from;
    ``delta0``: the previous update δ₀ (Sec 7); ``params``: the model's K-FAC parameters,
    for scale. Nothing else persists between steps. A :class:`~kfac_fast._parts.MemoryReport`:
    its ``diagonal_factors`` name the factors the ``max_block_dim`` bound keeps as diagonals.
    """
    return memory_report_of({
        "factors": state_bytes([] if opt.factors is None else opt.factors.tensors()),
        "inverse": state_bytes(tensors_in(opt.inverse)),
        "delta0": state_bytes(opt._delta0 or []),
        "params": state_bytes(opt._params()),
    }, opt.layers, opt.config.max_block_dim)


def state_dict(opt) -> dict:
    """Everything needed to continue the same trajectory (with the model's own state_dict).

    Data-parallel: a collective (every rank calls it); the state is replicated except the
    generators, whose states of all ranks are gathered into ``rank_generators``, so rank 0's
    dict is the whole checkpoint."""
    gens = None
    if opt.dist.world_size > 1:
        gens = opt.dist.all_gather_object(opt.generator.get_state())
    return {
        "rank_generators": gens,
        "version": STATE_VERSION,
        "kind": "KFAC",
        "config": opt.config.to_dict(),
        "layers": [l.name for l in opt.layers],
        "shapes": [(l.g_dim, l.a_dim) for l in opt.layers],
        "ordered": opt._ordered,
        "k": opt.k,
        "lambda_": opt.lambda_,
        "gamma": opt.gamma,
        "delta0": None if opt.delta0 is None else [d.clone() for d in opt.delta0],
        "factors": None if opt.factors is None else opt.factors.state(),
        "inverse": inverse_state(opt.inverse),
        "generator": opt.generator.get_state(),
        "rejections": opt.rejections,
        "total_rejections": opt.total_rejections,
        "nu": opt.nu,
        "pending": None if opt._pending is None else {
            "theta": [[t.clone() for t in ps] for ps in opt._pending["theta"]],
            "M": opt._pending["M"], "lm_due": opt._pending["lm_due"]},
        "inverse_fallbacks": opt.inverse_fallbacks,
        # Tq > 1: the last exact check's curvature quotients (absent from older checkpoints: the
        # next step then checks exactly)
        "exact_model": None if opt._exact_model is None else opt._exact_model.clone(),
        # torch.optim.Optimizer's layout: no per-parameter state, the param group's hyper-parameters
        "state": {},
        "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(g["params"])))}
                         for g in opt.param_groups],
    }


def load_state_dict(opt, state: dict) -> None:
    """Restore ``opt`` from a :func:`state_dict`. Raises ValueError for another model or format."""
    if state.get("kind") != "KFAC" or state.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"not a KFAC state_dict of a readable version {READABLE_VERSIONS} "
                         f"(got kind={state.get('kind')!r}, version={state.get('version')!r})")
    by_name = {l.name: l for l in opt.layers}
    if sorted(by_name) != sorted(state["layers"]):
        raise ValueError(f"state_dict is from a different model: layers {state['layers']} vs {sorted(by_name)}")
    layers = [by_name[n] for n in state["layers"]]
    for l, shp in zip(layers, state["shapes"]):
        if (l.g_dim, l.a_dim) != tuple(shp):
            raise ValueError(f"state_dict is from a different model: layer {l.name} has shape {tuple(shp)} "
                             f"there, ({l.g_dim}, {l.a_dim}) here")
    cfg = dict(state["config"])
    if state["version"] < 3:  # written before step rejection existed: resume as it ran
        cfg.setdefault("reject_steps", False)
    cfg.setdefault("max_block_dim", None)  # written before the bound existed: every factor dense, as it ran
    opt.config = KFACConfig(**cfg)
    opt.layers = layers
    opt._ordered = state["ordered"]
    opt.factors = None
    opt._ensure_state()
    if state["factors"] is not None:
        opt.factors.load(state["factors"])
    inv_state = state["inverse"]
    if inv_state is not None and inv_state.get("sharded"):  # rebuilt from its records (any world size)
        from ..curvature.block_inverse import records_from_dicts

        opt.inverse = None
        opt.inverse = opt._build_inverse(records_from_dicts(inv_state["records"], opt.factors.current),
                                         float(inv_state["damping"]))
    else:
        opt.inverse = load_inverse(opt.config.inverse, inv_state, opt.factors.current, opt.backend)
    if opt.inverse is not None:
        opt.inverse.compute_dtype = opt.compute_dtype
    opt.k = int(state["k"])
    opt.lambda_ = float(state["lambda_"])
    opt.gamma = float(state["gamma"])
    opt._delta0 = None if state["delta0"] is None else [d.to(opt.device, opt.inverse_dtype)
                                                        for d in state["delta0"]]
    opt.adapt.state.has_delta0.fill_(opt._delta0 is not None)
    gens = state.get("rank_generators")
    if gens is not None and len(gens) == opt.dist.world_size:
        opt.generator.set_state(gens[opt.dist.rank])
    elif gens is not None or opt.dist.world_size > 1:
        # another world size: fresh per-rank streams from a seed drawn from the saved stream
        g = torch.Generator().manual_seed(0)
        g.set_state(state["generator"])
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        opt.generator = rank_generator(seed, opt.dist.rank, opt.device)
    else:
        opt.generator.set_state(state["generator"])
    opt.rejections = int(state["rejections"])
    opt.adapt.state.set("total_rejections", int(state["total_rejections"]))
    opt.nu = float(state.get("nu", NU_INIT))
    pend = state.get("pending")
    opt._pending = None if pend is None else {
        "theta": [[t.to(opt.device) for t in ps] for ps in pend["theta"]], "M": float(pend["M"]),
        "lm_due": bool(pend["lm_due"])}
    opt.inverse_fallbacks = int(state.get("inverse_fallbacks", 0))
    saved_model = state.get("exact_model")
    opt._exact_model = None if saved_model is None else saved_model.to(opt.device)
    for group, saved in zip(opt.param_groups, state.get("param_groups") or []):
        group.update({k: v for k, v in saved.items() if k != "params"})
