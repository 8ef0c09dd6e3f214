"""Stage 5 — decide: one restricted problem per open token, by constraint generation (DESIGN §3 step 5).

With ``a_j = k_t − k_j`` and ``β_j = b_t − b_j`` on the keys ``k_j`` (``problem.keys``) the margin is

    m_t = max over x in X of  s   subject to   s <= a_j·x + β_j   for every j != t,

and only a working set S of competitors is kept: solve the problem restricted to S, compute all V logits
at its solution in float64, add the worst rows that beat the restricted optimum, repeat until none does;
then the restricted optimum is the full one (box and cone LPs: exactly; balls: to ``tol``).

* ``box`` — the LP above with x in [−ρ, ρ]^d, solved by HiGHS (dual simplex, warm started as rows arrive).
  Witness: the LP's x (clipped into the box against HiGHS's feasibility tolerance); certificate: its row
  duals.
* ``layernorm`` / ``rmsnorm`` — the restricted optimum lies in ``span{a_j : j in S}`` (an orthogonal
  component only uses radius), so everything runs on coordinates z of an orthonormal basis Q of that span,
  ``x = Q z``, grown by Gram–Schmidt as S grows (a new basis vector is orthogonal to every old row, so old
  rows get no entry in a new column). The ball is not polyhedral and Kelley's tangent cuts alone do not
  converge at GPT-2 shape (S of 64 competitors: after 400 cuts the LP bound was still +20 against a
  witness at −8 — the LP keeps finding new corners of the outer polytope in 64 dimensions). The restricted
  optimum is instead computed exactly by :func:`_ball_optimum` (2–4 least-distance problems, one NNLS
  each), which also yields the certificate (its weights give ``−δ(λ) = s*``) and the witness (the
  maximiser, on the sphere). ``use_lp=True`` additionally feeds that optimum to the HiGHS LP as a tangent
  cut — the LP over S with this single cut has the same optimum, since the ball's KKT multipliers satisfy
  the LP's — and offers the LP's duals as a second certificate: a cross-check that costs more than the
  oracle, off by default.
* ``cone`` — bias ignored, normalisation ``k_t·x = 1`` (keys are centred on the mean row, so every winner
  has ``k_t·x > 0``), cap ``s <= 1`` (a positive optimum already proves a winner; without the cap a
  vertex's LP is unbounded), x in ``span{k_t, a_j : j in S}`` as for the balls. At GPT-2 shape nearly every
  token is a hull vertex and the LP needs S beyond d rows before the cap stops binding (20 s without a
  verdict), so by default the witness is first sought with the ball oracle on the unit ball without bias
  (a positive restricted margin there, checked over all V, is a witness; it is reported normalised to
  ``k_t·x = 1``); once that margin is 0 on S (k_t in the hull of S) the cone LP takes over and gives the
  certificate ``(λ, mu)``. ``cone_oracle=False`` runs the LP throughout (then ``lower`` of a vertex is the
  capped LP optimum).

Pricing is one pass over all V logits per round, in float32 with a rigorous per-row error bound and
completed in float64 for every row the bound cannot exclude (:meth:`_Head.price`): the float64 values of
all rows that matter at half the memory traffic of a float64 GEMV.

Everything returned is a claim for ``engine.verify``: ``lower`` is the margin of the returned witness over
all V (float64), ``upper`` the bound ``−δ(λ)`` of the returned certificate recomputed in float64 from its
weights (cone: ``mu``, the normalisation row's multiplier refitted in float64 from λ, kept only when
``Σ λ_j (k_j − k_t) = −mu k_t`` holds to rounding). Both are valid at every round and tracked as the best
seen; a HiGHS status other than optimal, the time limit or the round limit end the loop with those bounds
and a reason, never with a verdict. ``stop_at_sign=True`` ends as soon as one of them has a clear sign.
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.optimize import nnls

from engine.evidence import Candidate, Certificate
from engine.highs import LP, LPResult, Status
from engine.verify import into_domain

BALLS = ("layernorm", "rmsnorm")
U32 = 2.0**-24


@dataclass
class DecideStats:
    """How one token's solve went (for benchmarks and logs; not part of the evidence)."""

    token: int
    status: str  # "converged", "gap", "sign", "time limit", "round limit", "oracle gap", "highs: <status>"
    rounds: int = 0  # restricted solves (LP or ball oracle)
    pricings: int = 0  # passes over the V logits
    cuts: int = 0  # tangent cuts of the sphere (balls, use_lp=True)
    oracle_solves: int = 0  # least-distance problems of the ball oracle
    rows: int = 0  # competitors in S at the end
    cols: int = 0  # LP columns at the end
    simplex_iterations: int = 0
    lp_time_s: float = 0.0
    oracle_time_s: float = 0.0
    pricing_time_s: float = 0.0
    time_s: float = 0.0


