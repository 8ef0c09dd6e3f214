"""``unspeakable audit REPORT SOURCE`` — re-derive every claim of a saved report from the weights alone.

A small checker that trusts nothing of the engine: it depends on numpy and python-flint, reuses
``engine.loader.load`` only to read the weights, and folds them itself. A reader can check this file alone.

**What it reads** — a report of schema ``unspeakable.report/1`` (DESIGN §5)::

    {"schema": "unspeakable.report/1", "V": int, "d": int, "domain": "layernorm"|"rmsnorm"|"box"|"cone",
     "radius": float|null, "bias": bool, "counts": {"tokens", "speakable", "unspeakable", "undecided", ...},
     "companion": "file.npz" (optional: arrays witness_ids [n] int64, witness_x [n, d] float64),
     "tokens": [{"id": int, "verdict": str, "margin_lower": float|null, "margin_upper": float|null,
                 "certificate": {"kind": "witness", "x": [d floats] | "self-direction" | {"companion": i}}
                              | {"kind": "dual", "competitors": [...], "weights": [...], "deficit": float}
                              | {"kind": "cone", "competitors", "weights", "mu", "deficit"}
                              | {"kind": "zero", "competitors", "weights", "mu"}
                              | {"kind": "tie", "tie_with": j} | null, ...}, ...]}

**The head it checks** is the head as given (DESIGN §1): rows ``ũ_j = γ ⊙ u_j``, bias ``b̃_j = u_j·β + b_j``
(zero with ``"bias": false`` or in ``cone``), in exact reals. Its own float64 fold of them is rounded, so
every float check also allows for the fold's rounding (``γ_i u_ji``: ``u`` of itself unless the weights and
gain are float32 or narrower, whose products are exact; ``u·β + b``: a dot product's ``γ``); where that is too
coarse to decide, exact rationals from the weights themselves decide (witness margins against the few
competitors that bind, dual deficits, Gordan solves, ties).

**What it proves**, per listed token (and per unlisted token: speakable at its screen point, DESIGN §3.3):

* witness ``x`` — ``x`` lies in the domain (``layernorm``: the point is ``Px``, the exact projection onto 1⊥,
  whose norm is at most ``||x||``) and ``l_t − l_j > E_j`` at it for every ``j ≠ t``, where ``E_j`` is an a-priori
  float64 rounding bound (``γ_n = n u / (1 − n u)``, ``u = 2^-53``, inflated 1% to cover evaluating the bound).
* dual ``λ`` — the deficit ``δ = c0 − sup_X(−r·x)`` (``r = Σλ_j(ũ_j − ũ_t)``, ``c0 = Σλ_j(b̃_j − b̃_t)``) is
  positive: in float64 with an allowance, else exactly in rationals (ball: ``c0 > 0`` and ``c0² > R²||Pr||²``).
* exact weights (``"weights_exact"``: rationals ``"p/q"`` over the competitors, on any of dual / cone / zero) —
  checked as they are, in rationals: ``w >= 0``, ``Σw > 0``, and the deficit ``δ(w) >= 0`` (cone: ``r = 0``;
  zero: ``r`` a multiple of 1 in layernorm, else 0, with a constant bias): ``t`` can at best tie.
* cone / zero ``(λ, μ)`` — Gordan, exactly in rationals: with ``κ = |μ|/V`` the weights ``λ_j + κ`` over all
  ``j ≠ t`` nearly cancel ``Σ w_j (ũ_j − ũ_t)``; an exact solve on a basis of ``d`` rows corrects them so the sum
  is exactly 0 (in ``layernorm`` up to a multiple of 1, which ``x ∈ 1⊥`` cannot see) with every weight still
  ``≥ 0``. So ``t`` can tie but never win. ``zero`` also needs a bounded domain and a constant bias
  (then ``x = 0`` ties every token: the margin is exactly 0). The multipliers only guide this solve: what is
  proven is the claim itself, so a multiplier changed in a way that keeps it true still passes.
* tie — an identical folded row (and bias, outside ``cone``), compared by value.
* stated bounds — a witness's ``margin_lower`` and a certificate's ``margin_upper`` (and ``deficit``) must follow
  from it; the other side must not contradict it (a speakable token's ``margin_upper`` is at least what its
  witness proves). Up to the allowance and a relative slack of ``2^-20``: bounds are informative numbers;
  verdicts get no slack. Undecided tokens claim nothing and carry no evidence: their bounds are not checked.
* counts — ``speakable + unspeakable + undecided = tokens``; the listed tokens fit the counts.

Any non-finite intermediate fails the claim. Inputs are never written to. Not checked: the gram-screen fields
(``hard_to_speak``, ``gram_argmax``: a heuristic, not a proof; only their count), a witness's informative
``runner_up`` and ``allowance``. Cost: one float64 GEMM of the ``V × d`` rows against the witnesses (a second
only for margins near the allowance; ``sample`` for very large heads) and, for cone/zero claims, one exact pass
over the rows plus a ``d × d`` rational ``rref`` per token.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from flint import fmpq, fmpq_mat

from unspeakable.engine.head import Head, InputError
from unspeakable.engine.loader import load

SCHEMA = "unspeakable.report/1"
DOMAINS = ("layernorm", "rmsnorm", "box", "cone")
VERDICTS = ("speakable", "unspeakable", "undecided")
U = 2.0**-53  # unit roundoff of float64
ETA = 2.0**-1000  # covers underflow: a length-n dot loses at most n·2^-1074 to subnormals (n < 2^70)
BOUND_SLACK = 2.0**-20  # relative slack for stated margin bounds (never for verdicts)
BATCH = 128  # witnesses per GEMM: a few [V, BATCH] float64 temporaries


def gamma(n: int) -> float:
    """Higham's γ_n, inflated 1% so that rounding while evaluating an error bound stays covered."""
    return 1.01 * n * U / (1.0 - n * U)


# ------------------------------------------------------------------------------------------ results
@dataclass
class AuditResult:
    """What the audit found: proofs checked by kind, failures (one line each) and notes."""

    witnesses: int = 0
    certificates: int = 0
    ties: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        n = self.witnesses + self.certificates + self.ties
        tail = "all hold" if self.ok else f"{len(self.failures)} fail"
        return (f"{n} proofs checked: {self.witnesses} witnesses, {self.certificates} certificates, "
                f"{self.ties} ties, {tail}")

    def fail(self, token, claim: str, message: str) -> None:
        who = "counts" if token is None else f"token {token}"
        self.failures.append(f"{who}: {claim}: {message}")


