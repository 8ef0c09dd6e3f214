"""Triton top-2 kernel, run in Triton's CPU interpreter, against the float64 reference.

Triton decides interpreted vs compiled once per function, when it is defined (its own ``tl.zeros`` /
``tl.max`` are jit functions too). So on a machine without CUDA, if nothing imported triton yet, this
module imports it with ``TRITON_INTERPRET=1`` and restores the environment at once; the tests that
launch the kernel switch the variable on for themselves only (other tests check that Triton without
CUDA is refused when it is off). Otherwise (triton already imported compiled, or a GPU machine whose
other tests want compiled kernels) the interpreter tests are skipped here and run in a fresh process
instead (``test_interpreter_tests_in_subprocess``).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        from unspeakable.kernels import triton_top2 as tt
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from unspeakable.kernels import triton_top2 as tt  # noqa: E402

INTERPRETED = isinstance(tl.zeros, InterpretedFunction) and isinstance(tt.top2_kernel, InterpretedFunction)

import unspeakable.kernels.screen as screen  # noqa: E402
from unspeakable.kernels import BackendError, resolve_backend  # noqa: E402
from unspeakable.kernels.screen import row_error_bounds, top2_exact  # noqa: E402
from unspeakable.kernels.top2 import Top2, top2_reference, top2_torch  # noqa: E402

FEATURES = ("self", "scale", "center", "bias")


@pytest.fixture
def interpret(monkeypatch):
    if not INTERPRETED:
        pytest.skip("triton was imported compiled in this process; see test_interpreter_tests_in_subprocess")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_interpreter_tests_in_subprocess():
    if INTERPRETED:
        pytest.skip("the interpreter tests run in this process")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.fixture
def poisoned(monkeypatch):
    """Output buffers full of garbage, so any row or field the kernel fails to write shows up."""
    real = tt._allocate

    def allocate(B, device):
        out = real(B, device)
        out.best_val.fill_(math.nan)
        out.second_val.fill_(math.nan)
        out.self_val.fill_(1.0e30)  # NaN is a legitimate self value (no self column)
        out.best_idx.fill_(123_456_789)
        out.second_idx.fill_(-987_654_321)
        return out

    monkeypatch.setattr(tt, "_allocate", allocate)


def make_case(B, V, d, features, seed=0, integer=False):
    """float64 inputs; queries with a self column are that key (plus noise), as in the gram screen, so
    the self column is usually the maximum and excluding it matters."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        # Small integers, power-of-two scales: every fp32 operation is exact and ties are common.
        keys = torch.randint(-2, 3, (V, d), generator=g).double()
        queries = torch.randint(-2, 3, (B, d), generator=g).double()
    else:
        keys = torch.randn(V, d, generator=g, dtype=torch.float64)
        queries = torch.randn(B, d, generator=g, dtype=torch.float64)
    kw = {}
    self_index = None
    if "self" in features:
        self_index = torch.randint(0, V, (B,), generator=g)
        self_index[::4] = -1  # some rows exclude nothing
        has = self_index >= 0
        if not integer:
            queries[has] = keys[self_index[has]] + 0.1 * queries[has]
        else:
            queries[has] = keys[self_index[has]]
    if "scale" in features:
        kw["scale"] = (2.0 ** torch.randint(-1, 3, (B,), generator=g)).double() if integer else \
            torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    if "center" in features:
        kw["center"] = torch.randint(-1, 2, (d,), generator=g).double() if integer else \
            0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    if "bias" in features:
        kw["bias"] = torch.randint(-3, 4, (V,), generator=g).double() if integer else \
            torch.randn(V, generator=g, dtype=torch.float64)
    return queries, keys, self_index, kw


def f32(kw):
    return {k: v.float() for k, v in kw.items()}


def run_triton(queries, keys, self_index, kw, precision="ieee", config=tt.TEST_CONFIG) -> Top2:
    return tt.top2_triton(queries.float(), keys.float(), self_index, precision=precision, config=config, **f32(kw))


