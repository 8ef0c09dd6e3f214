"""engine.memory and the arrays a scan holds (issue 17): one float32 copy of the keys shared by the stages, the
cone of a constant-bias head sharing the keys, the gram rows recognised as the problem's own without a copy,
the budget's batch sizes, and the same verdicts under the smallest budget.

The structural checks use identity (``is`` / ``np.shares_memory``) and tracemalloc's count of numpy's
allocations, not timings or RSS: they fail when a stage builds a V × d copy again.
"""
from __future__ import annotations

import os
import tracemalloc

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from unspeakable.engine.head import DerivedKeys, FoldedRows, head_from_arrays, row_chunks, rows_array
from unspeakable.engine.loader import fold, gram_rows, problem_from_rows
from unspeakable.engine.memory import GB, MIN_WORKING, SEARCH_BYTES_PER_V, Budget, abs_max, parse_gb, row_norms
from unspeakable.engine.pipeline import scan_head, shared_gram_rows, working_problem
from unspeakable.engine.verify import KeyRows, Verifier


def _head(V=600, d=24, seed=0, norm="rmsnorm", gain=True, bias=False, dtype=np.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((d, V)) * np.exp(0.3 * rng.standard_normal(V)) + 0.7 * rng.standard_normal((d, 1)))
    W = (W * scale).astype(dtype)
    g = np.exp(0.2 * rng.standard_normal(d)).astype(dtype) if gain else None
    b = rng.standard_normal(V).astype(dtype) if bias else None
    lb = (0.1 * rng.standard_normal(d)).astype(dtype) if bias and norm == "layernorm" else None
    return head_from_arrays(W, b, g, lb, norm, f"mem-{norm}-{seed}")


# ------------------------------------------------------------------------------------------------ budget
def test_parse_gb():
    assert parse_gb(None) is None and parse_gb("2") == 2 * GB and parse_gb(0.5) == GB // 2
    for bad in ("0", "-1", "nan", "inf", "lots", ""):
        with pytest.raises(ValueError):
            parse_gb(bad)


def test_budget_batches_shrink_with_the_budget_and_never_below_the_floor():
    V, d = 262144, 640
    resident = 3 * GB
    sizes = [Budget(int(gb * GB), resident, V, d) for gb in (1, 3.05, 3.1, 3.3, 4, 8)]
    s = [b.search_batch for b in sizes]
    w = [b.witness_batch for b in sizes]
    assert s == sorted(s) and w == sorted(w) and s[0] < s[-1] and w[0] < w[-1]  # monotone in the budget
    assert s[-1] == 256 and w[-1] == 192  # a comfortable budget: the usual batches
    assert not sizes[0].met and sizes[-1].met and sizes[0].working == MIN_WORKING  # the floor of the working set
    for b in sizes:  # what the batches need fits in the working set (or they are at their floor of 8)
        assert b.search_batch == 8 or b.search_batch * SEARCH_BYTES_PER_V * V <= b.working
        assert b.witness_batch == 8 or b.witness_batch * 2 * 4 * V <= b.working
        # the LP's 16 tokens side by side, each with a Gram and a factor of up to lp_warm_rows rows
        assert b.lp_warm_rows == 256 or 16 * 16 * b.lp_warm_rows**2 <= b.working
    assert [b.lp_warm_rows for b in sizes] == sorted(b.lp_warm_rows for b in sizes)
    assert sizes[0].lp_warm_rows == int(np.sqrt(MIN_WORKING / 256)) and sizes[-1].lp_warm_rows == 4096 and sizes[-1].to_json()["lp_warm_rows"] == 4096
    assert Budget(GB, 0, V, d).lp_warm_rows == int(np.sqrt(GB / 256))  # 1976 rows in 1 GB
    # the resident part counts the head, the keys (float64), the rows where they are held, and the shared
    # float32 keys; given the process's resident set now, at least that plus the float32 keys to come
    p = fold(_head(V=400, d=8, dtype=np.float64))  # u ⊙ γ rounds: rows, their residual, the search's keys
    b = Budget.for_problem(p, 123, GB)
    assert b.resident == 123 + (8 + 8 + 8 + 8 + 4) * p.V * p.d and b.to_json()["resident_bytes"] == b.resident
    p = fold(_head(V=400, d=8))
    assert Budget.for_problem(p, 123, GB).resident == 123 + (8 + 4) * p.V * p.d
    assert Budget.for_problem(p, 123, GB, rss=10**8).resident == 10**8 + 4 * p.V * p.d
    p.search_keys32()
    assert Budget.for_problem(p, 123, GB, rss=10**8).resident == 10**8
    assert Budget.for_problem(p, 123, GB, rss=1).resident == 123 + (8 + 4) * p.V * p.d