# ------------------------------------------------------------------------------------------ the fold
@dataclass
class Folded:
    """The audit's own float64 fold. ``A = rows − c`` (any common shift cancels in l_t − l_j), ``K`` the rows
    the logits are computed from (``P A`` in layernorm), ``A_abs``/``A_l1`` for the rounding bounds, and
    ``cs`` the per-row factors of the cheap (Cauchy–Schwarz) bound ``e_j = P_j ||x||_2 + Q_j ||x||_1 + R_j``."""

    rows: np.ndarray
    bias: np.ndarray
    domain: str
    radius: float | None
    A: np.ndarray
    K: np.ndarray
    A_abs: np.ndarray
    A_l1: np.ndarray
    cs: tuple
    raw: np.ndarray = None  # [V, d] the weights' rows u_j as float64 (exact)
    gain: np.ndarray | None = None  # γ as float64 (exact), None without one
    beta: np.ndarray | None = None  # β (None: no ln_b or no bias)
    b_U: np.ndarray | None = None  # b_U (None: none or no bias)
    row_err: np.ndarray | None = None  # per row: ||ũ_j − rows_j||_2 <= row_err_j (the fold's rounding)
    bias_err: np.ndarray | None = None  # per row: |b̃_j − bias_j| <= bias_err_j
    _colsum: list | None = None  # exact column sums of rows, computed once when a Gordan claim needs them
    _rank: int | None = None

    @property
    def fold_exact(self) -> bool:
        return not (np.any(self.row_err) or np.any(self.bias_err))

    def qrow(self, j: int) -> list:
        """Row j of the head as given, exactly: ``γ_i u_ji``."""
        u = self.raw[j]
        if self.gain is None:
            return [q(v) for v in u.tolist()]
        return [q(a) * q(g) for a, g in zip(u.tolist(), self.gain.tolist())]

    def qbias(self, j: int) -> fmpq:
        """Bias j of the head as given, exactly: ``u_j·β + b_j`` (0 without bias)."""
        out = fmpq(0) if self.b_U is None else q(self.b_U[j])
        if self.beta is not None:
            out += sum((q(a) * q(b) for a, b in zip(self.raw[j].tolist(), self.beta.tolist()) if a != 0 and b != 0),
                       fmpq(0))
        return out

    @property
    def V(self) -> int:
        return self.rows.shape[0]

    @property
    def d(self) -> int:
        return self.rows.shape[1]


def _narrow(a) -> bool:
    """Every value fits a float32 exactly (24-bit mantissas): the product of two such is exact in float64."""
    a = np.asarray(a)
    if a.dtype in (np.float16, np.float32):
        return True
    with np.errstate(over="ignore"):
        return bool(np.array_equal(a.astype(np.float32).astype(np.float64), a))


def fold64(head: Head, domain: str, radius: float | None, bias: bool) -> Folded:
    """Fold the head into float64 rows and bias on ``domain`` (DESIGN §1), without writing to its arrays, with
    bounds on what that rounding changed (the claims are about the head as given)."""
    raw = np.ascontiguousarray(np.array(head.W_U, dtype=np.float64).T)  # a fresh copy: [V, d] rows u_j
    V, d = raw.shape
    gain = None if head.ln_w is None else np.array(head.ln_w, dtype=np.float64)
    rows = raw * gain if gain is not None else raw
    row_err, bias_err = np.zeros(V), np.zeros(V)
    with np.errstate(all="ignore"):
        if gain is not None and not (_narrow(head.W_U) and _narrow(head.ln_w)):
            # one rounding per product: |err| <= u |fl(γ u)| (+ an underflow's 2^-1074)
            row_err = (U * np.linalg.norm(rows, axis=1) + math.sqrt(d) * 2.0**-1074) * (1 + gamma(d + 2))
    b, beta, b_U = np.zeros(V), None, None
    if bias and domain != "cone":
        if head.b_U is not None:
            b_U = np.array(head.b_U, dtype=np.float64)
            b = b_U.copy()
        if head.ln_b is not None:
            beta = np.array(head.ln_b, dtype=np.float64)
            with np.errstate(all="ignore"):
                b = b + raw @ beta  # b̃_j = u_j·β + b_j (β before the gain)
                bias_err = gamma(d + 2) * (np.abs(raw) @ np.abs(beta) + np.abs(b_U if b_U is not None else 0.0)) \
                    + d * ETA
    rows = np.ascontiguousarray(rows)
    with np.errstate(all="ignore"):  # huge weights may overflow here; the checks refuse non-finite numbers
        A = rows - rows.mean(axis=0)
        K = A - A.mean(axis=1, keepdims=True) if domain == "layernorm" else A
        A_abs = np.abs(A)
        A_l1, d = A_abs.sum(axis=1), rows.shape[1]
        # |S_j − (exact K̃_j·z + b_j)| for S_j = fl(fl(K̂_j·x) + b_j), its later subtraction and the rounding
        # of these sums: dot γ_d ||K̂_j|| ||x||, rows γ_(d+3) (||â_j|| ||x|| + ||â_j||_1 ||x||_1 / d), 8u per term.
        P = gamma(2 * d + 16) * (np.linalg.norm(A, axis=1) + np.linalg.norm(K, axis=1))
        Q = gamma(2 * d + 16) * A_l1 / d if domain == "layernorm" else np.zeros_like(A_l1)
        R = 8 * U * np.abs(b) + ETA
        # the fold's rounding: |(ũ_j − rows_j)·z| <= row_err_j ||x|| (||Px|| <= ||x||), |b̃_j − b_j| <= bias_err_j
        P = P + row_err * (1 + 4 * U)
        R = R + bias_err * (1 + 4 * U)
    return Folded(rows, b, domain, radius, A, np.ascontiguousarray(K), A_abs, A_l1, (P, Q, R), raw=raw, gain=gain,
                  beta=beta, b_U=b_U, row_err=row_err, bias_err=bias_err)


# ------------------------------------------------------------------------------------------ witnesses
def in_domain(F: Folded, x: np.ndarray) -> str | None:
    """None when ``x`` is in the domain (layernorm: ``||Px|| <= ||x|| <= R``), else why not."""
    if x.shape != (F.d,) or not np.all(np.isfinite(x)):
        return f"x must be {F.d} finite numbers"
    if F.domain == "box":
        top = float(np.max(np.abs(x)))
        return None if top <= F.radius else f"|x_i| = {top!r} > rho = {F.radius!r}"
    if F.domain == "cone":
        return None
    s = float(x @ x)
    if s * (1 + gamma(F.d + 2)) + ETA <= F.radius * F.radius * (1 - 4 * U):
        return None
    # Too close to the sphere for float64: decide exactly.
    if sum(Fraction(v) ** 2 for v in x.tolist()) <= Fraction(F.radius) ** 2:
        return None
    return f"||x|| = {math.sqrt(s)!r} > R = {F.radius!r}"


