"""Model sources: Hugging Face directories and objects, TransformerLens objects, model names offline, and
witnesses checked against the model's own final norm + unembedding (engine.modelcheck)."""
import json
import math
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from unspeakable.engine.enrich import enrich  # noqa: E402
from unspeakable.engine.loader import InputError, fold, load  # noqa: E402
from unspeakable.engine.modelcheck import check_witnesses, hidden_states  # noqa: E402
from unspeakable.engine.pipeline import check, scan_head  # noqa: E402
from unspeakable.engine.screen import witness_points  # noqa: E402
from realheads import SMOLLM2_MISSING, smollm2_path  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt2(path=None, V=48, d=16):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=d, n_head=2, vocab_size=V, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # unit-scale rows and a non-trivial final LayerNorm
        model.transformer.wte.weight.normal_(0, 1)
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.normal_(0, 0.3)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def tiny_llama(path=None, V=40, d=16):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1)
        model.model.norm.weight.uniform_(0.5, 1.5)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def own_logits(model, H: np.ndarray) -> np.ndarray:
    """The model's final norm + unembedding, reached by attribute, float64 out."""
    norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    with torch.no_grad():
        return model.lm_head(norm(torch.from_numpy(H).float())).double().numpy()


def folded_logits(head, H: np.ndarray) -> np.ndarray:
    """Folded rows and bias at x = the norm without its affine part (DESIGN §1)."""
    P = fold(head)
    eps = 1e-5
    if head.norm == "layernorm":
        Hc = H - H.mean(1, keepdims=True)
        X = Hc / np.sqrt((Hc ** 2).mean(1, keepdims=True) + eps)
    else:
        X = H / np.sqrt((H ** 2).mean(1, keepdims=True) + eps)
    return X @ P.rows.T + P.bias


# --------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_directory_and_object_fold_to_the_models_logits(tmp_path, make):
    model = make(tmp_path / "m")
    H = np.random.default_rng(0).standard_normal((32, 16)) * 3
    want = own_logits(model, H)
    for head in (load(str(tmp_path / "m")), load(model)):
        assert head.gram_center and head.model["kind"] == "torch"
        np.testing.assert_allclose(folded_logits(head, H), want, rtol=2e-5, atol=2e-5)
    with pytest.raises(InputError, match="got int"):
        load(42)


def test_transformerlens_bridge_object(tmp_path):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    model = tiny_gpt2(tmp_path / "m")
    bridge = bridge_mod.TransformerBridge.boot_transformers(str(tmp_path / "m"), device="cpu")
    head = load(bridge)
    H = np.random.default_rng(1).standard_normal((16, 16))
    np.testing.assert_allclose(folded_logits(head, H), own_logits(model, H), rtol=2e-5, atol=2e-5)
    assert head.source.startswith("TransformerBridge")


class HookedLike(torch.nn.Module):
    """The attributes a TransformerLens 3.x HookedTransformer exposes to us: W_U, b_U, ln_final, unembed."""

    class Unembed(torch.nn.Module):
        def __init__(self, W_U, b_U):
            super().__init__()
            self.W_U, self.b_U = torch.nn.Parameter(W_U), torch.nn.Parameter(b_U)

        def forward(self, x):
            return x @ self.W_U + self.b_U

    def __init__(self, d=12, V=30):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.unembed = self.Unembed(torch.randn(d, V, generator=g), torch.randn(V, generator=g) * 0.1)
        self.ln_final = torch.nn.LayerNorm(d)
        with torch.no_grad():
            self.ln_final.weight.uniform_(0.5, 1.5, generator=g)
            self.ln_final.bias.normal_(0, 0.2, generator=g)

    @property
    def W_U(self):
        return self.unembed.W_U

    @property
    def b_U(self):
        return self.unembed.b_U