def test_default_budget_is_the_held_part_plus_what_is_free(monkeypatch):
    """No --memory: never "not met" (a 262144 x 640 scan holds about 4 GB and must not be squeezed into a fixed
    default); the working set is what the machine has free beyond the held part, at most DEFAULT_WORKING."""
    import unspeakable.engine.memory as memory

    p = fold(_head(V=400, d=8))
    for avail, working in ((None, memory.DEFAULT_WORKING), (10**12, memory.DEFAULT_WORKING), (0, MIN_WORKING)):
        monkeypatch.setattr(memory, "available_bytes", lambda: avail)
        b = Budget.for_problem(p, 10**9)
        assert b.met and b.working == working and b.total == b.resident + working
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9 + 12 * p.V * p.d + 5 * 10**8)
    assert Budget.for_problem(p, 10**9).working == 5 * 10**8


def test_row_norms_and_abs_max_equal_numpy():
    a = np.random.default_rng(1).standard_normal((20001, 7)) * 1e3
    assert np.array_equal(row_norms(a, chunk=999), np.linalg.norm(a, axis=1))
    assert abs_max(a, chunk=1000) == float(np.max(np.abs(a)))
    assert abs_max(np.zeros((0, 3))) == 0.0


# ------------------------------------------------------------------------------------------ shared arrays
@pytest.mark.parametrize("norm, kw", [
    ("rmsnorm", {}), ("layernorm", {}), ("rmsnorm", {"gain": False}), ("layernorm", {"bias": True}),
    ("rmsnorm", {"dtype": np.float64}),  # inexact products: the fold keeps a residual
    ("rmsnorm", {"scale": 2.0**300, "dtype": np.float64}),  # rescaled at fold time
])
def test_shared_gram_rows_equal_gram_rows(norm, kw):
    head = _head(norm=norm, **kw)
    for domain in (None, "cone", "box"):
        p = fold(head, domain=domain)
        for centred in (False, True):
            got = shared_gram_rows(head, centred, p)
            assert np.array_equal(got, gram_rows(head, centred)), (norm, kw, domain, centred)


def test_shared_gram_rows_are_the_problems_own_arrays():
    head = _head(norm="rmsnorm")
    p = fold(head)
    assert shared_gram_rows(head, False, p) is p.rows
    assert shared_gram_rows(head, True, p) is p.keys


def test_cone_of_a_constant_bias_head_shares_the_keys():
    p = fold(_head(norm="rmsnorm"))  # no bias: every logit equal at x = 0
    cone, _ = working_problem(p)
    assert cone.domain.name == "cone"
    assert cone.rows is p.keys and cone.keys is p.keys and not np.any(cone.center)
    assert cone.search_keys32() is p.search_keys32()
    assert np.array_equal(p.search_keys32(), p.keys.astype(np.float32))


def test_verifier_shares_the_float32_keys_where_they_are_its_rows():
    rng = np.random.default_rng(3)
    for norm, shared in (("rmsnorm", True), ("layernorm", False)):
        p = fold(_head(norm=norm, bias=True))
        v = Verifier(p)
        X = rng.standard_normal((5, p.d))
        X = X / np.linalg.norm(X, axis=1, keepdims=True) * 0.5 * p.radius
        if norm == "layernorm":
            X -= X.mean(axis=1, keepdims=True)
        t = np.arange(5)
        checks = v.witnesses(t, X)
        assert v._candidates(t, X, v._xnorm(X)) is not None  # builds the float32 pass's operand
        A32 = v.A32[0].numpy()
        assert np.shares_memory(A32, p.search_keys32()) == shared
        ref = np.vstack([a.astype(np.float32) for _, a in v.A.chunks()])
        assert np.array_equal(A32, ref)  # the same float32 values either way
        # and the checks agree with a float64 evaluation over all V
        for i, c in enumerate(checks):
            L = (p.rows - p.center) @ X[i] + p.bias
            m = L[t[i]] - np.max(np.delete(L, t[i]))
            assert c.ok == (m > c.allowance) or abs(m) <= 2 * c.allowance


