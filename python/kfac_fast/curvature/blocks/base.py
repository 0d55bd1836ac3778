"""The curvature-block interface: what K-FAC needs to know about one layer type.

A block wraps one module (today: one layer i of the paper) and says
  * which parameters it owns and how they map to the paper's matrix W_i (``to_matrix`` /
    ``from_matrix``; gradients and updates travel between the optimizer and the inverses in
    this layout);
  * its factor spec (kind and sizes of Ā and G, Sec 3);
  * how the inputs captured in the forward pass and the output derivatives g_i = ∂L/∂s_i
    become factor **rows** (Ā = E[ā āᵀ] from ``a_rows``, G = E[g gᵀ] from ``g_rows``). Rows,
    not per-block updates, so the factor updates of all blocks stay one grouped launch;
  (the linearized forward of Appendix C needs nothing from a block: it runs the model with
  dual parameters, :mod:`kfac_fast.quadratic`).

Rows and scaling (the convention every block follows, for any shape of the module's input):
**Ā is the mean over its rows of ā āᵀ** and **G is (1/N) Σ over its rows of g gᵀ**, N the number
of loss terms the objective averages (the examples for (m, k) outputs, the non-ignored tokens
of a sequence model) and g the derivative of the SUM of the loss terms. For an (m, d) input both
have m rows (the paper's E[ā āᵀ], E[g gᵀ]); with R positions per example (a sequence, the output
locations of a convolution) KFAC-expand takes all m·R rows and KFAC-reduce one row per example,
the mean ā and the summed g (Eschenhagen et al. 2023).

Blocks that are not Kronecker products (kinds ``dense``/``diagonal``: norm scale-and-shift, any
other parameter) give per-example vectors u_n instead (``per_example``), with F = (1/N) Σ_n u_n u_nᵀ
per small dense block.

One subclass per layer type lives beside this file; :mod:`.registry` maps module types to them.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

# Factor kinds (Sec 3; kfac-jax names the same families): a Kronecker product Ā ⊗ G of dense
# factors; the same with a diagonal Ā; one Kronecker product per group (a grouped convolution:
# Ā_j ⊗ G_j, factors stored batched (groups, a, a) and (groups, g, g)); a diagonal; one small
# dense block.
KRONECKER = "kronecker"
KRONECKER_DIAG_A = "kronecker_diag_a"
KRONECKER_GROUPED = "kronecker_grouped"
DIAGONAL = "diagonal"
DENSE = "dense"
FACTOR_KINDS = (KRONECKER, KRONECKER_DIAG_A, KRONECKER_GROUPED, DIAGONAL, DENSE)
KFAC_APPROX = ("expand", "reduce")


def check_kfac_approx(kfac_approx: str) -> str:
    if kfac_approx not in KFAC_APPROX:
        raise ValueError(f"unknown kfac_approx {kfac_approx!r}; choose one of {', '.join(KFAC_APPROX)}")
    return kfac_approx


@dataclass(frozen=True)
class FactorSpec:
    """Kind and sizes of a block's factors.

    ``a_dim``: size of Ā (with the homogeneous coordinate when ``homogeneous``); ``g_dim``: size
    of G; ``homogeneous``: the A rows get a trailing 1 (ā = [a; 1], Sec 2.1) when the factor is
    formed (the kernels append it, so ``a_rows`` returns the rows without it). For the kinds
    ``dense``/``diagonal`` the block matrix is (g_dim, a_dim) = (k, b): k small dense blocks of
    size b (b = 1: a diagonal). For ``kronecker_grouped`` a_dim and g_dim are ONE group's
    factor sizes (the block has ``groups`` of them) and the block matrix is (groups·g_dim, a_dim).
    """

    kind: str
    a_dim: int
    g_dim: int
    homogeneous: bool


def frozen_bias(module: nn.Module) -> str | None:
    """The refusal of a layer whose bias is frozen beside a trainable weight."""
    b = getattr(module, "bias", None)
    if b is not None and not b.requires_grad:
        return "a frozen bias beside a trainable weight (the block models weight and bias together)"
    return None


class CurvatureBlock(abc.ABC):
    """One layer as K-FAC sees it. Subclasses set ``factor_kind`` and implement the abstract
    methods; :func:`kfac_fast.register_block` makes K-FAC use them for a module type."""

    factor_kind: ClassVar[str] = KRONECKER
    #: whether the block needs its module's input and output from the forward pass (hooks)
    captures: ClassVar[bool] = True
    #: whether Ā is formed from the module's input by the block's own kernel (a convolution:
    #: no patch matrix) rather than from ``a_rows``; such a block has ``geometry`` and ``a_row_count``
    implicit_a: bool = False

    def __init__(self, name: str, module: nn.Module, *, kfac_approx: str = "expand"):
        self.name = name
        self.module = module
        self.kfac_approx = check_kfac_approx(kfac_approx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, module={self.module!r})"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether K-FAC tracks this module (False: it is skipped, e.g. its weight is frozen; any
        parameter it still trains then follows the ``unsupported`` policy)."""
        return True

    @classmethod
    def create(cls, name: str, module: nn.Module, *, kfac_approx: str = "expand") -> list["CurvatureBlock"]:
        """The blocks modelling ``module`` at path ``name`` (default: one block of this class; a
        module with several weight matrices, such as attention, gives one block each)."""
        return [cls(name, module, kfac_approx=kfac_approx)]

    @classmethod
    def covers(cls, module: nn.Module) -> list[nn.Module]:
        """Sub-modules the blocks of ``module`` model (they get no block of their own)."""
        return []

    def register_capture(self, record: Callable[[Any, Any], None]):
        """Arm a forward hook on the module that calls ``record(input, output)`` on each call:
        ``input`` what ``a_input`` / ``per_example`` / ``output_rows`` read (default: the module's
        first argument, detached), ``output`` the tensor whose derivative ``g`` is (default: the
        module's output). Returns the hook handle."""
        def hook(module, args, out):
            record(args[0].detach(), out)

        return self.module.register_forward_hook(hook)

    @classmethod
    def specialise(cls, module: nn.Module) -> type:
        """The block class for this configuration of the module type (default: ``cls``; a
        grouped convolution returns its per-group block)."""
        return cls

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        """Why this block cannot model ``module`` (e.g. a grouped convolution), or None. A refused
        module is treated as unsupported (``unsupported=`` decides: diagonal, skip or error)."""
        return None

    # ---------------------------------------------------------------- parameters
    @abc.abstractmethod
    def params(self) -> list[nn.Parameter]:
        """The parameters this block owns, in the order ``to_matrix`` takes them."""

    @abc.abstractmethod
    def to_matrix(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Parameter-shaped tensors (one per ``params()`` entry, in order) -> the block matrix
        of shape (g_dim, a_dim) (W_i of Sec 2.1)."""

    @abc.abstractmethod
    def from_matrix(self, M: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of ``to_matrix``: (g_dim, a_dim) -> tensors shaped like ``params()``."""

    def grad_matrix(self) -> torch.Tensor:
        grads = [p.grad for p in self.params()]
        if any(g is None for g in grads):
            raise RuntimeError(f"layer {self.name} has no .grad; call loss.backward() before preconditioning")
        return self.to_matrix(*grads)

    def param_matrix(self) -> torch.Tensor:
        return self.to_matrix(*self.params())

    # ---------------------------------------------------------------- factors
    @property
    @abc.abstractmethod
    def factor_spec(self) -> FactorSpec:
        """Kind and sizes of Ā and G."""

    @property
    def a_dim(self) -> int:
        return self.factor_spec.a_dim

    @property
    def g_dim(self) -> int:
        return self.factor_spec.g_dim

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The module's captured input -> rows (rows, a_dim − homogeneous) whose mean outer
        product is Ā (Kronecker kinds)."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.factor_kind!r} block: it has no A rows")

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the running factors keep of the captured input for Ā: ``a_rows(x)``, or the input
        itself for an ``implicit_a`` block."""
        return self.a_rows(x)

    def g_rows(self, g: torch.Tensor) -> torch.Tensor:
        """∂(Σ loss terms)/∂(module output) -> rows (rows, g_dim); G = (1/N) Σ rows rowsᵀ."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.factor_kind!r} block: it has no G rows")

    def output_rows(self, x: Any, g: torch.Tensor) -> torch.Tensor:
        """The G rows from the captured input ``x`` and ∂(Σ loss terms)/∂output ``g`` (default:
        ``g_rows(g)``; a block whose output derivative is not its module's, e.g. the attention
        in-projection, derives it from both)."""
        return self.g_rows(g)

    def per_example(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Kinds ``dense``/``diagonal``: per-example parameter derivatives u_n arranged as
        (m, k, b) (F = (1/N) Σ_n u_n u_nᵀ per small block) from the captured input and ∂/∂output."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.factor_kind!r} block: no per-example rows")


def output_positions(x: torch.Tensor, geometry: dict) -> int:
    """R = H_out·W_out, the output positions of a convolution with ``geometry`` (kernel_size,
    stride, padding, dilation as pairs) on x (m, C, H, W)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (geometry["kernel_size"], geometry["stride"], geometry["padding"],
                                              geometry["dilation"])
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return ho * wo
