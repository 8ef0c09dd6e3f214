"""engine.decide against independent oracles.

* box / cone: ONE full-size LP over all V rows (scipy.optimize.linprog, no constraint generation).
* cone: the vertices of scipy.spatial.ConvexHull (qhull) are exactly the tokens with a positive optimum.
* balls: a sandwich — the same full LP with the ball replaced by a fine circumscribed polytope (upper bound)
  and by the convex hull of points on the sphere (lower bound).
* every claim is recomputed here in float64 from ``problem.rows`` (not the keys decide works on): the
  witness's margin over all V, the certificate's deficit, λ >= 0 summing to 1, t never a competitor; and
  clear verdicts go through ``engine.verify``.
"""
import dataclasses

import numpy as np
import pytest
from scipy.optimize import linprog
from scipy.spatial import ConvexHull

from unspeakable.engine import decide as decide_mod
from unspeakable.engine import restricted
from unspeakable.engine.decide import decide_many, decide_token, decide_token_stats
from unspeakable.engine.highs import LPResult, Status
from unspeakable.engine.loader import problem_from_rows
from unspeakable.engine.verify import Verifier


# ------------------------------------------------------------------------------------------ fixtures
def make_problem(rows, bias, domain, radius):
    """A Problem as load.fold would build it: keys = P(rows − mean row), P = projection on 1⊥ (layernorm)."""
    return problem_from_rows(rows, bias, domain, radius)


def random_rows(rng, V, d, n_interior=0, bias_scale=0.5):
    """Gaussian rows with lognormal norms; the last n_interior rows are convex combinations of others."""
    rows = rng.standard_normal((V, d)) * np.exp(rng.normal(0, 0.3, V))[:, None]
    for i in range(V - n_interior, V):
        w = rng.dirichlet(np.ones(4))
        rows[i] = w @ rows[rng.choice(V - n_interior, 4, replace=False)]
    return rows, rng.standard_normal(V) * bias_scale


def projector(problem):
    d = problem.d
    if problem.domain.name == "layernorm":
        return np.eye(d) - np.ones((d, d)) / d
    return np.eye(d)


def logit_scale(problem):
    R = problem.radius if problem.radius is not None else 1.0
    n = np.linalg.norm(problem.rows - problem.center, axis=1) if problem.domain.name != "box" else \
        np.abs(problem.rows - problem.center).sum(axis=1)
    return R * float(n.max()) + float(np.abs(problem.bias).max())


# ------------------------------------------------------------------------------------------ claim checks
def check_claims(problem, t, cand, tol=1e-9):
    """Recompute everything the candidate claims from problem.rows in float64."""
    scale = logit_scale(problem)
    assert cand.token == t
    assert cand.lower <= cand.upper + tol * scale
    if cand.witness is not None:
        x = np.asarray(cand.witness, dtype=np.float64)
        assert x.shape == (problem.d,) and np.all(np.isfinite(x))
        if problem.domain.name in ("layernorm", "rmsnorm"):
            assert np.linalg.norm(x) <= problem.radius * (1 + 1e-12)
        if problem.domain.name == "layernorm":
            assert abs(x.sum()) <= 1e-9 * problem.radius * np.sqrt(problem.d)
        if problem.domain.name == "box":
            assert np.max(np.abs(x)) <= problem.radius
        z = projector(problem) @ x
        logits = problem.rows @ z + (0.0 if problem.domain.name == "cone" else problem.bias)
        margin = logits[t] - np.max(np.delete(logits, t))
        if problem.domain.name == "cone":
            margin /= float((problem.rows[t] - problem.center) @ z)
        assert margin == pytest.approx(cand.lower, abs=tol * scale)
    else:
        assert cand.lower == -np.inf
    cert = cand.certificate
    if cert is not None:
        comp, lam = np.asarray(cert.competitors), np.asarray(cert.weights)
        assert t not in comp and len(np.unique(comp)) == comp.size
        assert np.all(lam > 0) and lam.sum() == pytest.approx(1.0, abs=1e-12)
        r = lam @ (problem.rows[comp] - problem.rows[t])
        if problem.domain.name == "cone":
            kt = problem.rows[t] - problem.center
            assert cert.mu is not None
            assert np.linalg.norm(r + cert.mu * kt) <= 1e-8 * (1 + np.abs(problem.rows).max())
            assert cand.upper == pytest.approx(cert.mu, abs=1e-9)
        else:
            c0 = lam @ (problem.bias[comp] - problem.bias[t])
            if problem.domain.name == "box":
                sup = problem.radius * np.abs(r).sum()
            else:
                sup = problem.radius * np.linalg.norm(projector(problem) @ r)
            assert cand.upper == pytest.approx(sup - c0, abs=tol * scale)  # upper = −δ(λ)
    else:
        assert cand.upper == np.inf


def check_verifier(problem, t, cand, gap=1e-6):
    """Clear claims must survive engine.verify (an independent re-derivation with rounding allowances)."""
    scale = logit_scale(problem)
    v = Verifier(problem)
    if cand.lower > gap * scale:
        assert v.witness(t, cand.witness).ok
    if cand.upper < -gap * scale:
        assert v.certificate(t, cand.certificate).ok


