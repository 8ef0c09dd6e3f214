"""The restricted problems of the decide stage: one solver per domain behind one interface.

For token t and a working set S of competitors, with ``a_j = k_t − k_j`` and ``β_j = b_t − b_j`` on the keys:

    max over x in X of  s   subject to   s <= a_j·x + β_j   for j in S.

Each solver keeps its restricted problem, grows it with :meth:`Restricted.add`, and on :meth:`step` returns
a :class:`Step`: a point of the domain to price over all V (its restricted margin ``m_ref``) and the
certificates it found (weights on S); a solver limit comes back as a status string, never as a number.

* :class:`BoxSolver` — the LP above with x in [−ρ, ρ]^d, solved by HiGHS (dual simplex, warm started).
  Witness: the LP's x, clipped into the box against HiGHS's feasibility tolerance; certificate: row duals.
* :class:`BallSolver` — layernorm / rmsnorm: the restricted optimum lies in ``span{a_j : j in S}``. The
  ball is not polyhedral and Kelley's tangent cuts do not converge at GPT-2 shape, so the restricted
  optimum is computed exactly by :func:`ball_optimum` (2–4 least-distance problems, one NNLS each), which
  yields the certificate and the witness. The oracle reads the rows only through their Gram and products
  with them, so they are kept as they are (no basis of their span, unless ``use_lp``'s LP needs one), and
  each NNLS starts from the last one's passive set on that Gram (:class:`_Warm`, an incrementally updated
  Cholesky factor): a hard token's restricted problems grow to ~1000 rows, where an NNLS from scratch per
  LDP was most of its time. ``use_lp`` also solves the LP over S, on coordinates z of an orthonormal basis
  Q of the span (``x = Q z``, grown by Gram–Schmidt), with a tangent cut at the oracle's optimum and offers
  its duals (a cross-check).
* :class:`ConeSolver` — bias ignored, normalisation ``k_t·x = 1`` and cap ``s <= 1``, on the span of
  ``k_t`` and S. At GPT-2 shape nearly every token is a hull vertex and the LP needs S beyond d rows before
  the cap stops binding, so by default it first seeks a witness with the ball oracle on the unit ball
  (a positive restricted margin there, checked over all V, is a witness); once that margin is 0 on S
  (k_t in the hull of S) the cone LP takes over and gives the certificate ``(λ, mu)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
from scipy.optimize import nnls

from unspeakable.engine import memory
from unspeakable.engine.highs import LP, LPResult, Status

WARM_MIN_ROWS = memory.WARM_MIN_ROWS  # restricted problems of this many rows keep their Gram for warm-started LDPs (_Warm)
WARM_MAX_ROWS = memory.WARM_MAX_ROWS  # ... up to this many (the Gram is 8·m² bytes: 134 MB here); past it, NNLS from scratch


@dataclass
class Step:
    """What one restricted solve hands the constraint-generation loop."""

    x: np.ndarray  # a point of the domain (cone: any direction with k_t·x > 0)
    m_ref: float  # the restricted margin at x (over S)
    certificates: list = field(default_factory=list)  # [(ids, lam)] weights on competitors, unverified


class Restricted:
    """Interface: ``add(J)`` grows S, ``step(remaining, tol, best_x) -> Step | str | None`` solves (None:
    solve again, the solver changed mode; ``best_x`` is the best witness so far, a warm start), ``finished(lower, upper, tol) -> str | None`` says whether no violated
    row means the end (None: go on)."""

    def __init__(self, pricer, t: int):
        self.p, self.t = pricer, t
        self.kt = pricer.keys[t]
        self.bt = float(pricer.bias[t])
        self.lp: LP | None = None
        self.ids: list[int] = []
        self.comp_rows: list[int] = []
        self.cuts = 0
        self.lp_iterations = 0
        self.lp_time_s = 0.0
        self.oracle_solves = 0

    def _solve_lp(self, remaining: float) -> LPResult | str:
        res = self.lp.solve(time_limit=remaining)
        self.lp_iterations += res.nit
        self.lp_time_s += res.time_s
        if not res.success:
            return "time limit" if res.status == Status.TIME_LIMIT else f"highs: {res.status.value}"
        return res

    def weights(self, res: LPResult) -> np.ndarray:
        """Shadow prices of the competitor rows: λ_j >= 0 up to the solver's tolerance."""
        return np.maximum(res.row_duals[np.asarray(self.comp_rows, dtype=np.int64)], 0.0)

    def finished(self, lower: float, upper: float, tol: float) -> str | None:
        return "converged"