# ------------------------------------------------------------------------------------------ the head
@dataclass
class _Pricing:
    """All V logits at one point, as far as they matter: every j != t with ``l_j >= floor`` is in ``ids``
    with its float64 logit, so the runner-up and every violated row are exact."""

    own: float  # l_t(x), float64
    ids: np.ndarray  # int64, j != t
    logits: np.ndarray  # float64 l_j(x) for ids
    top: float  # max_{j != t} l_j(x), float64
    runner_up: int
    size: float  # about max_j |l_j(x)|, for relative tolerances


class _Head:
    """What every token's solve reads: float64 keys and bias, a float32 copy for pricing, row norms.
    Built once per problem (see :func:`_head_for`)."""

    def __init__(self, problem):
        self.domain = problem.domain
        if self.domain not in ("layernorm", "rmsnorm", "box", "cone"):
            raise ValueError(f"unknown domain {self.domain!r}")
        self.keys = np.ascontiguousarray(problem.keys, dtype=np.float64)
        self.V, self.d = self.keys.shape
        if self.V < 2:
            raise ValueError("need at least two tokens")
        if self.domain == "cone":
            self.bias = np.zeros(self.V)  # the cone ignores the bias (scale x up)
            self.radius = None
        else:
            self.bias = np.ascontiguousarray(problem.bias, dtype=np.float64)
            self.radius = float(problem.radius)
        self.keys32 = self.keys.astype(np.float32)
        # |fl32(k32·x32) − k·x| <= (2u(1+u) + γ_d (1+u)²) Σ|k_i||x_i| <= that × ||k|| ||x||, u = 2^-24, for
        # any summation order (Higham 3.1 and the two roundings to float32); doubled for the float64 epilogue.
        g = (self.d + 2) * U32 / (1.0 - (self.d + 2) * U32)
        self.row_err = 2.0 * (2 * U32 * (1 + U32) + g * (1 + U32) ** 2) * np.linalg.norm(self.keys, axis=1)

    def price(self, x: np.ndarray, t: int, floor_offset: float = -math.inf, n_top: int = 2) -> _Pricing:
        """Logits at x: exact (float64) for the ``n_top`` largest j != t and for every j != t with
        ``l_j >= l_t + floor_offset`` (no such condition when it is −inf). The float32 pass gives bounds
        ``L32 ± err``; rows whose upper bound clears the floor are recomputed in float64 (all of them, by one
        float64 GEMV, when they are many)."""
        x = np.asarray(x, dtype=np.float64)
        own = float(self.keys[t] @ x + self.bias[t])
        L32 = (self.keys32 @ x.astype(np.float32)).astype(np.float64) + self.bias
        # dot-product bound, plus the float64 addition of the bias (a few units of 2^-53 of the sum)
        err = self.row_err * float(np.linalg.norm(x)) + 2.0**-50 * (np.abs(L32) + np.abs(self.bias))
        lo = L32 - err
        lo[t] = -math.inf
        n_top = max(1, min(int(n_top), self.V - 1))
        # The n_top-th largest lower bound over j != t is <= the true n_top-th largest logit over j != t,
        # so every row of the true top n_top (the runner-up included) clears this floor.
        kth = float(np.partition(lo, self.V - n_top)[self.V - n_top])
        floor = kth if floor_offset == -math.inf else min(kth, own + floor_offset)
        cand = np.nonzero(L32 + err >= floor)[0]
        cand = cand[cand != t]
        if cand.size > self.V // 8:
            L = self.keys @ x + self.bias
            L[t] = -math.inf
            cand = np.nonzero(L >= floor)[0]
            vals = L[cand]
        else:
            vals = self.keys[cand] @ x + self.bias[cand]
        i = int(np.argmax(vals))
        size = max(abs(own), float(np.max(np.abs(L32))))
        return _Pricing(own, cand.astype(np.int64), vals, float(vals[i]), int(cand[i]), size)

    def screen_point(self, t: int) -> np.ndarray:
        """The witness screen's point x_t (DESIGN §3 step 3)."""
        kt = self.keys[t]
        n = float(np.linalg.norm(kt))
        if self.domain == "box":
            return self.radius * np.sign(kt)
        if n == 0.0:
            return np.zeros(self.d)
        if self.domain == "cone":
            return kt / (n * n)
        return self.radius * kt / n


