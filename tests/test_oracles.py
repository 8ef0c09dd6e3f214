"""End-to-end verdicts against independent oracles (issue 2, "what it must show")."""
import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull

from unspeakable.engine.loader import Head, fold
from unspeakable.engine.pipeline import scan_head
from unspeakable.engine.screen import gram_screen

DOMAINS = ["layernorm", "rmsnorm", "box", "cone"]


def head_of(rows, b=None, norm="none", ln_w=None, ln_b=None):
    return Head(W_U=np.ascontiguousarray(rows.T), b_U=b, ln_w=ln_w, ln_b=ln_b, norm=norm, source="test")


def verdicts(rep):
    v = np.asarray(rep.verdicts_all)
    return v


# (1) cone == qhull vertices -------------------------------------------------------------------------
@pytest.mark.parametrize("d,seed", [(2, 0), (3, 1), (4, 2), (5, 3), (6, 4)])
def test_cone_verdicts_equal_qhull_vertices(d, seed):
    rng = np.random.default_rng(seed)
    n = 150 + 30 * d
    pts = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d)
    # interior points: convex combinations of random others; duplicates of random points
    interior = []
    for k in range(10):
        idx = rng.choice(n, size=d + 2, replace=False)
        w = rng.dirichlet(np.ones(d + 2))
        pts = np.vstack([pts, w @ pts[idx]])
        interior.append(len(pts) - 1)
    hull0 = ConvexHull(pts)
    dup_src = [int(hull0.vertices[0]), int(rng.integers(0, n))]
    for s in dup_src:
        pts = np.vstack([pts, pts[s]])
    rep = scan_head(head_of(pts), domain="cone", device="cpu", backend="torch")
    v = verdicts(rep)
    assert rep.counts["undecided"] == 0
    hull = ConvexHull(pts)
    vert = set(int(i) for i in hull.vertices)
    V = len(pts)
    dup_pairs = [(s, V - 2 + k) for k, s in enumerate(dup_src)]
    dups = {i for pair in dup_pairs for i in pair}
    for t in range(V):
        if t in dups:
            assert v[t] == -1, f"duplicate {t} must be a tie"
            continue
        assert (v[t] == 1) == (t in vert), f"token {t}: verdict {v[t]}, qhull vertex {t in vert}"
    by_id = {r.id: r for r in rep.tokens}
    for a, b in dup_pairs:
        assert by_id[a].reason == "tie" and by_id[b].reason == "tie"
    for t in interior:
        assert v[t] == -1


# (2) full-size LP oracle -----------------------------------------------------------------------------
@pytest.mark.parametrize("domain,d,seed", [("box", 4, 0), ("box", 7, 1), ("cone", 3, 2), ("cone", 5, 3),
                                           ("rmsnorm", 2, 4), ("rmsnorm", 3, 5)])
def test_every_verdict_agrees_with_full_lp(domain, d, seed, full_lp_margin):
    rng = np.random.default_rng(seed)
    V = 120
    rows = rng.standard_normal((V, d)) * np.exp(rng.normal(0, 0.4, (V, 1))) + rng.standard_normal(d)
    for k in range(5):  # interior points
        idx = rng.choice(V, 4, replace=False)
        rows[k] = rng.dirichlet(np.ones(4)) @ rows[idx]
    b = rng.normal(0, 0.3, V)
    rep = scan_head(head_of(rows, b), domain=domain, device="cpu", backend="torch")
    p = fold(head_of(rows, b), domain=domain)
    v = verdicts(rep)
    checked = 0
    for t in range(V):
        lo, hi = full_lp_margin(p.keys, p.bias, t, domain, p.radius)
        if lo > 1e-7:
            assert v[t] == 1, f"token {t}: LP margin in [{lo}, {hi}] but verdict {v[t]}"
            checked += 1
        elif hi < -1e-7:
            assert v[t] == -1, f"token {t}: LP margin in [{lo}, {hi}] but verdict {v[t]}"
            checked += 1
        elif abs(hi) <= 1e-7 and domain == "cone":
            assert v[t] == -1  # interior points in the cone have LP optimum <= 0
    assert checked > V * 0.8