# ------------------------------------------------------------------------------------- rows on demand
@pytest.mark.parametrize("dtype, gain", [(np.float32, True), (np.float16, True), (np.float32, False),
                                         (np.float64, False)])
def test_folded_rows_index_like_the_array(dtype, gain):
    """An exact fold derives its rows from the head on demand: every index form gives the array's values
    (γ ⊙ u in float64, exact for these dtypes), fresh arrays that write nothing back."""
    h0 = _head(V=300, d=12, seed=4, gain=gain, dtype=dtype)
    W_U = np.array(h0.W_U)
    W_U[:, 5] = -0.0  # ±0.0 survive as in the array (compared bit for bit below)
    W_U[3, 6] = 0.0
    head = head_from_arrays(W_U, None, h0.ln_w, None, "rmsnorm")
    p = fold(head)
    assert isinstance(p.rows, FoldedRows)
    W = W_U.astype(np.float64).T
    ref = W * np.asarray(head.ln_w, dtype=np.float64) if gain else W
    same = lambda a, b: a.shape == b.shape and np.array_equal(np.signbit(a), np.signbit(b)) and np.array_equal(a, b)  # noqa: E731
    assert same(rows_array(p.rows), ref) and p.rows.shape == ref.shape and len(p.rows) == 300
    for idx in (7, -1, slice(3, 40), slice(290, None), np.array([5, 1, 5, 299]), [2, 0], np.arange(300) % 3 == 0):
        assert same(p.rows[idx], ref[idx]), idx
    for idx in ((4, 6), (slice(2, 9), 3), (np.array([8, 1]), slice(0, 5)), (3, np.array([0, 11]))):
        assert same(np.asarray(p.rows[idx]), np.asarray(ref[idx])), idx
    got = p.rows[np.array([1, 2])]
    got[:] = 123.0
    assert same(p.rows[np.array([1, 2])], ref[[1, 2]])  # a fresh array each time
    assert same(np.vstack([a for _, a in row_chunks(p.rows, 64)]), ref)
    with pytest.raises(IndexError):
        p.rows[np.array([1, 2]), np.array([0, 1])]


def test_rows_are_held_where_the_fold_rounds_or_rescales():
    assert isinstance(fold(_head(dtype=np.float64, gain=True)).rows, np.ndarray)  # γ ⊙ u rounds: kept, residual too
    assert isinstance(fold(_head(dtype=np.float64, gain=False, scale=2.0**300)).rows, np.ndarray)  # rescaled
    p = fold(_head(dtype=np.float32))
    assert isinstance(p.rows, FoldedRows)
    held = Budget.for_problem(p, 0, GB).resident
    assert held == (8 + 4) * p.V * p.d  # keys and the float32 keys; no float64 rows


def test_fingerprint_is_the_arrays_whether_derived_or_held():
    """A checkpoint written before rows were derived on demand still belongs to the same head."""
    from dataclasses import replace

    from unspeakable.engine.ledger import fingerprint

    p = fold(_head(norm="layernorm", bias=True))
    q = replace(p, rows=rows_array(p.rows))
    assert isinstance(q.rows, np.ndarray) and fingerprint(p) == fingerprint(q)
    r = replace(p, rows=rows_array(p.rows) * (1 + 2.0**-52))
    assert fingerprint(r) != fingerprint(p)


@pytest.mark.parametrize("norm, domain, scale", [("rmsnorm", None, 1.0), ("layernorm", None, 1.0),
                                                 ("rmsnorm", "box", 1.0), ("layernorm", "cone", 1.0),
                                                 ("rmsnorm", None, 1e18)])
