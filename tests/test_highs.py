"""engine.highs: status table, solutions only when optimal, dual sign convention, warm-started re-solves.

Oracles: scipy.optimize.linprog (HiGHS through scipy's own wrapper) and finite differences of the optimum.
"""
import math

import numpy as np
import pytest
import scipy.sparse as sp
from highspy import HighsModelStatus
from scipy.optimize import linprog

from unspeakable.engine.highs import LP, Status, solve_lp, status_of

INF = np.inf


def _assert_failed(res, status):
    assert res.status == status, res.message
    assert res.success is False
    assert res.x is None and res.row_duals is None and res.objective is None


# ------------------------------------------------------------------------------------------ statuses
def test_every_model_status_is_mapped():
    for name, member in HighsModelStatus.__members__.items():
        assert status_of(member) != Status.UNRECOGNIZED, name
    assert status_of(HighsModelStatus.kOptimal) == Status.OPTIMAL
    assert status_of(HighsModelStatus.kTimeLimit) == Status.TIME_LIMIT
    assert status_of(HighsModelStatus.kInfeasible) == Status.INFEASIBLE


def test_unknown_status_falls_back_to_unrecognized():
    assert status_of(7) == Status.UNRECOGNIZED  # the int value of kOptimal is not a status
    assert status_of("kOptimal") == Status.UNRECOGNIZED
    assert status_of(None) == Status.UNRECOGNIZED


def test_infeasible():
    # x0 + x1 >= 3 with 0 <= x <= 1
    res = solve_lp(np.ones(2), np.array([[1.0, 1.0]]), 3.0, INF, 0.0, 1.0)
    _assert_failed(res, Status.INFEASIBLE)


def test_unbounded():
    # max x0 + x1 s.t. x0 - x1 <= 1, x >= 0
    res = solve_lp(np.ones(2), np.array([[1.0, -1.0]]), -INF, 1.0, 0.0, INF, sense="max")
    assert res.status in (Status.UNBOUNDED, Status.UNBOUNDED_OR_INFEASIBLE)
    _assert_failed(res, res.status)


def _random_lp(rng, m=300, n=200):
    A = rng.standard_normal((m, n))
    return rng.standard_normal(n), A, -INF, np.ones(m), -1.0, 1.0


def test_iteration_limit():
    c, A, rl, ru, cl, cu = _random_lp(np.random.default_rng(0))
    res = solve_lp(c, A, rl, ru, cl, cu, iteration_limit=3)
    _assert_failed(res, Status.ITERATION_LIMIT)
    assert res.nit <= 3


def test_time_limit():
    c, A, rl, ru, cl, cu = _random_lp(np.random.default_rng(1))
    res = solve_lp(c, A, rl, ru, cl, cu, time_limit=0.0)
    _assert_failed(res, Status.TIME_LIMIT)


def test_time_limit_is_per_solve_not_cumulative():
    # HiGHS < 2.0 compares time_limit with the run time summed over all runs of an instance; the wrapper
    # must offset it, or a long constraint-generation loop would end in a spurious time limit.
    c, A, rl, ru, cl, cu = _random_lp(np.random.default_rng(2), 200, 150)
    lp = LP(c, cl, cu, sense="max")
    lp.add_rows(A, rl, ru)
    first = lp.solve()
    assert first.success
    limit = 20 * first.time_s + 0.02
    while lp._h.getRunTime() <= 2 * limit:  # run well past the limit in total, one cold solve at a time
        lp._h.clearSolver()
        res = lp.solve(time_limit=limit)
        assert res.success, res.message


# ------------------------------------------------------------------------------------------ solutions
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("sense", ["max", "min"])
def test_matches_scipy_linprog(sense, sparse):
    rng = np.random.default_rng(3)
    m, n = 40, 25
    A = rng.standard_normal((m, n)) * (rng.random((m, n)) < 0.5)
    c = rng.standard_normal(n)
    b = rng.random(m) + 0.1
    res = solve_lp(c, sp.csr_matrix(A) if sparse else A, -INF, b, -2.0, 3.0, sense=sense)
    sign = -1.0 if sense == "max" else 1.0
    ref = linprog(sign * c, A_ub=A, b_ub=b, bounds=[(-2.0, 3.0)] * n, method="highs")
    assert res.success and ref.status == 0
    assert res.objective == pytest.approx(sign * ref.fun, rel=1e-9, abs=1e-9)
    assert np.all(A @ res.x <= b + 1e-7)
    assert np.all(res.x >= -2.0 - 1e-9) and np.all(res.x <= 3.0 + 1e-9)


def _fd_shadow(c, A, lo, up, sense, i, side, h=1e-4):
    base = solve_lp(c, A, lo, up, 0.0, INF, sense=sense)
    lo2, up2 = np.array(lo, float), np.array(up, float)
    (up2 if side == "upper" else lo2)[i] += h
    moved = solve_lp(c, A, lo2, up2, 0.0, INF, sense=sense)
    return base, (moved.objective - base.objective) / h


@pytest.mark.parametrize("sense", ["max", "min"])
def test_dual_sign_convention_upper_rows(sense):
    # rows x0 + 2 x1 <= 4, 3 x0 + x1 <= 6, both binding at the optimum of max x0 + x1 (or min of its negative)
    A = np.array([[1.0, 2.0], [3.0, 1.0]])
    c = np.array([1.0, 1.0]) * (1.0 if sense == "max" else -1.0)
    for i in range(2):
        base, fd = _fd_shadow(c, A, [-INF, -INF], [4.0, 6.0], sense, i, "upper")
        assert base.row_duals[i] == pytest.approx(fd, rel=1e-6)
    base = solve_lp(c, A, -INF, [4.0, 6.0], 0.0, INF, sense=sense)
    if sense == "max":
        assert np.all(base.row_duals > 0)  # λ >= 0 for binding <= rows of a max problem: no conversion needed