# (3) planted tokens --------------------------------------------------------------------------------
# The synthetic heads (planted tokens of every kind) and scans are test_pins': one scan per domain, shared.
PLANTED = {"layernorm": "synthetic:V=2000,d=24,seed=3", "rmsnorm": "synthetic:V=2000,d=24,seed=3",
           "box": "synthetic:V=1500,d=12,seed=4", "cone": "synthetic:V=1500,d=12,seed=4"}


@pytest.mark.parametrize("domain", DOMAINS)
def test_planted_tokens_come_out_as_planted(domain, shared):
    head = shared.head(PLANTED[domain])
    rep = shared.scan(PLANTED[domain], domain)
    v = verdicts(rep)
    pl = head.planted
    assert all(len(pl[k]) > 0 for k in ("interior", "duplicate", "low_bias", "shadow"))
    assert rep.counts["undecided"] == 0
    assert sum(rep.counts[k] for k in ("speakable", "unspeakable", "undecided")) == rep.counts["tokens"] == head.d_vocab
    for t in pl["interior"]:
        assert v[t] == -1, f"interior {t}"
    for a, b in pl["duplicate"]:
        assert v[a] == -1 and v[b] == -1
    for t in pl["low_bias"]:
        assert v[t] == (1 if domain == "cone" else -1), f"low-bias {t} in {domain}"
    by_id = {r.id: r for r in rep.tokens}
    for t in pl["shadow"]:
        assert by_id[t].hard_to_speak


# (4) invariances --------------------------------------------------------------------------------------
@pytest.mark.parametrize("domain", DOMAINS)
def test_shift_and_permutation_invariance(domain):
    rng = np.random.default_rng(11)
    V, d = 300, 10
    rows = rng.standard_normal((V, d)) * np.exp(rng.normal(0, 0.4, (V, 1)))
    rows[:4] = rng.dirichlet(np.ones(5), size=4) @ rows[10:15]
    rows[20] = rows[21]
    b = rng.normal(0, 0.3, V)
    b[20] = b[21]
    base = verdicts(scan_head(head_of(rows, b), domain=domain, device="cpu", backend="torch"))
    shift = rng.standard_normal(d) * 5.0  # any shift; for layernorm the fold projects onto 1⊥ as well
    shifted = verdicts(scan_head(head_of(rows + shift, b), domain=domain, device="cpu", backend="torch"))
    assert np.array_equal(base, shifted)
    perm = rng.permutation(V)
    permuted = verdicts(scan_head(head_of(rows[perm], b[perm]), domain=domain, device="cpu", backend="torch"))
    assert np.array_equal(base[perm], permuted)
    assert (base == 0).sum() == 0


# (6) gram screen == the seed's argmax --------------------------------------------------------------
def test_gram_screen_reproduces_seed_argmax_and_float64():
    rng = np.random.default_rng(0)
    d, V = 12, 700
    W_U = (rng.standard_normal((d, V)) * np.exp(rng.normal(0, 0.5, V))).astype(np.float32)
    W_U[:, 5] = W_U[:, 9]  # an exact tie pair
    seed = (torch.from_numpy(W_U).T @ torch.from_numpy(W_U)).argmax(-1).numpy()
    ref64 = (W_U.T.astype(np.float64) @ W_U.astype(np.float64))
    g = gram_screen(W_U.T.astype(np.float64), device="cpu", backend="torch")
    # float64 reference: exact equality of argmax (first index), hard-to-speak flags
    assert np.array_equal(g.argmax, ref64.argmax(-1))
    hard = np.array([np.max(np.delete(ref64[t], t)) >= ref64[t, t] for t in range(V)])
    assert np.array_equal(g.hard_to_speak, hard)
    # the seed (float32 GEMM) agrees except where float32 rounding makes a near-tie ambiguous
    top2 = np.sort(ref64, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * np.abs(top2[:, 1])
    assert np.array_equal(g.argmax[clear], seed[clear])
    assert g.hard_to_speak[5] and g.hard_to_speak[9]