# ------------------------------------------------------------------------------------------ full-LP oracles
def full_lp_box(problem, t):
    K, b, d = problem.keys, problem.bias, problem.d
    J = np.delete(np.arange(problem.V), t)
    A = np.hstack([np.ones((J.size, 1)), K[J] - K[t]])
    res = linprog(np.r_[-1.0, np.zeros(d)], A_ub=A, b_ub=b[t] - b[J],
                  bounds=[(None, None)] + [(-problem.radius, problem.radius)] * d, method="highs")
    assert res.status == 0
    return -res.fun


def full_lp_cone(problem, t):
    K, d = problem.keys, problem.d
    J = np.delete(np.arange(problem.V), t)
    A = np.hstack([np.ones((J.size, 1)), K[J] - K[t]])
    res = linprog(np.r_[-1.0, np.zeros(d)], A_ub=A, b_ub=np.zeros(J.size), A_eq=np.r_[0.0, K[t]][None, :],
                  b_eq=[1.0], bounds=[(None, 1.0)] + [(None, None)] * d, method="highs")
    assert res.status == 0
    return -res.fun


def sphere_directions(dim, n):
    if dim == 2:
        a = 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    i = np.arange(n) + 0.5  # Fibonacci sphere
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def ball_sandwich(problem, t, n_dirs):
    """(lower, upper) on the ball margin from polytopes inside and around the ball, in coordinates y of
    the domain's own space (1⊥ for layernorm): x = B y."""
    d, R = problem.d, problem.radius
    if problem.domain.name == "layernorm":
        B = np.linalg.svd(np.eye(d) - np.ones((d, d)) / d)[0][:, : d - 1]
    else:
        B = np.eye(d)
    Ky = (problem.rows - problem.rows[t]) @ B  # rows minus row t: keys' centring cancels in differences
    b = problem.bias
    J = np.delete(np.arange(problem.V), t)
    g = sphere_directions(B.shape[1], n_dirs)
    # outer: s + (k_j − k_t)·y <= b_t − b_j, g_i·y <= R
    dim = B.shape[1]
    A_rows = np.hstack([np.ones((J.size, 1)), Ky[J]])
    A_cut = np.hstack([np.zeros((len(g), 1)), g])
    outer = linprog(np.r_[-1.0, np.zeros(dim)], A_ub=np.vstack([A_rows, A_cut]),
                    b_ub=np.r_[b[t] - b[J], np.full(len(g), R)], bounds=[(None, None)] * (dim + 1), method="highs")
    # inner: y = R g^T μ, μ >= 0, Σ μ <= 1 (conv of 0 and the points R g_i, inside the ball)
    Ainner = np.hstack([np.ones((J.size, 1)), R * Ky[J] @ g.T])
    inner = linprog(np.r_[-1.0, np.zeros(len(g))], A_ub=np.vstack([Ainner, np.r_[0.0, np.ones(len(g))][None, :]]),
                    b_ub=np.r_[b[t] - b[J], 1.0], bounds=[(None, None)] + [(0, None)] * len(g), method="highs")
    assert outer.status == 0 and inner.status == 0
    return -inner.fun, -outer.fun


