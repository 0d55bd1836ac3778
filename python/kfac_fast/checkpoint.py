"""Checkpoint format versions of ``KFAC`` and ``KFACPreconditioner`` state dicts (one place).

1: the first format; 2: a Cholesky-built inverse is stored without eigenbases; 3: step
rejection (ν, the pending held-out step).
"""
from __future__ import annotations

STATE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