_HEAD_CACHE: dict = {}


def _head_for(problem) -> _Head:
    """One :class:`_Head` per live problem (the float32 copy and row norms cost about one GEMM's traffic)."""
    key = (id(problem), id(problem.keys), id(problem.bias), problem.domain, problem.radius)
    hit = _HEAD_CACHE.get("entry")
    if hit is not None and hit[0] == key and hit[1]() is problem:
        return hit[2]
    head = _Head(problem)
    try:
        ref = weakref.ref(problem, lambda _: _HEAD_CACHE.pop("entry", None))
    except TypeError:  # not weak-referenceable: do not cache
        return head
    _HEAD_CACHE["entry"] = (key, ref, head)
    return head


# ------------------------------------------------------------------------------------------ formulations
class _Formulation:
    """The restricted problem of one token. LP column 0 is s; competitor rows are kept in ``comp_rows``."""

    lp: LP

    def __init__(self, head: _Head, t: int):
        self.h, self.t = head, t
        self.kt = head.keys[t]
        self.bt = float(head.bias[t])
        self.ids: list[int] = []
        self.comp_rows: list[int] = []
        self.cuts = 0

    def add(self, J: np.ndarray):
        raise NotImplementedError

    def point(self, res: LPResult) -> np.ndarray:
        raise NotImplementedError

    def weights(self, res: LPResult) -> np.ndarray:
        """Shadow prices of the competitor rows: λ_j >= 0 up to the solver's tolerance."""
        return res.row_duals[np.asarray(self.comp_rows, dtype=np.int64)]


class _BoxLP(_Formulation):
    def __init__(self, head, t):
        super().__init__(head, t)
        rho = head.radius
        lo = np.full(head.d + 1, -rho)
        up = np.full(head.d + 1, rho)
        lo[0], up[0] = -math.inf, math.inf
        cost = np.zeros(head.d + 1)
        cost[0] = 1.0
        self.lp = LP(cost, lo, up, sense="max")

    def add(self, J):
        A = np.empty((J.size, self.h.d + 1))
        A[:, 0] = 1.0
        A[:, 1:] = self.h.keys[J] - self.kt
        rows = self.lp.add_rows(A, -math.inf, self.bt - self.h.bias[J])  # s + (k_j − k_t)·x <= b_t − b_j
        self.ids.extend(int(j) for j in J)
        self.comp_rows.extend(int(r) for r in rows)

    def point(self, res):
        # HiGHS meets bounds to its feasibility tolerance only; the witness must lie in the box exactly.
        return np.clip(res.x[1:], -self.h.radius, self.h.radius)


