"""Stage 5 — decide: one restricted problem per open token, by constraint generation (DESIGN §3 step 5).

With ``a_j = k_t − k_j`` and ``β_j = b_t − b_j`` on the keys ``k_j`` (``problem.keys``) the margin is

    m_t = max over x in X of  s   subject to   s <= a_j·x + β_j   for every j != t,

and only a working set S of competitors is kept: solve the problem restricted to S (a solver per domain,
``engine.restricted``), compute all V logits at its solution in float64, add the worst rows that beat the
restricted optimum, repeat until none does; then the restricted optimum is the full one (box and cone
LPs: exactly; balls: to ``tol``).

Pricing is one pass over all V logits per round, in float32 with a rigorous per-row error bound and
completed in float64 for every row the bound cannot exclude (:meth:`Pricer.price`): the float64 values of
all rows the round uses (the runner-up, the largest violated rows outside S) at half the memory traffic
of a float64 GEMV. The tokens of one :func:`decide_many` call run in lockstep (:func:`_drive`), so one
float32 GEMM prices the points of up to ``PRICE_BATCH`` of them at once; every value a pricing returns is
float64, so a token's result does not depend on the tokens it shares a batch with. The :class:`Pricer` is
built once per problem by the caller and passed explicitly (no caches).

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

from unspeakable.engine.evidence import Candidate, Certificate
from unspeakable.engine.head import FoldedRows
from unspeakable.engine.highs import lp_exponent
from unspeakable.engine.memory import LP_LOCKSTEP, row_norms
from unspeakable.engine.restricted import SOLVERS, WARM_MAX_ROWS

U32 = 2.0**-24
PRICE_BATCH = 32  # points priced by one float32 GEMM (Pricer.price_many)


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
        lockstep: tokens of a :func:`decide_many` batch under way at once (:func:`_drive`). Results do not
            depend on it.
        warm_max_rows: the largest restricted problem that keeps its Gram (and its factor) for warm LDPs,
            about ``16 · m²`` bytes each; past it, NNLS from scratch. The scan sizes it from its memory budget
            so that ``lockstep`` of them fit (``engine.memory.Budget.lp_warm_rows``). Results do not depend
            on it beyond the LDPs' rounding.
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
    lockstep: int = LP_LOCKSTEP
    warm_max_rows: int = WARM_MAX_ROWS

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
        k = problem.search_keys  # keys derived on demand (engine.head.DerivedKeys) are read as they are
        self.keys = k if isinstance(k, FoldedRows) else np.ascontiguousarray(k, dtype=np.float64)
        self.V, self.d = self.keys.shape
        if self.V < 2:
            raise ValueError("need at least two tokens")
        self.bias = np.ascontiguousarray(problem.search_bias, dtype=np.float64)  # zeros in the cone
        shared = getattr(problem, "search_keys32", None)  # the problem's one float32 copy, where it has one
        self.keys32 = shared() if shared is not None else np.asarray(self.keys, dtype=np.float32)
        # |fl32(k32·x32) − k·x| <= (2u(1+u) + γ_d (1+u)²) Σ|k_i||x_i| <= that × ||k|| ||x||, u = 2^-24, for
        # any summation order (Higham 3.1 and the two roundings to float32); doubled for the float64 epilogue.
        g = (self.d + 2) * U32 / (1.0 - (self.d + 2) * U32)
        norms = row_norms(self.keys)
        self.row_err = 2.0 * (2 * U32 * (1 + U32) + g * (1 + U32) ** 2) * norms
        self.bias_max = float(np.max(np.abs(self.bias)))
        self.lp_exp = lp_exponent(max(float(np.max(norms)), self.bias_max))  # HiGHS's rows scaled by 2^-lp_exp

    def price(self, x: np.ndarray, t: int, floor_offset: float = -math.inf, n_top: int = 2,
              exclude: np.ndarray | None = None, n_keep: int | None = None) -> Pricing:
        """Logits at x: exact (float64) for the ``n_top`` largest j != t and for every j != t with
        ``l_j >= l_t + floor_offset`` (no such condition when it is −inf) — or, with ``n_keep``, only for the
        ``n_keep`` largest of those among the rows not in ``exclude`` (a bool mask; all their ties included).
        The float32 pass gives bounds ``L32 ± err``; rows whose upper bound clears the floor are recomputed
        in float64 (all of them, by one float64 GEMV, when they are many)."""
        return self.price_many([(x, t, floor_offset, n_top, exclude, n_keep)])[0]

    def price_many(self, requests: list) -> list[Pricing]:
        """:meth:`price` for several ``(x, t, floor_offset, n_top, exclude, n_keep)`` (trailing ones optional)
        at once: one float32 GEMM over the keys for up to ``PRICE_BATCH`` points instead of one GEMV each (the
        keys are read once). Every output is a function of its own request only: the float32 values enter
        only through rigorous bounds that pick which rows to complete in float64, and every value returned
        (``own``, the logits of the rows that matter, ``top``, ``size``) is float64 — so the batch a request
        shares never changes a result."""
        out = []
        for b0 in range(0, len(requests), PRICE_BATCH):
            part = requests[b0: b0 + PRICE_BATCH]
            X = np.stack([np.asarray(r[0], dtype=np.float64) for r in part])
            X32 = X.astype(np.float32)
            L32s = [self.keys32 @ X32[0]] if len(part) == 1 else X32 @ self.keys32.T  # [B, V]
            out.extend(self._finish(X[i], int(r[1]), L32s[i], *r[2:]) for i, r in enumerate(part))
        return out

    def _finish(self, x: np.ndarray, t: int, L32: np.ndarray, floor_offset: float = -math.inf, n_top: int = 2,
                exclude: np.ndarray | None = None, n_keep: int | None = None) -> Pricing:
        own = float(self.keys[t] @ x + self.bias[t])
        L = L32.astype(np.float64)
        L += self.bias
        # dot-product bound, plus the float64 addition of the bias (2^-53 of |L32| + |b| per row, bounded
        # here by a few units of 2^-53 of the largest of each)
        err = self.row_err * float(np.linalg.norm(x))
        err += 2.0**-50 * (max(float(np.max(L)), -float(np.min(L))) + self.bias_max)
        lo = L - err
        lo[t] = -math.inf
        hi = L
        hi += err  # L is not needed past here
        n_top = max(1, min(int(n_top), self.V - 1))
        # The n_top-th largest lower bound over j != t is <= the true n_top-th largest logit over j != t,
        # so every row of the true top n_top (the runner-up included) clears this floor.
        kth = float(np.partition(lo, self.V - n_top)[self.V - n_top])
        if floor_offset == -math.inf:
            floor = kth
        else:
            level = own + floor_offset
            if n_keep is not None:
                # Likewise the n_keep-th largest lower bound among the rows not excluded: every row of the true
                # n_keep largest above the level (ties included) clears max(level, it).
                lk = lo if exclude is None else np.where(exclude, -math.inf, lo)
                nk = max(1, min(int(n_keep), self.V - 1))
                level = max(level, float(np.partition(lk, self.V - nk)[self.V - nk]))
            floor = min(kth, level)
        cand = np.nonzero(hi >= floor)[0]
        cand = cand[cand != t]
        if cand.size > self.V // 8:
            L = self.keys @ x + self.bias
            L[t] = -math.inf
            cand = np.nonzero(L >= floor)[0]
            vals = L[cand]
        else:
            vals = self.keys[cand] @ x + self.bias[cand]
        i = int(np.argmax(vals))
        # The scale of the tolerances, max_j |l_j(x)|, in float64 (never from the float32 values, whose
        # rounding depends on the product that computed them): the top is exact above; the bottom row is
        # among those whose lower bound is below the least upper bound.
        hi[t] = math.inf
        low = np.nonzero(lo <= float(np.min(hi)))[0]
        low = low[low != t]
        bottom = float(np.min(self.keys[low] @ x + self.bias[low]))
        size = max(abs(own), abs(float(vals[i])), abs(bottom))
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
        return _drive(pricer, [(t, competitors)], opt, contain=False)[0]


class _Clock:
    """One token's seconds: its own work (between pricings) plus its share of each batched pricing. With
    one token at a time this is its wall time; in a batch the shares add up to the batch's wall time."""

    def __init__(self):
        self.spent, self.since = 0.0, time.perf_counter()

    def now(self) -> float:
        return self.spent + (time.perf_counter() - self.since)

    def pause(self) -> None:
        self.spent += time.perf_counter() - self.since

    def resume(self, share: float) -> None:
        self.spent += share
        self.since = time.perf_counter()


