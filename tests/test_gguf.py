"""GGUF heads (engine.gguf): tensors against an independent reading of the bytes, shapes, norms, texts."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

gguf = pytest.importorskip("gguf")

from unspeakable.engine.loader import InputError, fold, load  # noqa: E402


from realheads import SMOLLM2_MISSING, smollm2_path  # noqa: E402

SMOL = smollm2_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason=SMOLLM2_MISSING)


def write_gguf(path, arch, tensors: dict, quant=None, d_model=None, tokens=None, tok_model="gpt2"):
    """A GGUF file with the given numpy tensors (numpy order: a head is [V, d]); quant quantizes 2-D ones."""
    w = gguf.GGUFWriter(str(path), arch)
    if d_model is not None:
        w.add_uint32(f"{arch}.embedding_length", d_model)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    if tokens is not None:
        w.add_string("tokenizer.ggml.model", tok_model)
        w.add_array("tokenizer.ggml.tokens", tokens)
    for name, a in tensors.items():
        if quant is not None and a.ndim == 2:
            q = gguf.quants.quantize(a.astype(np.float32), quant)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quant)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def q8_0_by_hand(raw: np.ndarray, n_cols: int) -> np.ndarray:
    """Q8_0 blocks read with numpy alone: per 32 values, a float16 scale then 32 int8 quants (34 bytes)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    blocks = raw.reshape(raw.shape[0], n_cols // 32, 34)
    scale = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # [rows, blocks, 1]
    q = blocks[:, :, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * q).reshape(raw.shape[0], n_cols)


# ------------------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smol(shared):
    if SMOL is None:
        pytest.skip(SMOLLM2_MISSING)
    return shared.head(SMOL)  # load(SMOL), once per session (test_models reads the same head)


@needs_smol
def test_smollm2_head_matches_the_bytes(smol):
    reader = gguf.GGUFReader(SMOL)
    t = {x.name: x for x in reader.tensors}
    assert "output.weight" not in t  # tied: the head is token_embd.weight
    emb = t["token_embd.weight"]
    assert emb.tensor_type.name == "Q8_0" and list(emb.shape) == [576, 49152]  # GGUF lists ne0 (d) first
    assert smol.W_U.shape == (576, 49152) and smol.norm == "rmsnorm" and smol.ln_b is None and smol.b_U is None
    rows = np.r_[0:64, 20000:20064, 49088:49152]
    by_hand = q8_0_by_hand(np.asarray(emb.data)[rows], 576)
    np.testing.assert_array_equal(np.asarray(smol.W_U)[:, rows].T, by_hand)
    norm_w = np.frombuffer(bytes(np.asarray(t["output_norm.weight"].data).tobytes()), dtype=np.float32)
    np.testing.assert_array_equal(smol.ln_w, norm_w)
    assert any("Q8_0" in w and "quantized head" in w for w in smol.warnings)
    assert any("Q8_0" in w for w in fold(smol).warnings)  # the warning reaches the report


def test_quantization_warning_in_the_json(tmp_path):
    from unspeakable.engine.cli import main

    E, g = random_head(V=40, d=32)
    p = write_gguf(tmp_path / "q.gguf", "llama", {"output.weight": E, "output_norm.weight": g},
                   quant=gguf.GGMLQuantizationType.Q8_0)
    assert main(["scan", p, "--device", "cpu", "--out", str(tmp_path / "r.json")]) == 0
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert any("dequantized from Q8_0" in w and "quantized head" in w for w in data["warnings"])
    assert data["gram"]["counted_with"] == "uncentred"


@needs_smol
def test_smollm2_texts(smol):
    assert smol.text_scheme == "bytelevel" and len(smol.texts) == 49152
    assert smol.tokens[0] == "<|endoftext|>" and smol.texts[0] == "<|endoftext|>"
    assert smol.tokens[198] == "Ċ" and smol.texts[198] == "\n"
    assert smol.texts[216] == " " and smol.tokens[216] == "Ġ"
    with_space = [i for i, s in enumerate(smol.tokens[:5000]) if s and s.startswith("Ġ") and len(s) > 1]
    assert with_space and all(smol.texts[i] == " " + smol.tokens[i][1:] for i in with_space if smol.tokens[i][1:].isascii())


# ------------------------------------------------------------------------------------------ written files
def random_head(V=64, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((V, d)).astype(np.float32), np.exp(0.2 * rng.standard_normal(d)).astype(np.float32)


def test_layernorm_arch_f32_orientation_and_bias(tmp_path):
    E, g = random_head()
    beta = np.linspace(-0.1, 0.1, 32).astype(np.float32)
    b = np.arange(64, dtype=np.float32) / 100
    p = write_gguf(tmp_path / "g.gguf", "gpt2", {"output.weight": E, "output.bias": b, "output_norm.weight": g,
                                                 "output_norm.bias": beta}, d_model=32)
    head = load(p)
    assert head.norm == "layernorm" and head.W_U.shape == (32, 64)
    np.testing.assert_array_equal(head.W_U, E.T)
    np.testing.assert_array_equal(head.b_U, b)
    np.testing.assert_array_equal(head.ln_b, beta)
    assert not any("quantized" in w for w in head.warnings)  # F32: no quantization warning
    assert head.model["eps"] == pytest.approx(1e-5)  # LayerNorm: layer_norm_epsilon


def test_output_weight_preferred_over_token_embd(tmp_path):
    E, g = random_head()
    p = write_gguf(tmp_path / "t.gguf", "llama", {"token_embd.weight": -E, "output.weight": E, "output_norm.weight": g})
    head = load(p)
    np.testing.assert_array_equal(head.W_U, E.T)
    assert head.model["head_tensor"] == "output.weight" and head.model["eps"] == pytest.approx(1e-6)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "BF16", "F16"])