class _SpanLP(_Formulation):
    """Balls and cone on x = Q z. Keeps the rows' coefficients ``C`` [|S|, k] (``(k_j − k_t)·Q z``) and
    ``β`` so that margins over S cost |S| k flops."""

    def __init__(self, head, t):
        super().__init__(head, t)
        self.cone = head.domain == "cone"
        self.Q = np.zeros((head.d, 0))
        self.C = np.zeros((0, 0))
        self.beta = np.zeros(0)
        if self.cone:
            nt = float(np.linalg.norm(self.kt))
            if nt == 0.0:
                raise ValueError(f"token {t} has a zero centred row: the cone normalisation k_t·x = 1 is empty")
            self.lp = LP(np.array([1.0]), [-math.inf], [1.0], sense="max")  # the cap s <= 1
            # k_t·x = k_t·Q z = ||k_t|| z_0: Q's first column is k_t/||k_t||, later ones are orthogonal to it.
            self.Q = (self.kt / nt)[:, None]
            self.C = np.zeros((0, 1))
            self.lp.add_cols(np.zeros(1), -math.inf, math.inf)
            self.lp.add_rows(np.array([[0.0, nt]]), 1.0, 1.0)
        else:
            self.lp = LP(np.array([1.0]), [-math.inf], [math.inf], sense="max")

    def _grow(self, W: np.ndarray):
        """Extend Q by the part of span(rows of W) it misses: project out Q twice (classical Gram–Schmidt
        with reorthogonalisation), then a pivoted QR of the rest keeps the numerically independent part."""
        room = self.h.d - self.Q.shape[1]
        if room <= 0 or W.shape[0] == 0:
            return
        Rm = W.T.copy()
        for _ in range(2):
            Rm -= self.Q @ (self.Q.T @ Rm)
        Qb, Rb, _ = sla.qr(Rm, mode="economic", pivoting=True)
        diag = np.abs(np.diag(Rb))
        ref = max(float(np.max(np.linalg.norm(W, axis=1))), 1e-300)
        r = min(int(np.sum(diag > 1e-9 * ref)), room)  # a direction already in the span adds no column
        if r == 0:
            return
        Qn = Qb[:, :r]
        Qn -= self.Q @ (self.Q.T @ Qn)
        Qn, _ = np.linalg.qr(Qn)
        self.Q = np.concatenate([self.Q, Qn], axis=1)
        self.C = np.concatenate([self.C, np.zeros((self.C.shape[0], r))], axis=1)
        bound = math.inf if self.cone else self.h.radius  # |z_i| <= R contains the ball
        self.lp.add_cols(np.zeros(r), -bound, bound)

    def add(self, J):
        W = self.h.keys[J] - self.kt  # k_j − k_t
        self._grow(W)
        Cn = W @ self.Q
        beta = np.zeros(J.size) if self.cone else self.bt - self.h.bias[J]
        A = np.empty((J.size, self.Q.shape[1] + 1))
        A[:, 0] = 1.0
        A[:, 1:] = Cn
        rows = self.lp.add_rows(A, -math.inf, beta)  # s + (k_j − k_t)·Q z <= b_t − b_j
        self.C = np.concatenate([self.C, Cn], axis=0)
        self.beta = np.concatenate([self.beta, beta])
        self.ids.extend(int(j) for j in J)
        self.comp_rows.extend(int(r) for r in rows)

    def point(self, res):
        return self.Q @ res.x[1:]

    def margin_S(self, z: np.ndarray) -> float:
        """min over S of a_j·x + β_j at x = Q z."""
        return float(np.min(self.beta - self.C @ z))

    def add_cut(self, g: np.ndarray):
        """Tangent cut g·z <= R of the sphere (g a unit vector): valid for every point of the ball."""
        A = np.zeros((1, g.size + 1))
        A[0, 1:] = g
        self.lp.add_rows(A, -math.inf, self.h.radius)
        self.cuts += 1


# ------------------------------------------------------------------------------------------ ball oracle
@dataclass
class _BallOptimum:
    lower: float  # min_j (G_j·z + β_j) at z
    z: np.ndarray  # a point with ||z|| <= R
    upper: float  # R ||G^T λ|| + β·λ, an upper bound on the restricted optimum
    lam: np.ndarray  # weights on the rows (>= 0, sum 1)
    solves: int


def _ldp(G: np.ndarray, h: np.ndarray):
    """Least distance programming (Lawson & Hanson, ch. 23): ``min ||z|| s.t. G z >= h`` by one NNLS of
    ``[G^T; h^T] u ≈ e_last``. Returns ``(z, u)`` with ``z = G^T u / (1 − h·u)``; when the constraints are
    infeasible ``z`` is None and ``u`` a Farkas certificate (``G^T u = 0``, ``h·u = 1``)."""
    m, k = G.shape
    E = np.empty((k + 1, m))
    E[:k] = G.T
    E[k] = h
    f = np.zeros(k + 1)
    f[k] = 1.0
    u, _ = nnls(E, f, maxiter=max(100, 10 * m))
    den = 1.0 - float(h @ u)
    if not den > 1e-12:
        return None, u
    return (G.T @ u) / den, u


def _min_norm_slope(GP: np.ndarray) -> np.ndarray:
    """The min-norm dz with ``G_P dz = 1`` (how the LDP point moves with the level on one active set)."""
    ones = np.ones(GP.shape[0])
    try:
        c = sla.cho_factor(GP @ GP.T)
        dz = GP.T @ sla.cho_solve(c, ones)
        if np.all(np.isfinite(dz)) and np.allclose(GP @ dz, ones, rtol=0, atol=1e-8):
            return dz
    except (np.linalg.LinAlgError, ValueError):
        pass
    return np.linalg.lstsq(GP, ones, rcond=None)[0]  # rank-deficient active set


