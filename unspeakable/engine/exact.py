"""Exact rational arithmetic (python-flint) for the proofs float64 allowances cannot settle.

Every float64 is a dyadic rational, so a matrix of floats scaled by one power of two is a matrix of
integers: :func:`to_integers`. On integers, flint's ``fmpz_mat`` computes ranks and null spaces exactly.

:func:`gordan` proves that ``u_t`` lies in the convex hull of the rows ``u_j, j in S`` (modulo the span of
the domain's null directions F): it finds an exact rational ``w > 0`` on S with
``Σ w_j (u_j − u_t) ∈ span(F)``, the Gordan certificate the verifier needs when the rows of S are
degenerate (an edge midpoint, rows that do not span, a row equal to another after the layernorm
projection) and the float64 verified solve cannot separate the smallest weight from rounding.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

# Exact elimination costs grow fast with size: beyond this many matrix entries the check is not tried.
MAX_ENTRIES = 60_000


def to_integers(M: np.ndarray) -> tuple[list[list[int]], int]:
    """``(N, k)`` with ``M = N · 2**-k`` exactly (``N`` nested lists of Python ints)."""
    M = np.asarray(M, dtype=np.float64)
    mant, exp = np.frexp(M)  # M = mant · 2**exp, |mant| in [0.5, 1) or 0
    ints = (mant * 2.0**53).astype(np.int64)  # exact: 53-bit mantissas
    e = exp.astype(np.int64) - 53
    nz = ints != 0
    k = int(-e[nz].min()) if np.any(nz) else 0
    shift = e + k  # >= 0 where nonzero
    rows = []
    for r in range(M.shape[0]):
        rows.append([int(ints[r, c]) << int(shift[r, c]) if nz[r, c] else 0 for c in range(M.shape[1])])
    return rows, k


def gordan(rows: np.ndarray, t: int, support: np.ndarray, lam: np.ndarray, F: np.ndarray) -> bool:
    """True iff an exact rational ``w > 0`` on ``support`` has ``Σ w_j (rows_j − rows_t) ∈ span(F)``,
    found near the float weights ``lam``. False means no proof (not a disproof)."""
    import flint

    support = np.asarray(support, dtype=np.int64)
    keep = np.nonzero(np.ptp(np.vstack([rows[support], rows[t][None]]), axis=0) != 0)[0]
    if keep.size == 0:
        return support.size > 0  # every u_j equals u_t on every coordinate: any w > 0 works
    m = support.size + F.shape[1]
    if keep.size * (m + 1) > MAX_ENTRIES:
        return False
    sub = np.vstack([rows[support][:, keep], rows[t][keep][None]])
    ints, _ = to_integers(np.concatenate([sub, F[keep].T], axis=0))
    u_t = ints[support.size]
    cols = [[a - b for a, b in zip(ints[i], u_t)] for i in range(support.size)]
    Fi = ints[support.size + 1:]  # F's columns, on the same integer scale (any scale spans the same)
    N = flint.fmpz_mat([[c[r] for c in cols + Fi] for r in range(keep.size)])
    X, nullity = N.nullspace()
    if nullity == 0:
        return False
    basis = np.array([[float(X[i, j]) for j in range(nullity)] for i in range(m)])
    w_float = basis[: support.size]
    scale = np.max(np.abs(w_float), axis=0)
    scale[scale == 0] = 1.0
    coef, *_ = np.linalg.lstsq(w_float / scale, np.asarray(lam, dtype=np.float64), rcond=None)
    c = [Fraction(float(coef[j] / scale[j])) for j in range(nullity)]
    w = [sum((Fraction(int(X[i, j])) * c[j] for j in range(nullity)), Fraction(0)) for i in range(support.size)]
    return all(x > 0 for x in w) or all(x < 0 for x in w)


def differ_by(a: np.ndarray, b: np.ndarray, F: np.ndarray) -> bool:
    """True iff ``a − b`` lies in the span of F's columns, exactly. F is empty (then: a == b by value) or
    one constant column (layernorm's all-ones: then all entries of a − b are equal)."""
    if F.shape[1] == 0:
        return bool(np.array_equal(a, b))
    if F.shape[1] != 1 or np.ptp(F[:, 0]) != 0 or F[0, 0] == 0:
        return False  # no other null directions occur
    diff = {Fraction(float(x)) - Fraction(float(y)) for x, y in zip(a, b)}
    return len(diff) == 1
