"""The eigendecomposition engine's Python face (Sec 8, task 5; Appendix B set-up)."""
from .eigh import EighResult, eigh

__all__ = ["EighResult", "eigh"]
