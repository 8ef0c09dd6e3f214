"""Stage 5 — decide: one restricted problem per open token, by constraint generation (DESIGN §3 step 5).

With ``a_j = k_t − k_j`` and ``β_j = b_t − b_j`` on the keys ``k_j`` (``problem.keys``) the margin is

    m_t = max over x in X of  s   subject to   s <= a_j·x + β_j   for every j != t,

and only a working set S of competitors is kept: solve the problem restricted to S (a solver per domain,
``engine.restricted``), compute all V logits at its solution in float64, add the worst rows that beat the
restricted optimum, repeat until none does; then the restricted optimum is the full one (box and cone
LPs: exactly; balls: to ``tol``).

Pricing is one pass over all V logits per round, in float32 with a rigorous per-row error bound and
completed in float64 for every row the bound cannot exclude (:meth:`Pricer.price`): the float64 values of
all rows that matter at half the memory traffic of a float64 GEMV. The :class:`Pricer` is built once per
problem by the caller and passed explicitly (no caches).

Everything returned is a claim for ``engine.verify``: ``lower`` is the margin of the returned witness over
all V (float64), ``upper`` the bound ``−δ(λ)`` of the returned certificate recomputed in float64 from its
weights (cone: ``mu``, the normalisation row's multiplier refitted in float64 from λ, kept only when
``Σ λ_j (k_j − k_t) = −mu k_t`` holds to rounding). Both are valid at every round and tracked as the best
seen by :class:`Bounds`; a HiGHS status other than optimal, the time limit or the round limit end the loop
with those bounds and a reason, never with a verdict. ``stop_at_sign`` ends as soon as one has a clear sign.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np

from unspeakable.engine.memory import row_norms
from unspeakable.engine.evidence import Candidate, Certificate
from unspeakable.engine.restricted import SOLVERS

U32 = 2.0**-24


@dataclass
class DecideOptions:
    """How one token is decided.

    Attributes:
        time_limit: wall seconds per token (checked between solves; a HiGHS solve gets the rest).
        max_rounds: restricted solves.
        add_per_round: violated rows added per pricing, the worst first.
        tol: relative tolerance (of the largest |logit| seen) for "violated" and for the gap between the
            witness's margin and the certificate's bound at which the loop stops.
        n_start: competitors S starts with when none are given (the largest logits at the screen point).
        stop_at_sign: stop once the witness's margin exceeds ``sign_tol`` (relative) or the certificate's
            bound is below ``−sign_tol``: enough for a verdict, not for the exact margin.
        use_lp: balls only: also solve the LP over S with a tangent cut at the oracle's optimum and offer
            its duals as a certificate (a cross-check; slower than the oracle).
        max_cuts: balls, ``use_lp``: cap on tangent cuts.
        cone_oracle: cone only: seek a witness with the ball oracle first (see ``engine.restricted``).
        warm_ldp: balls and the cone's ball oracle: solve each least-distance problem from the last one's
            passive set on the rows' Gram (falls back to a Lawson–Hanson NNLS from scratch where it fails).
    """

    time_limit: float = 20.0
    max_rounds: int = 200
    add_per_round: int = 32
    tol: float = 1e-9
    n_start: int = 64
    stop_at_sign: bool = False
    sign_tol: float = 1e-6
    use_lp: bool = False
    max_cuts: int = 200
    cone_oracle: bool = True
    warm_ldp: bool = True

    @classmethod
    def from_kwargs(cls, options: "DecideOptions | None" = None, **kw) -> "DecideOptions":
        base = options or cls()
        known = {f.name for f in fields(cls)}
        bad = sorted(set(kw) - known)
        if bad:
            raise TypeError(f"unknown decide options {', '.join(bad)}; expected {', '.join(sorted(known))}")
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **kw})


@dataclass
class DecideStats:
    """How one token's solve went (for benchmarks and logs; not part of the evidence)."""

    token: int
    status: str  # "converged", "gap", "sign", "time limit", "round limit", "oracle gap", "highs: <status>"
    rounds: int = 0  # restricted solves
    pricings: int = 0  # passes over the V logits
    cuts: int = 0  # tangent cuts of the sphere (balls, use_lp=True)
    oracle_solves: int = 0  # least-distance problems of the ball oracle
    rows: int = 0  # competitors in S at the end
    simplex_iterations: int = 0
    lp_time_s: float = 0.0
    pricing_time_s: float = 0.0
    time_s: float = 0.0