def test_hooked_transformer_style_object():
    m = HookedLike()
    head = load(m)
    assert head.norm == "layernorm" and head.b_U is not None
    H = np.random.default_rng(2).standard_normal((10, 12))
    with torch.no_grad():
        want = m.unembed(m.ln_final(torch.from_numpy(H).float())).double().numpy()
    np.testing.assert_allclose(folded_logits(head, H), want, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------- names offline
# One fresh process (the Hugging Face switches are read at import) serves both tests: with HF_HOME holding a
# cached tiny model and neither offline variable set, it first scans the uncached name "gpt2" through the CLI
# (timed), then loads the cached name. In that order: loading a cached name turns the process offline, which
# would let the uncached one fail fast for the wrong reason.
NAMES_SCRIPT = """
import json, sys, time, traceback
import numpy as np, torch, huggingface_hub
from unspeakable.engine.cli import main
t = time.perf_counter()
rc = main(["scan", "gpt2"])
out = {"rc": rc, "elapsed": time.perf_counter() - t}
sys.stderr.flush()
try:
    from unspeakable.engine.loader import load
    h = load("tiny-org/tiny-gpt2")
    out["equal"] = bool(np.array_equal(h.W_U, np.load(sys.argv[1])))
    out["norm"] = h.norm
except Exception:
    out["error"] = traceback.format_exc()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def names_offline(tmp_path_factory):
    """A model in the Hugging Face cache layout (models--org--name/snapshots/REV), and the process's result."""
    tmp_path = tmp_path_factory.mktemp("names")
    snap = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-gpt2" / "snapshots" / "0123abcd"
    model = tiny_gpt2(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    np.save(tmp_path / "want.npy", model.lm_head.weight.detach().numpy().T)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-c", NAMES_SCRIPT, str(tmp_path / "want.npy")], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0 and "RESULT " in p.stdout, p.stderr[-2000:]
    return json.loads(p.stdout.split("RESULT ")[1]), p.stderr


def test_uncached_name_fails_fast_without_network(names_offline):
    out, stderr = names_offline
    assert out["rc"] == 2, stderr
    assert "not in the local Hugging Face cache" in stderr and "checkpoint directory" in stderr
    assert out["elapsed"] < 5.0  # the hub is never asked: no retries


def test_cached_name_loads_offline(names_offline):
    """A model in the Hugging Face cache layout (models--org--name/snapshots/REV) loads by name, offline."""
    out, stderr = names_offline
    assert "error" not in out, out.get("error")
    assert out["equal"] and out["norm"] == "layernorm", stderr[-2000:]


# --------------------------------------------------------------------------------------------- model check
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_witnesses_hold_in_the_model(make):
    model = make()
    head = load(model)
    rep = enrich(scan_head(head, device="cpu", backend="torch"), head)
    checked = [t for t in rep.tokens if t.model_check is not None]
    assert checked and all(t.verdict == "speakable" for t in checked)
    P = fold(head)
    eps = model.config.layer_norm_epsilon if hasattr(model.config, "layer_norm_epsilon") else model.config.rms_norm_eps
    for t in checked:
        x = t.certificate["x"]
        x = witness_points(P, np.array([t.id]))[0] if isinstance(x, str) else np.asarray(x)
        h = hidden_states(x[None], eps)
        logits = own_logits(model, h)[0]  # the oracle: the model's own modules, reached by attribute
        if t.model_check == "ok":
            assert int(np.argmax(logits)) == t.id
        ulp = np.finfo(np.float32).eps * np.abs(logits).max()  # two float32 evaluations may differ by ulps
        np.testing.assert_allclose(logits[t.id] - np.delete(logits, t.id).max(), t.model_margin, rtol=0, atol=8 * ulp)
    assert "model_check" in rep.to_json()["tokens"][[t.id for t in rep.tokens].index(checked[0].id)]


def test_hidden_states_reach_the_witness():
    """The norm of h(x) is x: LayerNorm and RMSNorm without their affine parts, with eps."""
    rng = np.random.default_rng(4)
    d, eps = 24, 1e-5
    X = rng.standard_normal((6, d))
    X -= X.mean(1, keepdims=True)
    X *= (np.sqrt(d) * rng.uniform(0.5, 0.999999, 6) / np.linalg.norm(X, axis=1))[:, None]
    H = hidden_states(X, eps)
    np.testing.assert_allclose(H / np.sqrt((H ** 2).mean(1, keepdims=True) + eps), X, rtol=1e-9, atol=1e-12)
    Hc = H - H.mean(1, keepdims=True)
    np.testing.assert_allclose(Hc / np.sqrt(Hc.var(1, keepdims=True) + eps), X, rtol=1e-9, atol=1e-12)


def test_a_margin_below_float32_resolution_is_fragile():
    model = tiny_llama()
    with torch.no_grad():  # token 2 = token 1 scaled by 1 + 2^-22: it wins where u_1·x > 0, by two float32 ulps
        w = model.lm_head.weight
        w[2] = w[1] * (1 + 2.0 ** -22)
    head = load(model)
    P = fold(head)
    if (P.rows[2] == P.rows[1]).all():  # float32 rounded the scaling away: a tie, not what this test is about
        pytest.skip("rows identical in float32")
    reports = check(head, [2, 5])
    wit = {r.id: r for r in reports if r.verdict == "speakable"}
    assert 2 in wit, [(r.id, r.verdict, r.reason) for r in reports]
    X = np.stack([witness_points(P, np.array([t]))[0] if isinstance(wit[t].certificate["x"], str)
                  else np.asarray(wit[t].certificate["x"]) for t in wit])
    res = dict(zip(wit, check_witnesses(head, list(wit), X)))
    assert res[2]["status"] == "fragile" and res[2]["margin"] <= res[2]["resolution"]
    if 5 in res:
        assert res[5]["status"] == "ok"


needs_smol = pytest.mark.skipif(smollm2_path() is None, reason=SMOLLM2_MISSING)


@needs_smol
def test_smollm2_witnesses_in_the_models_float32(shared):
    head = shared.head(smollm2_path())  # load(path), shared with test_gguf (once per session)
    tokens = [190, 1929, 2, 103]  # found by search in a scan of ids 0-2000 (byte token \x00, " With", <|im_end|>, w)
    reports = [r for r in check(head, tokens) if r.verdict == "speakable"]
    assert len(reports) == len(tokens)
    X = np.stack([np.asarray(r.certificate["x"]) for r in reports])
    res = check_witnesses(head, [r.id for r in reports], X)
    # the oracle: numpy float64 RMSNorm (eps from the file) and the dequantized head, no torch
    eps = head.model["eps"]
    H = hidden_states(X, eps)
    Y = H / np.sqrt((H ** 2).mean(1, keepdims=True) + eps) * head.ln_w.astype(np.float64)
    L = Y @ np.asarray(head.W_U, dtype=np.float64)
    for r, got, row in zip(reports, res, L):
        assert int(np.argmax(row)) == r.id and got["argmax"] == r.id
        assert got["status"] == "ok"
        np.testing.assert_allclose(got["margin"], row[r.id] - np.delete(row, r.id).max(), rtol=1e-3, atol=1e-3)


def test_directory_with_a_tokenizer_keeps_raw_and_decoded_texts(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {("Ġ" if i % 2 else "") + f"t{i}": i for i in range(46)}
    vocab.update({"Ġthe": 46, "Ċ": 47})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    tiny_gpt2(tmp_path / "m")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(tmp_path / "m"))
    head = load(str(tmp_path / "m"))
    assert head.tokens[46] == "Ġthe" and head.texts[46] == " the" and head.texts[47] == "\n"
    assert head.text_scheme == "bytelevel"
    rep = enrich(scan_head(head, device="cpu", backend="torch"), head)
    assert all(t.token == head.tokens[t.id] for t in rep.tokens)


def _checks_oracle(L64: np.ndarray, ts: np.ndarray, fin: float) -> list[dict]:
    """The model check of whole float64 logit rows, as numpy states it: np.argmax (first index of the
    maximum), margin over every other token, resolution two ulps of the largest magnitude."""
    out = []
    for row, t in zip(L64, ts):
        others = np.delete(row, t)
        margin = row[t] - (others.max() if others.size else -np.inf)
        res = 2.0 * fin * np.max(np.abs(row))
        a = int(np.argmax(row))
        out.append({"status": "ok" if a == t and np.isfinite(margin) and margin > res else "fragile",
                    "argmax": a, "margin": float(margin), "resolution": float(res)})
    return out


@pytest.mark.parametrize("cols", [1, 3, 7, 50])
def test_tiled_reduction_equals_whole_rows(cols):
    """engine.modelcheck reduces each witness's logits tile by tile; the answer equals the whole row's:
    ties among the others keep the first index, a tie with the token itself goes to the smaller index
    (np.argmax), across tile edges, with a NaN row and an infinite logit."""
    from unspeakable.engine.modelcheck import _RowStats

    rng = np.random.default_rng(cols)
    n, V = 12, 50
    L = rng.integers(-4, 5, size=(n, V)).astype(np.float32)  # small integers: many exact ties
    ts = rng.integers(0, V, size=n)
    ts[0], ts[1] = 0, V - 1
    L[2, :] = 1.0; ts[2] = 30  # every logit tied: argmax 0, margin 0
    L[3, 10] = L[3, 40] = 9.0; ts[3] = 40  # a tie of the token (40) with an earlier one (10): argmax 10
    L[4, 10] = L[4, 40] = 9.0; ts[4] = 10  # ... and with a later one: argmax 10 = the token, margin 0
    L[5, 33] = np.inf
    L[6, 7] = np.nan
    st = _RowStats(torch.from_numpy(ts))
    for c0 in range(0, V, cols):
        st.add(torch.from_numpy(L[:, c0:c0 + cols].copy()), c0)
    fin = float(np.finfo(np.float32).eps)
    got, want = st.checks(fin), _checks_oracle(L.astype(np.float64), ts, fin)
    for k, (g, w) in enumerate(zip(got, want)):
        if k == 6:  # a NaN logit: fragile with a NaN margin (np.argmax would name the NaN's column)
            assert g["status"] == "fragile" and math.isnan(g["margin"])
            continue
        assert g == w or (g["status"] == w["status"] and g["argmax"] == w["argmax"]
                          and all(g[f] == w[f] or (math.isnan(g[f]) and math.isnan(w[f])) for f in ("margin", "resolution"))), (k, g, w)
    assert got[2]["argmax"] == 0 and got[3]["argmax"] == 10 and got[4]["argmax"] == 10 and got[4]["margin"] == 0.0


def test_gguf_head_check_in_column_tiles_equals_the_whole_logits(monkeypatch):
    """A GGUF-style head (our torch norm and unembedding, float32): the tiled check gives the argmax and
    status of the whole logits, and margins equal to float32 rounding (the tiles' GEMMs may sum in
    another order)."""
    import unspeakable.engine.modelcheck as mc
    from unspeakable.engine.head import head_from_arrays

    rng = np.random.default_rng(3)
    d, V, n = 16, 300, 40
    head = head_from_arrays(rng.standard_normal((d, V)).astype(np.float32), rng.standard_normal(V).astype(np.float32),
                            rng.uniform(0.5, 1.5, d).astype(np.float32), None, "rmsnorm")
    head.model = {"kind": "gguf", "dtype": "float32", "eps": 1e-6}
    X = rng.standard_normal((n, d))
    X *= (np.sqrt(d) * 0.99 / np.linalg.norm(X, axis=1))[:, None]
    ts = rng.integers(0, V, size=n)
    L = mc.model_logits(head, hidden_states(X, 1e-6)).double().numpy()
    ts[: n // 2] = L[: n // 2].argmax(axis=1)  # half of them the model's argmax: "ok" rows to compare too
    monkeypatch.setattr(mc, "COL_BLOCK", 37)
    monkeypatch.setattr(mc, "ROW_BLOCK", 16)
    got = check_witnesses(head, ts, X)
    want = _checks_oracle(L, ts, float(np.finfo(np.float32).eps))
    assert [g["argmax"] for g in got] == [w["argmax"] for w in want]
    assert [g["status"] for g in got] == [w["status"] for w in want] and {g["status"] for g in got} == {"ok", "fragile"}
    np.testing.assert_allclose([g["margin"] for g in got], [w["margin"] for w in want], rtol=1e-5, atol=1e-4)
