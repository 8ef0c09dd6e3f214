"""The verifier's symmetric competitor bound for self-direction witnesses (engine.verify_sym): the same
checks as the per-batch verifier and the exhaustive float64 check, and a fall-back wherever the bound
does not apply."""
import numpy as np
import pytest

from unspeakable.engine import verify_sym
from unspeakable.engine.loader import problem_from_rows
from unspeakable.engine.screen import witness_points
from unspeakable.engine.verify import Verifier


def _key(c):
    return (c.ok, c.runner_up, None if np.isnan(c.margin) else c.margin, None if np.isnan(c.allowance) else c.allowance)


def _compare(p, tokens=None, points=None):
    tokens = np.arange(p.V) if tokens is None else tokens
    points = points or (lambda ids: witness_points(p, ids))
    sym = Verifier(p).self_witnesses(tokens, points, chunk=700)
    batched = Verifier(p).witnesses(tokens, points(tokens))
    assert [_key(c) for c in sym] == [_key(c) for c in batched]
    _agree(sym, Verifier(p, full=True).witnesses(tokens, points(tokens)))
    return sym


def _agree(got, full):
    """Same verdicts and runner-ups as the exhaustive float64 check; margins equal up to float64 rounding of
    a differently ordered sum (far inside the allowance)."""
    assert [(c.ok, c.runner_up) for c in got] == [(c.ok, c.runner_up) for c in full]
    for a, b in zip(got, full):
        assert (np.isnan(a.margin) and np.isnan(b.margin)) or abs(a.margin - b.margin) <= b.allowance


@pytest.mark.parametrize("domain", ["layernorm", "rmsnorm", "cone"])
def test_equals_exhaustive_check(random_problem, domain):
    p = random_problem(1500, 24, 3, domain)
    v = Verifier(p)
    sp = verify_sym.self_pairs(v.A, v.bias, v.dom.centred, np.arange(p.V), lambda ids: witness_points(p, ids))
    assert sp is not None and (sp.col >= 0).mean() > 0.9  # the symmetric pass did the work
    checks = _compare(p)
    assert 0 < sum(c.ok for c in checks) < p.V  # both outcomes occur


def test_box_points_are_no_multiples(random_problem):
    p = random_problem(1200, 16, 4, "box")
    v = Verifier(p)
    assert verify_sym.self_pairs(v.A, v.bias, False, np.arange(p.V), lambda ids: witness_points(p, ids)) is None
    _compare(p)


def test_near_ties_are_rescored(random_problem):
    """Competitors within float32 error of each other (and exact duplicates) at the witness: the runner-up
    and margin are the exact float64 ones."""
    base = random_problem(1100, 12, 5, "rmsnorm")
    rows = np.array(base.rows)
    rows[1] = rows[0] * (1 + 2.0**-30)  # 0 and 1 nearly tie everywhere
    rows[3] = rows[2]  # an exact duplicate pair
    rows[5] = rows[4] + 1e-9 * np.linalg.norm(rows[4])
    p = problem_from_rows(rows, np.array(base.bias), "rmsnorm")
    checks = _compare(p)
    assert not checks[2].ok and not checks[3].ok  # a duplicate never wins strictly


def test_perturbed_points_and_subsets(random_problem):
    """Points off their rows' direction, outside the domain, a subset of tokens, repeated tokens."""
    p = random_problem(1300, 10, 6, "layernorm")
    rng = np.random.default_rng(0)

    def points(ids):
        x = witness_points(p, ids)
        x[::7] += 1e-3 * rng.standard_normal(x[::7].shape)  # residual far above RESIDUAL_REL
        x[::11] *= 2.0  # outside the ball
        return x - x.mean(axis=1, keepdims=True)

    toks = np.sort(rng.choice(p.V, 1200, replace=False))
    X = points(toks)
    sym = Verifier(p).self_witnesses(toks, lambda ids: X[np.searchsorted(toks, ids)], chunk=500)
    full = Verifier(p, full=True).witnesses(toks, X)
    _agree(sym, full)
    assert any("exceeds" in c.message for c in sym)
    rep = np.r_[toks, toks[:5]]  # repeated tokens: the per-batch check, same answers
    Xr = np.vstack([X, X[:5]])
    got = Verifier(p).self_witnesses(rep, lambda ids: Xr[: ids.size] if ids[0] == rep[0] else Xr[-ids.size:],
                                     chunk=rep.size)
    _agree(got[: toks.size], full)


@pytest.mark.parametrize("scale", [2.0**200, 2.0**-200])
def test_out_of_range_falls_back(random_problem, scale):
    """Magnitudes where float32 would overflow or flush (the fold rescales real inputs by powers of two,
    so this calls the pass on raw arrays): no symmetric bound."""
    p = random_problem(1100, 8, 7, "rmsnorm")
    A, b = p.keys * scale, p.bias * scale
    n = np.linalg.norm(A, axis=1)
    def pts(ids):
        return A[ids] * (p.domain.radius / n[ids])[:, None]

    assert verify_sym.self_pairs(A, b, False, np.arange(p.V), pts) is None
    assert verify_sym.self_pairs(p.keys, p.bias, False, np.arange(p.V), pts) is not None  # the same, unscaled


def test_bound_covers_float32_error():
    """E_t really bounds |fast value − exact logit| on a hard case: long rows, large bias, d = 300."""
    rng = np.random.default_rng(9)
    V, d = 1100, 300
    A = rng.standard_normal((V, d)) * 1e3 + 5e3
    b = rng.normal(0, 1e4, V)
    nB, delta, B32 = verify_sym._row_bounds(A, False, np.arange(V))
    sig = 1.0 / np.linalg.norm(A, axis=1)
    E = verify_sym._column_bound(sig, np.zeros(V), nB, delta, nB.max(), delta.max(), np.abs(b).max(), d)
    import torch

    fast = (B32 @ B32.T) * torch.from_numpy(sig).float()[:, None] + torch.from_numpy(b).float()[None, :]
    exact = sig[:, None] * (A @ A.T) + b[None, :]
    err = np.abs(fast.double().numpy() - exact).max(axis=1)
    assert np.all(err <= E) and np.median(err / E) > 1e-4  # a bound, and not a vacuous one


def test_points_that_change_between_calls(random_problem):
    """``points`` is asked twice (plan, check): a point that differs the second time is checked per batch
    against its own competitors, never with a bound made for the first point."""
    p = random_problem(1200, 12, 8, "rmsnorm")
    calls = []

    def points(ids):
        x = witness_points(p, ids)
        if calls.count(ids[0]) and ids[0] == 0:
            x[:50] = p.domain.into(-x[:50])  # the opposite direction: other competitors win there
        calls.append(ids[0])
        return x

    got = Verifier(p).self_witnesses(np.arange(p.V), points, chunk=p.V)
    X = witness_points(p, np.arange(p.V))
    X[:50] = p.domain.into(-X[:50])
    _agree(got, Verifier(p, full=True).witnesses(np.arange(p.V), X))
