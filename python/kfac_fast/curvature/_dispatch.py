"""Calls from the curvature blocks into the kernel families (kfac_fast.ops).

Kept in one place so the curvature code reads like the paper: every heavy product goes
through one of these entry points, each taking lists over layers and ``backend``.
"""
from __future__ import annotations

from ..ops import (cross_factor_update, eigen_precondition, factor_update, rank_m_is_cheaper,  # noqa: F401
                   rank_m_precondition, sandwich)
