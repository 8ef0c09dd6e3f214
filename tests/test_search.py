"""The search stage's claims bracket the true margin (full-size LP oracle), in every bounded domain."""
import numpy as np
import pytest

from engine.search import SearchOptions, search
from engine.verify import Verifier


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