def assert_matches(res: Top2, ref: Top2, eps: torch.Tensor):
    """Indices exactly equal; values within the a-priori bound ``eps`` that top2_exact relies on."""
    assert res.best_val.dtype == torch.float32 and res.best_idx.dtype == torch.int64
    assert torch.equal(res.best_idx, ref.best_idx)
    assert torch.equal(res.second_idx, ref.second_idx)
    for got, want in ((res.best_val, ref.best_val), (res.second_val, ref.second_val), (res.self_val, ref.self_val)):
        got = got.double()
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        ok = torch.isfinite(want)
        assert torch.all((got[ok] - want[ok]).abs() <= eps[ok]), (got[ok] - want[ok]).abs().max()


def bound(queries, keys, kw, precision):
    kn = float(torch.linalg.vector_norm(keys, dim=1).max()) if keys.shape[0] else 0.0
    return row_error_bounds(queries, kn, kw.get("scale"), kw.get("center"), kw.get("bias"), precision)


# (B, V, d): V in 1, 2, 1023, 4099 and d in 1, 17, 96, 768; none a multiple of the test tile in B or V.
SHAPES = [(3, 1, 17), (5, 2, 1), (70, 2, 768), (37, 1023, 17), (37, 1023, 96), (33, 4099, 1), (9, 4099, 768)]


@pytest.mark.parametrize("B,V,d", SHAPES)
@pytest.mark.parametrize("features", [(), FEATURES], ids=["plain", "all"])
def test_matches_float64_reference(B, V, d, features, interpret, poisoned):
    queries, keys, self_index, kw = make_case(B, V, d, features, seed=B * 7919 + V + d)
    res = run_triton(queries, keys, self_index, kw)
    ref = top2_reference(queries, keys, self_index, **kw)
    assert_matches(res, ref, bound(queries, keys, kw, "ieee"))


@pytest.mark.parametrize("mask", range(16))
def test_feature_switches(mask, interpret, poisoned):
    features = tuple(f for i, f in enumerate(FEATURES) if mask >> i & 1)
    queries, keys, self_index, kw = make_case(45, 300, 40, features, seed=mask)
    res = run_triton(queries, keys, self_index, kw)
    ref = top2_reference(queries, keys, self_index, **kw)
    assert_matches(res, ref, bound(queries, keys, kw, "ieee"))


@pytest.mark.parametrize("config", [tt.TEST_CONFIG, tt.TileConfig(16, 32, 16, 4, 1)], ids=lambda c: c.name)
def test_exact_ties_keep_first_index(config, interpret, poisoned):
    """Integer data: fp32 is exact, so values must equal the reference bit for bit and every tie (many,
    across tiles) must resolve to the first index of the maximum, whatever the tiling."""
    queries, keys, self_index, kw = make_case(37, 1023, 17, FEATURES, seed=3, integer=True)
    ref = top2_reference(queries, keys, self_index, **kw)
    ties = (ref.best_val == ref.second_val).sum()
    assert ties >= 10, "the data should contain ties for this test to mean anything"
    res = run_triton(queries, keys, self_index, kw, config=config)
    assert_matches(res, ref, torch.zeros(37, dtype=torch.float64))


def test_bf16_rounds_operands(interpret, poisoned):
    """bf16: the kernel's result is the float64 score of bf16-rounded (q - c) and keys (scale and bias
    applied after), and differs from the unrounded scores, so the cast really happened."""
    queries, keys, self_index, kw = make_case(37, 1023, 96, FEATURES, seed=11)
    res = run_triton(queries, keys, self_index, kw, precision="bf16")
    rnd = lambda t: t.float().to(torch.bfloat16).double()  # noqa: E731
    q_c = rnd(queries.float() - kw["center"].float())
    k_b = rnd(keys)
    ref = top2_reference(q_c, k_b, self_index, scale=kw["scale"], bias=kw["bias"])
    assert_matches(res, ref, bound(q_c, k_b, {k: kw[k] for k in ("scale", "bias")}, "ieee"))
    exact = top2_reference(queries, keys, self_index, **kw)
    assert (res.best_val.double() - exact.best_val).abs().max() > bound(queries, keys, kw, "ieee").max()