def screen_points(F: Folded, ts: np.ndarray) -> np.ndarray:
    """The screen points of DESIGN §3.3, recomputed: ``R k/||k||`` a hair inside the ball, ``rho sign(k)``
    (box), ``k/||k||²`` (cone), with ``k_t = P(ũ_t − c)``. A zero key gives 0, which wins nothing."""
    k = F.K[ts]
    with np.errstate(all="ignore"):  # a non-finite point is refused by in_domain, never used
        n = np.linalg.norm(k, axis=1, keepdims=True)
        safe = np.where(n > 0, n, 1.0)
        if F.domain == "box":
            return F.radius * np.sign(k)
        if F.domain == "cone":
            return np.where(n > 0, k / (safe * safe), 0.0)
        inside = F.radius * (1 - 8 * (F.d + 4) * U)  # room for the rounding of the norm
        return np.where(n > 0, k * (inside / safe), 0.0)


def check_witnesses(F: Folded, ts: np.ndarray, X: np.ndarray):
    """Margins of ``ts[i]`` at ``X[i]`` over all V logits, batched. Returns (ok, lo, hi, runner_up).

    ``M_j = fl(l_t − l_j)`` and ``|M_j − (l_t − l_j)| <= E_j``: the GEMM error ``γ_(2d+8)`` times the absolute
    products (plus the projection's ``||a_j||_1 ||x||_1 / d`` in layernorm) and ``4u`` of each term for the
    subtractions; the absolute products are first bounded by Cauchy–Schwarz (one GEMM), exactly where needed.
    The margin at x lies in ``[lo, hi] = [min_j (M_j − E_j), min_j (M_j + E_j)]``; ok iff ``lo > 0``
    and nothing was non-finite. Cone margins are divided by ``(ũ_t − c)·x`` (DESIGN §1's normalisation).
    """
    n = len(ts)
    ok, lo, hi, runner = np.zeros(n, bool), np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1)
    for b0 in range(0, n, BATCH):
        sl = slice(b0, b0 + BATCH)
        ok[sl], lo[sl], hi[sl], runner[sl] = _witness_batch(F, ts[sl], X[sl])
    return ok, lo, hi, runner


def _witness_batch(F: Folded, ts: np.ndarray, X: np.ndarray):
    """One GEMM with the cheap rank-one bound ``E_j = e_t + e_j + 8u|l_t|``; columns it cannot settle (a margin
    within a few ``γ ||a|| ||x||``) are redone with the tighter ``|A| |x|`` bound of :func:`_witness_precise`."""
    cols = np.arange(len(ts))
    P, Q, R = F.cs
    with np.errstate(all="ignore"):  # overflow and NaN are caught below, never read as a bound
        nx, l1x = np.linalg.norm(X, axis=1), np.abs(X).sum(axis=1)
        S = F.K @ X.T  # [V, B] logits
        S += F.bias[:, None]
        st = S[ts, cols].copy()
        et = P[ts] * nx + Q[ts] * l1x + R[ts]
        S += P[:, None] * nx[None, :]  # S_j + e_j: the most l_j can be
        S += (Q[:, None] * l1x[None, :]) + R[:, None]
        own = st - et - 8 * U * np.abs(st)  # the least l_t can be
        low = own[None, :] - S
        finite = np.isfinite(low).all(axis=0)
        low[ts, cols] = np.inf  # t is not its own competitor
        worst = np.argmin(low, axis=0)
        lo = low[worst, cols]
        ew = P[worst] * nx + Q[worst] * l1x + R[worst]
        hi = lo + 2 * (et + ew + 8 * U * np.abs(st))  # M_w + E_w for the binding competitor w
        ok = finite & (lo > 0)
        if F.domain == "cone":  # normalised so that (ũ_t − c)·x = 1
            scale = np.where(st > 0, st, np.nan)
            lo, hi = lo / scale, hi / scale
    redo = np.nonzero(~ok)[0]
    if redo.size:
        ok[redo], lo[redo], hi[redo], worst[redo] = _witness_precise(F, ts[redo], X[redo])
    return ok, lo, hi, worst


def _witness_precise(F: Folded, ts: np.ndarray, X: np.ndarray):
    """The tight bound: a second GEMM of ``|A|`` against ``|x|`` in place of Cauchy–Schwarz."""
    cols = np.arange(len(ts))
    with np.errstate(all="ignore"):  # overflow and NaN are caught below, never read as a bound
        G = F.K @ X.T  # [V, B] logits without bias
        T = F.A_abs @ np.abs(X).T
        if F.domain == "layernorm":
            T += F.A_l1[:, None] * (np.abs(X).sum(axis=1) / F.d)[None, :]
        gt, Tt, bt = G[ts, cols], T[ts, cols], F.bias[ts]
        M = (gt[None, :] - G) + (bt[None, :] - F.bias[:, None])
        E = gamma(2 * F.d + 8) * (Tt[None, :] + T)
        E += 4 * U * (np.abs(gt)[None, :] + np.abs(G) + np.abs(bt)[None, :] + np.abs(F.bias)[:, None]) + ETA
        if not F.fold_exact:  # the fold's rounding, both rows of each pair
            nx = np.linalg.norm(X, axis=1) * (1 + gamma(F.d + 2))
            fe = F.row_err[:, None] * nx[None, :] + F.bias_err[:, None]
            E += (fe + fe[ts, cols][None, :]) * (1 + 4 * U)
        finite = np.isfinite(M).all(axis=0) & np.isfinite(E).all(axis=0)
        M[ts, cols], E[ts, cols] = np.inf, 0.0  # t is not its own competitor
        low = M - E
        worst = np.argmin(low, axis=0)
        lo, hi = low[worst, cols], (M + E).min(axis=0)
        ok = finite & (lo > 0)
        for k in np.nonzero(finite & ~ok)[0]:  # too close for float64 and the fold's rounding: exactly
            J = np.nonzero(low[:, k] <= 0)[0]
            if 0 < J.size <= EXACT_COMPETITORS:
                m, j = _exact_margin(F, int(ts[k]), X[k], J)
                settled = np.ones(F.V, bool)
                settled[J] = False
                settled[ts[k]] = False
                lo_s = float(low[settled, k].min(initial=np.inf))
                hi_s = float((M + E)[settled, k].min(initial=np.inf))
                mf = qfloat(m)
                ok[k] = m > 0 and lo_s > 0
                lo[k], hi[k] = min(mf - 4 * U * abs(mf), lo_s), min(mf + 4 * U * abs(mf), hi_s)
                worst[k] = j
        if F.domain == "cone":  # normalised so that (ũ_t − c)·x = 1
            scale = np.where(gt > 0, gt, np.nan)
            lo, hi = lo / scale, hi / scale
    return ok, lo, hi, worst


EXACT_COMPETITORS = 256  # a witness is re-checked in rationals against at most this many unsettled competitors


