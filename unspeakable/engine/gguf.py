"""A head from a GGUF file (llama.cpp's format): unembedding, final norm, vocabulary.

Tensors (llama.cpp ``LLM_TENSOR_OUTPUT`` / ``OUTPUT_NORM`` / ``TOKEN_EMBD``):

* head: ``output.weight``; models with tied embeddings store none and llama.cpp uses ``token_embd.weight``.
  GGUF lists dimensions fastest-first (``ne[0]`` is the contiguous one), the reverse of numpy: a head of
  ``n_embd = 576`` and ``n_vocab = 49152`` is listed as ``[576, 49152]`` and dequantizes to a numpy
  ``[49152, 576]`` array, i.e. ``W_U.T``. Both orientations are checked against the metadata's
  ``<arch>.embedding_length``.
* bias: ``output.bias`` when present.
* final norm: ``output_norm.weight`` and ``output_norm.bias``. The norm *kind* is not stored: llama.cpp's
  graph for each architecture picks ``LLM_NORM_RMS`` or ``LLM_NORM`` (:data:`RMS_ARCHS`, :data:`LAYERNORM_ARCHS`).
  The stored gain is the one llama.cpp multiplies by: for Gemma 1-3 (and Nemotron's layernorm1p) the
  converter (``convert_hf_to_gguf.py``, ``modify_tensors``: ``data_torch = data_torch + 1`` for names ending
  in ``norm.weight``) already stored ``1 + w``, so the gain is used as stored — never add 1 again.
* eps: ``<arch>.attention.layer_norm_rms_epsilon`` or ``<arch>.attention.layer_norm_epsilon``.

Quantized tensors are dequantized with ``gguf.quants.dequantize`` (every type it implements: Q4_0 … Q8_0,
the K-quants, IQ*, TQ*, BF16, MXFP4 …); the verdicts then describe the quantized head, and the head carries
a warning saying so. Token texts come from ``tokenizer.ggml.tokens``; ``tokenizer.ggml.model`` names the
scheme (``gpt2`` byte-level BPE, ``llama`` SentencePiece, ``bert`` WordPiece).
"""
from __future__ import annotations

import os

import numpy as np

from unspeakable.engine.head import Head, InputError, head_from_arrays

# Final norm kind by ``general.architecture``, as llama.cpp's graph builds it (src/llama-model.cpp).
RMS_ARCHS = frozenset({
    "llama", "llama4", "mistral3", "deci", "qwen", "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "gemma",
    "gemma2", "gemma3", "gemma3n", "phi3", "phimoe", "minicpm", "minicpm3", "internlm2", "deepseek", "deepseek2",
    "baichuan", "chatglm", "glm4", "granite", "granitemoe", "olmo2", "olmoe", "mamba", "exaone", "arctic",
    "xverse", "grok", "openelm", "bitnet", "smollm3", "refact", "plamo", "cohere2", "ernie4_5", "hunyuan-moe",
})
LAYERNORM_ARCHS = frozenset({
    "gpt2", "gptj", "gptneox", "bloom", "falcon", "starcoder", "starcoder2", "mpt", "phi2", "stablelm",
    "persimmon", "codeshell", "orion", "command-r", "jais", "dbrx", "nemotron", "bert", "nomic-bert",
    "jina-bert-v2", "rwkv6", "olmo",
})
TEXT_SCHEMES = {"gpt2": "bytelevel", "llama": "sentencepiece", "bert": "wordpiece"}
HEAD_TENSORS = ("output.weight", "token_embd.weight")


def _reader(path: str):
    try:
        import gguf
    except ImportError as e:
        raise InputError(f"{path}: reading .gguf files needs the gguf package (pip install gguf): {e}") from e
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # bad magic, truncated header or tensor data: ValueError, struct.error, OSError, ...
        raise InputError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e}); "
                         f"is the file truncated or not a GGUF file?") from e


def _field(reader, key: str):
    """A metadata value (str, number or list), or None when absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        return None


def _strings(reader, key: str) -> list[str] | None:
    """A string-array field, decoded one entry at a time (invalid UTF-8 replaced, never refused)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]