def _priced(clock: _Clock, stats: DecideStats | None, x, t: int, *args):
    """Ask the driver for :meth:`Pricer.price` ``(x, t, *args)`` (``yield from``): the pricing of several
    tokens is batched there. ``stats``: the round's, or None (the starting set's pricing)."""
    clock.pause()
    pr, share = yield (x, t, *args)
    clock.resume(share)
    if stats is not None:
        stats.pricings += 1
        stats.pricing_time_s += share
    return pr


def _drive(pricer: Pricer, jobs: list, opt: DecideOptions, contain: bool = True) -> list[tuple[Candidate, DecideStats]]:
    """Decide the tokens of ``jobs`` (``(t, competitors)`` pairs) in lockstep: each round, every token that
    waits for a pricing gets it from one batched :meth:`Pricer.price_many`, its share of the time charged to
    its clock. At most ``opt.lockstep`` tokens are under way at once (each holds its restricted problem: up to
    its Gram of ``opt.warm_max_rows²`` doubles); the next starts when one finishes. Each token's solve sees exactly
    what it would alone (``price_many``'s results do not depend on the batch), so results do not depend on
    how many tokens run together. ``contain``: an exception while deciding one token becomes that token's
    Candidate with reason ``lp error: ...`` and no claims (see :func:`decide_many`); otherwise it
    propagates."""
    clocks: list = [None] * len(jobs)
    gens: list = [None] * len(jobs)
    out: list = [None] * len(jobs)
    pending: dict = {}
    queue = iter(range(len(jobs)))

    def step(i, value) -> bool:
        """Run token i to its next pricing request; False when it finished instead."""
        try:
            pending[i] = gens[i].send(value)
            return True
        except StopIteration as stop:
            out[i] = stop.value
        except Exception as e:  # noqa: BLE001 - reported as the token's reason
            if not contain:
                raise
            out[i] = _error(jobs[i][0], clocks[i], e)
        return False

    def start_next():
        for i in queue:  # until one is under way (some finish without a pricing)
            clocks[i] = _Clock()
            gens[i] = _decide(pricer, int(jobs[i][0]), jobs[i][1], opt, clocks[i])
            if step(i, None):
                return

    def advance(i, value):
        if not step(i, value):
            start_next()

    for _ in range(min(max(1, int(opt.lockstep)), len(jobs))):
        start_next()
    while pending:
        items = sorted(pending.items())
        pending.clear()
        t0 = time.perf_counter()
        try:
            prs = pricer.price_many([req for _, req in items])
        except Exception as e:  # noqa: BLE001
            if not contain:
                raise
            share = (time.perf_counter() - t0) / len(items)
            for i, _ in items:
                clocks[i].resume(share)
                out[i] = _error(jobs[i][0], clocks[i], e)
                gens[i].close()
                start_next()
            continue
        share = (time.perf_counter() - t0) / len(items)
        for (i, _), pr in zip(items, prs):
            advance(i, (pr, share))
    return out