def _exact_margin(F: Folded, t: int, x: np.ndarray, J: np.ndarray):
    """``(min_j l_t(z) − l_j(z), argmin)`` over ``J`` in exact rationals from the weights themselves (z = x, or
    ``P x`` in layernorm)."""
    z = [q(v) for v in x.tolist()]
    if F.domain == "layernorm":
        mean = sum(z, fmpq(0)) / F.d
        z = [v - mean for v in z]

    def logit(j):
        return sum((a * b for a, b in zip(F.qrow(j), z)), fmpq(0)) + F.qbias(j)

    lt = logit(t)
    best, arg = None, -1
    for j in J.tolist():
        m = lt - logit(j)
        if best is None or m < best:
            best, arg = m, j
    return best, arg


# ------------------------------------------------------------------------------------------ exact helpers
def q(v: float) -> fmpq:
    """A float64 as the exact rational it is."""
    return fmpq(*float(v).as_integer_ratio())


def qmat(a: np.ndarray) -> fmpq_mat:
    a = np.atleast_2d(a)
    return fmpq_mat(a.shape[0], a.shape[1], [q(v) for v in a.ravel().tolist()])


def qrows(F: "Folded", ids) -> fmpq_mat:
    """Rows ``ids`` of the head as given, exactly (an fmpq_mat)."""
    ids = [int(j) for j in ids]
    return fmpq_mat(len(ids), F.d, [v for j in ids for v in F.qrow(j)])


def qfloat(v: fmpq) -> float:
    return float(Fraction(int(v.p), int(v.q)))


def exact_colsum(rows: np.ndarray) -> list:
    """Σ_j rows[j, i] exactly, per column: mantissas as Python ints aligned to the smallest exponent."""
    mant, expo = np.frexp(rows)
    ints = (mant * 2.0**53).astype(np.int64)  # exact: |mant| < 1 has 53 significant bits
    expo = expo.astype(np.int64) - 53
    out = []
    for i in range(rows.shape[1]):
        e0 = int(expo[:, i].min())
        total = sum((ints[:, i].astype(object) << (expo[:, i] - e0).astype(object)).tolist(), 0)
        out.append(fmpq(total) * fmpq(2) ** e0)
    return out


# ------------------------------------------------------------------------------------------ dual certificates
def check_dual(F: Folded, t: int, comp: np.ndarray, lam: np.ndarray):
    """A dual certificate on a bounded domain. Returns (ok, (lo, hi) bounds on ``−δ/Σλ``, message).

    Float64 first: every rounded quantity carries an a-priori bound (``D = ũ_S − ũ_t`` and ``b_S − b_t`` are one
    subtraction each, ``r`` and ``c0`` dots of length m). Where that cannot show ``δ > 0``, exact rationals do.
    """
    m = comp.size
    with np.errstate(all="ignore"):
        D = F.rows[comp] - F.rows[t]
        r = lam @ D
        er = gamma(m + 4) * (lam @ np.abs(D))
        db = F.bias[comp] - F.bias[t]
        c0 = float(lam @ db)
        ec = gamma(m + 4) * float(lam @ np.abs(db))
        if not F.fold_exact:  # the fold's rounding: entrywise for the rows, per token for the bias
            ls_ = float(lam.sum()) * (1 + gamma(m))
            if np.any(F.row_err):
                er = er + (U * (lam @ np.abs(F.rows[comp]) + ls_ * np.abs(F.rows[t])) + ls_ * 2.0**-1073) * (1 + gamma(m + 4))
            ec += float(lam @ F.bias_err[comp] + ls_ * F.bias_err[t]) * (1 + gamma(m + 4))
        sup, esup = _support(F, r, er)
        spread = ec + esup + 4 * U * (abs(c0) + sup) + ETA
        lo, hi = c0 - sup - spread, c0 - sup + spread
        ls = float(lam.sum())
        ls_lo, ls_hi = ls * (1 - gamma(m)), ls * (1 + gamma(m))
    finite = all(math.isfinite(v) for v in (lo, hi, ls_lo, ls_hi))
    ok = finite and lo > 0
    if not ok and not (finite and hi <= 0):
        ok = dual_exact(F, t, comp, lam)  # float64 could not settle the sign: rationals can
    if not finite:
        return ok, None, "deficit" + (" proven exactly" if ok else " is not finite and not positive exactly")
    bounds = (-hi / (ls_lo if hi > 0 else ls_hi), -lo / (ls_hi if lo > 0 else ls_lo))
    return ok, bounds, "" if ok else f"deficit {c0 - sup:.6g} is not positive (allowance {spread:.3g})"


def _support(F: Folded, r: np.ndarray, er: np.ndarray) -> tuple[float, float]:
    """``sup_X(−r·x)`` computed from ``r̂`` with ``|r − r̂| <= er``: (value, error bound)."""
    d, g = F.d, gamma(F.d + 4)
    if F.domain == "box":
        v = F.radius * float(np.abs(r).sum())
        e = F.radius * float(er.sum())
        return v, e + g * (v + e)
    if F.domain == "rmsnorm":
        v = F.radius * float(np.linalg.norm(r))
        e = F.radius * float(np.linalg.norm(er))
        return v, e + g * (v + e)
    p = r - r.mean()  # layernorm: x ⊥ 1, so only P r matters; |fl(P r̂) − P r̂| is bounded below
    v = F.radius * float(np.linalg.norm(p))
    e = F.radius * (float(np.linalg.norm(er)) + g * (float(np.abs(r).sum()) / math.sqrt(d) + v / F.radius))
    return v, e + g * (v + e)


def dual_exact(F: Folded, t: int, comp: np.ndarray, lam: np.ndarray) -> bool:
    """``δ > 0`` in exact rationals. Ball domains compare squares: ``c0 > 0`` and ``c0² > R²||P r||²``."""
    L = qmat(lam[None, :])
    ls = sum((L[0, k] for k in range(comp.size)), fmpq(0))
    ut = qrows(F, [t])
    r = L * qrows(F, comp) - ut * ls
    rv = [r[0, i] for i in range(F.d)]
    c0 = (L * fmpq_mat(comp.size, 1, [F.qbias(int(j)) for j in comp]))[0, 0] - F.qbias(t) * ls
    R = q(F.radius)
    if F.domain == "box":
        return c0 - R * sum((abs(v) for v in rv), fmpq(0)) > 0
    if F.domain == "layernorm":
        mean = sum(rv, fmpq(0)) / F.d
        rv = [v - mean for v in rv]
    return c0 > 0 and c0 * c0 > R * R * sum((v * v for v in rv), fmpq(0))