def test_screens_and_verifier_same_with_rows_on_demand(norm, domain, scale):
    """The screens reduce the gram rows from the same pass whether they are held or derived (then they go
    in as the other convention, read block by block, and built whole only for the rows recomputed over all
    V: rows beyond float32's range at scale 1e18); the verifier's shifted rows are the keys where the keys
    are ``rows − center``. Every field equal to the run on the held array."""
    from dataclasses import replace

    from unspeakable.engine.screen import screens

    head = _head(V=900, d=16, seed=9, norm=norm, bias=True, scale=scale)
    p = fold(head, domain=domain)
    q = replace(p, rows=rows_array(p.rows), derived={})
    ids = np.arange(p.V)
    for centred in (False, True):
        a = screens(shared_gram_rows(head, centred, p), centred, head.norm, p, ids,
                    other_rows=lambda: shared_gram_rows(head, not centred, p))
        b = screens(shared_gram_rows(head, centred, q), centred, head.norm, q, ids,
                    other_rows=lambda: shared_gram_rows(head, not centred, q))
        for x, y in zip(a[:2], b[:2]):
            for f in x.__dataclass_fields__:
                if f not in ("time_s", "seconds"):
                    assert np.array_equal(getattr(x, f), getattr(y, f)), (centred, f)
        assert a[2].get("other_gram") == b[2].get("other_gram") and a[2].get("passes") == b[2].get("passes")
        assert a[2].get("other_recomputed") == b[2].get("other_recomputed")
        if scale > 1:
            assert a[2]["gram_recomputed"] > 0 and a[2]["other_recomputed"] > 0  # the path that builds them whole
    va, vb = Verifier(p), Verifier(q)
    assert isinstance(va.A, KeyRows) == p.keys_are_shifted_rows
    assert np.array_equal(np.vstack([a for _, a in va.A.chunks()]), np.vstack([a for _, a in vb.A.chunks()]))
    rng = np.random.default_rng(2)
    X = p.domain.screen_points(p.keys, np.arange(40))
    X = np.concatenate([X, 0.5 * X[::-1]])  # the screen points and points inside, for other tokens
    t = np.concatenate([np.arange(40), rng.permutation(40)])
    for c, e in zip(va.witnesses(t, X), vb.witnesses(t, X)):
        assert (c.ok, c.runner_up, c.message) == (e.ok, e.runner_up, e.message)
        assert np.array_equal([c.margin, c.allowance], [e.margin, e.allowance], equal_nan=True)