def test_quantized_heads_dequantize(tmp_path, qtype):
    E, g = random_head(V=40, d=64)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    p = write_gguf(tmp_path / "q.gguf", "qwen2", {"output.weight": E, "output_norm.weight": g}, quant=qt)
    head = load(p)
    assert head.W_U.shape == (64, 40) and head.norm == "rmsnorm"
    err = np.abs(np.asarray(head.W_U).T - E).max()
    assert 0 < err < {"Q4_0": 0.6, "Q5_1": 0.3}.get(qtype, 0.05)  # lossy, but the same matrix
    assert any(f"from {qtype}" in w for w in head.warnings)
    if qtype == "Q8_0":
        raw = gguf.GGUFReader(p).tensors[0].data
        np.testing.assert_array_equal(np.asarray(head.W_U).T, q8_0_by_hand(np.asarray(raw), 64))


def test_gemma_gain_used_as_stored(tmp_path):
    """llama.cpp's converter stores Gemma's RMSNorm gain as 1 + w already: it must not be shifted again."""
    E, g = random_head()
    head = load(write_gguf(tmp_path / "gm.gguf", "gemma2", {"token_embd.weight": E, "output_norm.weight": g}))
    np.testing.assert_array_equal(head.ln_w, g)
    assert head.norm == "rmsnorm"


def test_unknown_arch_and_vocab(tmp_path):
    E, g = random_head(V=6, d=32)
    toks = ["<s>", "▁the", "▁a", "<0x0A>", "b", "▁"]
    p = write_gguf(tmp_path / "u.gguf", "newarch", {"output.weight": E, "output_norm.weight": g}, tokens=toks,
                   tok_model="llama")
    head = load(p)
    assert head.norm == "rmsnorm" and any("newarch" in w for w in head.warnings)
    assert head.tokens == toks and head.texts == ["<s>", " the", " a", "\n", "b", " "]


def test_bad_gguf_files(tmp_path):
    E, g = random_head()
    with pytest.raises(InputError, match="no head tensor"):
        load(write_gguf(tmp_path / "n.gguf", "llama", {"output_norm.weight": g}))
    with pytest.raises(InputError, match=r"embedding_length = 16"):
        load(write_gguf(tmp_path / "s.gguf", "llama", {"output.weight": E}, d_model=16))
    good = write_gguf(tmp_path / "ok.gguf", "llama", {"output.weight": E})
    data = open(good, "rb").read()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.gguf"):
        load(str(tmp_path / "trunc.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InputError, match="junk.gguf: cannot read GGUF"):
        load(str(tmp_path / "junk.gguf"))