# ------------------------------------------------------------------------------------------ Gordan (cone, zero)
def check_gordan(F: Folded, t: int, comp: np.ndarray, lam: np.ndarray, mu: float, weights_out: dict | None = None):
    """Exact Gordan certificate: weights ``w ≥ 0``, ``w ≠ 0`` over ``j ≠ t`` with ``Σ w_j (ũ_j − ũ_t) = 0``
    (in layernorm ``= α 1`` for some real α). Returns (ok, normalised cone margin bound or None, message);
    ``weights_out`` receives ``{j: w_j}`` for the named tokens (every other ``j ≠ t`` has ``w_j = κ``) and ``"kappa"``.

    Start from ``w_j = λ_j + κ`` (``κ = |μ|/V``; for the engine's cone LP ``Σλ_j(ũ_j − ũ_t) = |μ|(ũ_t − c)`` and
    ``ũ_t − c = (1/V) Σ_j (ũ_t − ũ_j)``, so these nearly cancel), compute the residual ``e`` exactly (the dense
    part through exact column sums), then solve ``M y = −e`` exactly on a basis ``B`` of rows by ``rref``.
    """
    V, d, project = F.V, F.d, F.domain == "layernorm"
    kappa = q(abs(mu)) / V
    lam_q = {int(j): q(w) for j, w in zip(comp, lam)}
    ls = sum(lam_q.values(), fmpq(0))
    ut = F.qrow(t)
    LS = qmat(lam[None, :]) * qrows(F, comp)
    s = colsum(F)
    e = [LS[0, i] - ls * ut[i] + kappa * (s[i] - V * ut[i]) for i in range(d)]
    B = basis(F, t, comp, lam)
    k = len(B) + project
    QB = [F.qrow(j) for j in B]
    entries = []
    for i in range(d):
        entries += [QB[n][i] - ut[i] for n in range(len(B))] + [fmpq(1)] * project + [-e[i]]
    R, rank = fmpq_mat(d, k + 1, entries).rref()
    if rank != k or any(R[i, i] != 1 for i in range(k)):
        return False, None, f"the residual is not in the exact span of {len(B)} basis rows"
    w = {j: lam_q.get(j, fmpq(0)) + kappa + R[n, k] for n, j in enumerate(B)}
    neg = [j for j in B if w[j] < 0]
    if neg:
        j = neg[0]
        return False, None, f"the exact correction makes the weight of token {j} negative ({qfloat(w[j]):.3g})"
    total = ls + (V - 1) * kappa + sum((R[n, k] for n in range(len(B))), fmpq(0))
    if weights_out is not None:
        weights_out.update({j: v + kappa for j, v in lam_q.items()}, **{"kappa": kappa})
        weights_out.update(w)
    if not total > 0:
        return False, None, "all weights are 0"
    return True, _cone_bound(F, w, lam_q, kappa, total), ""


def _cone_bound(F: Folded, w: dict, lam_q: dict, kappa: fmpq, total: fmpq) -> float | None:
    """With ``m = min_j w_j``, ``Σ (w_j − m)(ũ_j − ũ_t) = mV(ũ_t − c)``: at any x with ``(ũ_t − c)·x = 1`` some j
    beats t by ``mV / Σ(w_j − m)``, an upper bound on the normalised cone margin (DESIGN §1)."""
    if F.domain != "cone":
        return None
    named = set(w) | set(lam_q)
    vals = [w.get(j, lam_q.get(j, fmpq(0)) + kappa) for j in named]
    if len(named) < F.V - 1:
        vals.append(kappa)
    m = min(vals)
    rest = total - (F.V - 1) * m
    return -qfloat(m * F.V / rest) if m > 0 and rest > 0 else None


def colsum(F: Folded) -> list:
    """Σ_j ũ_ji exactly, per column, for the head as given (``γ_i Σ_j u_ji``)."""
    if F._colsum is None:
        s = exact_colsum(F.raw)
        F._colsum = s if F.gain is None else [v * q(g) for v, g in zip(s, F.gain.tolist())]
    return F._colsum


def basis(F: Folded, t: int, comp: np.ndarray, lam: np.ndarray) -> list[int]:
    """Up to rank-many rows ``j ≠ t`` whose ``P(ũ_j − ũ_t)`` are independent in float64: the heaviest competitors
    first, then the rows farthest from the span so far. Only a choice; the exact ``rref`` judges it."""
    K, need = F.K - F.K[t], numeric_rank(F)
    Q = np.zeros((F.d, 0))
    chosen: list[int] = []

    def take(j: int) -> bool:
        nonlocal Q
        v = K[j]
        res = v - Q @ (Q.T @ v)
        res -= Q @ (Q.T @ res)  # twice: one Gram–Schmidt pass loses orthogonality
        nr = float(np.linalg.norm(res))
        if j == t or j in chosen or not nr > 1e-9 * float(np.linalg.norm(v)):
            return False
        chosen.append(j)
        Q = np.column_stack([Q, res / nr])
        return True

    for j in comp[np.argsort(-lam, kind="stable")]:
        if len(chosen) == need:
            return chosen
        take(int(j))
    while len(chosen) < need:  # competitors exhausted: the row farthest from the span so far
        norms = np.linalg.norm(K - (K @ Q) @ Q.T, axis=1)
        norms[[t] + chosen] = -1.0
        if not take(int(np.argmax(norms))):
            break
    return chosen


def numeric_rank(F: Folded) -> int:
    """The float64 rank of the keys, a target for :func:`basis` (the exact solve does not trust it)."""
    if F._rank is None:
        sv = np.linalg.svd(F.K, compute_uv=False)
        F._rank = int((sv > sv[0] * 1e-10).sum()) if sv.size and sv[0] > 0 else 0
    return F._rank


# ------------------------------------------------------------------------------------------ the report
def read_report(path: str) -> dict:
    """Parse a report file; :class:`InputError` when it is not JSON of schema ``unspeakable.report/1``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read report {path}: {e}") from e
    return data


def validate(data, head: Head, where: str) -> tuple[str, float | None, bool]:
    """Refuse (InputError) a report that does not fit these weights or the schema. Returns (domain, radius, bias)."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{where}: expected schema {SCHEMA!r}, got {got!r}")
    missing = [k for k in ("V", "d", "domain", "radius", "bias", "counts", "tokens") if k not in data]
    if missing:
        raise InputError(f"{where}: report is missing keys {', '.join(missing)}")
    if (data["V"], data["d"]) != (head.d_vocab, head.d_model):
        raise InputError(f"{where}: report has V = {data['V']}, d = {data['d']} but the weights {head.source} have "
                         f"V = {head.d_vocab}, d = {head.d_model}")
    domain, radius, bias = data["domain"], data["radius"], data["bias"]
    if domain not in DOMAINS:
        raise InputError(f"{where}: domain {domain!r} is not one of {', '.join(DOMAINS)}")
    bounded = domain != "cone"
    if bounded != (isinstance(radius, (int, float)) and not isinstance(radius, bool)):
        raise InputError(f"{where}: domain {domain} needs " + ("a radius" if bounded else "radius null")
                         + f"; got {radius!r}")
    if bounded and not (math.isfinite(radius) and radius > 0):
        raise InputError(f"{where}: radius must be finite and > 0; got {radius!r}")
    if not isinstance(bias, bool) or (bias and not bounded):
        raise InputError(f"{where}: bias must be true or false (false in domain cone); got {bias!r}")
    counts = data["counts"]
    if not isinstance(counts, dict) or not all(isinstance(counts.get(k), int) and counts[k] >= 0
                                                for k in ("tokens", *VERDICTS)):
        raise InputError(f"{where}: counts must hold non-negative integers tokens, {', '.join(VERDICTS)}")
    _validate_tokens(data["tokens"], head.d_vocab, where)
    return domain, (float(radius) if bounded else None), bias


