"""Checkpoint format versions of ``KFAC`` and ``KFACPreconditioner`` state dicts (one place).

1: the first format; 2: a Cholesky-built inverse is stored without eigenbases; 3: step
rejection (ν, the pending held-out step); 4: curvature blocks of every kind (the inverse is a
``BlockInverse`` state, the factors hold ``F`` for small dense / diagonal blocks). Formats ≤ 3
(MLPs of nn.Linear) still load.
"""
from __future__ import annotations

STATE_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
