"""The verifier's own competitor bound for witnesses that are multiples of their token's row, from ONE
symmetric Gram (issue 7: verification at a fraction of the scan's cost, still independent).

The screens' witnesses are self-directions: ``x_t = σ_t B_t + r_t`` with a residual ``r_t`` of a few ulps
(the move into the domain), where ``B_j`` is row j as the verifier certifies it — ``B = A = rows − c``,
or for layernorm ``B = P A`` (then ``A_j·P x = B_j·x`` exactly). Every competitor's logit at such a point
is ``σ_t B_j·B_t + B_j·r_t + b_j``, so the competitor bounds of all these witnesses come from one Gram of
``B``: a float32 tile pass over block pairs ``I <= J`` serves the witnesses of ``I`` against the rows of
``J`` and those of ``J`` against the rows of ``I`` — half the products of a pass per witness. Per witness
it keeps the ``TOP_K`` best fast values.

Everything here is the verifier's: ``B``, its float32 copy and every bound are computed from the folded
rows (``Verifier.A``), nothing from the screens. The top-K fold is written again on purpose rather than
shared with ``kernels.sym_screen``: a fault there must not carry over into the check of its results.

The bound ``E_t`` (float64, rounded up generously) covers, for every j at once: the float32 dot product
(Higham, any order, both input roundings), the difference between the float64 ``B`` and the exact rows
(one rounding in ``rows − c``, the row sums of the projection), the float32 rounding of ``σ_t`` and ``b_j``
and the two roundings of the epilogue, flushed subnormals, and ``||B_j|| ||r_t||`` for the residual. So
``|fast_jt − l_j(z_t)| <= E_t`` and a row more than ``2 E_t`` below the column's best fast value is below
that row's exact logit: neither the runner-up nor a threat. The caller rescores the rest in float64. A
column whose K-th kept value is still within ``2 E_t`` of its best (the candidates may extend past the K
kept), or any input out of the range where the bound holds, goes back to the per-batch check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from unspeakable.engine.domain import ETA, U, gamma
from unspeakable.kernels import torch_threads

TOP_K = 4
SYM_MIN = 1024  # fewer multiples than this: the per-batch pass costs about as much
RESIDUAL_REL = 2.0**-20  # x_t counts as a multiple of B_t when ||r_t|| <= this × ||x_t||
U32 = 2.0**-24
TINY32 = 2.0**-126  # the absolute error of one flushed float32 subnormal
RANGE = 2.0**100  # float32 values must stay below this for the bound (float32 max ~ 2^128)


def dot_error32(d: int) -> float:
    """Relative bound: ``|fl32(a32·x32) − a·x| <= this × ||a|| ||x||`` for float64 a, x rounded to float32 and
    a float32 dot product in any order (Higham 3.1 with both input roundings), doubled for safety."""
    g = (d + 2) * U32 / (1.0 - (d + 2) * U32)
    return 2.0 * (2 * U32 * (1 + U32) + g * (1 + U32) ** 2)


@dataclass
class SelfPairs:
    """Competitor candidates of the witnesses that took the symmetric pass.

    ``col[i]``: the witness's column in ``J_of`` (-1: not here, check it per batch); ``J_of[c]``: its
    candidate competitor ids (original ids); ``sigma`` / ``rn``: the split ``x = σ B_t + r`` the bound was
    made for (a point checked later must split the same way, see :meth:`holds_for`)."""

    col: np.ndarray
    J_of: list
    sigma: np.ndarray
    rn: np.ndarray

    def holds_for(self, A, centred: bool, ids: np.ndarray, X: np.ndarray, c0: int) -> np.ndarray:
        """Per point: was the bound made for this very point? (The points are asked for twice; a caller's
        ``points`` that answered differently gets the per-batch check, not a bound made for another point.)"""
        _, dl, B64t = _bounds64(A[ids], centred)
        s, r, _ = _split(B64t, X, dl)
        return (s == self.sigma[c0: c0 + ids.size]) & (r <= self.rn[c0: c0 + ids.size])


def certified_rows(a: np.ndarray, centred: bool) -> np.ndarray:
    """float64 ``B`` of rows ``a`` of A (a new array): ``a`` itself, or ``a − (sum(a_j) / d) 1`` for layernorm."""
    return a - (a.sum(axis=1) / a.shape[1])[:, None] if centred else np.array(a, dtype=np.float64)


def _bounds64(a: np.ndarray, centred: bool):
    """For rows ``a`` of A: ``nB >= ||B_ex||``, ``delta >= ||B64 − B_ex||`` (B_ex: the exact rows the verifier
    certifies, from the exact ``rows − c``) and the float64 ``B64``."""
    d = a.shape[1]
    b = certified_rows(a, centred)
    na, nb = (np.linalg.norm(m, axis=1) * (1 + gamma(d + 2)) + d * ETA for m in (a, b))
    dl = U * na  # one rounding in rows − c
    if centred:
        s = np.abs(a.sum(axis=1))
        s_err = gamma(d) * np.abs(a).sum(axis=1) + d * ETA
        dl = dl + U * nb + (s_err + 2 * U * s) / math.sqrt(d) + d * ETA
    return (nb + dl) * (1 + 8 * U), dl * (1 + 8 * U), b


def _row_bounds(A: np.ndarray, centred: bool, perm: np.ndarray, chunk: int = 8192):
    """:func:`_bounds64` of all rows in the order ``perm``, with the float32 copy of B (built in that order:
    no second V × d copy)."""
    V, d = A.shape
    nB, delta = np.empty(V), np.empty(V)
    B32 = torch.empty((V, d), dtype=torch.float32)
    for r0 in range(0, V, chunk):
        nB[r0: r0 + chunk], delta[r0: r0 + chunk], b = _bounds64(A[perm[r0: r0 + chunk]], centred)
        with np.errstate(over="ignore"):
            B32[r0: r0 + chunk] = torch.from_numpy(b.astype(np.float32))
    return nB, delta, B32


def _split(B64t: np.ndarray, X: np.ndarray, delta_t: np.ndarray):
    """``x = σ B_t + r``: σ by least squares, and a rigorous bound on ``||r||`` against the exact ``B_t``."""
    d = X.shape[1]
    with np.errstate(all="ignore"):
        sigma = np.einsum("ij,ij->i", B64t, X) / np.einsum("ij,ij->i", B64t, B64t)
        r = X - sigma[:, None] * B64t
        nr = np.linalg.norm(r, axis=1) * (1 + gamma(d + 2)) + d * ETA
        nb = np.linalg.norm(B64t, axis=1) * (1 + gamma(d + 2)) + d * ETA
        rn = (nr + 2 * U * (np.abs(sigma) * nb + nr) + np.abs(sigma) * delta_t + 2 * d * ETA) * (1 + 8 * U)
        xn = np.linalg.norm(X, axis=1)
    return sigma, rn, xn


def _column_bound(sigma, rn, nB_t, delta_t, Bm, dm, bm, d) -> np.ndarray:
    """``E_t`` (module docstring), float64, for every competitor j at once."""
    e32 = dot_error32(d)
    s = np.abs(sigma)
    g_abs = (Bm * nB_t * (1 + e32) + dm * nB_t + Bm * delta_t) * (1 + 4 * U)  # >= |G32_jt|
    err_g = e32 * Bm * nB_t + dm * nB_t + Bm * delta_t + TINY32 * (d + math.sqrt(d) * (Bm + nB_t))
    err_v = s * err_g + U32 * s * g_abs + U32 * bm
    err_v += 2 * U32 * (1 + U32) ** 2 * (s * (1 + U32) * g_abs + bm * (1 + U32)) + 4 * TINY32
    return (err_v + Bm * rn) * (1 + 2.0**-20) + 2.0**-140


def _fold(T: torch.Tensor, dim: int, vals: torch.Tensor, idx: torch.Tensor, t0: int, c0: int) -> None:
    """Merge tile ``T``'s candidates into the running top-K. dim=1: targets are T's rows (positions
    ``t0 + i``), candidates its columns (``c0 + j``); dim=0: the transpose."""
    m = T.amax(dim=dim)
    hit = (~(m <= vals[t0: t0 + m.shape[0], -1])).nonzero().squeeze(1)
    if hit.numel() == 0:
        return
    cv, ci = torch.topk(T.index_select(1 - dim, hit), min(vals.shape[1], T.shape[dim]), dim=dim)
    if dim == 0:
        cv, ci = cv.T, ci.T
    ci = torch.where(cv == -math.inf, -1, ci + c0)
    rows = hit + t0
    tv, tj = torch.topk(torch.cat([vals[rows], cv], 1), vals.shape[1], dim=1)
    vals[rows] = tv
    idx[rows] = torch.cat([idx[rows], ci], 1).gather(1, tj)


def _fast_pass(B32, s32, b32, ns: int, block: int = 1024):
    """Top-K fast values ``σ_t B_j·B_t + b_j`` over ``j != t`` for the first ``ns`` rows (the witnesses),
    each tile ``B_I B_J^T`` computed once for both directions. Positions are those of ``B32``."""
    V = B32.shape[0]
    vals = torch.full((ns, TOP_K), -math.inf, dtype=torch.float32)
    idx = torch.full((ns, TOP_K), -1, dtype=torch.int64)
    buf, wbuf = torch.empty(block * block), torch.empty(block * block)
    gemm_threads = torch.get_num_threads()
    with torch_threads(1):
        for r0 in range(0, ns, block):
            r1 = min(ns, r0 + block)
            for c0 in range(r0, V, block):
                c1 = min(V, c0 + block)
                S = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                with torch_threads(gemm_threads):
                    torch.mm(B32[r0:r1], B32[c0:c1].T, out=S)
                T = torch.addcmul(b32[None, c0:c1], S, s32[r0:r1, None], out=wbuf[: S.numel()].view(S.shape))
                if c0 == r0:
                    T.fill_diagonal_(-math.inf)  # the token itself is no competitor
                _fold(T, 1, vals, idx, r0, c0)
                cw = min(c1, ns) - c0
                if c0 != r0 and cw > 0:  # the witnesses of this column block against the rows r0:r1
                    T = torch.addcmul(b32[r0:r1, None], S[:, :cw], s32[None, c0: c0 + cw],
                                      out=wbuf[: (r1 - r0) * cw].view(r1 - r0, cw))
                    _fold(T, 0, vals, idx, c0, r0)
    return vals, idx


def self_pairs(A, bias, centred: bool, tokens: np.ndarray, points, chunk: int = 4096,
               fold_extra=None) -> SelfPairs | None:
    """Candidates for the witnesses ``points(tokens[c0:c1])`` that are multiples of their rows (module
    docstring); None when fewer than ``SYM_MIN`` are, or the inputs are out of the bound's range.
    ``fold_extra(xn)``: what the rounded rows and bias miss of the exact logits at points of norm ``xn`` (the
    fold's residual, ``Verifier._fold_extra``), added to every ``E_t``."""
    if torch.get_float32_matmul_precision() != "highest":
        return None  # float32 GEMMs may then run in reduced precision: the bound assumes IEEE float32
    V, d = A.shape
    sig, rn, xns = np.zeros(tokens.size), np.full(tokens.size, np.inf), np.zeros(tokens.size)
    for c0 in range(0, tokens.size, chunk):
        ids = tokens[c0: c0 + chunk]
        _, dl, B64t = _bounds64(A[ids], centred)
        s, r, xn = _split(B64t, np.asarray(points(ids), dtype=np.float64), dl)
        usable = np.isfinite(s) & (np.abs(s) >= 2.0**-100) & (np.abs(s) <= 2.0**100) & (r <= RESIDUAL_REL * xn)
        sig[c0: c0 + chunk], rn[c0: c0 + chunk] = np.where(usable, s, 0.0), np.where(usable, r, np.inf)
        xns[c0: c0 + chunk] = xn
    sel = np.nonzero(np.isfinite(rn))[0]
    if sel.size < SYM_MIN:
        return None
    perm = np.concatenate([tokens[sel], np.setdiff1d(np.arange(V), tokens[sel])])
    nB, delta, B32 = _row_bounds(A, centred, perm)  # position k holds row perm[k]
    Bm, dm, bm = float(nB.max(initial=0.0)), float(delta.max(initial=0.0)), float(np.abs(bias).max(initial=0.0))
    if not (Bm <= 2.0**50 and bm <= RANGE and np.abs(sig).max() * Bm * Bm <= RANGE):
        return None
    E = _column_bound(sig[sel], rn[sel], nB[: sel.size], delta[: sel.size], Bm, dm, bm, d)
    if fold_extra is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            E = E + fold_extra(xns[sel] * (1 + gamma(d + 2)) + d * ETA)
    vals, idx = _fast_pass(B32, torch.from_numpy(sig[sel]).float(), torch.from_numpy(bias[perm]).float(), sel.size)
    del B32
    return _candidates(vals, idx, E, perm, sel, sig, rn)


def _candidates(vals, idx, E, perm, sel, sig, rn) -> SelfPairs:
    """Per witness, the kept competitors within ``2 E_t`` of its best; columns whose set may extend past
    the K kept (or with a non-finite best) are left to the per-batch check."""
    v = vals.double().numpy()
    thr = v[:, 0] - 2 * E
    keep = v >= thr[:, None]
    good = np.isfinite(v[:, 0]) & np.isfinite(thr) & ~keep[:, -1]
    col = np.full(sig.size, -1, dtype=np.int64)
    J_of = []
    ix = idx.numpy()
    for k in np.nonzero(good)[0]:
        col[sel[k]] = len(J_of)
        J_of.append(perm[ix[k][keep[k]]])
    return SelfPairs(col, J_of, sig, rn)