def _validate_tokens(tokens, V: int, where: str) -> None:
    if not isinstance(tokens, list):
        raise InputError(f"{where}: tokens must be a list")
    seen = set()
    for i, t in enumerate(tokens):
        tid = t.get("id") if isinstance(t, dict) else None
        if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < V:
            raise InputError(f"{where}: tokens[{i}] has id {tid!r}; expected an integer in 0 … {V - 1}")
        if tid in seen:
            raise InputError(f"{where}: token {tid} is listed twice")
        if t.get("verdict") not in VERDICTS:
            raise InputError(f"{where}: token {tid} has verdict {t.get('verdict')!r}; "
                             f"expected one of {', '.join(VERDICTS)}")
        seen.add(tid)


def read_companion(data: dict, base_dir: str, d: int):
    """The optional companion .npz named by the report: (witness_ids [n] int64, witness_x [n, d] float64)."""
    name = data.get("companion")
    if name is None:
        return None
    path = os.path.join(base_dir, str(name))
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, X = np.asarray(z["witness_ids"]), np.asarray(z["witness_x"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"companion {path}: cannot read witness_ids and witness_x ({type(e).__name__}: {e})") from e
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or X.dtype != np.float64 or X.shape != (ids.size, d):
        raise InputError(f"companion {path}: expected witness_ids [n] int64 and witness_x [n, {d}] float64; got "
                         f"{ids.dtype}{list(ids.shape)} and {X.dtype}{list(X.shape)}")
    return ids, X


# ------------------------------------------------------------------------------------------ the audit
class Unproven(Exception):
    """A claim whose evidence is missing or malformed: the claim fails (exit 1), the input is still readable."""


def audit(report, head, *, sample: int | None = None, seed: int = 0, base_dir: str | None = None) -> AuditResult:
    """Re-derive every claim of ``report`` from the weights ``head`` alone.

    Args:
        report: a report file path, or the parsed report dict (schema ``unspeakable.report/1``).
        head: a :class:`engine.head.Head`, or a SOURCE string for ``engine.loader.load``.
        sample: audit only a random sample of this many claims (the counts are always checked).
        seed: seed of that sample.
        base_dir: where a companion file is looked up (default: the report's directory, or the cwd for a dict).

    Returns:
        An :class:`AuditResult`; ``.ok`` is False when any claim fails.

    Raises:
        InputError: unreadable report or companion, wrong schema, or V/d/domain that do not fit the weights.
    """
    if isinstance(report, (str, os.PathLike)):
        where = os.fspath(report)
        data, base_dir = read_report(where), base_dir or os.path.dirname(os.path.abspath(where))
    else:
        where, data, base_dir = "<report>", report, base_dir or os.getcwd()
    head = load(os.fspath(head)) if isinstance(head, (str, os.PathLike)) else head
    domain, radius, bias = validate(data, head, where)
    F = fold64(head, domain, radius, bias)
    companion = read_companion(data, base_dir, F.d)
    res = AuditResult()
    entries = {t["id"]: t for t in data["tokens"]}
    unlisted = check_counts(data["counts"], entries, F.V, res)
    claims = [(t, entries[t]) for t in sorted(entries)] + [(int(t), None) for t in unlisted]
    if sample is not None and sample < len(claims):
        pick = np.sort(np.random.default_rng(seed).choice(len(claims), size=sample, replace=False))
        res.notes.append(f"sample: {sample} of {len(claims)} claims audited (seed {seed})")
        claims = [claims[i] for i in pick]
    pending: list[tuple[int, np.ndarray, dict | None]] = []
    for t, entry in claims:
        try:
            x = check_claim(F, head, t, entry, companion, res)
        except Unproven as e:
            res.fail(t, (entry or {}).get("verdict", "speakable"), str(e))
            continue
        if x is not None:
            pending.append((t, x, entry))
    check_pending(F, pending, res)
    check_volume(entries, res)
    undecided = sum(1 for e in entries.values() if e["verdict"] == "undecided")
    if undecided:
        res.notes.append(f"{undecided} undecided tokens claim no verdict; their stated bounds carry no evidence")
    return res


def check_volume(entries: dict, res: AuditResult) -> None:
    """``scan --volume`` entries are statistical estimates, not proofs: they are not re-derived (nor is the cap
    bound, whose centre the report does not carry). Only their consistency with the verdicts is checked: a
    token proven unspeakable (other than a tie, whose members split their cell) wins nowhere, so its entry must
    claim no share."""
    vols = {t: e["volume"] for t, e in entries.items() if isinstance(e.get("volume"), dict)}
    if not vols:
        return
    res.notes.append(f"{len(vols)} tokens carry volume estimates (scan --volume): statistics, not audited; "
                     f"checked only against the verdicts")
    for t, v in vols.items():
        e = entries[t]
        tie = (e.get("certificate") or {}).get("kind") == "tie"
        if e["verdict"] == "unspeakable" and not tie and (v.get("log10_share") is not None
                                                         or v.get("log10_share_lower_bound") is not None):
            res.fail(t, "volume", "a token proven unspeakable wins nowhere, but its volume entry claims a share")


def check_counts(counts: dict, entries: dict, V: int, res: AuditResult) -> np.ndarray:
    """The counts against V and the listed tokens. Returns the unlisted ids claimed speakable at their screen
    point (all of them for a full scan; none for a subset scan, whose report does not name them)."""
    listed = {v: sum(1 for e in entries.values() if e["verdict"] == v) for v in VERDICTS}
    n = counts["tokens"]
    if n > V:
        res.fail(None, "tokens", f"counts.tokens = {n} > V = {V}")
    total = sum(counts[v] for v in VERDICTS)
    if total != n:
        res.fail(None, "sum", f"speakable + unspeakable + undecided = {total} != tokens = {n}")
    for v in ("unspeakable", "undecided"):  # every such token is listed with its evidence
        if listed[v] != counts[v]:
            res.fail(None, v, f"counts.{v} = {counts[v]} but {listed[v]} tokens are listed as {v}")
    if listed["speakable"] > counts["speakable"]:
        res.fail(None, "speakable", f"{listed['speakable']} tokens listed as speakable > counts.speakable = "
                                    f"{counts['speakable']}")
    hard = counts.get("hard_to_speak")
    n_hard = sum(1 for e in entries.values() if e.get("hard_to_speak") is True)
    if isinstance(hard, int) and hard != n_hard:  # every hard-to-speak token is listed (DESIGN §5)
        res.fail(None, "hard_to_speak", f"counts.hard_to_speak = {hard} but {n_hard} listed tokens are hard-to-speak")
    unlisted = counts["speakable"] - listed["speakable"]
    if n != V:
        if unlisted > 0:
            res.notes.append(f"subset scan ({n} of {V} tokens): {unlisted} screen-settled speakable tokens are "
                             f"not named in the report and are not checked")
        return np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(V), np.fromiter(entries, dtype=np.int64, count=len(entries)))