class BoxSolver(Restricted):
    def __init__(self, pricer, t, options):
        super().__init__(pricer, t)
        rho, d = pricer.domain.radius, pricer.d
        lo, up = np.full(d + 1, -rho), np.full(d + 1, rho)
        lo[0], up[0] = -math.inf, math.inf
        cost = np.zeros(d + 1)
        cost[0] = 1.0
        self.lp = LP(cost, lo, up, sense="max")

    def add(self, J):
        # Rows and bound scaled by 2^-e (Pricer.lp_exp; exact): s' = 2^-e s, the same x and the same
        # weights (Σλ = 1 from s' as from s), the objective scaled back in step
        e = self.p.lp_exp
        A = np.empty((J.size, self.p.d + 1))
        A[:, 0] = 1.0
        A[:, 1:] = np.ldexp(self.p.keys[J] - self.kt, -e)
        # s + (k_j − k_t)·x <= b_t − b_j
        rows = self.lp.add_rows(A, -math.inf, np.ldexp(self.bt - self.p.bias[J], -e))
        self.ids.extend(int(j) for j in J)
        self.comp_rows.extend(int(r) for r in rows)

    def step(self, remaining, tol, best_x):
        res = self._solve_lp(remaining)
        if isinstance(res, str):
            return res
        ids = np.asarray(self.ids, dtype=np.int64)
        # HiGHS meets bounds to its feasibility tolerance only; the witness must lie in the box exactly.
        x = np.clip(res.x[1:], -self.p.domain.radius, self.p.domain.radius)
        return Step(x, math.ldexp(float(res.objective), self.p.lp_exp), [(ids, self.weights(res))])


class _SpanLP(Restricted):
    """x = Q z on the span of the rows seen so far. Keeps the rows' coefficients ``C`` [|S|, k]
    (``(k_j − k_t)·Q z``) and ``β`` so that margins over S cost |S| k flops. With ``span=False`` there is
    no basis (``Q`` is None: z = x, ``C`` holds the rows ``k_j − k_t`` themselves): for the ball oracle,
    whose least-distance points lie in the rows' span anyway and which reads the rows only through their
    Gram and products with them, a basis of the span saves little and costs a Gram–Schmidt pass over it
    every round (the largest share of a round's work once pricing is batched)."""

    def __init__(self, pricer, t, bound: float, warm: bool = True, span: bool = True,
                 warm_max_rows: int = WARM_MAX_ROWS):
        super().__init__(pricer, t)
        self.warm_max_rows = int(warm_max_rows)  # the largest restricted problem that keeps its Gram
        self.bound = bound  # |z_i| <= bound (R contains the ball; inf for the cone)
        self.Q = np.zeros((pricer.d, 0)) if span else None
        self.C = np.zeros((0, 0 if span else pricer.d))
        self.beta = np.zeros(0)
        # C C^T, grown with the rows once there are WARM_MIN_ROWS: the oracle's LDPs then solve their normal
        # equations from the last passive set (a few Cholesky solves) instead of a Lawson–Hanson NNLS from
        # scratch each. Below that, scipy's NNLS (compiled) is faster than the Python-level steps.
        self.warm = _Warm(None, np.zeros(0, dtype=bool)) if warm else None

    def _grow(self, W: np.ndarray):
        """Extend Q by the part of span(rows of W) it misses: project out Q twice (classical Gram–Schmidt
        with reorthogonalisation), then a pivoted QR of the rest keeps the numerically independent part."""
        room = self.p.d - self.Q.shape[1]
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
        if self.lp is not None:
            self.lp.add_cols(np.zeros(r), -self.bound, self.bound)

    def add(self, J):
        W = self.p.keys[J] - self.kt  # k_j − k_t
        if self.Q is None:
            Cn = W
        else:
            self._grow(W)
            Cn = W @ self.Q
        beta = self.bt - self.p.bias[J]  # zeros in the cone
        if self.p.lp_exp:  # held scaled by 2^-e (exact): see oracle
            Cn, beta = np.ldexp(Cn, -self.p.lp_exp), np.ldexp(beta, -self.p.lp_exp)
        if self.lp is not None:
            A = np.empty((J.size, self.Q.shape[1] + 1))
            A[:, 0] = 1.0
            A[:, 1:] = Cn
            rows = self.lp.add_rows(A, -math.inf, beta)  # s + (k_j − k_t)·Q z <= b_t − b_j (× 2^-e)
            self.comp_rows.extend(int(r) for r in rows)
        if self.warm is not None and self.warm.gram is not None:
            if self.C.shape[0] + Cn.shape[0] > self.warm_max_rows:
                self.warm = None
            else:
                cross = self.C @ Cn.T  # the old rows are zero on the columns _grow added
                g = self.warm.gram
                self.warm.gram = np.block([[g, cross], [cross.T, Cn @ Cn.T]])
        self.C = np.concatenate([self.C, Cn], axis=0)
        self.beta = np.concatenate([self.beta, beta])
        self.ids.extend(int(j) for j in J)

    def oracle(self, R: float, z_hint: np.ndarray, tol: float):
        """The ball optimum over S in the caller's units. The rows and bias are held scaled by 2^-e
        (``Pricer.lp_exp``, 0 unless the keys or bias are far from 1): the same z and weights, the levels
        scaled by 2^-e, so the LDPs' absolute thresholds and HiGHS's limits see entries near 1."""
        e = self.p.lp_exp
        G = -self.C
        # Without a basis the rows have d columns, where scipy's NNLS (its cost grows with them) loses to the
        # warm-started normal equations from the first row on; with one, below WARM_MIN_ROWS it wins.
        warm_min = WARM_MIN_ROWS if self.Q is not None else 0
        if self.warm is not None and self.warm.gram is None and warm_min <= G.shape[0] <= self.warm_max_rows:
            self.warm.gram = self.C @ self.C.T
        bo = ball_optimum(G, self.beta, R, float(np.min(G @ z_hint + self.beta)), math.ldexp(tol, -e),
                          warm=self.warm)
        if bo is None:
            return None
        self.oracle_solves += bo.solves
        return BallOptimum(math.ldexp(bo.lower, e), bo.z, math.ldexp(bo.upper, e), bo.lam, bo.solves) if e else bo