def _ball_optimum(G: np.ndarray, beta: np.ndarray, R: float, s_lo: float, tol_s: float,
                  max_solves: int = 30) -> _BallOptimum | None:
    """``max_{||z|| <= R} min_j (G_j·z + β_j)`` through the level function
    ``N(s) = min{||z|| : G z + β >= s}`` (an LDP): the optimum is the largest s with N(s) <= R.

    N is convex and nondecreasing, and on one active set P of the LDP z(s) is affine in s (slope:
    :func:`_min_norm_slope`), so N(s)² is a quadratic whose root is taken exactly; steps stay in the
    bracket ``[lo, hi]`` and fall back to bisection. Each LDP also yields a certificate: at a feasible
    level its NNLS weights (``z ∝ G^T u``; at the root ``−δ(u/Σu) = s`` exactly), at an infeasible one its
    Farkas weights (``G^T u = 0``, so ``−δ = β·u/Σu``: the optimum when the ball does not bind). Typically
    2–4 LDPs. ``s_lo`` must have N(s_lo) <= R (the margin over S of any point of the ball)."""
    lo, hi = float(s_lo), math.inf
    best_z, best_lower = None, -math.inf
    best_lam, best_upper = None, math.inf
    s, tried_below, solves = lo, math.nan, 0
    while solves < max_solves:
        z, u = _ldp(G, s - beta)
        solves += 1
        su = float(u.sum())
        if su > 0:
            lam = u / su
            up = R * float(np.linalg.norm(G.T @ lam)) + float(lam @ beta)
            if up < best_upper:
                best_lam, best_upper = lam, up
        hi = min(hi, best_upper)
        s_new = None
        if z is None:
            hi = min(hi, s)
        else:
            nz = float(np.linalg.norm(z))
            zb = z * min(1.0, R / nz) if nz > 0 else z
            low = float(np.min(G @ zb + beta))
            if low > best_lower:
                best_z, best_lower = zb, low
            lo = max(lo, min(s, low))
            if nz > R:
                hi = min(hi, s)
            P = u > 0
            if np.any(P):
                dz = _min_norm_slope(G[P])
                a, b, c = float(dz @ dz), float(z @ dz), nz * nz - R * R
                if a > 0 and b * b - a * c >= 0:
                    s_new = s + (-b + math.sqrt(b * b - a * c)) / a
            elif nz == 0.0:
                s_new = float(np.min(beta))  # z = 0 stays feasible up to the smallest β
        if best_upper - best_lower <= tol_s or hi - lo <= tol_s:
            break
        if s_new is None or not (lo < s_new < hi):
            if math.isfinite(hi) and hi != tried_below:
                # hi is often the optimum itself (a Farkas bound where the ball does not bind): try just below.
                s_new, tried_below = max(hi - 0.25 * tol_s, 0.5 * (lo + hi)), hi
            else:
                s_new = 0.5 * (lo + hi) if math.isfinite(hi) else lo + max(1.0, abs(lo))
        if s_new == s:
            break
        s = s_new
    if best_z is None or best_lam is None:
        return None
    return _BallOptimum(best_lower, best_z, best_upper, best_lam, solves)


# ------------------------------------------------------------------------------------------ evidence
def _certificate_bound(head: _Head, t: int, ids: np.ndarray, lam: np.ndarray) -> tuple[float, float | None]:
    """``(upper, mu)`` of weights λ (>= 0, sum 1) in float64 from the keys: ``upper = −δ(λ)`` on bounded
    domains; on the cone ``mu`` is the least-squares multiplier of ``Σ λ_j (k_j − k_t) = −mu k_t`` and
    ``upper = mu`` when that identity holds to rounding (else ``inf``, no bound)."""
    kt = head.keys[t]
    r = lam @ head.keys[ids] - kt  # Σ λ_j (k_j − k_t)
    if head.domain == "cone":
        nt2 = float(kt @ kt)
        mu = -float(r @ kt) / nt2
        resid = float(np.linalg.norm(r + mu * kt))
        size = float(lam @ np.linalg.norm(head.keys[ids], axis=1)) + math.sqrt(nt2)
        return (mu, mu) if resid <= 1e-9 * size else (math.inf, None)
    c0 = float(lam @ head.bias[ids]) - float(head.bias[t])
    if head.domain == "box":
        sup = head.radius * float(np.abs(r).sum())
    else:
        if head.domain == "layernorm":
            r = r - r.mean()
        sup = head.radius * float(np.linalg.norm(r))
    return sup - c0, None  # −δ with δ = c0 − sup_X(−r·x)