def check_claim(F: Folded, head: Head, t: int, entry: dict | None, companion, res: AuditResult):
    """Check one token's claim; a witness is returned for the batched pass instead (None otherwise)."""
    if entry is None:  # unlisted: speakable at its screen point
        return screen_points(F, np.array([t]))[0]
    verdict, cert = entry["verdict"], entry.get("certificate")
    if verdict == "undecided":
        return None
    kind = cert.get("kind") if isinstance(cert, dict) else None
    allowed = ("witness",) if verdict == "speakable" else ("tie", "zero", "cone" if F.domain == "cone" else "dual")
    if kind not in allowed:
        raise Unproven(f"certificate kind {kind!r} cannot prove it in domain {F.domain} "
                       f"(expected {' or '.join(allowed)})")
    if kind == "witness":
        return witness_point(F, t, cert, companion)
    if kind == "tie":
        lo_max = hi_min = check_tie(F, head, t, cert)
        res.ties += 1
    elif kind == "dual" and "weights_exact" in cert:  # deficit >= 0 in exact rationals: t can at best tie
        if "deficit" in cert and not (_number(cert["deficit"]) and cert["deficit"] >= 0):
            raise Unproven(f"deficit {cert['deficit']!r} is negative")
        delta = check_exact_weights(F, t, kind, cert)
        hi_min, lo_max = -qfloat(delta), None
        res.certificates += 1
    elif kind == "dual":
        if "deficit" in cert and not (_number(cert["deficit"]) and cert["deficit"] > 0):
            raise Unproven(f"deficit {cert['deficit']!r} is not positive")
        ok, bounds, msg = check_dual(F, t, *cert_arrays(cert, t, F.V, with_mu=False))
        if not ok:
            raise Unproven(msg)
        hi_min, lo_max = bounds if bounds is not None else (None, None)
        res.certificates += 1
    else:
        lo_max, hi_min = check_gordan_claim(F, t, kind, cert)
        res.certificates += 1
    check_bounds(res, t, entry, lo_max, hi_min, verdict)
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def cert_arrays(cert: dict, t: int, V: int, with_mu: bool):
    """Competitors, weights (and μ) of a dual / cone / zero certificate, or :class:`Unproven` saying what is wrong."""
    comp, lam = cert.get("competitors"), cert.get("weights")
    if not (isinstance(comp, list) and isinstance(lam, list) and comp and len(comp) == len(lam)):
        raise Unproven("certificate needs non-empty competitors and weights of equal length")
    if not all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < V and j != t for j in comp):
        raise Unproven(f"competitors must be token ids in 0 … {V - 1} other than {t}")
    if len(set(comp)) != len(comp):
        raise Unproven("a competitor is named twice")
    if not all(_number(w) and w >= 0 for w in lam) or not sum(lam) > 0:
        raise Unproven("weights must be finite, >= 0 and not all 0")
    out = [np.array(comp, dtype=np.int64), np.array(lam, dtype=np.float64)]
    if with_mu:
        mu = cert.get("mu")
        if not (_number(mu) and mu <= 0):
            raise Unproven(f"mu must be a finite number <= 0; got {mu!r}")
        out.append(float(mu))
    return out


def check_gordan_claim(F: Folded, t: int, kind: str, cert: dict) -> tuple[float | None, float | None]:
    """A cone or zero certificate. Returns (largest margin_lower, smallest margin_upper) it supports."""
    comp, lam, mu = cert_arrays(cert, t, F.V, with_mu=True)
    if kind == "zero":
        if F.domain == "cone":
            raise Unproven("margin exactly 0 needs a bounded domain")
        j = nonconstant_bias(F)
        if j is not None:
            raise Unproven(f"margin exactly 0 needs a constant bias; b[{j}] = {F.bias[j]!r} != b[0] = {F.bias[0]!r}")
    elif "deficit" in cert and not (_number(cert["deficit"]) and cert["deficit"] >= 0):
        raise Unproven(f"deficit {cert['deficit']!r} is negative")
    if "weights_exact" in cert:
        check_exact_weights(F, t, kind, cert)
        return 0.0 if kind == "zero" else None, 0.0
    ok, bound, msg = check_gordan(F, t, comp, lam, mu)
    if not ok:
        raise Unproven(msg)
    if kind == "zero":  # x = 0 ties every token: m_t >= 0; Gordan: m_t <= 0
        return 0.0, 0.0
    return (0.0 if bound is None else bound), bound


def check_tie(F: Folded, head: Head, t: int, cert: dict) -> float:
    """``tie_with`` has the same folded row (and bias outside cone), compared by value. Returns the bound 0."""
    j = cert.get("tie_with")
    if not (isinstance(j, int) and not isinstance(j, bool) and 0 <= j < F.V and j != t):
        raise Unproven(f"tie_with must be a token id other than {t}; got {j!r}")
    if not np.array_equal(F.rows[t], F.rows[j]):
        i = int(np.argmax(F.rows[t] != F.rows[j]))
        raise Unproven(f"folded rows of {t} and {j} differ at [{i}]: {F.rows[t, i]!r} != {F.rows[j, i]!r}")
    if np.any(F.row_err):  # the rounded products agree; the exact ones γ_i u_i agree iff u_i does or γ_i = 0
        differ = (F.raw[t] != F.raw[j]) & (F.gain != 0)
        if differ.any():
            i = int(np.argmax(differ))
            raise Unproven(f"rows of {t} and {j} differ at [{i}] before the fold rounded them together: "
                           f"{F.raw[t, i]!r} != {F.raw[j, i]!r}")
    if F.domain == "cone" or _same_raw(head, t, j):
        return 0.0
    if F.fold_exact and F.bias[t] != F.bias[j]:
        raise Unproven(f"biases of {t} and {j} differ: {F.bias[t]!r} != {F.bias[j]!r}")
    if not F.fold_exact and F.qbias(t) != F.qbias(j):
        raise Unproven(f"biases of {t} and {j} differ exactly (folded: {F.bias[t]!r}, {F.bias[j]!r})")
    return 0.0


def nonconstant_bias(F: Folded) -> int | None:
    """A token whose exact bias differs from token 0's, or None when the bias is constant (exactly)."""
    if F.fold_exact or not np.any(F.bias_err):
        bad = np.nonzero(F.bias != F.bias[0])[0]
        return int(bad[0]) if bad.size else None
    with np.errstate(all="ignore"):
        far = np.abs(F.bias - F.bias[0]) > (F.bias_err + F.bias_err[0]) * (1 + 8 * U) + 4 * U * (np.abs(F.bias) + abs(F.bias[0]))
    if far.any():
        return int(np.argmax(far))
    b0 = F.qbias(0)
    return next((j for j in range(1, F.V) if F.qbias(j) != b0), None)