class BallSolver(_SpanLP):
    def __init__(self, pricer, t, options):
        # no span basis unless the LP cross-check needs one (its columns are the basis's coordinates)
        super().__init__(pricer, t, pricer.domain.radius, options.warm_ldp, span=options.use_lp,
                         warm_max_rows=options.warm_max_rows)
        self.use_lp, self.max_cuts = options.use_lp, options.max_cuts
        # The oracle needs no LP; HiGHS holds the restricted problem only for use_lp's cross-check.
        self.lp = LP(np.array([1.0]), [-math.inf], [math.inf], sense="max") if self.use_lp else None

    def step(self, remaining, tol, best_x):
        R = self.p.domain.radius
        if self.Q is None:
            hint = np.zeros(self.p.d) if best_x is None else best_x
        else:
            hint = np.zeros(self.Q.shape[1]) if best_x is None else self.Q.T @ best_x
        bo = self.oracle(R, hint, tol)
        if bo is None:
            return "oracle failure"
        ids = np.asarray(self.ids, dtype=np.int64)
        certs = [(ids, bo.lam)]
        if self.use_lp:
            nz = float(np.linalg.norm(bo.z))
            if nz >= R * (1.0 - 1e-9) and self.cuts < self.max_cuts:
                self.add_cut(bo.z / nz)
            res = self._solve_lp(remaining)
            if isinstance(res, str):
                return res
            certs.append((ids, self.weights(res)))
        return Step(self.p.domain.into(bo.z if self.Q is None else self.Q @ bo.z), bo.lower, certs)

    def add_cut(self, g: np.ndarray):
        """Tangent cut g·z <= R of the sphere (g a unit vector): valid for every point of the ball."""
        A = np.zeros((1, g.size + 1))
        A[0, 1:] = g
        self.lp.add_rows(A, -math.inf, self.p.domain.radius)
        self.cuts += 1

    def finished(self, lower, upper, tol):
        return "converged" if upper - lower <= 2 * tol else "oracle gap"


class ConeSolver(_SpanLP):
    def __init__(self, pricer, t, options):
        super().__init__(pricer, t, math.inf, options.warm_ldp, warm_max_rows=options.warm_max_rows)
        nt = self.nt = float(np.linalg.norm(self.kt))
        self.by_ball = options.cone_oracle
        self.lp = LP(np.array([1.0]), [-math.inf], [1.0], sense="max")  # the cap s <= 1
        # k_t·x = k_t·Q z = ||k_t|| z_0: Q's first column is k_t/||k_t||, later ones are orthogonal to it.
        self.Q = (self.kt / nt)[:, None]
        self.C = np.zeros((0, 1))
        self.lp.add_cols(np.zeros(1), -math.inf, math.inf)
        # HiGHS's rows are the cone's scaled by 2^-e (Pricer.lp_exp), the normalisation's too: its z' is
        # 2^e z (the same s, weights and direction), scaled back in step
        self.lp.add_rows(np.array([[0.0, math.ldexp(nt, -pricer.lp_exp)]]), 1.0, 1.0)

    def step(self, remaining, tol, best_x):
        ids = np.asarray(self.ids, dtype=np.int64)
        if self.by_ball:
            # tol is in the cone's normalised units (k_t·x = 1): on the unit ball k_t·x <= ||k_t||, so the
            # ball's margins compare with tol ||k_t|| (scale-free: the same decision for the head × 2^k)
            bo = self.oracle(1.0, np.zeros(self.Q.shape[1]), tol * self.nt)
            if bo is not None and bo.upper > tol * self.nt:
                return Step(self.Q @ bo.z, bo.lower)  # a unit-ball point; the loop normalises k_t·x = 1
            self.by_ball = False  # k_t is (numerically) in the hull of S: only the cone LP can show how deep
        res = self._solve_lp(remaining)
        if isinstance(res, str):
            return res
        # The cap s <= 1 takes part of the weight; a certificate needs it slack (Σ λ = 1 on the rows).
        certs = [(ids, self.weights(res))] if res.objective < 1.0 - 1e-9 else []
        return Step(np.ldexp(self.Q @ res.x[1:], -self.p.lp_exp), float(res.objective), certs)

    def finished(self, lower, upper, tol):
        if self.by_ball and not lower > 0:
            self.by_ball = False  # no positive witness on the ball side: the cone LP decides
            return None
        return "converged"  # cone LP: the optimum; by the ball: a positive witness over all V