def dequantized(path: str, tensor) -> np.ndarray:
    """A tensor as float32 numpy in numpy order (GGUF's dimension list reversed)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    data = np.asarray(tensor.data)
    try:
        if qtype == GGMLQuantizationType.F64:
            out = data.view(np.float64).astype(np.float32)
        else:
            out = dequantize(data, qtype)
    except NotImplementedError as e:
        raise InputError(f"{path}: tensor {tensor.name} has type {qtype.name}, which gguf cannot dequantize ({e})") from e
    shape = tuple(int(s) for s in reversed(tensor.shape.tolist()))
    try:
        return np.asarray(out, dtype=np.float32).reshape(shape)
    except ValueError as e:
        raise InputError(f"{path}: tensor {tensor.name} ({qtype.name}) dequantized to {out.shape}, which does not "
                         f"fit its GGUF shape {list(tensor.shape)}; is the file truncated?") from e


def _norm_kind(path: str, arch: str, has_bias: bool, warnings: list[str]) -> str:
    if arch in RMS_ARCHS:
        return "rmsnorm"
    if arch in LAYERNORM_ARCHS:
        return "layernorm"
    kind = "layernorm" if has_bias else "rmsnorm"
    warnings.append(f"{path}: architecture {arch!r} is not in this tool's table of llama.cpp final norms: "
                    f"assuming {kind} because output_norm.bias is {'present' if has_bias else 'absent'}")
    return kind


def read_gguf(path: str) -> dict:
    """Everything :func:`load_gguf` needs, as plain numpy arrays and values (see the module docstring).

    Returns:
        dict with ``W_U`` [d_model, d_vocab] float32, ``b_U``, ``ln_w``, ``ln_b`` (or None), ``norm``,
        ``eps``, ``arch``, ``head_tensor``, ``qtype``, ``tokens`` (raw strings or None), ``scheme``, ``warnings``.
    """
    reader = _reader(path)
    arch = str(_field(reader, "general.architecture") or "")
    tensors = {t.name: t for t in reader.tensors}
    name = next((n for n in HEAD_TENSORS if n in tensors), None)
    if name is None:
        raise InputError(f"{path}: no head tensor: neither output.weight nor token_embd.weight is in the file")
    t = tensors[name]
    if len(t.shape) != 2:
        raise InputError(f"{path}: {name} has GGUF shape {list(t.shape)}; expected 2 dimensions [n_embd, n_vocab]")
    d_model = _field(reader, f"{arch}.embedding_length")
    if d_model is not None and int(t.shape[0]) != int(d_model):
        raise InputError(f"{path}: {name} has GGUF shape {list(t.shape)} but {arch}.embedding_length = {d_model}; "
                         f"expected [n_embd, n_vocab] = [{d_model}, ...]")
    rows = dequantized(path, t)  # [d_vocab, d_model]
    vec = {k: dequantized(path, tensors[k]).reshape(-1) if k in tensors else None
           for k in ("output.bias", "output_norm.weight", "output_norm.bias")}
    warnings: list[str] = []
    qtype = t.tensor_type.name
    if qtype not in ("F32", "F64"):
        warnings.append(f"weights dequantized from {qtype} ({name}): verdicts describe the quantized head")
    ln_w, ln_b = vec["output_norm.weight"], vec["output_norm.bias"]
    norm = "none" if ln_w is None and ln_b is None else _norm_kind(path, arch, ln_b is not None, warnings)
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon" if norm == "rmsnorm"
                 else f"{arch}.attention.layer_norm_epsilon")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    scheme = TEXT_SCHEMES.get(str(_field(reader, "tokenizer.ggml.model") or ""), None)
    return {"W_U": rows.T, "b_U": vec["output.bias"], "ln_w": ln_w, "ln_b": ln_b, "norm": norm,
            "eps": None if eps is None else float(eps), "arch": arch, "head_tensor": name, "qtype": qtype,
            "tokens": tokens, "scheme": scheme, "warnings": warnings}


def load_gguf(path: str) -> Head:
    """A :class:`Head` from a ``.gguf`` file, with token texts and the quantization warning.

    Raises:
        InputError: unreadable file, no head tensor, a shape that disagrees with the metadata.
    """
    from unspeakable.engine.text import decode, detect_scheme

    path = os.fspath(path)
    g = read_gguf(path)
    tokens = g["tokens"]
    scheme = g["scheme"] or (detect_scheme(tokens) if tokens else "plain")
    texts = None if tokens is None else [decode(tok, scheme) for tok in tokens]
    head = head_from_arrays(g["W_U"], g["b_U"], g["ln_w"], g["ln_b"], g["norm"], source=path, texts=texts)
    head.tokens = None if tokens is None else (list(tokens) + [None] * head.d_vocab)[: head.d_vocab]
    head.text_scheme = scheme
    head.warnings.extend(g["warnings"])
    head.model = {"kind": "gguf", "arch": g["arch"], "eps": g["eps"], "dtype": "float32",
                  "head_tensor": g["head_tensor"], "qtype": g["qtype"]}
    return head