def _error(t, clock: _Clock, e: Exception) -> tuple[Candidate, DecideStats]:
    spent = clock.now()
    return (Candidate(token=int(t), reason=f"lp error: {type(e).__name__}: {e}", time_s=spent),
            DecideStats(token=int(t), status="error", time_s=spent))


def _start_set(pricer: Pricer, t: int, competitors, opt: DecideOptions, bounds: Bounds, clock: _Clock):
    if competitors is None or len(competitors) == 0:
        x0 = pricer.screen_point(t)
        n0 = min(opt.n_start, pricer.V - 1)
        pr0 = yield from _priced(clock, None, x0, t, -math.inf, n0)
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


def _decide(pricer: Pricer, t: int, competitors, opt: DecideOptions, clock: _Clock):
    """One token's solve, as a generator that yields its pricing requests (run by :func:`_drive`) and
    returns ``(Candidate, DecideStats)``."""
    clock.resume(0.0)  # the clock runs from this token's first step, not from when the batch was set up
    stats = DecideStats(token=t, status="")
    bounds = Bounds(pricer, t)
    if _degenerate_cone(pricer, t, bounds):
        stats.status = "converged"
    else:
        S0 = yield from _start_set(pricer, t, competitors, opt, bounds, clock)
        solver = SOLVERS[pricer.domain.solver](pricer, t, opt)
        solver.add(S0)
        ks = pricer.domain.logit_size(pricer.keys[np.concatenate([S0, [t]])])
        scale = float(np.max(ks)) + float(np.max(np.abs(pricer.bias[np.concatenate([S0, [t]])])))
        stats.status = yield from _generate(pricer, t, solver, bounds, stats, opt, clock, scale)
        stats.cuts, stats.rows, stats.oracle_solves = solver.cuts, len(solver.ids), solver.oracle_solves
        stats.simplex_iterations, stats.lp_time_s = solver.lp_iterations, solver.lp_time_s
    stats.time_s = clock.now()
    status = stats.status
    reason = "lp" if status in ("converged", "gap", "sign") else status if status.startswith("highs") \
        else f"lp: {status}"
    return Candidate(token=t, witness=bounds.x, certificate=bounds.cert, lower=bounds.lower, upper=bounds.upper,
                     reason=reason, time_s=stats.time_s, iterations=stats.rounds), stats