SOLVERS = {"lp": BoxSolver, "ball": BallSolver, "cone": ConeSolver}


# ------------------------------------------------------------------------------------------ ball oracle
@dataclass
class BallOptimum:
    lower: float  # min_j (G_j·z + β_j) at z
    z: np.ndarray  # a point with ||z|| <= R
    upper: float  # R ||G^T λ|| + β·λ, an upper bound on the restricted optimum
    lam: np.ndarray  # weights on the rows (>= 0, sum 1)
    solves: int


def _ldp(G: np.ndarray, h: np.ndarray, warm: "_Warm | None" = None):
    """Least distance programming (Lawson & Hanson, ch. 23): ``min ||z|| s.t. G z >= h`` by one NNLS of
    ``[G^T; h^T] u ≈ e_last``. Returns ``(z, u)`` with ``z = G^T u / (1 − h·u)``; when the constraints are
    infeasible ``z`` is None and ``u`` a Farkas certificate (``G^T u = 0``, ``h·u = 1``).

    With ``warm`` (the rows' Gram ``G G^T`` and the passive set of the last solve), the NNLS is first tried
    by an active-set method on its normal equations from that passive set (:func:`_nnls_warm`), and by
    scipy's Lawson–Hanson from scratch only when that fails. Either way the result is only a candidate:
    the ball oracle evaluates its point and weights itself, and ``engine.verify`` re-checks every claim."""
    m, k = G.shape
    if not np.any(h > 0):  # z = 0 is feasible, hence optimal: u = 0 (what the NNLS returns, for free)
        return np.zeros(k), np.zeros(m)
    u = None
    if warm is not None and warm.gram is not None:
        A = warm.gram + np.outer(h, h)
        kept: dict = {}
        u = _nnls_bpp(A, h, warm.passive, kept=kept)
        if u is None:
            warm.bpp_failed += 1
            u = _nnls_warm(A, h, warm.passive)
        warm.chol = kept.get("chol")
        if u is not None:
            u = _refine(G, h, A, u, warm.chol)
            warm.fast += 1
        else:
            warm.slow += 1
    if u is None:
        E = np.empty((k + 1, m))
        E[:k] = G.T
        E[k] = h
        f = np.zeros(k + 1)
        f[k] = 1.0
        u, _ = nnls(E, f, maxiter=max(100, 10 * m))
    if warm is not None and np.any(u > 0):
        warm.passive = u > 0
    den = 1.0 - float(h @ u)
    if not den > 1e-12:
        return None, u
    return (G.T @ u) / den, u


@dataclass
class _Warm:
    """What makes the next LDP of one restricted problem cheap: the Gram ``G G^T`` of its rows (kept by the
    solver as rows are added) and the passive set of the last NNLS (rows added since: not passive)."""

    gram: np.ndarray | None  # None: not kept (yet); the LDPs run from scratch
    passive: np.ndarray
    fast: int = 0  # LDPs solved warm (_nnls_warm)
    slow: int = 0  # ... that fell back to Lawson–Hanson
    bpp_failed: int = 0  # block principal pivoting (_nnls_bpp) gave up, _nnls_warm took over
    chol: "_Chol | None" = None  # the last LDP's passive block factor (of G_P G_P^T + h_P h_P^T), when kept


# The incremental factor's many small LAPACK calls, without scipy.linalg's per-call argument handling (its
# batching wrapper costs ~40 us a call, as much as a triangular solve of a few hundred rows).
_trtrs, _potrf = sla.get_lapack_funcs(("trtrs", "potrf"), dtype=np.float64)
_qr_insert = getattr(sla.qr_insert, "__wrapped__", sla.qr_insert)


