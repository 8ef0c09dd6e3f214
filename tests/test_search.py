"""The search stage's claims bracket the true margin (full-size LP oracle), in every bounded domain."""
import numpy as np
import pytest

from unspeakable.engine.search import SearchOptions, search
from unspeakable.engine.verify import Verifier


@pytest.mark.parametrize("domain,d", [("box", 5), ("rmsnorm", 2), ("rmsnorm", 3)])
def test_search_bounds_bracket_the_lp_margin(domain, d, random_problem, full_lp_margin):
    p = random_problem(150, d, 7, domain)
    ver = Verifier(p)
    toks = np.arange(p.V)
    cands = search(p, toks, options=SearchOptions(rounds=6))
    assert [c.token for c in cands] == list(toks)
    proven = 0
    for c in cands:
        lo, hi = full_lp_margin(p.keys, p.bias, c.token, domain, p.radius)
        assert c.lower <= hi + 1e-6, (c.token, c.lower, hi)
        assert c.upper >= lo - 1e-6, (c.token, c.upper, lo)
        if c.witness is not None and ver.witness(c.token, c.witness).ok:
            assert hi > 0  # (lo is the inscribed polytope's bound for balls: it may sit below 0)
            proven += 1
        elif c.certificate is not None and ver.certificate(c.token, c.certificate).ok:
            assert lo < 0
            proven += 1
    # It must settle a good share cheaply (the LP does the rest). Frank-Wolfe on the box's l1 dual norm
    # (best responses jump between corners) is much weaker than on balls.
    assert proven > (0.25 if domain == "box" else 0.5) * p.V


def test_search_cone_finds_vertex_witnesses_only(random_problem, full_lp_margin):
    p = random_problem(120, 3, 8, "cone")
    cands = search(p, np.arange(p.V), options=SearchOptions(rounds=6))
    ver = Verifier(p)
    for c in cands:
        assert c.certificate is None and c.upper == float("inf")
        if c.witness is not None and ver.witness(c.token, c.witness).ok:
            lo, _ = full_lp_margin(p.keys, p.bias, c.token, "cone", None)
            assert lo > 0


@pytest.mark.parametrize("domain", ["rmsnorm", "layernorm", "box", "cone"])
def test_first_active_set_holds_the_hubs_never_the_token(domain, random_problem, monkeypatch):
    """The first active set: the screen point's threats plus the rows of largest reach sup_X l_j(x)
    (computed here independently per domain), the token itself never among them, hubs included."""
    import unspeakable.engine.search as es

    p = random_problem(300, 6, 3, domain)
    keys, bias = p.keys, p.bias
    if domain == "box":
        reach = p.radius * np.abs(keys).sum(1) + bias
    elif domain == "cone":  # the search's surrogate: the unit ball, no bias
        reach = np.linalg.norm(keys, axis=1)
    else:
        k = keys - keys.mean(1, keepdims=True) if domain == "layernorm" else keys
        reach = p.radius * np.linalg.norm(k, axis=1) + bias
    top = np.argsort(-reach, kind="stable")
    opt = SearchOptions(hubs=8)
    st = es._setup(p, None, opt)
    assert list(st.hubs.numpy()) == list(top[:9])
    seen = {}
    real = es._active_set

    def spy(st_, s, act, cand, first):
        S, lam = real(st_, s, act, cand, first)
        if first:
            for i, t in enumerate(s.T[act].tolist()):
                seen[t] = set(S[i].tolist())
        return S, lam
    monkeypatch.setattr(es, "_active_set", spy)
    toks = np.r_[top[:3], top[8], np.arange(20)]  # hubs themselves, the last hub, ordinary tokens
    search(p, toks, options=opt)
    # every token whose screen point the first pricing pass did not find winning builds a first active set
    assert seen and set(seen) <= set(toks.tolist())
    for t, S in seen.items():
        assert t not in S
        assert set(top[:9].tolist()) - {t} <= S or (t not in top[:9] and set(top[:8].tolist()) <= S)