# --------------------------------------------------------------------------------------- what a scan holds
def test_scan_holds_two_float64_copies_of_the_rows_not_four():
    """numpy's allocations during a scan of a constant-bias RMSNorm head (the cone path): the keys (8·V·d),
    the shared float32 keys (0.5) and per-chunk transients (8192-row chunks: 2/3 of this V); the rows are
    derived from the head on demand. Before, the rows were held too (4.44 × 8·V·d); before that the cone
    copied rows and keys again and the fold copied its rows once more: above 5.5 × 8·V·d at this size."""
    V, d = 12288, 384
    head = _head(V=V, d=d, seed=5)
    tracemalloc.start()
    try:
        rep = scan_head(head, domain="rmsnorm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rep.counts["undecided"] == 0
    assert peak <= 3.7 * 8 * V * d, peak / (8 * V * d)


def test_smallest_budget_same_verdicts(monkeypatch):
    """A budget below what the scan holds (and no floor under the working set): the smallest batches, a
    warning, and the same verdicts."""
    import unspeakable.engine.memory as memory

    head = _head(V=700, d=24, seed=7, norm="layernorm", bias=True)
    a = scan_head(head)
    monkeypatch.setattr(memory, "MIN_WORKING", 0)
    b = scan_head(head, memory=0.0001)
    assert b.memory["search_batch"] == 8 and b.memory["witness_batch"] == 8
    assert any("memory budget" in w for w in b.warnings) and not any("memory budget" in w for w in a.warnings)
    assert np.array_equal(a.verdicts_all, b.verdicts_all)
    assert a.counts == b.counts and a.counts["undecided"] == 0
    for x, y in zip(a.tokens, b.tokens):
        assert x.id == y.id and x.verdict == y.verdict


def test_bad_memory_option(tmp_path):
    from unspeakable.engine.head import InputError

    ck = tmp_path / "r.json.partial"
    for bad in (-1, 0, float("nan"), "lots"):
        with pytest.raises(InputError, match="gigabytes"):
            scan_head(_head(V=50, d=4), memory=bad, checkpoint=str(ck))
        assert not ck.exists() and not list(tmp_path.iterdir())  # refused before any work or file


def test_problem_from_rows_copies_by_default():
    rows = np.random.default_rng(0).standard_normal((40, 5))
    keep = rows.copy()
    p = problem_from_rows(rows, None, "rmsnorm")
    assert not np.shares_memory(p.rows, rows)
    p.rows[0, 0] = 99.0
    assert np.array_equal(rows, keep)


def _refuse_whole(monkeypatch, float32: bool = False) -> None:
    """Make every whole-array path of derived rows and keys (FoldedRows, DerivedKeys) fail: ``np.asarray``,
    ndarray attributes, numpy arithmetic. ``float32``: the one float32 copy (``np.asarray(.., float32)``, built
    chunk by chunk) is allowed. numpy's probes for ``__array_struct__`` / ``__array_interface__`` find none."""
    real = FoldedRows.__array__

    def refuse(*_a, **_k):
        raise AssertionError("derived rows or keys built whole")

    def no_attr(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        refuse()

    monkeypatch.setattr(FoldedRows, "__array__", lambda self, dtype=None, copy=None:
                        real(self, dtype) if float32 and dtype == np.float32 else refuse())
    monkeypatch.setattr(FoldedRows, "__getattr__", no_attr)
    monkeypatch.setattr(FoldedRows, "__array_ufunc__", refuse)


@pytest.mark.parametrize("norm, domain, scale", [("rmsnorm", None, 1.0), ("layernorm", None, 1.0),
                                                 ("rmsnorm", "box", 1.0), ("rmsnorm", "cone", 1.0),
                                                 ("rmsnorm", None, 1e18)])
def test_scan_and_volume_never_build_derived_rows_whole(monkeypatch, norm, domain, scale):
    """Every stage reads derived rows by index or in chunks: a scan (screens, ties, verifier, search, LP)
    and the volume of a few tokens run with FoldedRows' whole-array paths disabled (at scale 1e18 the
    screens recompute rows beyond float32's range over all V: their tiles too)."""
    import unspeakable

    head = _head(V=1100, d=24, seed=3, norm=norm, bias=True, scale=scale)
    ref = scan_head(head, domain=domain)

    _refuse_whole(monkeypatch)
    rep = scan_head(head, domain=domain)
    assert isinstance(fold(head, domain=domain).rows, FoldedRows)
    assert np.array_equal(rep.verdicts_all, ref.verdicts_all)
    assert rep.counts["undecided"] == 0 or scale > 1  # (×1e18: the LP's HiGHS refuses entries ≥ 1e15)
    if scale > 1:
        assert rep.screen_stats["gram_recomputed"] > 0
        return
    vol = unspeakable.volume(head, tokens=[0, 1, 2], domain=domain, samples=2000, seed=1)
    assert len(vol.tokens) == 3


def test_row_groups_equal_numpys_unique():
    """The twins' grouping by fingerprints and exact splits: the partition np.unique(rows, axis=0) gives,
    with ±0.0 equal, for held and derived rows, and with a forced fingerprint collision."""
    import unspeakable.engine.pipeline as pl

    rng = np.random.default_rng(5)
    R = rng.integers(-2, 3, size=(300, 4)).astype(np.float64)  # many exact repeats
    R[7] = -0.0 * np.abs(R[7])
    R[8] = np.abs(R[7])
    same = lambda a, b: np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])  # noqa: E731
    ref = np.unique(R, axis=0, return_inverse=True)[1].ravel()
    assert same(pl._row_groups(R, chunk=64), ref) and pl._row_groups(R)[7] == pl._row_groups(R)[8]
    p = fold(_head(V=500, d=6, seed=2))
    assert same(pl._row_groups(p.rows), np.unique(rows_array(p.rows), axis=0, return_inverse=True)[1].ravel())
    orig = pl._fingerprint
    try:  # every row one fingerprint: the exact split alone must recover the partition
        pl._fingerprint = lambda block, mult: np.zeros((block.shape[0], 2), dtype=np.uint64)
        assert same(pl._row_groups(R, chunk=64), ref)
    finally:
        pl._fingerprint = orig


# ------------------------------------------------------------------------------------- keys on demand
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype, gain", [(np.float32, True), (np.float16, True), (np.float32, False)])
def test_derived_keys_equal_the_folds_keys(norm, dtype, gain):
    """DerivedKeys are the fold's held keys bit for bit (±0.0 included) for every index form a stage uses."""
    head = _head(V=700, d=10, seed=4, norm=norm, gain=gain, dtype=dtype)
    held, lazy = fold(head), fold(head, derive_keys=True)
    assert isinstance(held.keys, np.ndarray) and isinstance(lazy.keys, DerivedKeys)
    K = held.keys
    same = lambda a, b: a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))  # noqa: E731
    idx = np.array([5, 0, 699, 5])
    for i in (0, 17, -1, slice(3, 90), slice(650, None), idx, idx.reshape(2, 2), (idx, slice(2, 7)), (4, 3)):
        assert same(np.asarray(lazy.keys[i]), np.asarray(K[i])), i
    assert same(np.asarray(lazy.keys), K) and same(np.asarray(lazy.keys, dtype=np.float32), K.astype(np.float32))
    assert same(lazy.keys @ np.arange(10.0), K @ np.arange(10.0))
    assert same(lazy.search_keys32(), held.search_keys32())
    assert lazy.keys_are_shifted_rows == held.keys_are_shifted_rows