def _generate(pricer, t, solver, bounds: Bounds, stats: DecideStats, opt: DecideOptions, clock: _Clock,
              scale: float):
    """The constraint-generation loop: restricted solve → price all V → add the worst violated rows.
    Returns the status (a generator: the pricing is the driver's); the bounds live in ``bounds``."""
    in_S = np.zeros(pricer.V, dtype=bool)
    in_S[np.asarray(solver.ids, dtype=np.int64)] = True
    while True:
        if stats.rounds >= opt.max_rounds:
            return "round limit"
        remaining = opt.time_limit - clock.now()
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
        # Exact logits for the rows the round uses: the runner-up, and the add_per_round largest violated
        # rows outside S (all of them when fewer; what decides "none violated" and which rows enter).
        pr = yield from _priced(clock, stats, step.x, t, -step.m_ref + opt.tol * scale, 2, in_S, opt.add_per_round)
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
    return _drive(pricer, [(t, competitors.get(t))], options)[0][0]


def decide_many(problem, tokens, competitors: dict | None = None, *, workers: int = 1,
                pricer: Pricer | None = None, options: DecideOptions | None = None, **kw) -> list[Candidate]:
    """:func:`decide_token` for each token (same order); ``competitors`` maps a token id to its starting ids.
    With one worker the tokens run in lockstep (:func:`_drive`: one batched pricing a round for all of
    them); with more, a fork-based process pool decides them one by one (the children share the problem's
    arrays copy-on-write). Each token's solve is deterministic and sees the same pricing either way, so the
    results do not depend on ``workers`` or on which tokens share a batch.
    An exception while deciding one token becomes that token's Candidate with reason ``lp error: ...`` and
    no claims — a solver failure is reported, never turned into a verdict, and never stops the others."""
    return [c for c, _ in decide_many_stats(problem, tokens, competitors, workers=workers, pricer=pricer,
                                            options=options, **kw)]


def decide_many_stats(problem, tokens, competitors: dict | None = None, *, workers: int = 1,
                      pricer: Pricer | None = None, options: DecideOptions | None = None,
                      **kw) -> list[tuple[Candidate, DecideStats | None]]:
    """:func:`decide_many` plus each token's :class:`DecideStats` (None from a process pool's workers).
    A token's ``time_s`` is its own work plus its share of the batched pricings (see :class:`_Clock`)."""
    opt = DecideOptions.from_kwargs(options, **kw)
    tokens = [int(t) for t in tokens]
    competitors = competitors or {}
    pricer = pricer or Pricer(problem)
    if workers <= 1 or len(tokens) <= 1:
        with _one_blas_thread():  # once for the batch: each limit object rescans the loaded libraries (~2 ms)
            return _drive(pricer, [(t, competitors.get(t)) for t in tokens], opt)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("fork"),
                             initializer=_PoolState.bind, initargs=(pricer, competitors, opt)) as ex:
        return [(c, None) for c in ex.map(_pool_decide, tokens)]