# ------------------------------------------------------------------------------------------ box and cone
@pytest.mark.parametrize("seed", range(4))
def test_box_matches_full_lp(seed):
    rng = np.random.default_rng(seed)
    V, d = int(rng.integers(30, 200)), int(rng.integers(2, 9))
    rows, bias = random_rows(rng, V, d, n_interior=V // 5)
    p = make_problem(rows, bias, "box", float(rng.choice([1.0, 100.0])))
    for t in rng.choice(V, 8, replace=False):
        t = int(t)
        cand = decide_token(p, t, add_per_round=4, n_start=8)
        ref = full_lp_box(p, t)
        scale = logit_scale(p)
        assert cand.reason == "lp"
        assert cand.upper == pytest.approx(ref, abs=1e-7 * scale)
        assert cand.lower == pytest.approx(ref, abs=1e-7 * scale)
        assert (cand.lower > 0) == (ref > 0) and (cand.upper < 0) == (ref < 0)
        check_claims(p, t, cand)
        check_verifier(p, t, cand)


@pytest.mark.parametrize("seed", range(4))
def test_cone_lp_matches_full_lp(seed):
    rng = np.random.default_rng(10 + seed)
    V, d = int(rng.integers(30, 200)), int(rng.integers(2, 9))
    rows, _ = random_rows(rng, V, d, n_interior=V // 4)
    p = make_problem(rows, None, "cone", None)
    for t in rng.choice(V, 8, replace=False):
        t = int(t)
        ref = full_lp_cone(p, t)
        # the LP throughout: its optimum (capped at 1) is the full LP's
        cand = decide_token(p, t, add_per_round=4, n_start=8, cone_oracle=False)
        assert cand.lower == pytest.approx(ref, abs=1e-7)
        if ref < 1 - 1e-7:
            assert cand.upper == pytest.approx(ref, abs=1e-7)
        check_claims(p, t, cand)
        check_verifier(p, t, cand)
        # default (witness by the ball oracle first): same sign; exact where the LP decides (inside)
        cand = decide_token(p, t, add_per_round=4, n_start=8)
        assert (cand.lower > 0) == (ref > 0) and (cand.upper < 0) == (ref < 0)
        if ref < 0:
            assert cand.upper == pytest.approx(ref, abs=1e-7) and cand.lower == pytest.approx(ref, abs=1e-7)
        check_claims(p, t, cand)
        check_verifier(p, t, cand)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_cone_sign_is_qhull_vertices(d):
    rng = np.random.default_rng(20 + d)
    V = 60
    rows, _ = random_rows(rng, V, d, n_interior=10)
    p = make_problem(rows, None, "cone", None)
    vertices = set(int(i) for i in ConvexHull(p.keys).vertices)
    for t in range(V):
        cand = decide_token(p, t)
        if t in vertices:
            assert cand.lower > 0, t
        else:
            assert cand.upper < 0, t  # strictly inside: the normalisation makes the optimum negative
        check_claims(p, t, cand)


# ------------------------------------------------------------------------------------------ balls
@pytest.mark.parametrize("domain,d", [("rmsnorm", 2), ("rmsnorm", 3), ("layernorm", 3), ("layernorm", 4)])
def test_ball_within_polytope_sandwich(domain, d):
    rng = np.random.default_rng(30 + d)
    V = 50
    rows, bias = random_rows(rng, V, d, n_interior=8, bias_scale=1.0)
    p = make_problem(rows, bias, domain, float(np.sqrt(d)))
    n_dirs = 2000 if (d if domain == "rmsnorm" else d - 1) == 2 else 3000
    scale = logit_scale(p)
    for t in rng.choice(V, 10, replace=False):
        t = int(t)
        cand = decide_token(p, t, add_per_round=4, n_start=8)
        lo, hi = ball_sandwich(p, t, n_dirs)
        assert cand.reason == "lp"
        assert lo - 1e-9 * scale <= cand.lower and cand.upper <= hi + 1e-9 * scale
        assert cand.upper - cand.lower <= 1e-8 * scale  # the optimum, pinned from both sides
        if lo > 0:
            assert cand.lower > 0
        if hi < 0:
            assert cand.upper < 0
        check_claims(p, t, cand)
        check_verifier(p, t, cand)
        # with the LP cross-check (tangent cut at the oracle's optimum) the same optimum comes out
        cand_lp, stats = decide_token_stats(p, t, add_per_round=4, n_start=8, use_lp=True)
        assert stats.simplex_iterations > 0
        assert cand_lp.upper == pytest.approx(cand.upper, abs=1e-8 * scale)
        check_claims(p, t, cand_lp)


def test_ball_oracle_interior_optimum():
    # R large: the ball does not bind and the optimum is the plain LP max-min (Farkas branch of the oracle)
    rng = np.random.default_rng(5)
    G = rng.standard_normal((40, 3))
    beta = rng.standard_normal(40)
    ref = linprog(np.r_[-1.0, 0, 0, 0], A_ub=np.hstack([np.ones((40, 1)), -G]), b_ub=beta,
                  bounds=[(None, None)] * 4, method="highs")
    bo = restricted.ball_optimum(G, beta, 1e3, float(beta.min()), 1e-10)
    assert bo.lower == pytest.approx(-ref.fun, abs=1e-9) and bo.upper == pytest.approx(-ref.fun, abs=1e-9)
    assert np.linalg.norm(bo.z) < 1e3


def test_ball_larger_instance_is_pinned():
    # d = 40, V = 3000: no polytope oracle, but a witness checked over all V and a certificate whose deficit
    # is recomputed here must meet (lower <= m_t <= upper), which is the optimum.
    rng = np.random.default_rng(7)
    V, d = 3000, 40
    rows = rng.standard_normal((V, d)) * np.exp(rng.normal(0, 0.35, V))[:, None]
    p = make_problem(rows, rng.normal(0, 0.3, V), "rmsnorm", float(np.sqrt(d)))
    own = np.linalg.norm(p.keys, axis=1)
    for t in np.argsort(own)[:3]:  # small rows: they lose at their own direction
        t = int(t)
        cand = decide_token(p, t)
        scale = logit_scale(p)
        assert cand.reason == "lp"
        assert cand.upper - cand.lower <= 1e-8 * scale
        check_claims(p, t, cand)
        check_verifier(p, t, cand)


# ------------------------------------------------------------------------------------------ limits and errors
def _box_instance():
    rng = np.random.default_rng(40)
    rows, bias = random_rows(rng, 150, 6, n_interior=30)
    return make_problem(rows, bias, "box", 1.0)


def test_time_limit_claims_only_what_was_checked():
    p = _box_instance()
    cand = decide_token(p, 3, time_limit=0.0)
    assert cand.reason == "lp: time limit"
    assert cand.certificate is None and cand.upper == np.inf
    check_claims(p, 3, cand)  # the screen point's witness, checked over all V, is all it may claim


def test_round_limit():
    p = _box_instance()
    full, stats = decide_token_stats(p, 7, add_per_round=1, n_start=1)
    assert stats.rounds > 1
    cand = decide_token(p, 7, add_per_round=1, n_start=1, max_rounds=1)
    assert cand.reason == "lp: round limit"
    check_claims(p, 7, cand)


def test_solver_failure_is_not_a_verdict(monkeypatch):
    p = _box_instance()

    def failing_solve(self, **_):
        return LPResult(Status.UNKNOWN, False, "Unknown")

    monkeypatch.setattr(restricted.LP, "solve", failing_solve)
    cand = decide_token(p, 5)
    assert cand.reason == "highs: unknown"
    assert cand.certificate is None and cand.upper == np.inf
    check_claims(p, 5, cand)


def test_decide_many_does_not_depend_on_workers():
    p = _box_instance()
    tokens = [0, 4, 9, 17, 33]
    comp = {4: np.array([1, 2, 3])}
    one = decide_many(p, tokens, comp, workers=1)
    two = decide_many(p, tokens, comp, workers=2)
    for a, b in zip(one, two):
        assert a.token == b.token and a.lower == b.lower and a.upper == b.upper
        assert np.array_equal(a.certificate.competitors, b.certificate.competitors)
        assert np.array_equal(a.certificate.weights, b.certificate.weights)
        assert np.array_equal(a.witness, b.witness)


def test_given_competitors_are_cleaned():
    p = _box_instance()
    cand = decide_token(p, 11, competitors=np.array([11, 11, 3, -1, 10**6, 3, 20]))
    check_claims(p, 11, cand)
    assert cand.upper == pytest.approx(full_lp_box(p, 11), abs=1e-7 * logit_scale(p))


def test_tie_is_never_a_win():
    # an exact duplicate (row and bias) of t: m_t = 0, neither witness > 0 nor certificate < 0 is claimed
    rng = np.random.default_rng(50)
    rows, bias = random_rows(rng, 40, 4)
    rows[7], bias[7] = rows[3], bias[3]
    for domain, R in (("box", 1.0), ("rmsnorm", 2.0)):
        p = make_problem(rows, bias, domain, R)
        cand = decide_token(p, 3)
        assert cand.lower <= 1e-12 and cand.upper >= -1e-12
        check_claims(p, 3, cand)


def test_pricer_is_passed_not_cached():
    # no module-level cache: a Pricer belongs to its problem, and a changed bias needs a new one
    p = _box_instance()
    q = dataclasses.replace(p, bias=p.bias + 1.0)
    assert not hasattr(decide_mod, "_HEAD_CACHE")
    pr_p, pr_q = decide_mod.Pricer(p), decide_mod.Pricer(q)
    x = p.domain.screen_points(p.keys, np.array([3]))[0]
    assert pr_q.price(x, 3).own == pytest.approx(pr_p.price(x, 3).own + 1.0, abs=1e-12)


def test_pricing_is_exact_where_it_matters():
    # 300 logits tied far below float32 resolution at x (bias set to 100 − k_j·x + 1e-9 noise): the float32
    # pass alone orders them at random, the error bound must send all of them to float64
    rng = np.random.default_rng(60)
    V, d = 4000, 48
    rows = rng.standard_normal((V, d))
    x = rng.standard_normal(d)
    keys = make_problem(rows, None, "rmsnorm", 3.0).keys
    bias = rng.standard_normal(V)
    tied = rng.choice(V, 300, replace=False)
    bias[tied] = 100.0 - keys[tied] @ x + 1e-9 * rng.standard_normal(tied.size)
    p = make_problem(rows, bias, "rmsnorm", 3.0)
    head = decide_mod.Pricer(p)
    for t in (int(tied[0]), int(tied[1]), 7):
        full = p.keys @ x + p.bias
        full_t = full[t]
        full[t] = -np.inf
        for offset, n_top in ((-np.inf, 2), (-np.inf, 5), (-1e-8, 2), (-50.0, 2)):
            pr = head.price(x, t, floor_offset=offset, n_top=n_top)
            assert pr.runner_up == int(np.argmax(full)) and pr.top == pytest.approx(full.max(), abs=1e-12)
            assert pr.own == pytest.approx(full_t, abs=1e-12)
            need = set(np.argsort(-full)[:n_top].tolist())
            if np.isfinite(offset):
                need |= set(np.nonzero(full >= full_t + offset)[0].tolist())
            got = dict(zip(pr.ids.tolist(), pr.logits.tolist()))
            assert need <= set(got) and all(abs(got[j] - full[j]) <= 1e-12 for j in need)
            assert t not in got
    # away from the tie the float32 pass prunes: few rows go to float64, and they are still exact
    x2 = rng.standard_normal(d)
    pr = head.price(x2, 7, n_top=2)
    full = p.keys @ x2 + p.bias
    full[7] = -np.inf
    assert pr.ids.size < 20 and pr.runner_up == int(np.argmax(full))


# ------------------------------------------------------------------------------------------ warm-started LDPs
def _ldp_system(rng, m, k, twins):
    """An LDP ``min ||z|| s.t. G z >= h`` as its NNLS ``[G^T; h^T] u ≈ e``; the last ``twins`` rows are
    near-copies of the first ones (BPE variants), and m > k + 1 makes the normal equations singular."""
    G = rng.standard_normal((m, k))
    if twins:
        G[-twins:] = G[:twins] + 1e-7 * rng.standard_normal((twins, k))
    h = rng.standard_normal(m) - 0.5
    E = np.vstack([G.T, h[None, :]])
    e = np.zeros(k + 1)
    e[k] = 1.0
    return G, h, E, e


def _nnls_reference(G, h):
    """The LDP's NNLS ``[G^T; h^T] u ≈ e_last`` solved by scipy (Lawson–Hanson): ``(E, e, u, residual, E^T E)``."""
    from scipy.optimize import nnls

    m, k = G.shape
    E = np.vstack([G.T, h[None, :]])
    e = np.zeros(k + 1)
    e[k] = 1.0
    ref, _ = nnls(E, e, maxiter=50 * m)
    return E, e, ref, float(np.linalg.norm(E @ ref - e)), E.T @ E


@pytest.mark.parametrize("m,k,twins", [(60, 20, 0), (120, 90, 0), (300, 40, 0), (200, 120, 40)])
def test_warm_nnls_reaches_the_lawson_hanson_optimum(m, k, twins):
    from scipy.optimize import nnls

    rng = np.random.default_rng(m + k + twins)
    G, h, E, e = _ldp_system(rng, m, k, twins)
    ref, _ = nnls(E, e, maxiter=50 * m)
    best = float(np.linalg.norm(E @ ref - e))
    A = E.T @ E
    solved = 0
    for start in (np.zeros(m, bool), ref > 0, rng.random(m) < 0.5, rng.random(m // 2) < 0.5):
        u = restricted._nnls_warm(A, h, start)
        if u is None:  # allowed (the caller falls back to Lawson–Hanson), but not from every start
            continue
        solved += 1
        assert np.all(u >= 0)
        assert np.linalg.norm(E @ u - e) <= best + 1e-9
        g = E.T @ (E @ u - e)  # KKT: no descent direction left among the zero weights
        assert np.all(g[u == 0] >= -1e-8 * np.linalg.norm(E, axis=0)[u == 0])
    assert solved >= 2


@pytest.mark.parametrize("R", [3.0, 1e3])
def test_ball_optimum_warm_equals_cold(R):
    # m > WARM_MIN_ROWS rows in k < m dimensions: the restricted problems of a hard token. Warm-started LDPs
    # (normal equations from the last passive set) must reach the optimum the NNLS from scratch reaches.
    rng = np.random.default_rng(11)
    m, k = 400, 60
    G = rng.standard_normal((m, k)) * np.exp(rng.normal(0, 0.3, m))[:, None]
    G[-40:] = G[:40] + 1e-6 * rng.standard_normal((40, k))
    beta = rng.normal(0, 0.5, m)
    s_lo, tol = float(beta.min()), 1e-10
    cold = restricted.ball_optimum(G, beta, R, s_lo, tol)
    warm = restricted._Warm(G @ G.T, np.zeros(0, dtype=bool))
    hot = restricted.ball_optimum(G, beta, R, s_lo, tol, warm=warm)
    again = restricted.ball_optimum(G, beta, R, s_lo, tol, warm=warm)  # from the passive set just found
    assert warm.fast > 0
    for bo in (hot, again):
        assert bo.lower == pytest.approx(cold.lower, abs=1e-8) and bo.upper == pytest.approx(cold.upper, abs=1e-8)
        assert np.linalg.norm(bo.z) <= R * (1 + 1e-12)
        assert np.all(bo.lam >= 0) and bo.lam.sum() == pytest.approx(1.0)


def test_unseen_head_family_lp_tokens_match_the_full_lp_oracle(monkeypatch):
    # A head of benchmarks/unseen.py's kind (low-rank part, BPE variants, glitch rows, Q4 rows, LayerNorm
    # gain outliers), small: the screens and the search leave tokens to the LP, as real heads do. Their
    # verdicts must match an independent full-size oracle (tests/oracles.py), with the warm-started LDPs
    # forced on from the first row and with the default threshold.
    import os
    import sys

    from oracles import instance, truth
    from unspeakable.engine import scan

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import unseen

    a = unseen.make_arrays("quant", 0, V=2000, d=32)
    reps = [scan(a["W_U"], a["b_U"], ln_w=a["ln_w"], ln_b=a["ln_b"], device="cpu")]
    monkeypatch.setattr(restricted, "WARM_MIN_ROWS", 0)
    reps.append(scan(a["W_U"], a["b_U"], ln_w=a["ln_w"], ln_b=a["ln_b"], device="cpu"))
    monkeypatch.setattr(restricted, "WARM_MAX_ROWS", 40)  # the Gram dropped part-way: from scratch again
    reps.append(scan(a["W_U"], a["b_U"], ln_w=a["ln_w"], ln_b=a["ln_b"], device="cpu"))
    for rep in reps[1:]:
        assert rep.counts == reps[0].counts and rep.counts["undecided"] == 0
        assert [(t.id, t.verdict) for t in rep.tokens] == [(t.id, t.verdict) for t in reps[0].tokens]
    lp = [t for t in reps[1].tokens if t.reason.endswith("(lp)")]
    assert len(lp) >= 3
    inst = instance(a["W_U"], a["b_U"], a["ln_w"], a["ln_b"], domain="layernorm")
    for t in lp[:3]:  # the oracle's cutting-plane LP takes seconds a token
        sign, why, lo, hi = truth(inst, t.id)
        assert sign is not None, (t.id, why, lo, hi)
        assert sign == (1 if t.verdict == "speakable" else -1), (t.id, t.verdict, lo, hi)


def test_incremental_cholesky_matches_a_fresh_factorisation():
    # restricted._Chol updates the passive block's factor as rows enter (block solves) and leave (Givens);
    # after any sequence its solves must match a fresh solve of the same block, and a block that is not
    # positive definite (a duplicate row, more rows than the rank) must be refused with the factor unchanged.
    rng = np.random.default_rng(5)
    m, k = 90, 40
    G = rng.standard_normal((m, k)) * np.exp(rng.normal(0, 1.0, m))[:, None]
    G[-5:] = G[:5]  # exact duplicates: any block holding a row and its twin is singular
    A = G @ G.T + 1e-3 * np.outer(G[:, 0], G[:, 0])
    b = rng.standard_normal(m)
    chol = restricted._Chol(A)
    F = np.zeros(m, dtype=bool)
    for step in range(60):
        G2 = F.copy()
        if F.sum() > 5 and rng.random() < 0.5:
            G2[rng.choice(np.nonzero(F)[0], size=int(rng.integers(1, 4)), replace=False)] = False
        else:
            G2[rng.choice(m - 5, size=int(rng.integers(1, 8)), replace=False)] = True
        if G2.sum() > 30:  # stay below the rank (40), away from near-singular blocks
            continue
        chol.sync(G2)  # a well-conditioned block: never refused
        F = G2
        assert sorted(chol.idx.tolist()) == np.nonzero(F)[0].tolist()
        idx = np.nonzero(F)[0]
        z = chol.solve(b)
        ref = np.linalg.solve(A[np.ix_(idx, idx)], b[idx])
        assert np.allclose(z[idx], ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
        assert np.all(z[~F] == 0)
    # the twin of a passive row: refused, and the factor left as it was
    F[0] = True
    chol.sync(F)
    idx, R = chol.idx.copy(), chol.R.copy()
    with pytest.raises(np.linalg.LinAlgError):
        chol.add(np.array([m - 5]))  # the exact twin of row 0
    assert np.array_equal(chol.idx, idx) and np.array_equal(chol.R, R)


@pytest.mark.parametrize("seed", range(6))
def test_warm_nnls_matches_scipy_on_rank_deficient_instances(seed):
    # Duplicate and dependent rows, more rows than dimensions: the incremental factor must reach scipy's
    # Lawson–Hanson objective (or decline with None, which sends the caller to scipy).
    rng = np.random.default_rng(100 + seed)
    m, k = int(rng.integers(40, 160)), int(rng.integers(5, 60))
    G = rng.standard_normal((m, k))
    G[m // 2: m // 2 + 5] = G[:5]  # exact twins
    G[-3:] = G[5:8] + G[8:11]  # dependent rows
    h = rng.standard_normal(m) - 0.3
    E, e, ref, best, A = _nnls_reference(G, h)
    for start in (np.zeros(m, bool), ref > 0, rng.random(m) < 0.3):
        u = restricted._nnls_warm(A, h, start)
        if u is None:
            continue
        assert np.all(u >= 0)
        assert np.linalg.norm(E @ u - e) <= best + 1e-9


# ------------------------------------------------------------------------------------------ batched pricing
def _tied_pricing_instance(rng):
    """Rows whose logits at x tie to within float32's error (the pruning must complete them in float64)."""
    V, d = 3000, 40
    rows = rng.standard_normal((V, d))
    x = rng.standard_normal(d)
    keys = make_problem(rows, None, "rmsnorm", 3.0).keys
    bias = rng.standard_normal(V)
    tied = rng.choice(V, 200, replace=False)
    bias[tied] = 50.0 - keys[tied] @ x + 1e-9 * rng.standard_normal(tied.size)
    return make_problem(rows, bias, "rmsnorm", 3.0), x, tied


def test_pricing_keeps_the_largest_violated_rows_outside_the_set():
    # price(..., exclude, n_keep): exact float64 logits for the n_keep largest rows above the level among the
    # rows not excluded (ties at the cut included), the runner-up over all j != t, and size = max_j |l_j|,
    # all against a full float64 recomputation.
    rng = np.random.default_rng(21)
    p, x, tied = _tied_pricing_instance(rng)
    head = decide_mod.Pricer(p)
    for t in (int(tied[0]), 5):
        full = p.keys @ x + p.bias
        own = full[t]
        full[t] = -np.inf
        for offset, n_keep in ((-1e-8, 10), (-1e-8, 500), (-30.0, 7), (5.0, 3)):
            exclude = np.zeros(p.V, dtype=bool)
            exclude[rng.choice(p.V, 300, replace=False)] = True
            exclude[tied[:20]] = True
            pr = head.price(x, t, offset, 2, exclude, n_keep)
            got = dict(zip(pr.ids.tolist(), pr.logits.tolist()))
            assert pr.runner_up == int(np.argmax(full)) and pr.top == full.max() and pr.own == own
            ok = np.nonzero((full >= own + offset) & ~exclude)[0]
            if ok.size:
                cut = np.sort(full[ok])[::-1][min(n_keep, ok.size) - 1]
                need = ok[full[ok] >= cut]
                assert set(need.tolist()) <= set(got)
                assert all(abs(got[j] - full[j]) <= 1e-12 * max(1.0, abs(full[j])) for j in need)
            fin = np.concatenate([full[np.isfinite(full)], [own]])
            assert pr.size == pytest.approx(float(np.max(np.abs(fin))), rel=1e-13)


def test_batched_pricing_equals_single():
    # One GEMM for many points rounds differently from one GEMV each: every returned value must not care.
    rng = np.random.default_rng(22)
    p, x, tied = _tied_pricing_instance(rng)
    head = decide_mod.Pricer(p)
    reqs = []
    for i in range(40):
        xi = x if i % 3 == 0 else rng.standard_normal(p.d) * rng.uniform(0.1, 3.0)
        exclude = rng.random(p.V) < 0.05
        reqs.append((xi, int(tied[i % 7]) if i % 2 else i, -1e-8 if i % 4 else -np.inf, 2 + i % 3,
                     exclude if i % 5 else None, None if i % 6 == 0 else 1 + i))
    single = [head.price(*r) for r in reqs]
    for batch in (2, 7, 40):
        got = []
        for b0 in range(0, len(reqs), batch):
            got.extend(head.price_many(reqs[b0: b0 + batch]))
        for a, b in zip(single, got):
            assert (a.own, a.top, a.runner_up, a.size) == (b.own, b.top, b.runner_up, b.size)
            common, ia, ib = np.intersect1d(a.ids, b.ids, return_indices=True)
            assert np.array_equal(a.logits[ia], b.logits[ib])


@pytest.mark.parametrize("domain,R", [("layernorm", 3.0), ("rmsnorm", 2.0), ("box", 1.0), ("cone", None)])
def test_lockstep_decide_equals_one_at_a_time(domain, R):
    # decide_many runs its tokens in lockstep with one batched pricing a round; each token's result must be
    # bit-identical to deciding it alone (same bounds, witness, certificate, rounds).
    rng = np.random.default_rng(23)
    rows, bias = random_rows(rng, 300, 12, n_interior=40)
    p = make_problem(rows, None if domain == "cone" else bias, domain, R)
    tokens = [3, 17, 260, 270, 285, 299, 100]
    comp = {17: np.array([1, 2, 3]), 270: np.array([5])}
    for stop_at_sign in (True, False):
        kw = dict(add_per_round=4, n_start=8, stop_at_sign=stop_at_sign)
        many = decide_many(p, tokens, comp, **kw)
        for t, c in zip(tokens, many):
            one, stats = decide_token_stats(p, t, competitors=comp.get(t), **kw)
            assert (c.lower, c.upper, c.reason, c.iterations) == (one.lower, one.upper, one.reason, one.iterations)
            assert (c.witness is None) == (one.witness is None)
            if c.witness is not None:
                assert np.array_equal(c.witness, one.witness)
            assert (c.certificate is None) == (one.certificate is None)
            if c.certificate is not None:
                assert np.array_equal(c.certificate.competitors, one.certificate.competitors)
                assert np.array_equal(c.certificate.weights, one.certificate.weights)
            check_claims(p, t, c)


def test_lockstep_contains_one_tokens_failure(monkeypatch):
    # An exception while deciding one token is that token's "lp error", never a verdict, and the others in
    # its batch finish as they would alone.
    p = _box_instance()
    alone = decide_many(p, [0, 9, 17])
    orig = restricted.BoxSolver.step

    def step(self, *a):
        if self.t == 9:
            raise RuntimeError("boom")
        return orig(self, *a)

    monkeypatch.setattr(restricted.BoxSolver, "step", step)
    got = decide_many(p, [0, 9, 17])
    assert got[1].reason.startswith("lp error: RuntimeError") and got[1].certificate is None
    assert got[1].witness is None and got[1].lower == -np.inf and got[1].upper == np.inf
    for a, b in ((alone[0], got[0]), (alone[2], got[2])):
        assert (a.lower, a.upper) == (b.lower, b.upper)


@pytest.mark.parametrize("seed", range(8))
def test_block_pivoting_nnls_reaches_scipys_optimum(seed):
    # restricted._nnls_bpp (block principal pivoting on the normal equations, the first try of every warm
    # LDP) against scipy's Lawson-Hanson: the same objective, KKT at the answer, on instances with twins and
    # dependent rows. From the optimum's support it must finish (at once); from
    # other starts it may give up with None (the caller then runs _nnls_warm: block pivoting can take long
    # under Murty's rule, above all where the residual can reach 0), but what it returns must be optimal.
    rng = np.random.default_rng(300 + seed)
    m, k = int(rng.integers(30, 200)), int(rng.integers(5, 80))
    G = rng.standard_normal((m, k)) * np.exp(rng.normal(0, 0.5, m))[:, None]
    if seed % 2:
        G[m // 2: m // 2 + 4] = G[:4]  # exact twins
        G[-3:] = G[4:7] + G[7:10]  # dependent rows
    h = rng.standard_normal(m) - 0.3
    E, e, ref, best, A = _nnls_reference(G, h)
    near = ref > 0
    near[rng.choice(m, 3, replace=False)] ^= True
    twin = ref > 0
    if seed % 2:
        twin[m // 2: m // 2 + 4] |= twin[:4]
        twin[:4] |= twin[m // 2: m // 2 + 4]
    starts = [(ref > 0, True), (twin, False), (near, False), (np.zeros(m, bool), False), (rng.random(m) < 0.3, False)]
    for start, must in starts:
        u = restricted._nnls_bpp(A, h, start)
        if u is None:
            assert not must
            continue
        assert np.all(u >= 0)
        assert np.linalg.norm(E @ u - e) <= best + 1e-9
        g = E.T @ (E @ u - e)
        assert np.all(g[u == 0] >= -1e-8 * np.linalg.norm(E, axis=0)[u == 0])


def test_incremental_cholesky_bulk_removal():
    # _Chol.remove with several positions (one QR of the trailing part) against a fresh factorisation
    rng = np.random.default_rng(8)
    G = rng.standard_normal((80, 60))
    A = G @ G.T
    b = rng.standard_normal(80)
    chol = restricted._Chol(A)
    chol.add(rng.permutation(50))
    for drop in ([0, 1, 2], [3, 17, 18, 30, 44], [0], [5, 6], list(range(10, 30))):
        drop = np.array([p for p in drop if p < chol.idx.size])
        keep = np.delete(chol.idx, drop)
        chol.remove(drop)
        assert np.array_equal(chol.idx, keep)
        assert np.allclose(chol.R, np.triu(chol.R))
        z = chol.solve(b)
        ref = np.linalg.solve(A[np.ix_(keep, keep)], b[keep])
        assert np.allclose(z[keep], ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def test_lockstep_window_refills(monkeypatch):
    # More tokens than the window (lockstep): it refills as tokens finish, with the same results as one at a time
    monkeypatch.setattr(decide_mod, "PRICE_BATCH", 2)
    p = _box_instance()
    tokens = list(range(0, 40, 3))
    many = decide_many(p, tokens, lockstep=3)
    assert [(c.lower, c.upper) for c in decide_many(p, tokens, lockstep=1)] == [(c.lower, c.upper) for c in many]
    for t, c in zip(tokens, many):
        one = decide_token(p, t)
        assert c.token == t and (c.lower, c.upper, c.iterations) == (one.lower, one.upper, one.iterations)


def test_gram_cap_from_the_budget_keeps_the_verdicts():
    # A budget too small for 16 Grams of 4096 rows caps them (NNLS from scratch past the cap): the same signs,
    # bounds that agree to the LDPs' rounding
    p = _box_instance()
    tokens = list(range(0, 40, 3))
    ref = decide_many(p, tokens, stop_at_sign=False)
    for cap in (1, 4):
        got = decide_many(p, tokens, stop_at_sign=False, warm_max_rows=cap)
        for a, b in zip(ref, got):
            assert (a.lower > 0, a.upper < 0) == (b.lower > 0, b.upper < 0)
            assert abs(a.lower - b.lower) <= 1e-6 * (1 + abs(a.lower)) and abs(a.upper - b.upper) <= 1e-6 * (1 + abs(a.upper))


def test_slope_from_the_ldp_factor_matches_a_fresh_one():
    # _slope_from_factor (Sherman-Morrison on the NNLS's factor of G_P G_P^T + h_P h_P^T) against
    # _min_norm_slope (a fresh factor of G_P G_P^T) on the passive set an LDP leaves
    from scipy.optimize import nnls

    rng = np.random.default_rng(31)
    for m, k in ((30, 40), (60, 120), (200, 300)):  # independent rows: the LDP is feasible (else: None)
        G = rng.standard_normal((m, k))
        h = rng.standard_normal(m) + 0.5
        E = np.vstack([G.T, h[None, :]])
        ref_u, _ = nnls(E, np.eye(k + 1)[k], maxiter=50 * m)
        kept = {}
        u = restricted._nnls_bpp(G @ G.T + np.outer(h, h), h, ref_u > 0, kept=kept)
        assert u is not None and "chol" in kept
        ch = kept["chol"]
        P = np.zeros(m, dtype=bool)
        P[ch.idx] = True
        dz = restricted._slope_from_factor(G, h, ch)
        ref = restricted._min_norm_slope(G[P])
        assert dz is not None and np.allclose(dz, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
