"""The phases of Algorithm 2 (Martens & Grosse 2015, Sec 9) that :class:`kfac_fast.optimizer.KFAC` orchestrates.

- :mod:`.statistics`: steps 1-3, the gradient pass, the sampled-target statistics and the factor update (Sec 5, 9).
- :mod:`.refresh`: step 4, the inverse refresh with damping γ (Sec 4, 6.3, 8).
- :mod:`.proposal`: steps 5-6, Δ per γ candidate and δ = αΔ + µδ₀ from the exact-Fisher model
  (Sec 6.4, 6.6, 7).
- :mod:`.commit`: steps 7-8, θ ← θ + δ, ρ and the acceptance of the step (Sec 6.5).
- :mod:`.adaptation`: the λ, γ and rejection rules in their device and host forms (Sec 6.5, 6.6).
- :mod:`.checkpoint_io`: ``state_dict``/``load_state_dict`` and the memory report.

Nothing here imports :mod:`kfac_fast.optimizer`.
"""
