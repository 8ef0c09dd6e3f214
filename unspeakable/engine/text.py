"""Token text: what a vocabulary entry stands for, and a form of it a person can read unambiguously.

Two steps, kept apart because reports need both:

1. **decode** — a raw vocabulary entry (the string stored in ``tokenizer.json``, ``vocab.json``, a GGUF file's
   ``tokenizer.ggml.tokens``) to the text it produces. Schemes:

   * ``bytelevel`` — GPT-2 style byte-level BPE: every byte is stored as one printable character
     (``Ġ`` is the space byte, ``Ċ`` the newline byte); decoding maps characters back to bytes and reads
     UTF-8. A token can hold part of a multi-byte character: the incomplete bytes decode to U+FFFD, as
     Hugging Face's ``decode`` does.
   * ``sentencepiece`` — ``▁`` (U+2581) is a space; byte tokens ``<0x0A>`` stand for one byte.
   * ``wordpiece`` / ``plain`` — the entry is the text (``##ing`` keeps its continuation mark).

2. **escape** — a display form in which nothing is invisible or ambiguous (:func:`escape`):

   * ``\\n`` ``\\t`` ``\\r``, other control characters as ``\\xNN`` (C0, DEL, C1);
   * invisible or confusable characters as ``\\uXXXX``: format characters (zero-width space/joiners, BOM,
     bidi marks, soft hyphen), every space character except the plain space (NBSP, en/em spaces, ideographic
     space, line/paragraph separators), combining marks at the start of a token, and private-use or
     unassigned code points;
   * a plain space at the start or end of a token as ``␣`` (U+2423); interior spaces stay;
   * the backslash itself as ``\\\\`` and a literal ``␣`` as ``\\u2423``, so the display form is unambiguous;
   * bytes that are not valid UTF-8 (only from :func:`display_token`, which sees the raw bytes) as ``\\xNN``;
   * the empty string as ``\\∅`` (a backslash sequence no other text produces).
"""
from __future__ import annotations

import json
import unicodedata
from functools import lru_cache

SCHEMES = ("bytelevel", "sentencepiece", "wordpiece", "plain")
SPACE_MARK = "\u2423"  # ␣ OPEN BOX
EMPTY = "\\\u2205"  # \∅: the empty string (every other backslash sequence is \\ \n \t \r \xNN \uXXXX)
SP_SPACE = "\u2581"  # ▁ LOWER ONE EIGHTH BLOCK: SentencePiece's space
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", SPACE_MARK: "\\u2423"}


