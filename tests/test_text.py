"""Token text (engine.text): decoding against the tokenizers library, the escaper, vocabulary files."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from unspeakable.engine.loader import InputError, head_from_arrays, load  # noqa: E402
from unspeakable.engine.text import (  # noqa: E402
    byte_decoder,
    decode,
    detect_scheme,
    display_token,
    escape,
    read_vocab,
    token_bytes,
)


def gpt2_table() -> dict:
    """GPT-2's byte → unicode table from transformers (the oracle for ours)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def test_byte_table_is_gpt2s():
    table = gpt2_table()
    assert {c: b for b, c in table.items()} == byte_decoder()
    assert byte_decoder()["Ġ"] == 0x20 and byte_decoder()["Ċ"] == 0x0A


def test_bytelevel_decode_matches_the_tokenizers_decoder():
    from tokenizers import decoders

    table = gpt2_table()
    rng = np.random.default_rng(0)
    samples = ["Ġhello", "Ċ", "ĠĠ", "âĢ", "âĢĶ", "Ã©", "<|endoftext|>"]
    for _ in range(300):  # random byte strings, including broken UTF-8
        samples.append("".join(table[int(b)] for b in rng.integers(0, 256, rng.integers(1, 6))))
    dec = decoders.ByteLevel()
    for tok in samples:
        assert decode(tok, "bytelevel") == dec.decode([tok]), tok


def test_sentencepiece_decode_matches_the_tokenizers_decoder():
    from tokenizers import decoders

    dec = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    for tok in ["▁the", "▁", "<0x0A>", "<0x20>", "ab▁c", "<0xZZ>", "<s>"]:
        assert decode(tok, "sentencepiece") == dec.decode([tok]), tok
    assert token_bytes("<0xE2>", "sentencepiece") == b"\xe2"


@pytest.mark.parametrize("text, shown", [
    ("the", "the"),
    (" the", "␣the"),
    ("the  ", "the␣␣"),
    ("   ", "␣␣␣"),
    ("a b", "a b"),
    ("\n", "\\n"),
    ("\t\r", "\\t\\r"),
    ("\x00\x7f\x85", "\\x00\\x7f\\x85"),
    ("a\u200bb", "a\\u200bb"),  # zero-width space
    ("\u00a0x", "\\xa0x"),  # no-break space
    ("\ufeff", "\\ufeff"),  # BOM
    ("\u2028", "\\u2028"),  # line separator
    ("\u0301e", "\\u0301e"),  # a combining mark with nothing before it
    ("e\u0301", "e\u0301"),  # ... and one that combines
    ("back\\slash", "back\\\\slash"),
    ("␣", "\\u2423"),  # a literal open box cannot be mistaken for a space
    ("", "\\∅"),
    ("日本", "日本"),
    (None, None),
])
def test_escape(text, shown):
    assert escape(text) == shown


def test_escape_is_unambiguous():
    texts = [" ", "␣", "\\", "\\\\", "\n", "\\n", "", '""', "\u200b", "\\u200b", "a ", "a␣"]
    shown = [escape(t) for t in texts]
    assert len(set(shown)) == len(texts), shown
    assert all(c.isprintable() for s in shown for c in s)


def test_display_token_shows_broken_utf8_bytes():
    assert display_token("âĢ", "bytelevel") == "\\xe2\\x80"  # half of a 3-byte character
    assert display_token("ĠâĢĶ", "bytelevel") == "␣—"
    assert display_token("Ċ", "bytelevel") == "\\n"
    assert display_token("▁▁x", "sentencepiece") == "␣␣x"
    assert display_token("##ing", "wordpiece") == "##ing"


def test_detect_scheme():
    assert detect_scheme(["Ġthe", "Ġa", "b", "Ċ"] * 10) == "bytelevel"
    assert detect_scheme(["▁the", "<0x0A>", "b"] * 10) == "sentencepiece"
    assert detect_scheme(["[CLS]", "##ing", "the"] * 10) == "wordpiece"
    assert detect_scheme(["the", "a b"]) == "plain"


