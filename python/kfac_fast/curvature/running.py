"""Running estimates of the Kronecker factors (paper Sec 5): ε-decayed averages, double-buffered.

The curvature side owns these tensors; the optimizer only asks for an update, a commit and
a snapshot for the inverse.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import ops
from .blocks import DENSE, DIAGONAL, KRONECKER, KRONECKER_DIAG_A, KRONECKER_GROUPED, CurvatureBlock
from .blocks.tied import TiedEmbeddingBlock, TiedHeadBlock
from .compute_dtype import operand_dtype, precision
from .diagonal_factors import accumulate_diagonal_, patch_square_sum, row_square_sum
from .factors import BlockFisher, KroneckerFactors, check_max_block_dim, diagonal_factor, factor_like, record_to_dict
from .statistics import BatchStatistics


#: the most patch entries a grouped convolution's factor update forms at once (a chunk of groups)
GROUPED_CHUNK = 1 << 24


class RunningFactors:
    """Exponentially decayed averages of every block's curvature (Sec 5), double-buffered.

    Per block (the blocks' order): a :class:`KroneckerFactors` (Ā dense (a, a), or a vector (a,)
    for a diagonal Ā; G (g, g) or a vector (g,); a grouped convolution's batched per-group
    factors Ā (groups, a, a), G (groups, g, g); with ``tridiagonal`` the cross factors
    Ā_{i-1,i}, G_{i,i+1} towards the next dense Kronecker block), or a :class:`BlockFisher` F
    (k, b, b) for the small dense / diagonal kinds.

    ``max_block_dim``: a Kronecker factor larger than this is kept as its diagonal (a vector,
    :mod:`.factors`); None keeps every Ā and G dense. The per-group factors of a grouped
    convolution are not bounded by it (:mod:`.blocks.grouped_conv_kronecker`). The Embedding's Ā is always diagonal. ``update`` writes into the spare buffers, ``commit`` makes them
    current, so a rejected step leaves the committed factors untouched (no lost state).

    Tridiagonal coupling (Sec 4.3) links consecutive dense Kronecker blocks that are adjacent
    in the block order and whose statistics have the same rows (the same positions per
    example); every other pair keeps zero cross factors, which makes the tridiagonal inverse
    block-diagonal there (zero cross-covariance: conditionally independent blocks).
    """

    def __init__(self, layers: Sequence[CurvatureBlock], *, dtype: torch.dtype, device, tridiagonal: bool,
                 compute_dtype=None, max_block_dim: Optional[int] = None):
        self.layers = list(layers)
        # the dtype the accumulation X̄ᵀX̄ reads its rows in (fp32 accumulation; .compute_dtype)
        self.compute_dtype = compute_dtype
        self.tridiagonal = tridiagonal
        self.dtype = dtype
        self.max_block_dim = check_max_block_dim(max_block_dim)
        has_g = (KRONECKER, KRONECKER_DIAG_A)
        # per block: whether its Ā / G is kept as a diagonal (vector)
        self.diag_a = [l.factor_kind == KRONECKER_DIAG_A or
                       (l.factor_kind == KRONECKER and diagonal_factor(l.a_dim, self.max_block_dim))
                       for l in self.layers]
        self.diag_g = [l.factor_kind in has_g and diagonal_factor(l.g_dim, self.max_block_dim) for l in self.layers]
        # dense Kronecker blocks (both factors dense): the chosen inverse kind, the tridiagonal links
        self.kron = [i for i, l in enumerate(self.layers)
                     if l.factor_kind == KRONECKER and not self.diag_a[i] and not self.diag_g[i]]
        # Ā from rows or the convolution kernel, dense or diagonal
        self.dense_a = [i for i, l in enumerate(self.layers) if l.factor_kind == KRONECKER and not self.diag_a[i]]
        self.bounded_a = [i for i, l in enumerate(self.layers) if l.factor_kind == KRONECKER and self.diag_a[i]]
        # one Kronecker product per group: batched (groups, a, a), (groups, g, g)
        self.grouped = [i for i, l in enumerate(self.layers) if l.factor_kind == KRONECKER_GROUPED]
        self.tied = tied_pairs(self.layers)
        # the chain of the tridiagonal inverse: the dense Kronecker blocks but a tied head (its
        # inverse is the Kronecker sum with its embedding, a block-diagonal entry)
        chain = [i for i in self.kron if i not in self.tied]
        # (i, j) consecutive in the chain; linked when adjacent in the block order
        self.links = [(i, j, j == i + 1) for i, j in zip(chain[:-1], chain[1:])]
        self._sets = [self._alloc(device), self._alloc(device)]
        self._cur = 0
        self.initialized = False

    def _alloc(self, device) -> list:
        out = []
        z = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=device)  # noqa: E731
        for l in self.layers:
            kind = l.factor_kind
            if kind in (KRONECKER, KRONECKER_DIAG_A):
                i = len(out)
                A = z(l.a_dim) if self.diag_a[i] else z(l.a_dim, l.a_dim)
                G = z(l.g_dim) if self.diag_g[i] else z(l.g_dim, l.g_dim)
                out.append(KroneckerFactors(A=A, G=G, name=l.name,
                                            homogeneous=kind == KRONECKER and l.factor_spec.homogeneous))
            elif kind == KRONECKER_GROUPED:
                G = l.groups
                out.append(KroneckerFactors(A=z(G, l.a_dim, l.a_dim), G=z(G, l.g_dim, l.g_dim), name=l.name,
                                            homogeneous=l.factor_spec.homogeneous))
            elif kind in (DENSE, DIAGONAL):
                out.append(BlockFisher(F=z(l.g_dim, l.a_dim, l.a_dim), name=l.name, kind=kind))
            else:
                raise NotImplementedError(f"layer {l.name}: factor kind {kind!r} has no running factors")
        for i, j in self.tied.items():
            if self.layers[i].factor_kind == KRONECKER:
                out[i].tied_partner = j
            else:
                out[i].tied_owner = j
        if self.tridiagonal:
            for i, j, _ in self.links:
                a, b = self.layers[i], self.layers[j]
                out[i].A_next = z(a.a_dim, b.a_dim)
                out[i].G_next = z(a.g_dim, b.g_dim)
        return out

    @property
    def current(self) -> list:
        return self._sets[self._cur]

    @property
    def pending(self) -> list:
        return self._sets[1 - self._cur]

    def tensors(self) -> list[torch.Tensor]:
        """Every factor tensor of both buffers (for memory accounting)."""
        return [t for fs in self._sets for f in fs for t in _record_tensors(f)]

    def update(self, stats: BatchStatistics, *, eps: float, backend: str,
               valid: Optional[torch.Tensor] = None) -> None:
        """pending ← eps·current + (1−eps)·(this batch's estimate), every block (Sec 5).

        Ā averages its rows; G, the small dense blocks and the diagonals divide by N =
        ``stats.n_terms`` (:mod:`.blocks.base`). All dense Ā updates are one grouped launch, all
        G updates another.

        ``valid`` (a 0-d bool device tensor; the sync-free step): where it is False the pending
        factors come out bitwise equal to the current ones (ε → 1, the statistics → 0, the
        homogeneous corner restored), so a step with non-finite statistics leaves no trace and
        needs no host read. N may then be a 0-d device tensor (masked loss terms)."""
        cur, pen = self.current, self.pending
        w = 1.0 - eps
        if valid is None:
            for c, p in zip(cur, pen):
                for tc, tp in zip(_record_tensors(c), _record_tensors(p)):
                    tp.copy_(tc)
        else:
            one = torch.ones((), dtype=self.dtype, device=valid.device)
            e_t = torch.where(valid, one * eps, one)
            for c, p in zip(cur, pen):
                for tc, tp in zip(_record_tensors(c), _record_tensors(p)):
                    torch.mul(tc, e_t, out=tp)  # the copy with ε folded in: no extra pass
            stats = _zeroed_unless(stats, valid)
            eps = 1.0  # already applied
        N = stats.n_terms
        if isinstance(N, torch.Tensor):  # masked terms: 1/N folded into the rows, no host read of N
            r = N.clamp_min(1).to(self.dtype).rsqrt()
            stats = BatchStatistics(a=stats.a, g=[None if t is None else t * r.to(t.dtype) for t in stats.g],
                                    u=[None if t is None else t * r.to(t.dtype) for t in stats.u], n_terms=1)
            N = 1
        N = max(int(N), 1)
        corners = self._homogeneous_corners(cur, stats) if valid is not None else []
        cd = operand_dtype(self.compute_dtype)
        if cd is not None:  # rows rounded once to the compute dtype (convolution inputs stay: their patches
            # are formed inside ops.conv_factor_update)
            imp = {i for i in self.dense_a + self.bounded_a if self.layers[i].implicit_a}
            rnd = lambda t: t if t is None or not t.is_floating_point() else t.to(cd)  # noqa: E731
            stats = BatchStatistics(a=[t if i in imp else rnd(t) for i, t in enumerate(stats.a)],
                                    g=[rnd(t) for t in stats.g], u=stats.u, n_terms=stats.n_terms)
        with precision(self.compute_dtype):
            self._accumulate(stats, eps=eps, w=w, N=N, backend=backend, valid=valid)
        for t, c in corners:  # an invalid step's homogeneous 1·1 term, undone exactly
            t.copy_(torch.where(valid, t, c))

    def _accumulate(self, stats: BatchStatistics, *, eps: float, w: float, N: int, backend: str, valid) -> None:
        """The EMA's accumulation into the pending buffers (their ε·current part is done)."""
        pen = self.pending
        implicit = [i for i in self.dense_a if self.layers[i].implicit_a]
        rows_a = [i for i in self.dense_a if i not in set(implicit)]
        hom = lambda k: self.layers[k].factor_spec.homogeneous  # noqa: E731
        if rows_a:
            ops.factor_update([pen[i].A for i in rows_a], [stats.a[i] for i in rows_a], eps=eps,
                              scale=[w / max(stats.a[i].shape[0], 1) for i in rows_a],
                              homogeneous=[hom(i) for i in rows_a], backend=backend)
        if implicit:  # convolutions: Ā from the inputs, no patch matrix (ops.conv_factor_update)
            geo = [self.layers[i].geometry() for i in implicit]
            ops.conv_factor_update([pen[i].A for i in implicit], [stats.a[i] for i in implicit], eps=eps,
                                   scale=[w / max(self._a_count(i, stats), 1) for i in implicit],
                                   homogeneous=[hom(i) for i in implicit],
                                   kernel_size=[g["kernel_size"] for g in geo], stride=[g["stride"] for g in geo],
                                   padding=[g["padding"] for g in geo], dilation=[g["dilation"] for g in geo],
                                   backend=backend)
        for i in self.bounded_a:  # diagonal Ā of a Kronecker block whose Ā exceeds max_block_dim
            l = self.layers[i]
            if l.implicit_a:
                geo = l.geometry()
                sq = patch_square_sum(l.batched(stats.a[i]), dtype=self.dtype, **geo)
            else:
                sq = row_square_sum(stats.a[i], self.dtype)
            accumulate_diagonal_(pen[i].A, sq, eps=eps, scale=w / max(self._a_count(i, stats), 1),
                                 homogeneous_weight=w if hom(i) else None)
        has_g = [i for i, l in enumerate(self.layers)
                 if l.factor_kind in (KRONECKER, KRONECKER_DIAG_A) and not self.diag_g[i]]
        if has_g:
            ops.factor_update([pen[i].G for i in has_g], [stats.g[i] for i in has_g], eps=eps, scale=w / N,
                              homogeneous=False, backend=backend)
        for i, d in enumerate(self.diag_g):
            if d:
                accumulate_diagonal_(pen[i].G, row_square_sum(stats.g[i], self.dtype), eps=eps, scale=w / N)
        for i, l in enumerate(self.layers):
            if l.factor_kind == KRONECKER_DIAG_A:
                tok = stats.a[i].reshape(-1)
                # index_add, not bincount: no data-dependent output size (bincount reads the max)
                counts = torch.zeros(l.a_dim, dtype=self.dtype, device=tok.device).index_add_(
                    0, tok, torch.ones(tok.shape, dtype=self.dtype, device=tok.device))
                if valid is not None:
                    counts = counts * valid
                if eps != 1.0:
                    pen[i].A.mul_(eps)
                pen[i].A.add_(counts, alpha=w / max(tok.numel(), 1))
            elif l.factor_kind == KRONECKER_GROUPED:
                self._accumulate_grouped(i, stats, eps=eps, w=w, N=N)
            elif l.factor_kind in (DENSE, DIAGONAL):
                u = stats.u[i].to(self.dtype)
                if eps != 1.0:
                    pen[i].F.mul_(eps)
                pen[i].F.add_(torch.einsum("nkb,nkc->kbc", u, u), alpha=w / N)
        if self.tridiagonal:
            live = [(i, j) for i, j, linked in self.links
                    if linked and self._a_count(i, stats) == self._a_count(j, stats)
                    and stats.g[i].shape[0] == stats.g[j].shape[0]]
            if live:
                ops.cross_factor_update([pen[i].A_next for i, _ in live], [self._a_rows(i, stats) for i, _ in live],
                                        [self._a_rows(j, stats) for _, j in live], eps=eps,
                                        scale=[w / max(self._a_count(i, stats), 1) for i, _ in live],
                                        homogeneous_x=[hom(i) for i, _ in live], homogeneous_y=[hom(j) for _, j in live],
                                        backend=backend)
                ops.cross_factor_update([pen[i].G_next for i, _ in live], [stats.g[i] for i, _ in live],
                                        [stats.g[j] for _, j in live], eps=eps, scale=w / N,
                                        homogeneous_x=[False] * len(live), homogeneous_y=[False] * len(live),
                                        backend=backend)

    def _accumulate_grouped(self, i: int, stats: BatchStatistics, *, eps: float, w: float, N: int) -> None:
        """Ā_j ← ε Ā_j + w·mean_rows ā_j ā_jᵀ and G_j ← ε G_j + (w/N) Σ_rows g_j g_jᵀ for every group
        j of a grouped convolution, as batched products; the patches are formed for a chunk of
        groups at a time (at most :data:`GROUPED_CHUNK` patch entries)."""
        l, f = self.layers[i], self.pending[i]
        x = stats.a[i]
        G, a0 = l.groups, l.group_in
        rows = l.a_row_count(x)
        scale = w / max(rows, 1)
        if eps != 1.0:
            f.A.mul_(eps)
            f.G.mul_(eps)
        step = max(1, GROUPED_CHUNK // max(rows * a0, 1))
        for j0 in range(0, G, step):
            j1 = min(G, j0 + step)
            X = l.a_rows(x, slice(j0, j1)).to(self.dtype)  # (rows, groups in the chunk, a0)
            A = f.A[j0:j1]
            A[:, :a0, :a0].add_(torch.einsum("rgi,rgj->gij", X, X), alpha=scale)
            if l.factor_spec.homogeneous:  # ā = [a; 1]: the mean a in the last row and column, 1 in the corner
                s = X.sum(0) * scale
                A[:, :a0, a0].add_(s)
                A[:, a0, :a0].add_(s)
                A[:, a0, a0].add_(w)
        g = stats.g[i].to(self.dtype)  # (rows, groups, g)
        f.G.add_(torch.einsum("rgi,rgj->gij", g, g), alpha=w / N)

    def _homogeneous_corners(self, cur: list, stats: BatchStatistics) -> list:
        """(pending corner view, current corner value) of every factor whose [-1, -1] entry the
        fused homogeneous coordinate feeds even when the rows are zeroed."""
        pen, out = self.pending, []
        for i in self.dense_a:
            if self.layers[i].factor_spec.homogeneous:
                out.append((pen[i].A[-1:, -1:], cur[i].A[-1:, -1:].clone()))
        for i in self.bounded_a:
            if self.layers[i].factor_spec.homogeneous:
                out.append((pen[i].A[-1:], cur[i].A[-1:].clone()))
        for i in self.grouped:
            if self.layers[i].factor_spec.homogeneous:
                out.append((pen[i].A[:, -1:, -1:], cur[i].A[:, -1:, -1:].clone()))
        if self.tridiagonal:
            for i, j, linked in self.links:
                if linked and self.layers[i].factor_spec.homogeneous and self.layers[j].factor_spec.homogeneous:
                    out.append((pen[i].A_next[-1:, -1:], cur[i].A_next[-1:, -1:].clone()))
        return out

    def _a_count(self, i: int, stats: BatchStatistics) -> int:
        l = self.layers[i]
        return l.a_row_count(stats.a[i]) if l.implicit_a else stats.a[i].shape[0]

    def _a_rows(self, i: int, stats: BatchStatistics) -> torch.Tensor:
        """The A rows of block i (formed from the input for an ``implicit_a`` block)."""
        l = self.layers[i]
        return l.a_rows(stats.a[i]) if l.implicit_a else stats.a[i]

    # ------------------------------------------------------------------ one flat buffer
    # (data-parallel K-FAC, :mod:`kfac_fast.distributed`): every factor of one buffer set as ONE
    # 1-D tensor of ``self.dtype``, the symmetric factors as their upper triangles only.
    def flat_tensors(self, which: str = "pending") -> tuple[list[torch.Tensor], list[bool]]:
        """The factor tensors of ``which`` (``"pending"`` or ``"current"``) in the flat buffer's
        order (blocks in order; per block A, G, A_next, G_next or F) and whether each is
        symmetric in its last two dimensions (dense Ā (a, a), G (g, g), the per-group factors
        (groups, a, a), (groups, g, g), the small dense blocks
        F (k, b, b) with b > 1; not a diagonal Ā (a,) or G (g,), the diagonal kind (k, 1, 1) or
        the cross factors Ā_{i-1,i}, G_{i,i+1}, which are rectangular)."""
        if which not in ("pending", "current"):
            raise ValueError(f"which must be 'pending' or 'current', got {which!r}")
        ts, sym = [], []
        for f in (self.pending if which == "pending" else self.current):
            if isinstance(f, BlockFisher):
                ts.append(f.F)
                sym.append(f.F.shape[-1] > 1)
                continue
            ts.append(f.A)
            sym.append(f.A.dim() >= 2)  # (n, n) or per group (groups, n, n)
            ts.append(f.G)
            sym.append(f.G.dim() >= 2)
            for t in (f.A_next, f.G_next):
                if t is not None:
                    ts.append(t)
                    sym.append(False)
        return ts, sym

    def flat_numel(self) -> int:
        """Length of :meth:`pack_flat`'s buffer: Σ n(n+1)/2 per symmetric n×n matrix, numel
        for the others."""
        ts, sym = self.flat_tensors()
        return packed_numel(ts, sym)

    def pack_flat(self, which: str = "pending", out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every factor of ``which`` as one 1-D buffer (upper triangles of the symmetric ones),
        shape (:meth:`flat_numel`,), dtype ``self.dtype``; written into ``out`` when given."""
        ts, sym = self.flat_tensors(which)
        return pack_tensors(ts, sym, out=out)

    def unpack_flat_(self, flat: torch.Tensor, which: str = "pending") -> None:
        """Write :meth:`pack_flat`'s buffer back into the factors of ``which``: the symmetric
        factors get the upper triangle in both triangles (exactly symmetric afterwards)."""
        ts, sym = self.flat_tensors(which)
        unpack_tensors_(flat, ts, sym)

    def commit(self) -> None:
        self._cur = 1 - self._cur
        self.initialized = True

    def state(self) -> dict:
        return {"factors": [record_to_dict(f) for f in self.current], "initialized": self.initialized}

    def load(self, state: dict) -> None:
        if len(state["factors"]) != len(self.current):
            raise ValueError(f"checkpoint has factors for {len(state['factors'])} blocks, this optimizer "
                             f"{len(self.current)}")
        for f, d in zip(self.current, state["factors"]):
            keys = ("F",) if isinstance(f, BlockFisher) else ("A", "G", "A_next", "G_next")
            for k in keys:
                t = getattr(f, k)
                cross = k in ("A_next", "G_next")
                if cross and self.max_block_dim is not None and (
                        (t is None) != (d.get(k) is None) or (t is not None and tuple(d[k].shape) != tuple(t.shape))):
                    # saved without the bound: a block it now makes diagonal was coupled to its neighbours;
                    # here it is a block-diagonal entry and the pair is unlinked (zero cross factors)
                    if t is not None:
                        t.zero_()
                    continue
                if t is None:
                    if d.get(k) is not None:
                        raise ValueError(f"checkpoint has {k} for layer {f.name} but this optimizer does not use it")
                    continue
                src = d.get(k)
                if src is not None:  # a dense factor saved without the max_block_dim bound: its diagonal
                    src = factor_like(src, t)
                if src is None or tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"checkpoint factor {k} of layer {f.name} has shape "
                                     f"{None if src is None else tuple(src.shape)}, expected {tuple(t.shape)}")
                t.copy_(src)
        self.initialized = bool(state["initialized"])


def _zeroed_unless(stats: BatchStatistics, valid: torch.Tensor) -> BatchStatistics:
    """The statistics with every floating tensor replaced by zeros where ``valid`` is False
    (``torch.where``: a NaN does not survive as 0·NaN would)."""
    def z(t):
        if t is None or not t.is_floating_point():
            return t
        return torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return BatchStatistics(a=[z(t) for t in stats.a], g=[z(t) for t in stats.g], u=[z(t) for t in stats.u],
                           n_terms=stats.n_terms)


_TRIU_CACHE: dict = {}


def _triu(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the upper triangle (diagonal included) of an n×n matrix, row
    by row (``torch.triu_indices`` order), cached per (n, device)."""
    key = (n, str(device))
    if key not in _TRIU_CACHE:
        rc = torch.triu_indices(n, n, device=device)
        _TRIU_CACHE[key] = (rc[0], rc[1])
    return _TRIU_CACHE[key]


def _packed_len(t: torch.Tensor, symmetric: bool) -> int:
    if not symmetric:
        return t.numel()
    if t.dim() < 2 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"a symmetric tensor must be (..., n, n), got shape {tuple(t.shape)}")
    n = t.shape[-1]
    return t.numel() // (n * n) * (n * (n + 1) // 2)


def packed_numel(tensors: Sequence[torch.Tensor], symmetric: Union[bool, Sequence[bool]] = False) -> int:
    """Length of :func:`pack_tensors`' buffer."""
    sym = [symmetric] * len(tensors) if isinstance(symmetric, bool) else list(symmetric)
    return sum(_packed_len(t, s) for t, s in zip(tensors, sym))


def pack_tensors(tensors: Sequence[torch.Tensor], symmetric: Union[bool, Sequence[bool]] = False, *,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tensors of one dtype and device as one 1-D buffer, in order: a tensor flagged symmetric
    ((..., n, n), symmetric in its last two dimensions) contributes only its upper triangles,
    (..., n(n+1)/2) row by row; any other tensor all its elements (row-major).

    Raises:
        ValueError: mixed dtypes or devices (pack each dtype separately), a symmetric flag on a
            tensor that is not (..., n, n), or ``out`` of the wrong length.
    """
    tensors = list(tensors)
    sym = [symmetric] * len(tensors) if isinstance(symmetric, bool) else list(symmetric)
    if len(sym) != len(tensors):
        raise ValueError(f"pack_tensors: {len(tensors)} tensors but {len(sym)} symmetric flags")
    if not tensors:
        return torch.empty(0) if out is None else out
    dtype, device = tensors[0].dtype, tensors[0].device
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            raise ValueError(f"pack_tensors: one dtype and device per buffer, got {dtype}/{device} and "
                             f"{t.dtype}/{t.device}; pack each dtype separately")
    total = packed_numel(tensors, sym)
    if out is None:
        out = torch.empty(total, dtype=dtype, device=device)
    elif out.dim() != 1 or out.numel() != total:
        raise ValueError(f"pack_tensors: out must be 1-D with {total} elements, got shape {tuple(out.shape)}")
    o = 0
    for t, s in zip(tensors, sym):
        k = _packed_len(t, s)
        if s:
            r, c = _triu(t.shape[-1], t.device)
            out[o:o + k].view(*t.shape[:-2], r.numel()).copy_(t[..., r, c])
        else:
            out[o:o + k].view(t.shape).copy_(t)
        o += k
    return out


def unpack_tensors_(flat: torch.Tensor, tensors: Sequence[torch.Tensor],
                    symmetric: Union[bool, Sequence[bool]] = False) -> None:
    """The inverse of :func:`pack_tensors`: write ``flat`` into ``tensors`` in place; a symmetric
    tensor gets its upper triangles mirrored into the lower ones."""
    tensors = list(tensors)
    sym = [symmetric] * len(tensors) if isinstance(symmetric, bool) else list(symmetric)
    total = packed_numel(tensors, sym)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"unpack_tensors_: expected a 1-D buffer of {total} elements, got shape {tuple(flat.shape)}")
    o = 0
    for t, s in zip(tensors, sym):
        k = _packed_len(t, s)
        v = flat[o:o + k]
        if s:
            r, c = _triu(t.shape[-1], t.device)
            v = v.view(*t.shape[:-2], r.numel()).to(t.dtype)
            t[..., r, c] = v
            t[..., c, r] = v
        else:
            t.copy_(v.view(t.shape))
        o += k


def _record_tensors(f) -> list[torch.Tensor]:
    if isinstance(f, BlockFisher):
        return [f.F]
    return [t for t in (f.A, f.G, f.A_next, f.G_next) if t is not None]


def snapshot(factors: Sequence, dtype: Optional[torch.dtype] = None) -> list:
    """Independent copies, optionally cast (the inverse must not alias the double-buffered factors)."""
    def cp(t):
        return None if t is None else t.to(dtype=dtype or t.dtype, copy=True)

    return [BlockFisher(F=cp(f.F), name=f.name, kind=f.kind) if isinstance(f, BlockFisher) else
            KroneckerFactors(A=cp(f.A), G=cp(f.G), A_next=cp(f.A_next), G_next=cp(f.G_next),
                             name=f.name, homogeneous=f.homogeneous, tied_partner=f.tied_partner,
                             tied_owner=f.tied_owner) for f in factors]


def tied_pairs(layers: Sequence[CurvatureBlock]) -> dict[int, int]:
    """Index -> index of the other block of its tied pair (:mod:`.blocks.tied`), both ways.

    Raises:
        ValueError: one block of a tied pair is in ``layers`` without the other.
    """
    pos = {id(l): i for i, l in enumerate(layers)}
    out = {}
    for i, l in enumerate(layers):
        other = getattr(l, "partner", None) or getattr(l, "owner", None)
        if isinstance(l, (TiedHeadBlock, TiedEmbeddingBlock)):
            if id(other) not in pos:
                raise ValueError(f"layer {l.name} is one of a tied pair (its weight is shared with {other.name}) "
                                 f"but {other.name} is not among the layers; pass both blocks (find_blocks gives both)")
            out[i] = pos[id(other)]
    return out


def ema_decay(k: int, ema_max: float) -> float:
    """ε = min(1 − 1/k, ema_max) (Sec 5)."""
    return min(1.0 - 1.0 / k, ema_max)