def test_tf32_within_its_bound(interpret, poisoned):
    # The interpreter ignores input_precision, so this checks the plumbing, not TF32 rounding (the
    # recovery test below simulates that).
    queries, keys, self_index, kw = make_case(37, 1023, 96, FEATURES, seed=12)
    res = run_triton(queries, keys, self_index, kw, precision="tf32")
    ref = top2_reference(queries, keys, self_index, **kw)
    assert_matches(res, ref, bound(queries, keys, kw, "tf32"))


def test_centre_is_applied_in_row_chunks(interpret, poisoned, monkeypatch):
    monkeypatch.setattr(tt, "_CENTER_CHUNK_ELEMS", 64)  # chunk = max(BLOCK_M, 64 // d) = 32 rows
    queries, keys, self_index, kw = make_case(70, 300, 17, FEATURES, seed=5)
    res = run_triton(queries, keys, self_index, kw)
    ref = top2_reference(queries, keys, self_index, **kw)
    assert_matches(res, ref, bound(queries, keys, kw, "ieee"))


def test_padded_d_path(interpret, poisoned, monkeypatch):
    """The GPU pads d to a multiple of 16 with zero columns; run that path here too."""
    monkeypatch.setattr(tt, "_PAD_D_DEVICES", ("cpu", "cuda"))
    for precision in ("ieee", "bf16"):
        queries, keys, self_index, kw = make_case(37, 300, 17, FEATURES, seed=8)
        res = run_triton(queries, keys, self_index, kw, precision=precision)
        padded = tt._operand(keys.float(), precision)[0]
        assert padded.shape == (300, 32) and torch.all(padded[:, 17:] == 0)
        monkeypatch.setattr(tt, "_PAD_D_DEVICES", ())
        want = run_triton(queries, keys, self_index, kw, precision=precision)
        monkeypatch.setattr(tt, "_PAD_D_DEVICES", ("cpu", "cuda"))
        for f in ("best_idx", "second_idx"):
            assert torch.equal(getattr(res, f), getattr(want, f))
        ref = top2_reference(queries, keys, self_index, **kw)
        if precision == "ieee":
            assert_matches(res, ref, bound(queries, keys, kw, "ieee"))


def test_empty_query_batch(interpret):
    res = tt.top2_triton(torch.zeros(0, 5), torch.randn(7, 5))
    assert res.best_idx.shape == (0,) and res.best_idx.dtype == torch.int64


def test_launcher_validates(interpret):
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="keys must have shape"):
        tt.top2_triton(q, torch.randn(6, 9))
    with pytest.raises(TypeError, match="float32"):
        tt.top2_triton(q.double(), k)
    with pytest.raises(ValueError, match="bias must have shape"):
        tt.top2_triton(q, k, bias=torch.randn(4))
    with pytest.raises(ValueError, match="contiguous"):
        tt.top2_triton(torch.randn(8, 4).T, k)
    with pytest.raises(ValueError, match="precision"):
        tt.top2_triton(q, k, precision="fp16")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        tt.top2_triton(torch.randn(4, 8), torch.randn(6, 8))


def test_resolve_backend_triton_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == ("triton", torch.device("cpu"))


