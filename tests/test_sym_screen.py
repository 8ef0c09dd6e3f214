"""One symmetric pass for both screens (kernels.sym_screen) against the float64 reference.

Every comparison of indices is ``torch.equal`` against ``sym_screen_reference`` (untiled float64): best and
second index of both screens, on odd shapes, both gram-row conventions, every domain's scale convention,
exact ties, duplicates, ±0.0, rank-deficient rows, magnitudes near float32's limits and planted near ties
that only float64 resolves.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton decides interpreted vs compiled once per function, when it is defined (see test_triton_top2.py).
# On a machine without CUDA: if nothing imported triton yet, import it interpreted, together with both
# kernel modules (so that test_triton_top2.py, collected later, finds its kernel interpreted too); if it
# is interpreted already, import this file's kernel module the same way. Then restore the variable.
def _triton_interpreted_already() -> bool:
    if "triton" not in sys.modules:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules["triton.language"].zeros, InterpretedFunction)


if not torch.cuda.is_available() and ("triton" not in sys.modules or (
        _triton_interpreted_already() and "unspeakable.kernels.triton_sym" not in sys.modules)):
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        from unspeakable.kernels import triton_sym, triton_top2  # noqa: F401
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from unspeakable.kernels import triton_sym as ts  # noqa: E402
from unspeakable.kernels.sym_screen import KeyMap, OtherGram, round_inputs, sym_screen, sym_screen_reference  # noqa: E402

INTERPRETED = isinstance(tl.zeros, InterpretedFunction) and isinstance(ts.sym_kernel, InterpretedFunction)
ROOT = Path(__file__).resolve().parent.parent

SHAPES = [(37, 5), (130, 33), (257, 64)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tiles are many small torch ops: on a shared 2-core machine, two OpenMP threads per op mostly
    wait for each other (a scheduler quantum per barrier). One thread keeps the file fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def head(V, d, seed=0, mean=2.0, integer=False):
    """Rows ``ũ`` with a shared mean (uncentred, as gain-folded rows are) and a bias."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        u = torch.randint(-2, 3, (V, d), generator=g).double()
        return u, torch.randint(-3, 4, (V,), generator=g).double()
    u = torch.randn(V, d, generator=g, dtype=torch.float64) * (0.5 + torch.rand(V, 1, generator=g, dtype=torch.float64))
    u += mean * torch.randn(d, generator=g, dtype=torch.float64)
    return u, torch.randn(V, generator=g, dtype=torch.float64)


def screen_inputs(u, bias, domain, convention):
    """(gram_rows64, keys64, scale64, bias64, key_map) as the engine builds them (engine.load.fold):
    keys = P(ũ − c); gram rows = ũ ("uncentred", with the key map) or the keys themselves ("centred")."""
    V, d = u.shape
    c = u.mean(dim=0)
    k = u - c
    if domain == "layernorm":
        k = k - k.mean(dim=1, keepdim=True)
    n = torch.linalg.vector_norm(k, dim=1)
    pos = n > 0
    if domain == "cone":
        scale, bias = torch.where(pos, 1.0 / (n * n), 0.0), None
    else:
        scale = torch.where(pos, math.sqrt(d) / n, 0.0)
    if convention == "centred":
        return k, k, scale, bias, None
    return u, k, scale, bias, KeyMap(c, sum_zero=domain == "layernorm")