def _tri_solve(R: np.ndarray, b: np.ndarray, transpose: bool) -> np.ndarray:
    """``R^T \\ b`` (``transpose``) or ``R \\ b`` for an upper-triangular C-ordered R (passed to LAPACK as the
    Fortran-ordered lower-triangular ``R^T``, without a copy)."""
    x, info = _trtrs(R.T, b, lower=1, trans=0 if transpose else 1)
    if info != 0:
        raise np.linalg.LinAlgError("singular triangular factor")
    return x


class _Chol:
    """An upper Cholesky factor ``R`` (``R^T R = A[idx][:, idx]``) of a principal block of ``A`` that grows and
    shrinks by rows, updated rather than refactorised: adding n rows to a k-row block costs one triangular
    solve with n right-hand sides and an n × n Cholesky (O(k² n)); removing one row is a rank-one update of
    the trailing block, done by scipy's compiled Givens row insertion (``qr_insert``, O((k − p)²)) — where
    a fresh factorisation costs O(k³) each time. ``idx`` is in insertion order."""

    def __init__(self, A: np.ndarray):
        self.A = A
        self.idx = np.zeros(0, dtype=np.int64)
        self.R = np.zeros((0, 0))

    def add(self, J: np.ndarray) -> None:
        """Append rows ``J``; raises ``LinAlgError`` (the factor unchanged) when the enlarged block is not
        numerically positive definite."""
        J = np.asarray(J, dtype=np.int64)
        k, n = self.idx.size, J.size
        if n == 0:
            return
        if k:
            W = _tri_solve(self.R, self.A[np.ix_(self.idx, J)], True)
            S = self.A[np.ix_(J, J)] - W.T @ W
        else:
            W, S = np.zeros((0, n)), self.A[np.ix_(J, J)]
        Rn, info = _potrf(S, lower=0, clean=1)
        if info != 0 or not np.all(np.isfinite(Rn)) or not np.all(np.diag(Rn) > 0):
            raise np.linalg.LinAlgError("not positive definite")
        R = np.zeros((k + n, k + n))
        R[:k, :k] = self.R
        R[:k, k:] = W
        R[k:, k:] = Rn
        self.R, self.idx = R, np.concatenate([self.idx, J])

    def remove_at(self, p: int) -> None:
        """Drop the row at position ``p`` of ``idx``: with ``r`` its row of R past the diagonal, the trailing
        block becomes the triangular factor of ``R22^T R22 + r r^T`` (the QR of R22 with r appended as a row)."""
        k = self.idx.size
        n = k - p - 1
        R = np.empty((k - 1, k - 1))
        R[:p, :p] = self.R[:p, :p]
        R[:p, p:] = self.R[:p, p + 1:]
        R[p:, :p] = 0.0
        if n:
            _, R1 = _qr_insert(np.eye(n), self.R[p + 1:, p + 1:], self.R[p, p + 1:], n, "row", check_finite=False)
            R[p:, p:] = R1[:n]
        self.R, self.idx = R, np.delete(self.idx, p)

    def remove(self, positions: np.ndarray) -> None:
        """Drop the rows at ``positions`` (ascending) of ``idx``: one at a time by :meth:`remove_at`, several
        at once by one QR of the kept columns' part of R below the first one removed. (A fresh factor of the
        rows left, where its flops are fewer, was slower on stress 0's hardest token: 5.3 s against 3.0 s —
        gathering the block from the Gram costs more than its flops say.)"""
        if positions.size <= 2:
            for p in positions[::-1]:
                self.remove_at(int(p))
            return
        k, p0 = self.idx.size, int(positions[0])
        keep = np.ones(k, dtype=bool)
        keep[positions] = False
        after = np.nonzero(keep[p0:])[0] + p0
        c = after.size
        R = np.zeros((p0 + c, p0 + c))
        R[:p0, :p0] = self.R[:p0, :p0]
        R[:p0, p0:] = self.R[:p0, after]
        if c:
            R[p0:, p0:] = sla.qr(self.R[p0:, after], mode="r", check_finite=False)[0][:c, :c]
        self.R, self.idx = R, self.idx[keep]

    def sync(self, F: np.ndarray) -> None:
        """Make the factor's rows the set ``F`` (a bool mask): removals first, then one block addition."""
        self.remove(np.nonzero(~F[self.idx])[0])
        have = np.zeros(F.size, dtype=bool)
        have[self.idx] = True
        self.add(np.nonzero(F & ~have)[0])

    def solve(self, b: np.ndarray) -> np.ndarray:
        """``A[idx][:, idx]^{-1} b[idx]``, scattered into a vector of ``b``'s length."""
        z = np.zeros(b.size)
        if self.idx.size:
            z[self.idx] = _tri_solve(self.R, _tri_solve(self.R, b[self.idx], True), False)
        return z