# ------------------------------------------------------------------------------------------ pricing
@dataclass
class Pricing:
    """All V logits at one point, as far as they matter: every j != t with ``l_j >= floor`` is in ``ids``
    with its float64 logit, so the runner-up and every violated row are exact."""

    own: float  # l_t(x), float64
    ids: np.ndarray  # int64, j != t
    logits: np.ndarray  # float64 l_j(x) for ids
    top: float  # max_{j != t} l_j(x), float64
    runner_up: int
    size: float  # about max_j |l_j(x)|, for relative tolerances


class Pricer:
    """What every token's solve reads: float64 keys and bias, a float32 copy for pricing, row norms.
    Built once per problem (about one GEMM's memory traffic) and passed to every solve."""

    def __init__(self, problem):
        self.domain = problem.domain
        self.keys = np.ascontiguousarray(problem.search_keys, dtype=np.float64)
        self.V, self.d = self.keys.shape
        if self.V < 2:
            raise ValueError("need at least two tokens")
        self.bias = np.ascontiguousarray(problem.search_bias, dtype=np.float64)  # zeros in the cone
        shared = getattr(problem, "search_keys32", None)  # the problem's one float32 copy, where it has one
        self.keys32 = shared() if shared is not None else self.keys.astype(np.float32)
        # |fl32(k32·x32) − k·x| <= (2u(1+u) + γ_d (1+u)²) Σ|k_i||x_i| <= that × ||k|| ||x||, u = 2^-24, for
        # any summation order (Higham 3.1 and the two roundings to float32); doubled for the float64 epilogue.
        g = (self.d + 2) * U32 / (1.0 - (self.d + 2) * U32)
        self.row_err = 2.0 * (2 * U32 * (1 + U32) + g * (1 + U32) ** 2) * row_norms(self.keys)

    def price(self, x: np.ndarray, t: int, floor_offset: float = -math.inf, n_top: int = 2) -> Pricing:
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
        return Pricing(own, cand.astype(np.int64), vals, float(vals[i]), int(cand[i]), size)

    def screen_point(self, t: int) -> np.ndarray:
        """The witness screen's point x_t (DESIGN §3 step 3)."""
        return self.domain.screen_points(self.keys, np.array([t]))[0]

    def certificate_bound(self, t: int, ids: np.ndarray, lam: np.ndarray) -> tuple[float, float | None, np.ndarray]:
        """``(upper, mu, lam)`` of weights λ (>= 0, sum 1) in float64: ``upper = −δ(λ)`` on bounded domains;
        on the cone ``mu`` is the multiplier of ``Σ λ_j (k_j − k_t) = −mu k_t`` and ``upper = mu`` when that
        identity holds to rounding — the weights refitted over all of ``ids`` when the given ones (LP duals)
        miss it — else ``inf`` (no bound)."""
        kt = self.keys[t]
        r = lam @ self.keys[ids] - kt  # Σ λ_j (k_j − k_t)
        if not self.domain.bounded:
            return self._cone_bound(t, ids, lam, r)
        c0 = float(lam @ self.bias[ids]) - float(self.bias[t])
        return float(self.domain.support(-r)) - c0, None, lam  # −δ with δ = c0 − sup_X(−r·x)

    def _cone_bound(self, t, ids, lam, r) -> tuple[float, float | None, np.ndarray]:
        kt = self.keys[t]
        nt2 = float(kt @ kt)
        mu = -float(r @ kt) / nt2
        size = float(lam @ np.linalg.norm(self.keys[ids], axis=1)) + math.sqrt(nt2)
        if float(np.linalg.norm(r + mu * kt)) <= 1e-12 * size:
            return mu, mu, lam
        A = self.keys[ids] - kt
        for fixed in (mu, None):  # LP duals carry the solver's tolerance: refit λ (keeping mu if possible)
            lam2, mu2 = refit_cone_weights(A, kt, fixed)
            if lam2 is not None and float(np.linalg.norm(lam2 @ A + mu2 * kt)) <= 1e-12 * size:
                return mu2, mu2, lam2
        return math.inf, None, lam