# ------------------------------------------------------------------------------------------ decide
def _one_blas_thread():
    """BLAS on one thread while deciding: the small dense solves here lose badly to thread hand-offs on a
    busy machine (a 200×200 Cholesky: 0.9 ms on one thread, 170 ms on two contended ones), and one thread
    fixes the summation order, so the float64 logits do not depend on the machine's thread count."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its own setting
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def decide_token(problem, t: int, *, competitors=None, time_limit: float = 20.0, max_rounds: int = 200,
                 add_per_round: int = 32, tol: float = 1e-9, **options) -> Candidate:
    """Decide one token by constraint generation; returns a Candidate (claims for ``engine.verify``).
    See :func:`decide_token_stats` for the arguments."""
    return decide_token_stats(problem, t, competitors=competitors, time_limit=time_limit, max_rounds=max_rounds,
                              add_per_round=add_per_round, tol=tol, **options)[0]


def decide_token_stats(problem, t: int, *, competitors=None, time_limit: float = 20.0, max_rounds: int = 200,
                       add_per_round: int = 32, tol: float = 1e-9, n_start: int = 64, stop_at_sign: bool = False,
                       sign_tol: float = 1e-6, use_lp: bool = False, max_cuts: int = 200, cone_oracle: bool = True
                       ) -> tuple[Candidate, DecideStats]:
    """:func:`decide_token` plus how it went.

    Args:
        competitors: token ids to start S with (e.g. the search's certificate support); default: the
            ``n_start`` largest logits at the witness screen's point x_t.
        time_limit: wall seconds for this token (checked between solves; a HiGHS solve gets the rest).
        max_rounds: restricted solves.
        add_per_round: violated rows added per pricing, the worst first.
        tol: relative tolerance (of the largest |logit| seen) for "violated" and for the gap between the
            witness's margin and the certificate's bound at which the loop stops.
        stop_at_sign: stop as soon as the witness's margin exceeds ``sign_tol`` (relative) or the
            certificate's bound is below ``−sign_tol``: enough for a verdict, not for the exact margin.
        use_lp: balls only: also solve the LP over S with a tangent cut at the oracle's optimum and offer
            its duals as a certificate (a cross-check; the LP is exact there but slower than the oracle).
        max_cuts: balls, ``use_lp``: cap on tangent cuts.
        cone_oracle: cone only: look for a witness with the ball oracle (unit ball, no bias) first and
            switch to the cone LP only once the restricted ball margin is 0 (k_t inside the hull of S). For
            a vertex the result is then a witness (``lower`` its normalised margin, ``upper`` inf) rather
            than the capped LP optimum; ``False`` runs the LP throughout.
    """
    with _one_blas_thread():
        return _decide(problem, int(t), competitors, float(time_limit), int(max_rounds), int(add_per_round),
                       float(tol), int(n_start), bool(stop_at_sign), float(sign_tol), bool(use_lp), int(max_cuts),
                       bool(cone_oracle))


def _decide(problem, t, competitors, time_limit, max_rounds, add_per_round, tol, n_start, stop_at_sign, sign_tol,
            use_lp, max_cuts, cone_oracle) -> tuple[Candidate, DecideStats]:
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    head = _head_for(problem)
    V, domain = head.V, head.domain
    if not 0 <= t < V:
        raise ValueError(f"token {t} out of range [0, {V})")
    ball, cone = domain in BALLS, domain == "cone"
    R = head.radius
    stats = DecideStats(token=t, status="")
    best_lower, best_x = -math.inf, None
    best_upper, best_cert = math.inf, None

    def price(x, floor_offset=-math.inf, n_top=2):
        tp = time.perf_counter()
        pr = head.price(x, t, floor_offset, n_top)
        stats.pricings += 1
        stats.pricing_time_s += time.perf_counter() - tp
        return pr

    def offer_witness(x, pr: _Pricing):
        nonlocal best_lower, best_x
        m = pr.own - pr.top
        if cone:
            nx = float(head.keys[t] @ x)  # the normalisation k_t·x = 1 (up to rounding after the LP)
            if not nx > 0:
                return
            m, x = m / nx, x / nx
        if m > best_lower:
            best_lower, best_x = m, x.copy()

    def offer_certificate(ids, lam):
        nonlocal best_upper, best_cert
        keep = lam > 0
        if not np.any(keep):
            return
        ids, lam = ids[keep], lam[keep]
        lam = lam / lam.sum()
        upper, mu = _certificate_bound(head, t, ids, lam)
        if upper < best_upper:
            best_upper, best_cert = upper, Certificate(ids.astype(np.int64), lam, mu)

    # ---- the starting set S
    if competitors is None or len(competitors) == 0:
        x0 = head.screen_point(t)
        n0 = min(n_start, V - 1)
        pr0 = price(x0, n_top=n0)
        offer_witness(x0, pr0)
        S0 = pr0.ids[np.argsort(-pr0.logits, kind="stable")[:n0]]
    else:
        S0 = np.asarray(competitors, dtype=np.int64).ravel()
        S0 = S0[(S0 >= 0) & (S0 < V) & (S0 != t)]
        _, first = np.unique(S0, return_index=True)
        S0 = S0[np.sort(first)]
        if S0.size == 0:
            S0 = np.array([(t + 1) % V], dtype=np.int64)
    form: _Formulation = _BoxLP(head, t) if domain == "box" else _SpanLP(head, t)
    form.add(S0)
    in_S = np.zeros(V, dtype=bool)
    in_S[S0] = True
    # Tolerances are relative to the size of the logits: |b| + R·||k|| over t and S0, then what pricing sees.
    Sk = np.concatenate([S0, [t]])
    if domain == "box":
        scale = R * float(np.max(np.abs(head.keys[Sk]).sum(axis=1)))
    elif ball:
        scale = R * float(np.max(np.linalg.norm(head.keys[Sk], axis=1)))
    else:
        scale = 1.0
    scale += float(np.max(np.abs(head.bias[Sk])))

    # Cone: first the bias-free unit-ball margin on S (the oracle): positive means a witness direction,
    # and at GPT-2 shape almost every token is a hull vertex; the cone LP (mu) takes over once S holds k_t.
    cone_by_ball = cone and cone_oracle
    status = "round limit"
    while True:
        if stats.rounds >= max_rounds:
            status = "round limit"
            break
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            status = "time limit"
            break
        stats.rounds += 1
        tol_abs = tol * scale
        ids = np.asarray(form.ids, dtype=np.int64)
        bo = None
        if ball or cone_by_ball:
            to = time.perf_counter()
            R_or = R if ball else 1.0
            if ball and best_x is not None:
                z_hint = form.Q.T @ best_x
            else:
                z_hint = np.zeros(form.Q.shape[1])
            G = -form.C
            bo = _ball_optimum(G, form.beta, R_or, float(np.min(G @ z_hint + form.beta)), tol_abs)
            stats.oracle_time_s += time.perf_counter() - to
            if bo is not None:
                stats.oracle_solves += bo.solves
            if ball and bo is not None:
                offer_certificate(ids, bo.lam)
                nz = float(np.linalg.norm(bo.z))
                if use_lp and nz >= R * (1.0 - 1e-9) and form.cuts < max_cuts:
                    form.add_cut(bo.z / nz)
            if cone_by_ball and (bo is None or bo.upper <= tol_abs):
                # k_t is (numerically) in the hull of S: only the cone LP can show by how much (mu < 0).
                cone_by_ball, bo = False, None
        res = None
        if (not ball and bo is None) or (ball and (use_lp or bo is None)):
            res = form.lp.solve(time_limit=remaining)
            stats.simplex_iterations += res.nit
            stats.lp_time_s += res.time_s
            if not res.success:
                status = "time limit" if res.status == Status.TIME_LIMIT else f"highs: {res.status.value}"
                break
            # Cone: the cap s <= 1 takes part of the weight; a certificate needs it slack (Σ λ = 1 on rows).
            if not cone or res.objective < 1.0 - 1e-9:
                offer_certificate(ids, np.maximum(form.weights(res), 0.0))

        if cone and bo is not None:
            x_w = form.Q @ bo.z  # unit-ball point; the witness is offered normalised (k_t·x = 1)
            m_ref = bo.lower
        elif ball:
            if bo is None:
                # Oracle failure (not seen in practice): Kelley on the LP point, scaled into the ball.
                z_lp = res.x[1:]
                n_lp = float(np.linalg.norm(z_lp))
                if n_lp > R * (1.0 + 1e-9) and form.cuts < max_cuts:
                    form.add_cut(z_lp / n_lp)
                    continue
                z_w = z_lp * min(1.0, R / n_lp) if n_lp > 0 else z_lp
                m_ref = form.margin_S(z_w)
            else:
                z_w, m_ref = bo.z, bo.lower
            x_w = into_domain(problem, form.Q @ z_w)
        else:
            x_w = form.point(res)
            m_ref = float(res.objective)
        pr = price(x_w, floor_offset=-m_ref + tol_abs)
        offer_witness(x_w, pr)
        scale = max(scale, pr.size)
        tol_abs = tol * scale
        # Rows outside S that beat the restricted margin at the witness: the restricted problem misses them.
        viol_mask = (pr.logits > pr.own - m_ref + tol_abs) & ~in_S[pr.ids]
        viol, vals = pr.ids[viol_mask], pr.logits[viol_mask]
        if viol.size == 0:
            if cone_by_ball and not best_lower > 0:
                cone_by_ball = False  # no positive witness on the ball side: the cone LP decides
                continue
            if ball:
                status = "converged" if best_upper - best_lower <= 2 * tol_abs else "oracle gap"
            else:
                status = "converged"  # box / cone LP: optimum; cone by the ball: a positive witness over all V
            break
        if best_upper - best_lower <= tol_abs:
            status = "gap"
            break
        if stop_at_sign and (best_lower > sign_tol * scale or best_upper < -sign_tol * scale):
            status = "sign"
            break
        k = min(add_per_round, viol.size)
        order = np.argsort(-vals, kind="stable")[:k]
        J = viol[order]
        form.add(J)
        in_S[J] = True

    stats.status = status
    stats.cuts = form.cuts
    stats.rows = len(form.ids)
    stats.cols = form.lp.num_cols
    stats.time_s = time.perf_counter() - t0
    if status in ("converged", "gap", "sign"):
        reason = "lp"
    elif status.startswith("highs"):
        reason = status
    else:
        reason = f"lp: {status}"
    cand = Candidate(token=t, witness=best_x, certificate=best_cert, lower=best_lower, upper=best_upper,
                     reason=reason, time_s=stats.time_s, iterations=stats.rounds)
    return cand, stats


def decide_many(problem, tokens, competitors: dict | None = None, *, time_limit: float = 20.0, workers: int = 1,
                **options) -> list[Candidate]:
    """:func:`decide_token` for each token (same order); ``competitors`` maps a token id to its starting ids.
    Tokens are independent and each solve is deterministic, so the results do not depend on ``workers``
    (a fork-based process pool when > 1; the children share the problem's arrays copy-on-write).
    An exception while deciding one token becomes that token's Candidate with reason ``lp error: ...`` and
    no claims — a solver failure is reported, never turned into a verdict, and never stops the others."""
    tokens = [int(t) for t in tokens]
    competitors = competitors or {}
    if workers <= 1 or len(tokens) <= 1:
        return [_decide_contained(problem, t, competitors.get(t), time_limit, options) for t in tokens]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    global _POOL_STATE
    _head_for(problem)  # build once in the parent; the children inherit it
    _POOL_STATE = (problem, competitors, time_limit, options)
    try:
        with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("fork")) as ex:
            return list(ex.map(_pool_decide, tokens))
    finally:
        _POOL_STATE = None


_POOL_STATE = None


def _pool_decide(t: int) -> Candidate:
    problem, competitors, time_limit, options = _POOL_STATE
    return _decide_contained(problem, t, competitors.get(t), time_limit, options)


def _decide_contained(problem, t, competitors, time_limit, options) -> Candidate:
    t0 = time.perf_counter()
    try:
        return decide_token(problem, t, competitors=competitors, time_limit=time_limit, **options)
    except Exception as e:  # noqa: BLE001 - reported as the token's reason, see decide_many
        return Candidate(token=t, reason=f"lp error: {type(e).__name__}: {e}", time_s=time.perf_counter() - t0)