def _refine(G: np.ndarray, h: np.ndarray, A: np.ndarray, u: np.ndarray, chol: "_Chol | None" = None,
            steps: int = 2) -> np.ndarray:
    """Corrected semi-normal equations (Björck): the normal equations of the LDP's NNLS square the
    condition of ``E = [G^T; h^T]``, which costs the weights digits exactly where margins are near 0. Each
    step recomputes the gradient ``E_P^T (E u − e)`` from G and h themselves (not from ``A = E^T E``) and
    corrects the passive weights by the passive block's solve; a step that would make a weight nonpositive
    or raise the residual is not taken. ``chol``: the passive block's factor where the NNLS kept it (else
    one is computed). The result is still only a candidate (see :func:`_ldp`)."""
    if chol is not None:
        P = chol.idx

        def solve(g):
            return _tri_solve(chol.R, _tri_solve(chol.R, g, True), False)
    else:
        P = np.nonzero(u > 0)[0]
        try:
            c = sla.cho_factor(A[np.ix_(P, P)], check_finite=False) if P.size else None
        except (np.linalg.LinAlgError, ValueError):
            return u

        def solve(g):
            return sla.cho_solve(c, g, check_finite=False)
    if P.size == 0:
        return u
    GP, hP = G[P], h[P]

    def resid(uP):
        return np.concatenate([GP.T @ uP, [float(hP @ uP) - 1.0]])

    r = resid(u[P])
    for _ in range(steps):
        g = GP @ r[:-1] + hP * r[-1]
        uP = u[P] - solve(g)
        if not (np.all(np.isfinite(uP)) and np.all(uP >= 0)):
            break
        r2 = resid(uP)
        if not float(r2 @ r2) <= float(r @ r):
            break
        u = u.copy()
        u[P], r = uP, r2
    return u


def _nnls_bpp(A: np.ndarray, b: np.ndarray, passive: np.ndarray, max_iter: int = 60,
              kept: dict | None = None) -> np.ndarray | None:
    """``min ||E u − e||, u >= 0`` from its normal equations (as :func:`_nnls_warm`) by block principal
    pivoting (Kim & Park 2011, after Júdice & Pires): from the passive set ``passive``, solve the passive
    block, then exchange every infeasible row at once — passive rows with a negative weight leave, rows
    outside with a negative gradient enter — while the number of infeasible rows keeps falling (three
    tries without progress allowed), else only the last infeasible row (Murty's rule, which terminates).
    Where Lawson–Hanson walks back one row per solve (tens of solves after a block entry), this takes a few
    solves. Entering rows that depend on the others (twins) enter one by one, the dependent ones left out.
    ``kept``: a dict that receives the final passive block's factor (``"chol"``). Returns None where it cannot finish (a singular passive block, ``max_iter`` exchanges): the
    caller then runs :func:`_nnls_warm`."""
    m = b.size
    F = np.zeros(m, dtype=bool)
    F[: min(passive.size, m)] = passive[:m]
    tol = 1e-11 * np.sqrt(np.maximum(np.diag(A), 0.0)) + 1e-300
    chol = _Chol(A)
    best, backup = m + 1, 3
    y = np.zeros(m)
    try:
        for _ in range(max_iter):
            chol.remove(np.nonzero(~F[chol.idx])[0])
            have = np.zeros(m, dtype=bool)
            have[chol.idx] = True
            J = np.nonzero(F & ~have)[0]
            try:
                chol.add(J)
            except np.linalg.LinAlgError:
                # Rows entering together may depend on each other (twins): enter them one at a time, steepest
                # first, and leave out each that depends on those in (its gradient vanishes once they are).
                for j in J[np.argsort(y[J], kind="stable")]:
                    try:
                        chol.add(np.array([j]))
                    except np.linalg.LinAlgError:
                        F[j] = False
            x = chol.solve(b)
            if not np.all(np.isfinite(x)):
                return None
            y = A @ x - b
            bad = (F & (x < 0)) | (~F & (y < -tol))
            n = int(np.count_nonzero(bad))
            if n == 0:
                if kept is not None:
                    kept["chol"] = chol
                return np.maximum(x, 0.0)
            if n < best:
                best, backup = n, 3
            elif backup > 0:
                backup -= 1
            else:
                j = int(np.nonzero(bad)[0][-1])
                bad = np.zeros(m, dtype=bool)
                bad[j] = True
            F ^= bad
    except (np.linalg.LinAlgError, ValueError):
        return None
    return None