def test_keys_held_except_where_derivable():
    """Keys are derived only when asked, where the rows are (exact fold, no rescale) and the domain reads them
    by chunks: the box (sign queries), a rounding fold (float64 weights with a gain) and a rescaled fold
    hold them."""
    h = _head(V=300, d=8, seed=1)
    assert isinstance(fold(h, derive_keys=True).keys, DerivedKeys)
    assert isinstance(fold(h, domain="cone", derive_keys=True).keys, DerivedKeys)
    assert isinstance(fold(h, domain="box", derive_keys=True).keys, np.ndarray)
    assert isinstance(fold(_head(V=300, d=8, seed=1, dtype=np.float64), derive_keys=True).keys, np.ndarray)
    assert isinstance(fold(_head(V=300, d=8, seed=1, dtype=np.float64, gain=False, scale=1e80),
                           derive_keys=True).keys, np.ndarray)


def test_budget_that_cannot_hold_the_keys_derives_them(monkeypatch):
    """hold_keys: the process, the keys (8·V·d), their float32 copy and the smallest working set must fit."""
    import unspeakable.engine.memory as memory
    from unspeakable.engine.memory import hold_keys

    V, d, rss = 1000, 100, 300 * 10**6
    need = rss + 12 * V * d + MIN_WORKING
    assert hold_keys(need, V, d, rss) and not hold_keys(need - 1, V, d, rss)
    assert hold_keys(need - 1, V, d, None)  # nothing known of the process: hold them, as before
    # the default budget: what the process holds plus what the machine has available
    monkeypatch.setattr(memory, "available_bytes", lambda: need - rss)
    assert hold_keys(None, V, d, rss)
    monkeypatch.setattr(memory, "available_bytes", lambda: need - rss - 1)
    assert not hold_keys(None, V, d, rss)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert hold_keys(None, V, d, rss)
    monkeypatch.undo()
    head = _head(V=400, d=16, seed=2, bias=True)
    assert scan_head(head).memory["keys_held"] and not scan_head(head, memory=0.001).memory["keys_held"]


@pytest.mark.parametrize("norm, domain, bias, const", [("rmsnorm", None, True, False), ("layernorm", None, True, False),
                                                       ("rmsnorm", "cone", False, False),
                                                       ("rmsnorm", None, False, True),
                                                       ("layernorm", None, False, False)])
def test_scan_with_derived_keys_is_the_same_scan(monkeypatch, norm, domain, bias, const):
    """A scan whose budget cannot hold the keys derives them: the same report token for token (verdict,
    margins, witness point, certificate, tie) as with the keys held, with the whole-array paths of derived
    rows and keys disabled (every stage reads them by chunks and gathers). ``const``: a head with no bias,
    whose working problem is the cone of the keys (rows and keys both derived)."""
    head = _head(V=1100, d=24, seed=9, norm=norm, bias=bias)
    if const:  # planted interior and duplicate rows: ties, the LP and zero margins
        W = np.array(head.W_U)
        W[:, 10] = 0.5 * (W[:, 3] + W[:, 4])
        W[:, 11] = W[:, 12]
        head = head_from_arrays(W, None, head.ln_w, None, norm, "mem-const")
    import unspeakable.engine.pipeline as pl

    with monkeypatch.context() as m:  # the same budget (the same batches), the keys held
        m.setattr(pl, "hold_keys", lambda *a: True)
        ref = scan_head(head, domain=domain, memory=0.001)
    assert ref.memory["keys_held"]

    _refuse_whole(monkeypatch)
    rep = scan_head(head, domain=domain, memory=0.001)
    assert not rep.memory["keys_held"]
    assert np.array_equal(rep.verdicts_all, ref.verdicts_all) and rep.counts == ref.counts
    assert ref.counts["undecided"] == 0
    for a, b in zip(ref.tokens, rep.tokens):
        ja, jb = a.to_json(), b.to_json()
        ja.pop("time_s"), jb.pop("time_s")
        assert ja == jb, (a.id, ja, jb)