def check_exact_weights(F: Folded, t: int, kind: str, cert: dict) -> fmpq:
    """Exact weights ``"p/q"`` on the competitors: ``w >= 0``, ``Σw > 0`` and the deficit ``δ(w) >= 0`` in rationals
    (cone: ``r = 0``; zero: ``r`` in the span of 1 (layernorm) or 0; dual: box ``c0 − ρ||r||_1 >= 0``, balls
    ``c0 >= 0`` and ``c0² >= R²||P r||²``). Returns ``δ(w)/Σw`` for box and exact-zero cases (else 0); raises
    :class:`Unproven` otherwise."""
    comp = cert.get("competitors")
    we = cert.get("weights_exact")
    if not (isinstance(we, list) and isinstance(comp, list) and len(we) == len(comp) and comp):
        raise Unproven("weights_exact must be a list of rationals \"p/q\", one per competitor")
    if not all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < F.V and j != t for j in comp) \
            or len(set(comp)) != len(comp):
        raise Unproven(f"competitors must be distinct token ids in 0 … {F.V - 1} other than {t}")
    try:
        w = [Fraction(str(v)) for v in we]
    except (ValueError, ZeroDivisionError) as e:
        raise Unproven(f"weights_exact: {e}") from None
    if any(v < 0 for v in w) or not sum(w) > 0:
        raise Unproven("weights_exact must be >= 0 and not all 0")
    W = [fmpq(v.numerator, v.denominator) for v in w]
    ut = F.qrow(t)
    rows = [F.qrow(j) for j in comp]
    ws = sum(W, fmpq(0))
    r = [sum((W[k] * rows[k][i] for k in range(len(comp))), fmpq(0)) - ws * ut[i] for i in range(F.d)]
    if F.domain == "layernorm":
        mean = sum(r, fmpq(0)) / F.d
        r = [v - mean for v in r]
    if kind in ("cone", "zero"):
        if any(v != 0 for v in r):
            raise Unproven("the exact weights do not combine the rows into u_t (the residual is not 0)")
        return fmpq(0)
    c0 = sum((W[k] * F.qbias(j) for k, j in enumerate(comp)), fmpq(0)) - ws * F.qbias(t)
    R = q(F.radius)
    if F.domain == "box":
        delta = c0 - R * sum((abs(v) for v in r), fmpq(0))
        if delta < 0:
            raise Unproven(f"the exact deficit of weights_exact is negative ({qfloat(delta):.3g})")
        return delta / ws
    n2 = R * R * sum((v * v for v in r), fmpq(0))
    if not (c0 >= 0 and c0 * c0 >= n2):
        raise Unproven("the exact deficit of weights_exact is negative")
    if n2 == 0:
        return c0 / ws
    # δ = c0 − sqrt(n2) is irrational: a float lower bound, inflated generously, never below 0
    lo = qfloat(c0) * (1 - 1e-12) - math.sqrt(qfloat(n2)) * (1 + 1e-12)
    return q(max(lo, 0.0)) / ws


def _same_raw(head: Head, t: int, j: int) -> bool:
    """Equal stored columns and b_U make equal exact biases, whatever rounding folded them."""
    W = np.asarray(head.W_U)
    return bool(np.array_equal(W[:, t], W[:, j]) and (head.b_U is None or head.b_U[t] == head.b_U[j]))


def witness_point(F: Folded, t: int, cert: dict, companion) -> np.ndarray:
    """The point a witness certificate names: a list, ``"self-direction"`` or ``{"companion": i}``."""
    x = cert.get("x")
    if x == "self-direction":
        return screen_points(F, np.array([t]))[0]
    if isinstance(x, dict) and set(x) == {"companion"}:
        i = x["companion"]
        if companion is None:
            raise Unproven("x names a companion row but the report names no companion file")
        ids, X = companion
        if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < ids.size):
            raise Unproven(f"companion row {i!r} does not exist ({ids.size} rows)")
        if int(ids[i]) != t:
            raise Unproven(f"companion row {i} belongs to token {int(ids[i])}")
        return X[i]
    if isinstance(x, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
        return np.array(x, dtype=np.float64)
    raise Unproven("witness x must be a list of numbers, \"self-direction\" or {\"companion\": i}")


def check_pending(F: Folded, pending: list, res: AuditResult) -> None:
    """Domain membership, then all witnesses in batched passes over all V logits."""
    keep = []
    for t, x, entry in pending:
        why = in_domain(F, x)
        if why is None:
            keep.append((t, x, entry))
        else:
            res.fail(t, "speakable" if entry else "speakable (screen)", f"witness outside the domain: {why}")
    if not keep:
        return
    ts = np.array([k[0] for k in keep], dtype=np.int64)
    ok, lo, hi, runner = check_witnesses(F, ts, np.stack([k[1] for k in keep]))
    for i, (t, _, entry) in enumerate(keep):
        claim = "speakable" if entry else "speakable (screen)"
        if not ok[i]:
            res.fail(t, claim, f"the margin at x is only known to be >= {lo[i]:.6g}, not > 0 "
                               f"(token {int(runner[i])} binds)")
            continue
        res.witnesses += 1
        if entry is not None:
            check_bounds(res, t, entry, float(hi[i]), float(lo[i]), claim)


def check_bounds(res: AuditResult, t: int, entry: dict, lo_max, hi_min, claim: str) -> None:
    """Stated bounds against the evidence: ``margin_lower <= lo_max``, ``margin_upper >= hi_min`` (and a stated
    ``deficit <= −hi_min``), each up to ``BOUND_SLACK``. A side the evidence says nothing about (None) is skipped."""
    cert = entry.get("certificate") or {}
    checks = [("margin_lower", entry.get("margin_lower"), lo_max, 1.0),
              ("margin_upper", entry.get("margin_upper"), hi_min, -1.0)]
    if cert.get("kind") == "dual" and "deficit" in cert:
        checks.append(("deficit", None if cert["deficit"] is None else -cert["deficit"], hi_min, -1.0))
    for name, stated, limit, sign in checks:
        if stated is None or limit is None or not math.isfinite(limit):
            continue
        if not _number(stated):
            res.fail(t, claim, f"{name} {stated!r} is not a finite number")
            continue
        if sign * (stated - limit) > BOUND_SLACK * abs(limit):
            shown = -stated if name == "deficit" else stated
            want = "<=" if sign > 0 else ">="
            if name == "deficit":
                want, limit = "<=", -limit
            res.fail(t, claim, f"stated {name} {shown!r} does not follow from the evidence (needs {want} {limit:.17g})")