def _nnls_warm(A: np.ndarray, b: np.ndarray, passive: np.ndarray, max_solves: int = 400) -> np.ndarray | None:
    """``min ||E u − e||, u >= 0`` from its normal equations ``A = E^T E``, ``b = E^T e``: Lawson–Hanson's
    active-set method (as in Bro & de Jong's FNNLS) started from the passive set ``passive`` (a bool mask,
    any length: rows past it start out of it) and letting every row with a negative gradient in at once.
    Each outer step solves the enlarged passive block, then walks back towards the last feasible point
    until no weight is negative (removing those that reach zero), so the objective never increases; where a
    block step makes no progress, only the steepest row enters (the classical rule, which does).
    The passive block's Cholesky factor is updated as rows enter and leave (:class:`_Chol`), not rebuilt:
    a block entry is often followed by a walk-back of tens of single removals. Warm started, a handful of
    outer steps. Returns None where it cannot finish (a singular passive block, too many steps): the caller
    then solves from scratch. The residual ``E u − e`` has norm <= 1 at every iterate (u = 0 gives exactly
    1, and the objective never increases), so ``|(A u − b)_i| <= ||E_i||`` sets the scale of "a negative
    gradient"."""
    m = b.size
    F = np.zeros(m, dtype=bool)
    F[: min(passive.size, m)] = passive[:m]
    tol = 1e-11 * np.sqrt(np.maximum(np.diag(A), 0.0)) + 1e-300
    x = np.zeros(m)
    solves = 0
    single = False
    chol = _Chol(A)

    def solve(F):
        chol.sync(F)
        return chol.solve(b)

    F_before = None
    while solves < max_solves:
        try:
            z = solve(F)
        except (np.linalg.LinAlgError, ValueError):
            # A block of rows that entered together may be dependent (near-twin rows): only the steepest
            # one enters (a row with a negative gradient at a least-squares point is never dependent on
            # the passive ones, so the classical rule keeps the block nonsingular).
            if F_before is None or single:
                return None
            F, single = F_before, True
            continue
        solves += 1
        try:
            moved = False
            while np.any(F & (z <= 0)):  # walk back from x (feasible) towards z until the first weight hits 0
                q = np.nonzero(F & (z <= 0))[0]
                ratio = x[q] / (x[q] - z[q])
                alpha = float(np.min(ratio))
                moved |= alpha > 0
                x = x + alpha * (z - x)
                F[q[(ratio <= alpha) | (x[q] <= 0)]] = False  # the weights that reached zero leave
                x[~F] = 0.0
                if solves >= max_solves:
                    return None
                z = solve(F)
                solves += 1
            if not np.all(np.isfinite(z)):
                return None
            moved |= bool(np.any(z != x))
            x = z
            y = A @ x - b
            enter = ~F & (y < -tol)
            if not enter.any():
                return np.maximum(x, 0.0)
            if single or not moved:
                j = int(np.argmin(np.where(enter, y / tol, np.inf)))
                enter = np.zeros(m, dtype=bool)
                enter[j] = True
            single = not moved
            F_before = F.copy()
            F |= enter
        except (np.linalg.LinAlgError, ValueError):
            return None
    return None


def _slope_from_factor(G: np.ndarray, h: np.ndarray, chol: "_Chol") -> np.ndarray | None:
    """:func:`_min_norm_slope` on the LDP's passive rows P from the factor its NNLS left, of
    ``A = G_P G_P^T + h_P h_P^T``: ``(G_P G_P^T)^{-1} 1 = A^{-1} 1 + A^{-1} h (h·A^{-1} 1) / (1 − h·A^{-1} h)``
    (Sherman–Morrison), no new factorisation. None where the denominator is small or the result misses
    ``G_P dz = 1``: the caller then factorises afresh."""
    P = chol.idx
    hP = h[P]
    ones = np.ones(P.size)
    try:
        a = _tri_solve(chol.R, _tri_solve(chol.R, ones, True), False)
        c = _tri_solve(chol.R, _tri_solve(chol.R, hP, True), False)
    except np.linalg.LinAlgError:
        return None
    den = 1.0 - float(hP @ c)
    if not den > 1e-8:
        return None
    GP = G[P]
    dz = GP.T @ (a + c * (float(hP @ a) / den))
    if np.all(np.isfinite(dz)) and np.allclose(GP @ dz, ones, rtol=0, atol=1e-8):
        return dz
    return None