def refit_cone_weights(A: np.ndarray, kt: np.ndarray, mu: float | None = None) -> tuple[np.ndarray | None, float]:
    """Weights λ >= 0 (sum 1) and mu <= 0 (or the given mu) with ``Σ λ_j A_j = −mu k_t`` to float64
    accuracy, by one NNLS over the working set (LP duals satisfy it only to HiGHS's tolerance, ~1e-7)."""
    from scipy.optimize import nnls

    m, d = A.shape
    scale = float(np.max(np.abs(A))) + float(np.max(np.abs(kt))) + 1e-300
    free = mu is None
    E = np.zeros((d + 1, m + int(free)))
    E[:d, :m] = A.T / scale
    E[d, :m] = 1.0
    f = np.zeros(d + 1)
    f[d] = 1.0
    if free:
        E[:d, m] = -kt / scale  # the column of nu = -mu >= 0
    else:
        f[:d] = -mu * kt / scale
    try:
        y, _ = nnls(E, f, maxiter=50 * (m + 1))
    except RuntimeError:
        return None, math.inf
    s = float(y[:m].sum())
    if not s > 0:
        return None, math.inf
    return (y[:m] / s, -float(y[m]) / s) if free else (y[:m] / s, mu / s)


# ------------------------------------------------------------------------------------------ bounds
class Bounds:
    """The best witness (lower bound) and certificate (upper bound) seen for one token; the loop's only
    mutable verdict state."""

    def __init__(self, pricer: Pricer, t: int):
        self.p, self.t = pricer, t
        self.lower, self.x = -math.inf, None
        self.upper, self.cert = math.inf, None

    def offer_witness(self, x: np.ndarray, pr: Pricing) -> None:
        m = pr.own - pr.top
        if not self.p.domain.bounded:
            nx = float(self.p.keys[self.t] @ x)  # the normalisation k_t·x = 1 (up to rounding after the LP)
            if not nx > 0:
                return
            m, x = m / nx, x / nx
        if m > self.lower:
            self.lower, self.x = m, np.array(x, dtype=np.float64)

    def offer_certificate(self, ids: np.ndarray, lam: np.ndarray) -> None:
        if not np.any(lam > 0):
            return
        upper, mu, lam = self.p.certificate_bound(self.t, ids, lam / lam.sum())
        keep = lam > 0
        if upper < self.upper and np.any(keep):
            self.upper, self.cert = upper, Certificate(ids[keep].astype(np.int64), lam[keep] / lam[keep].sum(), mu)