# --------------------------------------------------------------------------------------------- vocab files
def test_read_vocab_formats(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"Ġthe": 0, "a": 1, "Ċ": 2, "b": 3}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    tokens, scheme = read_vocab(str(tmp_path / "tokenizer.json"))
    assert tokens == ["Ġthe", "a", "Ċ", "b", "<|end|>"] and scheme == "bytelevel"

    (tmp_path / "vocab.json").write_text(json.dumps({"b": 1, "a": 0, "c": 3}))
    assert read_vocab(str(tmp_path / "vocab.json"))[0] == ["a", "b", None, "c"]
    (tmp_path / "vocab.txt").write_text("[PAD]\nhello\n##lo\n")
    assert read_vocab(str(tmp_path / "vocab.txt"))[0] == ["[PAD]", "hello", "##lo"]
    (tmp_path / "list.json").write_text(json.dumps(["x", "▁y", None]))
    assert read_vocab(str(tmp_path / "list.json"))[0] == ["x", "▁y", None]


@pytest.mark.parametrize("content, match", [
    ("{not json", "not JSON"),
    ("[1, 2]", r"entries \[0, 1\] are not strings"),
    ('{"a": -1}', "not non-negative integers"),
    ('"a string"', "expected a JSON list or object"),
])
def test_read_vocab_bad(tmp_path, content, match):
    p = tmp_path / "v.json"
    p.write_text(content)
    with pytest.raises(InputError, match=match):
        read_vocab(str(p))


def test_tokens_key_in_npz_and_vocab_option(tmp_path):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 5)).astype(np.float32)
    toks = np.array(["Ġthe", "Ċ", "a", "Ġb", "ĠĠ"])
    np.savez(tmp_path / "h.npz", W_U=W, tokens=toks)
    head = load(str(tmp_path / "h.npz"))
    assert head.tokens == list(toks) and head.texts == [" the", "\n", "a", " b", "  "]
    (tmp_path / "v.json").write_text(json.dumps(["x", "y"]))
    head = load(str(tmp_path / "h.npz"), vocab=str(tmp_path / "v.json"))
    assert head.texts == ["x", "y", None, None, None]  # a shorter vocabulary leaves the padding without text
    (tmp_path / "big.json").write_text(json.dumps(["x"] * 6))
    with pytest.raises(InputError, match="6 tokens, but W_U .8, 5. has d_vocab = 5"):
        load(str(tmp_path / "h.npz"), vocab=str(tmp_path / "big.json"))
    np.savez(tmp_path / "bad.npz", W_U=W, tokens=np.arange(5))
    with pytest.raises(InputError, match="bad.npz: tokens must be a 1-D array of strings"):
        load(str(tmp_path / "bad.npz"))
    assert head_from_arrays(W).texts is None


def test_cli_vocab(tmp_path, capsys):
    from unspeakable.engine.cli import main

    W = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    W[:, 1], W[:, 3] = 2 * W[:, 0], 3 * W[:, 2]  # tokens 0 and 2 are hard-to-speak: the gram report lists them
    np.savez(tmp_path / "h.npz", W_U=W)
    (tmp_path / "v.json").write_text(json.dumps(["Ġa", "Ċ", "b", "ĠĠ"]))
    out = tmp_path / "g.json"
    assert main(["gram", str(tmp_path / "h.npz"), "--vocab", str(tmp_path / "v.json"), "--no-center",
                 "--device", "cpu", "--out", str(out)]) == 0
    listed = json.loads(out.read_text())["tokens"]
    assert [t["id"] for t in listed] == [0, 2]
    for t in listed:
        assert (t["token"], t["text"]) == {0: ("Ġa", " a"), 1: ("Ċ", "\n"), 2: ("b", "b"), 3: ("ĠĠ", "  ")}[t["id"]]
    capsys.readouterr()
    assert main(["scan", str(tmp_path / "h.npz"), "--vocab", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "--vocab" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