def test_configs_for():
    for cc in (80, 86, (8, 0), 90, (9, 0)):
        for precision in tt.PRECISIONS:
            configs = tt.configs_for(cc, precision)
            assert configs and all(isinstance(c, tt.TileConfig) for c in configs)
            assert all(c.block_m >= 16 and c.block_n >= 16 and c.block_k >= 8 for c in configs)
    assert tt.configs_for(80) != tt.configs_for(90)
    with pytest.raises(ValueError, match="sm_80"):
        tt.configs_for(75)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_top2_exact_triton_equals_torch(precision, interpret):
    queries, keys, self_index, kw = make_case(40, 1023, 96, FEATURES, seed=21)
    kw64 = {f"{k}64": v for k, v in kw.items()}
    a, n_a = top2_exact(queries, keys, self_index, backend="triton", precision=precision, **kw64)
    b, n_b = top2_exact(queries, keys, self_index, backend="torch", **kw64)
    for f in ("best_idx", "second_idx"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    ref = top2_reference(queries, keys, self_index, **kw)
    assert torch.equal(a.best_idx, ref.best_idx) and torch.equal(a.second_idx, ref.second_idx)


# --- recovery of near-tie rows, with low-precision dots simulated on the CPU -------------------------


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest value with 10 explicit mantissa bits (ties to even), as TF32 tensor cores see it."""
    b = x.float().contiguous().view(torch.int32)
    b = (b + 0xFFF + ((b >> 13) & 1)) & -0x2000
    return b.view(torch.float32)


def test_round_tf32():
    x = torch.tensor([1.0 + 2.0**-10, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-12, -(1.0 + 2.0**-11)])
    assert round_tf32(x).tolist() == [1.0 + 2.0**-10, 1.0, 1.0 + 2.0**-9, 1.0, -1.0]


def planted_near_ties(B=64, V=300, d=64, seed=0):
    """Rows whose two best keys differ by a relative 2^-20: below TF32/bf16 input rounding, far above
    float64 rounding. Rows 0, 2, 4, ... have the *later* index as the real best (a low-precision tie
    then picks the wrong one by the first-index rule); rows 1, 5, 9, ... the earlier one."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(V, d, generator=g, dtype=torch.float64)
    queries = torch.randn(B, d, generator=g, dtype=torch.float64)
    center = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    scale = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    bias = 0.1 * torch.randn(V, generator=g, dtype=torch.float64)
    perm = torch.randperm(V, generator=g)
    planted = torch.arange(0, B, 2)
    for n, i in enumerate(planted.tolist()):
        lo, hi = sorted(perm[2 * n: 2 * n + 2].tolist())
        q = queries[i] - center
        strong = 4.0 * math.sqrt(d) * q / q.norm()
        small, large = strong, strong * (1.0 + 2.0**-20)
        keys[lo], keys[hi] = (small, large) if n % 2 == 0 else (large, small)
        bias[hi] = bias[lo]
    self_index = torch.full((B,), -1, dtype=torch.int64)
    return queries, keys, self_index, dict(scale=scale, center=center, bias=bias), planted


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_recovery_fixes_simulated_low_precision(precision, monkeypatch):
    queries, keys, self_index, kw, planted = planted_near_ties()
    ref = top2_reference(queries, keys, self_index, **kw)
    fast_results = []

    def simulated_fast(backend, q, k, si, scale, center, bias, prec, **_):
        assert prec == precision
        rnd = round_tf32 if prec == "tf32" else (lambda t: t.to(torch.bfloat16).float())
        qc = q if center is None else q - center  # centred in fp32, then rounded, as the launcher does
        out = top2_torch(rnd(qc), rnd(k), si, scale=scale, bias=bias)
        # A copy: top2_exact writes its recovered indices into the fast result's tensors on the CPU.
        fast_results.append(Top2(*(t.clone() for t in (out.best_val, out.best_idx, out.second_val,
                                                        out.second_idx, out.self_val))))
        return out

    monkeypatch.setattr(screen, "_fast_top2", simulated_fast)
    res, n_redo = top2_exact(queries, keys, self_index, precision=precision,
                             **{f"{k}64": v for k, v in kw.items()})
    fast = fast_results[0]
    wrong = (fast.best_idx[planted] != ref.best_idx[planted]).sum().item()
    assert wrong >= 5, "the simulated low-precision pass should get planted rows wrong"
    assert n_redo >= len(planted)  # every planted row is a near tie at this precision
    assert torch.equal(res.best_idx, ref.best_idx)
    assert torch.equal(res.second_idx, ref.second_idx)
    torch.testing.assert_close(res.best_val, ref.best_val, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.second_val, ref.second_val, rtol=1e-12, atol=1e-12)