# ------------------------------------------------------------------------------------------ decide
def _one_blas_thread():
    """BLAS on one thread while deciding: the small dense solves here lose badly to thread hand-offs on a
    busy machine (a 200×200 Cholesky: 0.9 ms on one thread, 170 ms on two contended ones), and one thread
    fixes the summation order, so the float64 logits do not depend on the machine's thread count."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def decide_token(problem, t: int, *, competitors=None, pricer: Pricer | None = None,
                 options: DecideOptions | None = None, **kw) -> Candidate:
    """Decide one token by constraint generation; returns a Candidate (claims for ``engine.verify``).

    Args:
        competitors: token ids to start S with (e.g. the search's certificate support); default: the
            ``n_start`` largest logits at the witness screen's point x_t.
        pricer: the problem's :class:`Pricer` (built here when not given).
        options, **kw: :class:`DecideOptions`, or its fields as keywords.
    """
    return decide_token_stats(problem, t, competitors=competitors, pricer=pricer, options=options, **kw)[0]


def decide_token_stats(problem, t: int, *, competitors=None, pricer: Pricer | None = None,
                       options: DecideOptions | None = None, **kw) -> tuple[Candidate, DecideStats]:
    """:func:`decide_token` plus how it went."""
    opt = DecideOptions.from_kwargs(options, **kw)
    pricer = pricer or Pricer(problem)
    t = int(t)
    if not 0 <= t < pricer.V:
        raise ValueError(f"token {t} out of range [0, {pricer.V})")
    with _one_blas_thread():
        return _decide(pricer, t, competitors, opt)


def _start_set(pricer: Pricer, t: int, competitors, opt: DecideOptions, bounds: Bounds) -> np.ndarray:
    if competitors is None or len(competitors) == 0:
        x0 = pricer.screen_point(t)
        n0 = min(opt.n_start, pricer.V - 1)
        pr0 = pricer.price(x0, t, n_top=n0)
        bounds.offer_witness(x0, pr0)
        return pr0.ids[np.argsort(-pr0.logits, kind="stable")[:n0]]
    S0 = np.asarray(competitors, dtype=np.int64).ravel()
    S0 = S0[(S0 >= 0) & (S0 < pricer.V) & (S0 != t)]
    _, first = np.unique(S0, return_index=True)
    S0 = S0[np.sort(first)]
    return S0 if S0.size else np.array([(t + 1) % pricer.V], dtype=np.int64)


def _degenerate_cone(pricer: Pricer, t: int, bounds: Bounds) -> bool:
    """Cone, ``k_t = 0`` (the token is the mean row): the normalisation is empty and t never wins — the
    uniform weights over j != t are a certificate (Σ_j k_j = 0), with mu = 0."""
    if pricer.domain.bounded or np.any(pricer.keys[t]):
        return False
    ids = np.array([j for j in range(pricer.V) if j != t], dtype=np.int64)
    bounds.upper, bounds.cert = 0.0, Certificate(ids, np.full(ids.size, 1.0 / ids.size), 0.0)
    return True


def _decide(pricer: Pricer, t: int, competitors, opt: DecideOptions) -> tuple[Candidate, DecideStats]:
    t0 = time.perf_counter()
    stats = DecideStats(token=t, status="")
    bounds = Bounds(pricer, t)
    if _degenerate_cone(pricer, t, bounds):
        stats.status = "converged"
    else:
        S0 = _start_set(pricer, t, competitors, opt, bounds)
        solver = SOLVERS[pricer.domain.solver](pricer, t, opt)
        solver.add(S0)
        ks = pricer.domain.logit_size(pricer.keys[np.concatenate([S0, [t]])])
        scale = float(np.max(ks)) + float(np.max(np.abs(pricer.bias[np.concatenate([S0, [t]])])))
        stats.status = _generate(pricer, t, solver, bounds, stats, opt, t0 + opt.time_limit, scale)
        stats.cuts, stats.rows, stats.oracle_solves = solver.cuts, len(solver.ids), solver.oracle_solves
        stats.simplex_iterations, stats.lp_time_s = solver.lp_iterations, solver.lp_time_s
    stats.time_s = time.perf_counter() - t0
    status = stats.status
    reason = "lp" if status in ("converged", "gap", "sign") else status if status.startswith("highs") \
        else f"lp: {status}"
    return Candidate(token=t, witness=bounds.x, certificate=bounds.cert, lower=bounds.lower, upper=bounds.upper,
                     reason=reason, time_s=stats.time_s, iterations=stats.rounds), stats


def _generate(pricer, t, solver, bounds: Bounds, stats: DecideStats, opt: DecideOptions, deadline: float,
              scale: float) -> str:
    """The constraint-generation loop: restricted solve → price all V → add the worst violated rows.
    Returns the status; the bounds live in ``bounds``."""
    in_S = np.zeros(pricer.V, dtype=bool)
    in_S[np.asarray(solver.ids, dtype=np.int64)] = True
    while True:
        if stats.rounds >= opt.max_rounds:
            return "round limit"
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return "time limit"
        stats.rounds += 1
        step = solver.step(remaining, opt.tol * scale, bounds.x)
        if isinstance(step, str):
            return step
        if step is None:
            continue
        for ids, lam in step.certificates:
            bounds.offer_certificate(ids, lam)
        tp = time.perf_counter()
        pr = pricer.price(step.x, t, floor_offset=-step.m_ref + opt.tol * scale)
        stats.pricings += 1
        stats.pricing_time_s += time.perf_counter() - tp
        bounds.offer_witness(step.x, pr)
        scale = max(scale, pr.size)
        tol_abs = opt.tol * scale
        # Rows outside S that beat the restricted margin at the point: the restricted problem misses them.
        viol_mask = (pr.logits > pr.own - step.m_ref + tol_abs) & ~in_S[pr.ids]
        viol, vals = pr.ids[viol_mask], pr.logits[viol_mask]
        if viol.size == 0:
            done = solver.finished(bounds.lower, bounds.upper, tol_abs)
            if done:
                return done
            continue
        if bounds.upper - bounds.lower <= tol_abs:
            return "gap"
        if opt.stop_at_sign and (bounds.lower > opt.sign_tol * scale or bounds.upper < -opt.sign_tol * scale):
            return "sign"
        J = viol[np.argsort(-vals, kind="stable")[: min(opt.add_per_round, viol.size)]]
        solver.add(J)
        in_S[J] = True


# ------------------------------------------------------------------------------------------ many tokens
class _PoolState:
    """A worker process's view of the job, bound by the pool's initializer (fork: nothing is pickled)."""

    job: tuple | None = None

    @classmethod
    def bind(cls, pricer, competitors, options):
        cls.job = (pricer, competitors, options)
        _one_blas_thread()  # applied on creation, kept for the worker's life


def _pool_decide(t: int) -> Candidate:
    pricer, competitors, options = _PoolState.job
    return _decide_contained(pricer, t, competitors.get(t), options)


def decide_many(problem, tokens, competitors: dict | None = None, *, workers: int = 1,
                pricer: Pricer | None = None, options: DecideOptions | None = None, **kw) -> list[Candidate]:
    """:func:`decide_token` for each token (same order); ``competitors`` maps a token id to its starting ids.
    Tokens are independent and each solve is deterministic, so the results do not depend on ``workers``
    (a fork-based process pool when > 1; the children share the problem's arrays copy-on-write).
    An exception while deciding one token becomes that token's Candidate with reason ``lp error: ...`` and
    no claims — a solver failure is reported, never turned into a verdict, and never stops the others."""
    opt = DecideOptions.from_kwargs(options, **kw)
    tokens = [int(t) for t in tokens]
    competitors = competitors or {}
    pricer = pricer or Pricer(problem)
    if workers <= 1 or len(tokens) <= 1:
        with _one_blas_thread():  # once for the batch: each limit object rescans the loaded libraries (~2 ms)
            return [_decide_contained(pricer, t, competitors.get(t), opt) for t in tokens]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("fork"),
                             initializer=_PoolState.bind, initargs=(pricer, competitors, opt)) as ex:
        return list(ex.map(_pool_decide, tokens))


def _decide_contained(pricer: Pricer, t: int, competitors, opt: DecideOptions) -> Candidate:
    t0 = time.perf_counter()
    try:  # BLAS already on one thread (decide_many's block, or the pool worker's initializer)
        return _decide(pricer, t, competitors, opt)[0]
    except Exception as e:  # noqa: BLE001 - reported as the token's reason, see decide_many
        return Candidate(token=t, reason=f"lp error: {type(e).__name__}: {e}", time_s=time.perf_counter() - t0)