def _min_norm_slope(GP: np.ndarray, gram_P: np.ndarray | None = None) -> np.ndarray:
    """The min-norm dz with ``G_P dz = 1`` (how the LDP point moves with the level on one active set);
    ``gram_P``: ``G_P G_P^T`` when the caller keeps it."""
    ones = np.ones(GP.shape[0])
    try:
        c = sla.cho_factor(GP @ GP.T if gram_P is None else gram_P)
        dz = GP.T @ sla.cho_solve(c, ones)
        if np.all(np.isfinite(dz)) and np.allclose(GP @ dz, ones, rtol=0, atol=1e-8):
            return dz
    except (np.linalg.LinAlgError, ValueError):
        pass
    return np.linalg.lstsq(GP, ones, rcond=None)[0]  # rank-deficient active set


@dataclass
class _Bracket:
    """The level search's state: ``lo <= optimum <= hi`` and the best point and weights seen."""

    lo: float
    hi: float = math.inf
    best_z: np.ndarray | None = None
    best_lower: float = -math.inf
    best_lam: np.ndarray | None = None
    best_upper: float = math.inf
    tried_below: float = math.nan


def _level(G, beta, R, s: float, br: _Bracket, warm: _Warm | None = None) -> float | None:
    """One LDP at level s: update the bracket and the best point / weights; return the exact next level
    on this active set (N(s)² is a quadratic there), or None."""
    z, u = _ldp(G, s - beta, warm)
    su = float(u.sum())
    if su > 0:
        lam = u / su
        up = R * float(np.linalg.norm(G.T @ lam)) + float(lam @ beta)
        if up < br.best_upper:
            br.best_lam, br.best_upper = lam, up
    br.hi = min(br.hi, br.best_upper)
    if z is None:
        br.hi = min(br.hi, s)
        return None
    nz = float(np.linalg.norm(z))
    zb = z * min(1.0, R / nz) if nz > 0 else z
    low = float(np.min(G @ zb + beta))
    if low > br.best_lower:
        br.best_z, br.best_lower = zb, low
    br.lo = max(br.lo, min(s, low))
    if nz > R:
        br.hi = min(br.hi, s)
    P = u > 0
    if np.any(P):
        ch = None if warm is None else warm.chol
        dz = None
        if ch is not None and ch.idx.size == int(np.count_nonzero(P)) and np.all(P[ch.idx]):
            dz = _slope_from_factor(G, s - beta, ch)
        if dz is None:
            dz = _min_norm_slope(G[P], None if warm is None or warm.gram is None else warm.gram[np.ix_(P, P)])
        a, b, c = float(dz @ dz), float(z @ dz), nz * nz - R * R
        if a > 0 and b * b - a * c >= 0:
            return s + (-b + math.sqrt(b * b - a * c)) / a
    elif nz == 0.0:
        return float(np.min(beta))  # z = 0 stays feasible up to the smallest β
    return None


def ball_optimum(G: np.ndarray, beta: np.ndarray, R: float, s_lo: float, tol_s: float,
                 max_solves: int = 30, warm: _Warm | None = None) -> BallOptimum | None:
    """``max_{||z|| <= R} min_j (G_j·z + β_j)`` through the level function
    ``N(s) = min{||z|| : G z + β >= s}`` (an LDP): the optimum is the largest s with N(s) <= R.

    N is convex and nondecreasing, and on one active set P of the LDP z(s) is affine in s (slope:
    :func:`_min_norm_slope`), so N(s)² is a quadratic whose root is taken exactly; steps stay in the
    bracket ``[lo, hi]`` and fall back to bisection. Each LDP also yields a certificate: at a feasible
    level its NNLS weights (at the root ``−δ(u/Σu) = s`` exactly), at an infeasible one its Farkas weights
    (``G^T u = 0``, so ``−δ = β·u/Σu``: the optimum when the ball does not bind). Typically 2–4 LDPs.
    ``s_lo`` must have N(s_lo) <= R (the margin over S of any point of the ball). ``warm``: see :func:`_ldp`."""
    br = _Bracket(lo=float(s_lo))
    s, solves = br.lo, 0
    while solves < max_solves:
        s_new = _level(G, beta, R, s, br, warm)
        solves += 1
        if br.best_upper - br.best_lower <= tol_s or br.hi - br.lo <= tol_s:
            break
        if s_new is None or not (br.lo < s_new < br.hi):
            if math.isfinite(br.hi) and br.hi != br.tried_below:
                # hi is often the optimum itself (a Farkas bound where the ball does not bind): try just below.
                s_new, br.tried_below = max(br.hi - 0.25 * tol_s, 0.5 * (br.lo + br.hi)), br.hi
            else:
                s_new = 0.5 * (br.lo + br.hi) if math.isfinite(br.hi) else br.lo + max(1.0, abs(br.lo))
        if s_new == s:
            break
        s = s_new
    if br.best_z is None or br.best_lam is None:
        return None
    return BallOptimum(br.best_lower, br.best_z, br.best_upper, br.best_lam, solves)
