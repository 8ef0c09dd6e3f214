"""Exact rational arithmetic (python-flint, fractions) for the proofs float64 allowances cannot settle.

Every float64 is a dyadic rational, so the head as given — its weights, gain and biases, not their rounded
fold — is exactly a matrix of rationals (issue 18): :func:`problem_rows` / :func:`problem_bias` give a
problem's rows and biases so, in its internal units. On integers (one common scale), flint's ``fmpz_mat``
computes null spaces exactly.

:func:`null_weights` proves that ``ũ_t`` lies in the convex hull of the rows ``ũ_j, j in S`` (modulo the span of
the domain's null directions F): an exact rational ``w >= 0`` on S with ``Σ w_j (ũ_j − ũ_t) ∈ span(F)``, the
Gordan certificate of an edge point, rows that do not span, a row equal to another after the layernorm
projection, where the float64 verified solve cannot separate the smallest weight from rounding. It works on
the certificate's support (the LP's active set first, more of its rows only if needed), never on all V.
:func:`combination` and :func:`deficit_sign` give the exact deficit of given weights.
"""
from __future__ import annotations

import math
import time
from fractions import Fraction

import numpy as np

# Exact elimination costs grow fast with size: beyond this many matrix entries the check is not tried.
MAX_ENTRIES = 60_000


def differ_by(a: np.ndarray, b: np.ndarray, F: np.ndarray) -> bool:
    """True iff ``a − b`` lies in the span of F's columns, exactly. F is empty (then: a == b by value) or
    one constant column (layernorm's all-ones: then all entries of a − b are equal)."""
    if F.shape[1] == 0:
        return bool(np.array_equal(a, b))
    if F.shape[1] != 1 or np.ptp(F[:, 0]) != 0 or F[0, 0] == 0:
        return False  # no other null directions occur
    diff = {Fraction(float(x)) - Fraction(float(y)) for x, y in zip(a, b)}
    return len(diff) == 1


# ------------------------------------------------------------------------------------------ the head as given
def problem_rows(problem, ids) -> list[list[Fraction]]:
    """Rows ``ids`` of the head as given, exactly, in the problem's internal units: ``γ_i u_ji 2**row_exp``
    from the head's own numbers when the problem was folded from one, else the problem's rows (+ rows_lo)."""
    ids = [int(j) for j in np.atleast_1d(ids)]
    head = problem.exact_source
    if head is None or (head.ln_w is None and problem.row_exp == 0):
        lo = problem.rows_lo
        return [[Fraction(float(a)) + (Fraction(float(lo[j, i])) if lo is not None else 0)
                 for i, a in enumerate(problem.rows[j])] for j in ids]
    W = np.asarray(head.W_U)
    g = None if head.ln_w is None else [Fraction(float(v)) for v in np.asarray(head.ln_w)]
    s = Fraction(2) ** problem.row_exp
    out = []
    for j in ids:
        u = [Fraction(float(v)) for v in np.asarray(W[:, j], dtype=np.float64)]
        out.append([(a if g is None else a * g[i]) * s for i, a in enumerate(u)])
    return out


def problem_bias(problem, ids) -> list[Fraction]:
    """Biases ``ids`` of the head as given, exactly, in internal units (``(u_j·β + b_j) 2**bias_exp``; 0
    where the problem has no bias)."""
    ids = [int(j) for j in np.atleast_1d(ids)]
    head = problem.exact_source
    if head is None or head.ln_b is None or not problem.bias_used or not problem.domain.bounded:
        lo = problem.bias_lo
        return [Fraction(float(problem.bias[j])) + (Fraction(float(lo[j])) if lo is not None else 0) for j in ids]
    W = np.asarray(head.W_U)
    beta = [Fraction(float(v)) for v in np.asarray(head.ln_b)]
    s = Fraction(2) ** problem.bias_exp
    out = []
    for j in ids:
        b = Fraction(0) if head.b_U is None else Fraction(float(np.asarray(head.b_U)[j]))
        u = np.asarray(W[:, j], dtype=np.float64)
        out.append((b + sum((Fraction(float(v)) * beta[i] for i, v in enumerate(u) if v != 0), Fraction(0))) * s)
    return out


# ------------------------------------------------------------------------------------------ exact certificates
def _common_ints(vectors: list[list[Fraction]]) -> list[list[int]]:
    """Dyadic (or any) rationals on one integer scale (what a null space needs: any common scale works)."""
    den = 1
    for v in vectors:
        for q in v:
            den = den * q.denominator // math.gcd(den, q.denominator)
    return [[int(q * den) for q in v] for v in vectors]


def _parse_deadline(deadline):
    return math.inf if deadline is None else deadline