def test_subset_scan_with_derived_keys_never_builds_them_whole(monkeypatch):
    """A ``tokens`` subset takes the two-pass screens (kernels.screen.top2_exact for the witness screen): with
    the keys derived it reads them by blocks and gathers too, and the report is the one with them held."""
    import unspeakable.engine.pipeline as pl
    from unspeakable.kernels.screen import top2_exact

    head = _head(V=900, d=10, seed=6, norm="layernorm", bias=True)
    ids = np.r_[0:40, 400:430, 880:900]
    with monkeypatch.context() as m:
        m.setattr(pl, "hold_keys", lambda *a: True)
        ref = scan_head(head, tokens=ids, memory=0.001)
    p = fold(head, derive_keys=True)
    import torch

    q = torch.from_numpy(p.keys[ids])
    held = torch.from_numpy(rows_array(p.keys))
    for keys in (held, p.keys):  # the kernel alone: a tensor and rows on demand, the same top-2 and values
        r, _ = top2_exact(q, keys, torch.from_numpy(ids), bias64=torch.from_numpy(p.bias))
        if keys is held:
            r_held = r
    for f in ("best_val", "best_idx", "second_val", "second_idx", "self_val"):
        assert torch.equal(getattr(r, f), getattr(r_held, f)), f

    _refuse_whole(monkeypatch)
    rep = scan_head(head, tokens=ids, memory=0.001)
    assert not rep.memory["keys_held"] and ref.memory["keys_held"]
    assert [t.to_json() | {"time_s": 0} for t in rep.tokens] == [t.to_json() | {"time_s": 0} for t in ref.tokens]


def test_volume_tie_groups_are_numpys_unique_groups_of_rows_and_bias():
    """The volume's groups of identical (row, bias) pairs, read in chunks (held or derived keys), against
    np.unique over the whole [rows, bias] array; ±0.0 equal; equal rows with different bias apart."""
    from unspeakable.engine.volume import _tie_groups

    head = _head(V=500, d=6, seed=8, bias=True)
    W, b = np.array(head.W_U), np.array(head.b_U)
    W[:, 10], b[10] = W[:, 11], b[11]  # a pair
    W[:, 20], W[:, 21], W[:, 22] = W[:, 23], W[:, 23], W[:, 23]
    b[20], b[21], b[22] = b[23], b[23], b[23] + 1  # a triple (22: the same row, another bias)
    W[:, 30], W[:, 31] = 0.0, -0.0
    b[30] = b[31] = 0.0
    head = head_from_arrays(W, b, head.ln_w, None, "rmsnorm", "ties")
    for p in (fold(head), fold(head, derive_keys=True)):
        M = np.hstack([rows_array(p.rows), p.bias[:, None]]) + 0.0
        _, inv, cnt = np.unique(M, axis=0, return_inverse=True, return_counts=True)
        inv = inv.ravel()
        ref = {t: sorted(np.nonzero(inv == inv[t])[0].tolist()) for t in range(p.V) if cnt[inv[t]] > 1}
        got = _tie_groups(p)
        assert got == ref and got[20] == [20, 21, 23] and got[30] == [30, 31] and 22 not in got


def test_scan_volume_with_derived_keys_is_the_same(monkeypatch):
    """``scan --volume`` under a budget that cannot hold the keys: the volume stage reads them in chunks and
    gathers (its float32 copy and norms by blocks) and gives the estimates of the keys held, seed for seed."""
    import unspeakable.engine.pipeline as pl
    from unspeakable.engine.volume import SplitOptions, VolumeOptions

    head = _head(V=800, d=8, seed=12, bias=True)
    opts = lambda: VolumeOptions(hardest=3, samples=4000, seed=1,  # noqa: E731
                                 split=SplitOptions(particles=32, replicates=4, moves=10))
    with monkeypatch.context() as m:
        m.setattr(pl, "hold_keys", lambda *a: True)
        ref = scan_head(head, memory=0.001, volume=opts())

    _refuse_whole(monkeypatch, float32=True)  # only the volume's float32 copy
    rep = scan_head(head, memory=0.001, volume=opts())
    assert not rep.memory["keys_held"]
    strip = lambda v: {k: x for k, x in (v or {}).items() if k != "seconds"}  # noqa: E731
    vols = [(t.id, strip(t.volume)) for t in rep.tokens if t.volume]
    assert vols and vols == [(t.id, strip(t.volume)) for t in ref.tokens if t.volume]