def assert_same(res, ref, witness=True):
    for name in ("gram", "witness") if witness else ("gram",):
        a, e = getattr(res, name), getattr(ref, name)
        for f in ("best_idx", "second_idx"):
            assert torch.equal(getattr(a, f), getattr(e, f)), (name, f, (getattr(a, f) != getattr(e, f)).nonzero()[:5])
        for f in ("best_val", "second_val", "self_val"):
            got, want = getattr(a, f), getattr(e, f)
            assert got.dtype == torch.float64
            assert torch.equal(torch.isneginf(got), torch.isneginf(want)), (name, f)
            ok = torch.isfinite(want)
            torch.testing.assert_close(got[ok], want[ok], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("V,d", SHAPES)
@pytest.mark.parametrize("domain", ["layernorm", "rmsnorm", "cone"])
@pytest.mark.parametrize("convention", ["uncentred", "centred"])
def test_matches_float64_reference(V, d, domain, convention):
    u, b = head(V, d, seed=V + d)
    args = screen_inputs(u, b, domain, convention)
    ref = sym_screen_reference(*args)
    for block in (16, 64):
        assert_same(sym_screen(*args, block=block), ref)


def test_inputs_are_not_written():
    u, b = head(130, 33)
    args = screen_inputs(u, b, "layernorm", "uncentred")
    before = [a.clone() for a in args[:4]] + [args[4].center64.clone()]
    sym_screen(*args, block=16)
    for x, y in zip(before, list(args[:4]) + [args[4].center64]):
        assert torch.equal(x, y)


def test_gram_only_box_fallback():
    """keys64=None: the gram screen alone (the box domain's witness is no Gram of the rows)."""
    u, _ = head(130, 33)
    res = sym_screen(u, block=32)
    assert res.witness is None
    assert_same(res, sym_screen_reference(u), witness=False)


@pytest.mark.parametrize("block", [7, 16, 1024])
def test_exact_ties_and_duplicates_keep_first_index(block):
    """Integer rows: every product is exact in float32 and float64, ties are everywhere (and duplicated
    rows tie exactly): the first index of the maximum must win, whatever the tiling and sort order."""
    u, b = head(131, 9, seed=3, integer=True)
    u[50:60] = u[10]  # ten duplicates of row 10
    b[50:60] = b[10]
    for convention in ("uncentred", "centred"):
        args = screen_inputs(u, b, "rmsnorm", convention)
        ref = sym_screen_reference(*args)
        assert int((ref.gram.best_val == ref.gram.second_val).sum()) >= 10
        assert_same(sym_screen(*args, block=block), ref)
    # integer gram rows with an integer "key" map: exact everywhere, so the reference rule decides alone
    assert_same(sym_screen(u, u, torch.ones(131, dtype=torch.float64), b, block=block),
                sym_screen_reference(u, u, torch.ones(131, dtype=torch.float64), b))


def test_signed_zeros_zero_rows_and_rank_deficient():
    g = torch.Generator().manual_seed(5)
    V, d = 130, 33
    u = torch.randn(V, 3, generator=g, dtype=torch.float64) @ torch.randn(3, d, generator=g, dtype=torch.float64)
    u[7] = 0.0
    u[8] = -0.0
    u[9, ::2] = -0.0
    b = torch.randn(V, generator=g, dtype=torch.float64)
    for domain in ("layernorm", "rmsnorm", "cone"):
        for convention in ("uncentred", "centred"):
            args = screen_inputs(u, b, domain, convention)
            assert_same(sym_screen(*args, block=16), sym_screen_reference(*args))
    k = u.clone()  # a key exactly zero: its scale is 0 (as engine.screen.witness_queries makes it)
    s = torch.where(k.norm(dim=1) > 0, 1.0 / k.norm(dim=1).clamp(min=1e-300), 0.0)
    assert_same(sym_screen(u, k, s, b, block=16), sym_screen_reference(u, k, s, b))


@pytest.mark.parametrize("scale", [1e18, 1e-18, "mixed"])
def test_float32_range_limits(scale):
    """Rows at 1e18 overflow float32 dot products, rows at 1e-18 underflow their products: the result
    must still be the float64 one (such rows are recomputed in float64)."""
    u, b = head(130, 33, seed=9)
    if scale == "mixed":
        # Keys are the rows themselves here: centring a mix of 1e18 and 1e-18 rows would make the small
        # rows' keys equal in float64 (-c + 1e-18 == -c), ties that float64 itself cannot order.
        u[::3] *= 1e18
        u[1::3] *= 1e-18
        b[::3] *= 1e18
        s = math.sqrt(33) / u.norm(dim=1)
        cases = [(u, u, s, b, None), (u, None, None, None, None)]
    else:
        u *= scale
        b *= scale
        cases = [screen_inputs(u, b, domain, convention)
                 for domain, convention in (("layernorm", "uncentred"), ("rmsnorm", "centred"), ("cone", "uncentred"))]
    for args in cases:
        res = sym_screen(*args, block=32)
        assert_same(res, sym_screen_reference(*args), witness=args[1] is not None)
        if scale != 1e-18:
            assert res.stats.out_of_range_rows > 0


def planted(V=257, d=64, rel=2.0**-30, seed=0):
    """Rows whose two best competitors differ by a relative ``rel``: far below float32's resolution, far
    above float64's. Half of the plants put the larger value at the later index (where a float32 tie would
    pick the wrong one by the first-index rule)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(V, d, generator=g, dtype=torch.float64)
    targets = list(range(0, min(40, V // 2 - 1), 4))
    for n, t in enumerate(targets):
        lo, hi = V // 2 + 2 * n, V // 2 + 2 * n + 1
        w = 3.0 * u[t] / u[t].norm() * math.sqrt(d)
        small, large = w, w * (1.0 + rel)
        u[lo], u[hi] = (small, large) if n % 2 == 0 else (large, small)
    return u, torch.zeros(V, dtype=torch.float64), targets


def test_planted_near_ties_only_float64_resolves():
    u, b, targets = planted()
    ref = sym_screen_reference(u, u, torch.ones(u.shape[0], dtype=torch.float64), b)
    # float32 cannot tell the plants apart: rounded to float32 they compare equal or the wrong way round
    r32 = sym_screen_reference(u.float().double(), u.float().double(), torch.ones(u.shape[0], dtype=torch.float64), b)
    assert not torch.equal(r32.gram.best_idx[targets], ref.gram.best_idx[targets])
    res = sym_screen(u, u, torch.ones(u.shape[0], dtype=torch.float64), b, block=32)
    assert_same(res, ref)
    assert res.stats.gram_rescored + res.stats.gram_recomputed >= len(targets)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_inputs_still_exact(precision):
    """The torch backend rounds the operands as TF32 (10 mantissa bits) / bf16 (7) do: many rows become
    near ties at that precision, and the recovery must still give the float64 answer."""
    u, b, targets = planted(rel=2.0**-16)
    args = screen_inputs(u, b, "layernorm", "uncentred")
    ref = sym_screen_reference(*args)
    lo = sym_screen(*args, block=32, precision=precision)
    hi = sym_screen(*args, block=32, precision="ieee")
    assert_same(lo, ref)
    assert lo.stats.gram_rescored + lo.stats.gram_recomputed > hi.stats.gram_rescored + hi.stats.gram_recomputed


def test_round_inputs_tf32():
    x = torch.tensor([1.0 + 2.0**-10, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-12, -(1.0 + 2.0**-11)])
    assert round_inputs(x, "tf32").tolist() == [1.0 + 2.0**-10, 1.0, 1.0 + 2.0**-9, 1.0, -1.0]
    assert round_inputs(x, "ieee") is x


def test_pruned_equals_unpruned_and_prunes():
    """Norms spread over decades (sorted, the small-norm blocks cannot reach anyone's top-K): tiles are
    skipped, and the result is identical to the unpruned pass."""
    g = torch.Generator().manual_seed(2)
    V, d = 600, 16
    u = torch.randn(V, d, generator=g, dtype=torch.float64) * torch.logspace(0, -4, V, dtype=torch.float64)[:, None]
    b = torch.zeros(V, dtype=torch.float64)
    for domain in ("rmsnorm", "cone"):
        args = screen_inputs(u, b, domain, "centred")
        a = sym_screen(*args, block=32, prune=True)
        n = sym_screen(*args, block=32, prune=False)
        assert_same(a, n)
        assert_same(a, sym_screen_reference(*args))
        assert n.stats.directions_skipped == 0 and n.stats.tiles_skipped == 0
    gram_only = sym_screen(u, block=32, prune=True)
    assert gram_only.stats.tiles_skipped > 0 and 0 < gram_only.stats.skipped_fraction < 1
    assert_same(gram_only, sym_screen(u, block=32, prune=False), witness=False)


def test_keys_off_the_map_are_still_exact():
    """Keys that are not P(g − c) (a wrong centre): the measured residual widens the bound, the answer
    stays the float64 one for the keys given."""
    u, b = head(130, 33, seed=4)
    _, k, s, bias, _ = screen_inputs(u, b, "layernorm", "uncentred")
    wrong = KeyMap(torch.zeros(33, dtype=torch.float64), sum_zero=False)
    res = sym_screen(u, k, s, bias, wrong, block=16)
    assert_same(res, sym_screen_reference(u, k, s, bias, wrong))


@pytest.mark.parametrize("V", [1, 2, 3, 4])
def test_tiny_vocabularies(V):
    u, b = head(V, 5, seed=V)
    for convention in ("uncentred", "centred"):
        args = screen_inputs(u, b, "rmsnorm", convention)
        assert_same(sym_screen(*args, block=2), sym_screen_reference(*args))
        args, other = with_other(u, b, "layernorm", convention)
        res, ref = sym_screen(*args, block=2, other=other), sym_screen_reference(*args, other=other)
        assert_same(res, ref)
        assert_other_same(res, ref)


def test_validation():
    u = torch.randn(10, 4, dtype=torch.float64)
    s = torch.ones(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="keys64 must have shape"):
        sym_screen(u, torch.randn(10, 5, dtype=torch.float64), s)
    with pytest.raises(TypeError, match="float64"):
        sym_screen(u.float())
    with pytest.raises(ValueError, match="non-finite"):
        bad = u.clone()
        bad[3, 1] = math.nan
        sym_screen(bad)
    with pytest.raises(ValueError, match="scale64"):
        sym_screen(u, u)
    with pytest.raises(ValueError, match=">= 0"):
        sym_screen(u, u, -s)
    with pytest.raises(ValueError, match="need keys64"):
        sym_screen(u, None, s)
    with pytest.raises(ValueError, match="precision"):
        sym_screen(u, precision="fp16")
    with pytest.raises(ValueError, match="backend"):
        sym_screen(u, backend="numpy")


# --- a second gram convention from the same tiles (OtherGram: the report names both counts) ----------------


def tl_rows(u, domain):
    """TransformerLens-style centred rows, computed as ``engine.loader.gram_rows`` does (not as the keys are:
    the two differ in float64 rounding, which the bound's measured residual covers)."""
    r = u.clone()
    if domain == "layernorm":
        r -= r.mean(dim=1, keepdim=True)
    return r - r.mean(dim=0)


def with_other(u, b, domain, convention):
    """The screen inputs plus the other convention: TransformerLens rows when the main rows are uncentred,
    the uncentred rows ũ (through the key map) when they are centred."""
    g, k, s, bias, km = screen_inputs(u, b, domain, convention)
    c = u.mean(dim=0)
    if convention == "uncentred":
        return (g, k, s, bias, km), OtherGram(lambda: tl_rows(u, domain), None)
    return (tl_rows(u, domain), k, s, bias, None), OtherGram(lambda: u.clone(), KeyMap(c, sum_zero=domain == "layernorm"))


def assert_other_same(res, ref):
    a, e = res.other, ref.other
    assert a is not None and e is not None
    for f in ("best_idx", "second_idx"):
        assert torch.equal(getattr(a, f), getattr(e, f)), (f, (getattr(a, f) != getattr(e, f)).nonzero()[:5])
    for f in ("best_val", "second_val", "self_val"):
        ok = torch.isfinite(getattr(e, f))
        torch.testing.assert_close(getattr(a, f)[ok], getattr(e, f)[ok], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("V,d", SHAPES)
@pytest.mark.parametrize("domain", ["layernorm", "rmsnorm", "cone"])
@pytest.mark.parametrize("convention", ["uncentred", "centred"])
def test_other_convention_matches_its_float64_reference(V, d, domain, convention):
    """The other convention's gram screen, reduced from the keys' tiles, equals the float64 reference of
    its own rows; the main gram and witness screens are the same as without it."""
    u, b = head(V, d, seed=V + d + 1)
    args, other = with_other(u, b, domain, convention)
    ref = sym_screen_reference(*args, other=other)
    assert torch.equal(ref.other.best_idx, sym_screen_reference(other.rows()).gram.best_idx)
    for block in (16, 64):
        res = sym_screen(*args, block=block, other=other)
        assert_same(res, ref)
        assert_other_same(res, ref)
        assert_same(res, sym_screen(*args, block=block))  # the third reduction leaves the other two alone
    # the two conventions really count differently on these rows (else the test could not tell them apart)
    assert not torch.equal(ref.gram.best_idx, ref.other.best_idx)


def test_other_convention_ties_duplicates_and_pruning():
    """Duplicated rows (exact ties in both conventions keep the first index) and decades of norms (pruned
    directions): pruned and unpruned runs give the float64 reference's indices."""
    g = torch.Generator().manual_seed(5)
    V, d = 300, 12
    u = torch.randn(V, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, V, dtype=torch.float64)[:, None]
    u[40], u[41], u[250] = u[7], u[7], u[7]
    u[100:110] = torch.randint(-2, 3, (10, d), generator=g).double()
    b = torch.randn(V, generator=g, dtype=torch.float64)
    for domain in ("layernorm", "rmsnorm"):
        for convention in ("uncentred", "centred"):
            args, other = with_other(u, b, domain, convention)
            ref = sym_screen_reference(*args, other=other)
            for prune in (True, False):
                res = sym_screen(*args, block=32, prune=prune, other=other)
                assert_other_same(res, ref)
                assert res.stats.directions == sym_screen(*args, block=32, prune=prune).stats.directions * 3 // 2


def test_other_convention_off_the_map_and_not_written():
    """A wrong key map for the other rows widens its bound (the residual is measured), never its answer;
    no input is written, the rows callable included."""
    u, b = head(130, 33, seed=9)
    g, k, s, bias, km = screen_inputs(u, b, "layernorm", "uncentred")
    shown = u * 1.5 + 0.25
    before = [x.clone() for x in (g, k, s, bias, shown)]
    other = OtherGram(lambda: shown, KeyMap(torch.zeros(33, dtype=torch.float64), sum_zero=False))
    res = sym_screen(g, k, s, bias, km, block=16, other=other)
    assert_other_same(res, sym_screen_reference(g, k, s, bias, km, other=other))
    for x, y in zip(before, (g, k, s, bias, shown)):
        assert torch.equal(x, y)


def test_other_convention_validation():
    u, b = head(20, 4, seed=1)
    args = screen_inputs(u, b, "rmsnorm", "uncentred")
    with pytest.raises(ValueError, match="needs keys64"):
        sym_screen(u, other=OtherGram(lambda: u))
    with pytest.raises(ValueError, match="shape"):
        sym_screen(*args, other=OtherGram(lambda: u[:, :3].contiguous()))
    with pytest.raises(ValueError, match="float64"):
        sym_screen(*args, other=OtherGram(lambda: u.float()))
    bad = u.clone()
    bad[2, 2] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        sym_screen(*args, other=OtherGram(lambda: bad))


# --- the Triton kernel, in Triton's CPU interpreter (small odd shapes: it runs each program in numpy) ------


@pytest.fixture
def interpret(monkeypatch):
    if not INTERPRETED:
        pytest.skip("triton was imported compiled in this process; see test_triton_tests_in_subprocess")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_triton_tests_in_subprocess():
    if INTERPRETED:
        pytest.skip("the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton", __file__],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("V,d,block,convention", [(37, 5, 16, "uncentred"), (70, 33, 32, "centred"),
                                                  (130, 64, 64, "uncentred")])
def test_triton_matches_float64_reference(V, d, block, convention, interpret):
    u, b = head(V, d, seed=V + d)
    args = screen_inputs(u, b, "layernorm" if convention == "uncentred" else "rmsnorm", convention)
    res = sym_screen(*args, backend="triton", block=block)
    assert res.stats.backend == "triton" and res.stats.tiles == (-(-V // block)) * (-(-V // block) + 1) // 2
    assert_same(res, sym_screen_reference(*args))


def test_triton_ties_cone_and_pruning(interpret):
    """Integer rows (exact ties everywhere), the cone's scale without bias, and a spread of norms that
    makes the kernel prune: same answer as the reference, pruned or not."""
    u, b = head(37, 9, seed=3, integer=True)
    u[20:25] = u[3]
    args = screen_inputs(u, b, "cone", "centred")
    assert_same(sym_screen(*args, backend="triton", block=16), sym_screen_reference(*args))
    g = torch.Generator().manual_seed(2)
    w = torch.randn(70, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 70, dtype=torch.float64)[:, None]
    pruned = sym_screen(w, backend="triton", block=16, prune=True)
    # the round-robin order pairs far blocks early, before the K-th values have risen: reductions are
    # pruned here, whole tiles less often than in the CPU's row-block order
    assert pruned.stats.directions_skipped > 0
    assert_same(pruned, sym_screen(w, backend="triton", block=16, prune=False), witness=False)
    assert_same(pruned, sym_screen_reference(w), witness=False)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_triton_low_precision_plumbing(precision, interpret):
    """The interpreter ignores input_precision; the operands arrive rounded as the precision rounds them
    (as on the GPU), and the recovery must still give the float64 answer."""
    u, b, _ = planted(V=70, d=16, rel=2.0**-16)
    args = screen_inputs(u, b, "layernorm", "uncentred")
    res = sym_screen(*args, backend="triton", block=16, precision=precision)
    assert_same(res, sym_screen_reference(*args))


def test_round_robin_visits_every_pair_once():
    for nb in (1, 2, 5, 8):
        rounds = ts.round_robin(nb)
        seen = [p for r in rounds for p in r]
        assert sorted(seen) == [(i, j) for i in range(nb) for j in range(i, nb)]
        for r in rounds:  # no block twice in a round: each program owns its rows
            blocks = [x for p in r for x in set(p)]
            assert len(blocks) == len(set(blocks))


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    from unspeakable.kernels import BackendError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        sym_screen(torch.randn(8, 4, dtype=torch.float64), backend="triton")


def test_sym_kernel_compiles_without_spills():
    """The register-hungriest build (sm_90 wgmma, tf32, every switch on) through Triton's full pipeline and
    ptxas: no spills. ``python -m unspeakable.kernels.aot --kernel all`` reports every target and precision."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "unspeakable.kernels.aot", "--kernel", "sym", "--target", "90",
                           "--precision", "tf32", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (r,) = json.loads(proc.stdout)
    assert r["spills_bytes"] == 0 and 0 < r["registers"] <= 255 and r["wgmma"], r


@pytest.mark.parametrize("offset", [1e18, 1e-18])
def test_other_convention_out_of_float32_range(offset):
    """Keys of ordinary size, but uncentred rows with a shared offset that overflows float32 products (or
    rows so small their products underflow): the other convention's rows are recomputed in float64 and
    its answer is still the float64 one."""
    u, b = head(130, 33, seed=12, mean=0.0)
    u = u * (1.0 if offset > 1 else offset) + (offset if offset > 1 else 0.0) * torch.linspace(1, 2, 33, dtype=torch.float64)
    for domain in ("layernorm", "rmsnorm"):
        args, other = with_other(u, b, domain, "centred")
        res = sym_screen(*args, block=32, other=other)
        ref = sym_screen_reference(*args, other=other)
        assert_other_same(res, ref)
        if offset > 1:
            assert res.stats.other_recomputed > 0