@pytest.mark.parametrize("sense", ["max", "min"])
def test_dual_sign_convention_lower_rows(sense):
    A = np.array([[1.0, 2.0], [3.0, 1.0]])
    c = np.array([1.0, 1.0]) * (1.0 if sense == "min" else -1.0)
    for i in range(2):
        base, fd = _fd_shadow(c, A, [4.0, 6.0], [INF, INF], sense, i, "lower")
        assert base.row_duals[i] == pytest.approx(fd, rel=1e-6)


def test_warm_started_rows_and_cols_match_one_shot():
    rng = np.random.default_rng(4)
    m, n = 60, 30
    A = rng.standard_normal((m, n))
    b = rng.random(m) + 0.5
    c = rng.standard_normal(n)
    ref = solve_lp(c, A, -INF, b, -1.0, 1.0, sense="max")
    # columns first without rows, rows in batches, then the last 10 columns with their entries
    lp = LP(c[:20], -1.0, 1.0, sense="max")
    for k in range(0, m, 15):
        lp.add_rows(A[k:k + 15, :20], -INF, b[k:k + 15])
        assert lp.solve().success
    lp.add_cols(c[20:], -1.0, 1.0, A=A[:, 20:])
    res = lp.solve()
    assert res.success and lp.num_rows == m and lp.num_cols == n
    assert res.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-9)
    # strong duality with our sign convention: c·x = b·λ + bound terms, and λ >= 0 on <= rows
    assert np.all(res.row_duals >= -1e-9)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        solve_lp(np.ones(3), np.ones((2, 2)), -INF, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        LP(np.ones(2), 0.0, 1.0, sense="maximize")


def test_limits_do_not_stick_to_later_solves():
    c, A, rl, ru, cl, cu = _random_lp(np.random.default_rng(5), 120, 80)
    lp = LP(c, cl, cu, sense="max")
    lp.add_rows(A, rl, ru)
    _assert_failed(lp.solve(iteration_limit=2), Status.ITERATION_LIMIT)
    _assert_failed(lp.solve(time_limit=0.0), Status.TIME_LIMIT)
    res = lp.solve()
    assert res.success
    ref = solve_lp(c, A, rl, ru, cl, cu, sense="max")
    assert res.objective == pytest.approx(ref.objective, rel=1e-9)


def test_solve_lp_reports_a_refused_model_as_unsuccessful():
    # HiGHS refuses matrix entries of 1e15 and more: an unsuccessful result, never an exception (the verifier's
    # support LP calls solve_lp inside a proof attempt; a head × 1e18 used to crash the scan there)
    res = solve_lp(np.zeros(2), np.array([[1e18, 1.0]]), [0.0], [1.0], np.zeros(2), np.ones(2))
    assert not res.success and res.x is None and res.status == Status.ERROR and "HiGHS" in res.message


def test_lp_exponent_leaves_comfortable_sizes_alone():
    from unspeakable.engine.highs import LP_EXP_MAX, LP_EXP_MIN, lp_exponent

    for size in (1.0, 0.3, 2.0**LP_EXP_MAX - 1, 2.0**(LP_EXP_MIN - 1), 0.0, float("inf"), float("nan")):
        assert lp_exponent(size) == 0, size
    for size in (1e18, 1e300, 1e-12, 5e-324):
        assert 0.5 <= abs(math.ldexp(size, -lp_exponent(size))) < 1.0, size


@pytest.mark.parametrize("domain, bias", [("rmsnorm", False), ("box", True), ("cone", False), ("rmsnorm", True)])
def test_verdicts_of_a_head_scaled_by_powers_of_two_beyond_highs_range(domain, bias):
    """Scaling W_U (and b_U) by 2^k changes no verdict. At 2^60 (entries ~1e18: HiGHS takes ≥ 1e15 for
    infinite) and 2^-40 (below its 1e-9 drop threshold) the LPs of the decide stage (the box's, the cone
    of a head without bias) and the verifier's support LP see their rows scaled back by a power of two: every
    token decided, the same verdicts as at 2^0, every claim re-derived by the independent audit."""
    import json

    import unspeakable
    from unspeakable.engine.head import head_from_arrays
    from unspeakable.engine.pipeline import scan_head

    rng = np.random.default_rng(11)
    d, V = 12, 400
    W = rng.standard_normal((d, V)).astype(np.float32)
    W[:, 7] = 0.5 * (W[:, 8] + W[:, 9])  # an interior row: a certificate with a support LP
    g = np.exp(0.3 * rng.standard_normal(d)).astype(np.float32)
    b = rng.standard_normal(V).astype(np.float32) if bias else None
    verdicts = {}
    for k in (0, 60, -40):
        s = np.float32(2.0**k)
        h = head_from_arrays(W * s, None if b is None else b * s, g, None, "rmsnorm", f"pow2-{k}")
        rep = scan_head(h, domain=domain)
        assert rep.counts["undecided"] == 0, (k, [t.reason for t in rep.tokens if t.verdict == "undecided"][:3])
        assert unspeakable.audit(json.loads(json.dumps(rep.to_json())), h).ok
        verdicts[k] = rep.verdicts_all
    assert np.array_equal(verdicts[0], verdicts[60]) and np.array_equal(verdicts[0], verdicts[-40])