# --------------------------------------------------------------------------------------------- decode
@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ unicode table, inverted: printable character → the byte it stands for.

    Bytes that are printable Latin-1 (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other
    68 bytes are mapped, in order, to U+0100 onwards (so the space byte 0x20 is ``Ġ`` U+0120 and the
    newline 0x0A is ``Ċ`` U+010A).
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def _sp_byte(token: str) -> int | None:
    """The byte of a SentencePiece byte token ``<0xNN>``, else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def token_bytes(token: str, scheme: str) -> bytes | None:
    """The bytes a raw token stands for, or None when the scheme does not define them (``plain``,
    ``wordpiece``, or a byte-level entry with characters outside the byte table, e.g. ``<|endoftext|>``)."""
    if scheme == "bytelevel":
        table = byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return None
    if scheme == "sentencepiece":
        b = _sp_byte(token)
        return bytes([b]) if b is not None else token.replace(SP_SPACE, " ").encode("utf-8")
    return None


def decode(token: str | None, scheme: str) -> str | None:
    """The text a raw vocabulary entry produces (invalid UTF-8 as U+FFFD, like Hugging Face's decode)."""
    if token is None:
        return None
    _check_scheme(scheme)
    b = token_bytes(token, scheme)
    return token if b is None else b.decode("utf-8", errors="replace")


def detect_scheme(tokens) -> str:
    """Guess the scheme of a vocabulary from its entries.

    Byte-level BPE stores the space byte as ``Ġ`` and never holds a raw space or control byte; SentencePiece
    marks spaces with ``▁`` and stores ``<0xNN>`` byte tokens; WordPiece marks continuations with ``##``.
    """
    toks = [t for t in tokens if isinstance(t, str)]
    if not toks:
        return "plain"
    n = len(toks)
    sp = sum(t.startswith(SP_SPACE) for t in toks) + sum(_sp_byte(t) is not None for t in toks)
    g = sum(t.startswith("Ġ") for t in toks)
    wp = sum(t.startswith("##") for t in toks)
    if sp >= max(g, wp) and sp >= 0.02 * n:
        return "sentencepiece"
    raw_space = sum(" " in t or "\n" in t for t in toks)  # byte-level BPE stores none (added tokens may)
    if g >= 0.02 * n and raw_space <= 0.01 * n:
        return "bytelevel"
    if wp >= 0.02 * n:
        return "wordpiece"
    return "plain"


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown token text scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


# --------------------------------------------------------------------------------------------- escape
def _invisible(c: str, at_start: bool) -> bool:
    cat = unicodedata.category(c)
    if cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return True
    if cat == "Zs" and c != " ":
        return True
    return at_start and cat in ("Mn", "Me")  # a combining mark with nothing to combine with


def _escape_char(c: str) -> str:
    o = ord(c)
    if c in _NAMED:
        return _NAMED[c]
    if o < 0x100:
        return f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:  # surrogateescape: an undecodable byte
        return f"\\x{o - 0xDC00:02x}"
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def escape(s: str | None) -> str | None:
    """Display form of a text: nothing invisible, nothing ambiguous (rules in the module docstring)."""
    if s is None:
        return None
    if s == "":
        return EMPTY
    n_lead = len(s) - len(s.lstrip(" "))
    n_trail = len(s) - len(s.rstrip(" ")) if n_lead < len(s) else 0
    out = [SPACE_MARK] * n_lead
    for i in range(n_lead, len(s) - n_trail):
        c = s[i]
        if c in _NAMED or _invisible(c, at_start=(i == n_lead)):
            out.append(_escape_char(c))
        else:
            out.append(c)
    out.extend([SPACE_MARK] * n_trail)
    return "".join(out)


def display_token(token: str | None, scheme: str) -> str | None:
    """Display form of a raw token: decoded, then escaped; bytes that are not valid UTF-8 show as ``\\xNN``."""
    if token is None:
        return None
    _check_scheme(scheme)
    b = token_bytes(token, scheme)
    return escape(token if b is None else b.decode("utf-8", errors="surrogateescape"))


# --------------------------------------------------------------------------------------------- vocab files
def read_vocab(path: str) -> tuple[list[str | None], str]:
    """Raw tokens by id and their scheme, from a vocabulary file.

    Accepted: a JSON list of strings (index = id; ``null`` for ids without text); a Hugging Face
    ``tokenizer.json`` (``model.vocab`` as a token → id map or, for Unigram, a list of ``[token, score]``,
    plus ``added_tokens``); a ``vocab.json`` token → id map; a ``vocab.txt`` with one token per line.

    Raises:
        InputError: naming the file and what is wrong with it.
    """
    from unspeakable.engine.head import InputError

    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--vocab {path}: cannot read ({type(e).__name__}: {e})") from e
    if path.endswith(".txt"):
        tokens: list[str | None] = raw.split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return tokens, detect_scheme(tokens)
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InputError(f"--vocab {path}: not JSON ({e}); expected a JSON list of strings, a tokenizer.json, "
                         f"a vocab.json or a vocab.txt") from e
    return _vocab_from_json(path, data)


def _vocab_from_json(path: str, data) -> tuple[list[str | None], str]:
    from unspeakable.engine.head import InputError

    if isinstance(data, list):
        bad = [i for i, t in enumerate(data) if t is not None and not isinstance(t, str)]
        if bad:
            raise InputError(f"--vocab {path}: entries {bad[:10]} are not strings; expected a JSON list of strings")
        return list(data), detect_scheme(data)
    if not isinstance(data, dict):
        raise InputError(f"--vocab {path}: expected a JSON list or object, got {type(data).__name__}")
    model = data.get("model") if isinstance(data.get("model"), dict) else None
    scheme = None
    if model is not None:  # tokenizer.json
        vocab = model.get("vocab")
        if isinstance(vocab, list):  # Unigram: [[token, score], ...], index = id
            mapping = {str(e[0]): i for i, e in enumerate(vocab) if isinstance(e, (list, tuple)) and e}
        elif isinstance(vocab, dict):
            mapping = dict(vocab)
        else:
            raise InputError(f"--vocab {path}: tokenizer.json has no model.vocab")
        for a in data.get("added_tokens") or ():
            if isinstance(a, dict) and "content" in a and "id" in a:
                mapping[str(a["content"])] = a["id"]
        scheme = _scheme_from_tokenizer_json(data)
    else:  # vocab.json
        mapping = data
    bad = [k for k, v in mapping.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise InputError(f"--vocab {path}: ids of {bad[:5]} are not non-negative integers")
    tokens: list[str | None] = [None] * (max(mapping.values(), default=-1) + 1)
    for tok, i in mapping.items():
        tokens[i] = tok
    return tokens, scheme or detect_scheme(tokens)


def _scheme_from_tokenizer_json(data: dict) -> str | None:
    """The decoder named in a tokenizer.json, when it settles the scheme."""
    text = json.dumps(data.get("decoder") or {}) + json.dumps(data.get("pre_tokenizer") or {})
    if "ByteLevel" in text:
        return "bytelevel"
    if "Metaspace" in text or "ByteFallback" in text or SP_SPACE in text:
        return "sentencepiece"
    if "WordPiece" in text:
        return "wordpiece"
    return None

