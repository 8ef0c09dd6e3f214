"""The synthetic head and its planted tokens: each kind checked against its definition, independently."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from unspeakable.engine.loader import InputError, fold, gram_rows, load  # noqa: E402
from unspeakable.engine.synthetic import make_synthetic, synthesize  # noqa: E402

KINDS = ("interior", "duplicate", "low_bias", "shadow")


def flat(planted, kind):
    v = planted[kind]
    return [x for pair in v for x in pair] if kind == "duplicate" else list(v)


@pytest.fixture(scope="module")
def gpt2_sized():
    return synthesize(50257, 768, 0)


@pytest.fixture(scope="module")
def small():
    return synthesize(600, 24, 5)  # V > d + 1: the hull is full-dimensional


def test_deterministic_and_seeded():
    a, b, c = make_synthetic(300, 16, 1), make_synthetic(300, 16, 1), make_synthetic(300, 16, 2)
    for k in ("W_U", "b_U", "ln_w", "ln_b"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        assert not np.array_equal(getattr(a, k), getattr(c, k))
    assert a.planted == b.planted


def test_head_fields(small):
    h = small.head
    assert h.W_U.shape == (24, 600) and h.W_U.dtype == np.float32 and h.W_U.flags.c_contiguous
    assert h.b_U.dtype == h.ln_w.dtype == h.ln_b.dtype == np.float32
    assert h.norm == "layernorm" and not h.gram_center
    assert h.source == "synthetic:V=600,d=24,seed=5"
    assert h.texts[123] == "tok123" and len(h.texts) == 600
    assert (h.ln_w > 0).all() and 0.5 < np.median(h.ln_w) < 2
    assert np.abs(h.ln_b).max() < 0.2
    # a large shared mean: the mean row is longer than the typical deviation from it
    U = h.W_U.T.astype(np.float64)
    dev = np.linalg.norm(U - U.mean(0), axis=1)
    assert np.linalg.norm(U.mean(0)) > 2 * np.median(dev)
    assert load(h.source).planted == h.planted


def test_planted_ids(gpt2_sized, small):
    for syn, n in ((gpt2_sized, 5), (small, 1)):
        p, V = syn.head.planted, syn.head.d_vocab
        assert set(p) == set(KINDS)
        assert all(len(p[k]) == n for k in KINDS)
        ids = [x for k in KINDS for x in flat(p, k)]
        assert all(type(x) is int and 0 <= x < V for x in ids)
        assert len(set(ids)) == len(ids)  # no overlaps
        sources = {s for src in syn.recipe.interior_sources for s in src} | set(syn.recipe.shadow_of)
        assert not sources & set(ids)  # built from untouched, non-planted rows
    ids = sorted(x for k in KINDS for x in flat(gpt2_sized.head.planted, k))
    assert ids[0] < 50257 // 4 and ids[-1] > 3 * 50257 // 4  # spread over the vocabulary


def test_small_vocabularies():
    assert all(not v for v in make_synthetic(10, 8, 0).planted.values())
    make_synthetic(2, 1, 0)
    p = make_synthetic(40, 16, 0).planted
    assert all(len(p[k]) >= 1 for k in KINDS)
    with pytest.raises(InputError):
        make_synthetic(1, 8, 0)
    with pytest.raises(InputError):
        make_synthetic(10, 0, 0)


def test_duplicates_exact(gpt2_sized):
    h = gpt2_sized.head
    for a, b in h.planted["duplicate"]:
        np.testing.assert_array_equal(h.W_U[:, a], h.W_U[:, b])
        assert h.b_U[a] == h.b_U[b]


def interior_weights(syn, t_index):
    """μ over all tokens: ½ uniform on the non-planted rows + ½ λ on the three sources."""
    h = syn.head
    planted = {x for k in KINDS for x in flat(h.planted, k)}
    non_planted = np.array([j for j in range(h.d_vocab) if j not in planted])
    mu = np.zeros(h.d_vocab)
    mu[non_planted] = 0.5 / len(non_planted)
    np.add.at(mu, syn.recipe.interior_sources[t_index], 0.5 * np.array(syn.recipe.interior_weights[t_index]))
    return mu


def test_interior_is_the_stated_combination_and_unspeakable(gpt2_sized, small):
    for syn in (small, gpt2_sized):
        h = syn.head
        U = h.W_U.T.astype(np.float64)
        b = h.b_U.astype(np.float64)
        for i, t in enumerate(h.planted["interior"]):
            mu = interior_weights(syn, i)
            assert mu[t] == 0 and mu.min() >= 0 and math.isclose(mu.sum(), 1.0)
            np.testing.assert_allclose(U[t], mu @ U, rtol=0, atol=1e-6 * np.abs(U).max())
            assert b[t] <= mu @ b - syn.recipe.interior_gap + 1e-5
        # the dual certificate λ = μ proves it unspeakable in every bounded domain (DESIGN §2)
        P = fold(h)  # rows and bias are the same in every bounded domain; only the set of x differs
        for domain, radius in (("layernorm", math.sqrt(h.d_model)), ("rmsnorm", math.sqrt(h.d_model)),
                               ("box", 1.0), ("box", 100.0)):
            for i, t in enumerate(h.planted["interior"]):
                mu = interior_weights(syn, i)
                r = mu @ P.rows - P.rows[t]
                c0 = mu @ P.bias - P.bias[t]
                if domain == "box":
                    deficit = c0 - radius * np.abs(r).sum()
                else:
                    Pr = r - r.mean() if domain == "layernorm" else r
                    deficit = c0 - radius * np.linalg.norm(Pr)
                assert deficit > 0.5 * syn.recipe.interior_gap, (domain, t, deficit)


def test_interior_inside_the_hull_in_cone(small):
    """Cone: ũ_t is a convex combination of the other folded rows (LP feasibility, independent of μ)."""
    from scipy.optimize import linprog

    h = small.head
    rows = fold(h, domain="cone").rows
    for t in h.planted["interior"]:
        others = np.delete(rows, t, axis=0)
        A_eq = np.vstack([others.T, np.ones(len(others))])
        res = linprog(np.zeros(len(others)), A_eq=A_eq, b_eq=np.append(rows[t], 1.0), bounds=(0, None),
                      method="highs")
        assert res.status == 0, res.message


def test_low_bias_loses_in_bounded_domains(gpt2_sized, small):
    for syn in (small, gpt2_sized):
        h = syn.head
        V, d = h.d_vocab, h.d_model
        U = h.W_U.T.astype(np.float64)
        b = h.b_U.astype(np.float64)
        w, beta = h.ln_w.astype(np.float64), h.ln_b.astype(np.float64)
        rows = U * w
        l1 = np.abs(rows).sum(1)
        ub = U @ beta
        low = h.planted["low_bias"]
        others = np.setdiff1d(np.arange(V), low)
        S = max(math.sqrt(d), 100.0)
        for t in low:
            assert b[t] < b[others].min() - 2 * S * l1.max() - abs(ub[t]) - 1  # the stated inequality
            # honest consequence: for ‖x‖_∞ ≤ S (the √d ball and the box up to ρ = 100),
            # l_t(x) ≤ b̃_t + S‖ũ_t‖₁ < b̃_j − S‖ũ_j‖₁ ≤ l_j(x) for the best other j
            best_floor = np.max((b + ub - S * l1)[others])
            assert b[t] + ub[t] + S * l1[t] < best_floor
        # cone (bias ignored): the centred self-direction wins, so they stay speakable there
        keys = rows - rows.mean(0)
        for t in low:
            s = keys @ keys[t]
            own = s[t]
            s[t] = -np.inf
            assert s.max() < own


def test_shadow_hard_to_speak(small):
    h = small.head
    for center in (False, True):
        G = gram_rows(h, center=center)
        gram = G @ G.T  # float64, small V
        for s, L in zip(h.planted["shadow"], small.recipe.shadow_of):
            own = gram[s, s]
            row = gram[s].copy()
            row[s] = -np.inf
            assert row.max() >= own, (center, s)
            assert gram[s, L] >= own  # beaten by the long row it copies
            assert int(np.argmax(gram[s])) != s


def test_shadow_construction(small):
    h, m = small.head, small.recipe.mean
    U = h.W_U.T.astype(np.float64)
    w = h.ln_w.astype(np.float64)
    for s, L in zip(h.planted["shadow"], small.recipe.shadow_of):
        e = w * (U[L] - m)
        q = w * (U[s] - m - 0.9 * (U[L] - m))  # the sideways push, after the gain
        assert abs(q @ e) < 1e-4 * (e @ e) and abs(q.sum()) < 1e-4 * np.abs(q).sum()
        assert np.linalg.norm(q) == pytest.approx(0.2 * np.linalg.norm(e), rel=1e-3)