def null_weights(problem, t: int, support, lam, F: np.ndarray, deadline: float | None = None):
    """Exact rational ``w >= 0`` (not all 0) on ``support`` with ``Σ w_j (ũ_j − ũ_t) ∈ span(F)`` for the head as
    given (:func:`problem_rows`), found near the float weights ``lam``: the support-restricted exact solve of a
    "margin exactly 0" (or hull-edge) proof. Tries the heaviest weights' support first, then all of
    ``support``. None: no proof (not a disproof) — also when the sizes exceed :data:`MAX_ENTRIES` or the
    ``deadline`` (``time.monotonic()``) passes."""
    import flint

    support = np.asarray(support, dtype=np.int64)
    lam = np.asarray(lam, dtype=np.float64)
    if support.size == 0 or (support.size + F.shape[1] + 1) * problem.d > MAX_ENTRIES:
        return None
    order = np.argsort(-lam, kind="stable")
    top = float(lam[order[0]]) if lam.size else 0.0
    tries = []
    for cut in (1e-6, 1e-12, -1.0):  # the active set first; more rows only if needed
        keep = np.sort(order[lam[order] > cut * top]) if cut >= 0 else np.arange(support.size)
        if keep.size and (not tries or keep.size != tries[-1].size):
            tries.append(keep)
    rows = problem_rows(problem, np.concatenate([[t], support]))
    ut, R = rows[0], rows[1:]
    Fcols = [[Fraction(float(v)) for v in F[:, k]] for k in range(F.shape[1])]
    for keep in tries:
        if time.monotonic() > _parse_deadline(deadline):
            return None
        cols = [[a - b for a, b in zip(R[k], ut)] for k in keep] + Fcols
        ints = _common_ints(cols)
        m = len(cols)
        N = flint.fmpz_mat([[ints[c][r] for c in range(m)] for r in range(problem.d)])
        X, nullity = N.nullspace()
        if nullity == 0:
            continue
        basis = [[Fraction(int(X[i, j])) for j in range(nullity)] for i in range(m)]
        w = _pick_nonnegative(basis[: keep.size], lam[keep], deadline)
        if w is not None:
            return support[keep], w
    return None


def _pick_nonnegative(basis: list[list[Fraction]], lam: np.ndarray, deadline) -> list[Fraction] | None:
    """A combination ``w`` of the null-space basis columns with ``w >= 0`` and ``w != 0``: the unique one (up to
    scale) when the null space is a line, else the least-squares match of ``lam``, rounded to rationals."""
    k = len(basis[0]) if basis else 0
    if k == 0:
        return None
    if k == 1:
        w = [row[0] for row in basis]
    else:
        # each column over its largest entry, exactly, before any float: the integer basis can pass float64's
        # range (a head near the float limits), and a column read as inf or 0 is no match of anything
        scale = [max(abs(row[j]) for row in basis) or Fraction(1) for j in range(k)]
        B = np.array([[float(row[j] / scale[j]) for j in range(k)] for row in basis])
        coef, *_ = np.linalg.lstsq(B, lam, rcond=None)
        if not np.all(np.isfinite(coef)):
            return None
        c = [Fraction(float(coef[j])) / scale[j] for j in range(k)]
        w = [sum((row[j] * c[j] for j in range(k)), Fraction(0)) for row in basis]
    if all(v <= 0 for v in w):
        w = [-v for v in w]
    if any(v < 0 for v in w) or not any(v > 0 for v in w):
        return None
    total = sum(w, Fraction(0))
    return [v / total for v in w]


def combination(problem, t: int, comp, w: list[Fraction]):
    """``(r, c0)`` exactly: ``r = Σ w_j (ũ_j − ũ_t)`` (list of Fractions) and ``c0 = Σ w_j (b̃_j − b̃_t)`` for the
    head as given."""
    comp = np.asarray(comp, dtype=np.int64)
    rows = problem_rows(problem, np.concatenate([[t], comp]))
    bias = problem_bias(problem, np.concatenate([[t], comp]))
    ws = sum(w, Fraction(0))
    r = [sum((w[k] * rows[k + 1][i] for k in range(len(w))), Fraction(0)) - ws * rows[0][i]
         for i in range(problem.d)]
    c0 = sum((w[k] * bias[k + 1] for k in range(len(w))), Fraction(0)) - ws * bias[0]
    return r, c0


def deficit_sign(problem, r: list[Fraction], c0: Fraction) -> tuple[int, float]:
    """Sign of the exact deficit ``δ = c0 − sup_X(−r·x)`` (+1, 0, −1) and a float lower bound of δ (rounded
    down). Balls compare squares; their lower bound uses a rational upper bound of the norm."""
    dom = problem.domain
    if not dom.bounded:  # the cone: a proof needs r = 0 exactly (then t is in the rows' hull)
        return (0 if not any(r) else -1), 0.0
    rad = Fraction(float(dom.radius))
    if dom.null_directions(problem.d).shape[1]:  # layernorm: only P r matters
        mean = sum(r, Fraction(0)) / problem.d
        r = [v - mean for v in r]
    if dom.solver == "lp":  # box: sup = rho ||r||_1, exact
        delta = c0 - rad * sum((abs(v) for v in r), Fraction(0))
        sign = (delta > 0) - (delta < 0)
        return sign, _down(delta)
    n2 = sum((v * v for v in r), Fraction(0))
    s2 = rad * rad * n2
    sign = 1 if c0 > 0 and c0 * c0 > s2 else 0 if c0 >= 0 and c0 * c0 == s2 else -1
    return sign, _down(c0 - rad * _sqrt_up(n2))


def _sqrt_up(q: Fraction) -> Fraction:
    """A rational ``>= sqrt(q)`` within a relative 2^-60 of it, in integers (``float(q)`` may overflow or
    underflow to 0 for the squares of rows near the float limits)."""
    if q <= 0:
        return Fraction(0)
    p, d = q.numerator, q.denominator
    k = max(0, (121 - (p * d).bit_length()) // 2 + 1)  # p d 4^k >= 2^120: the +1 below is below 2^-60
    return Fraction(math.isqrt(p * d * 4**k) + 1, d * 2**k)


def _down(q: Fraction) -> float:
    """The largest float64 <= q (reported bounds round outwards)."""
    try:
        f = float(q)
    except OverflowError:
        return -math.inf if q < 0 else math.nextafter(math.inf, 0)
    return f if Fraction(f) <= q else math.nextafter(f, -math.inf)
