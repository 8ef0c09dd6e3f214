"""Shared types and input validation: the leaf module every stage imports (it imports no other stage).

* :class:`InputError` — bad input; the message names what is wrong and the CLI exits with status 2.
* :class:`Head` — an unembedding head as loaded (``W_U`` ``[d_model, d_vocab]``, ``b_U``, final-norm ``ln_w`` /
  ``ln_b``), validated by :func:`head_from_arrays`, the one path every source goes through.
* :func:`as_array` — the one conversion of numpy arrays, torch tensors (any device, bfloat16 included) and
  lists into numpy, never writing to the caller's memory.
* Verdict codes shared by the ledger, the report and the figures.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

NORMS = ("layernorm", "rmsnorm", "none")
MAX_IDS_SHOWN = 10  # ids named in one error message; the rest are counted

# Verdict codes over all V (int8 arrays): the one map between names and codes.
VERDICT_CODE = {"speakable": 1, "unspeakable": -1, "undecided": 0}
VERDICT_NAME = {v: k for k, v in VERDICT_CODE.items()}


class InputError(ValueError):
    """Bad input: the message names what is wrong. The CLI exits with status 2."""


@dataclass
class Head:
    """An unembedding head as loaded, before folding. Arrays are numpy, in the source's dtype; they may be
    the caller's own memory, so nothing downstream writes to them."""

    W_U: np.ndarray  # [d_model, d_vocab]
    b_U: np.ndarray | None  # [d_vocab]
    ln_w: np.ndarray | None  # [d_model]
    ln_b: np.ndarray | None  # [d_model]
    norm: str  # "layernorm" | "rmsnorm" | "none"
    source: str
    texts: list[str] | None = None  # decoded token strings, when a tokenizer is known
    planted: dict | None = None  # synthetic only: {"interior": [...], "duplicate": [[a, b], ...], ...}
    gram_center: bool = False  # gram screen rows TransformerLens-style (models) or as stored (files)
    warnings: list[str] = field(default_factory=list)  # carried into the report (e.g. quantized weights)
    tokens: list[str | None] | None = None  # raw vocabulary entries (e.g. "Ġthe"), when known (engine.text)
    text_scheme: str | None = None  # how ``tokens`` decode: bytelevel, sentencepiece, wordpiece, plain
    model: object = None  # what the model check needs: the model's own final norm and head (engine.modelcheck)

    @property
    def d_model(self) -> int:
        return int(self.W_U.shape[0])

    @property
    def d_vocab(self) -> int:
        return int(self.W_U.shape[1])


class FoldedRows:
    """The folded rows ``γ ⊙ u_j`` (float64) of a head whose fold is exact, computed on demand from the
    head's own ``W_U`` and gain: the same float64 values every time, without holding a ``V × d`` float64
    array beside the head (issue 17: at 262144 × 640 that array is 1.34 GB). Exact because every product
    is (``W_U`` and ``γ`` float16 / float32: 24 × 24 bits fit in float64's 53; no gain: a conversion).

    Indexed like the array it stands for: ``rows[t]``, ``rows[ids]``, ``rows[r0:r1]``, ``rows[ids, cols]``
    with one index array at most, each a fresh float64 array; :meth:`chunks` walks all rows; ``np.asarray``
    builds the whole array (what code that needs all of it at once pays). Nobody writes to it."""

    ndim = 2
    dtype = np.dtype(np.float64)
    _OWN = ("Wt", "gain", "source", "shape")  # its own attributes: never looked up on the array built whole

    def __init__(self, W_U: np.ndarray, gain: np.ndarray | None):
        self.source = (W_U, gain)  # the arrays as given (:meth:`same_as`)
        self.Wt = np.asarray(W_U).T  # [V, d] view in the head's dtype
        self.gain = None if gain is None else np.asarray(gain, dtype=np.float64)
        self.shape = (int(self.Wt.shape[0]), int(self.Wt.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def _rows(self, r) -> np.ndarray:
        a = np.array(self.Wt[r], dtype=np.float64, order="C")
        if self.gain is not None:
            a *= self.gain
        return a

    def __getitem__(self, idx):
        if not isinstance(idx, tuple):
            return self._rows(idx)
        r, rest = idx[0], idx[1:]
        if sum(isinstance(i, (list, np.ndarray)) for i in idx) > 1:
            raise IndexError("FoldedRows: one index array at most")
        a = self._rows(r)
        return a[rest] if a.ndim == 1 else a[(slice(None),) + rest]

    def chunks(self, size: int = 8192):
        """``(r0, rows[r0:r1])`` over all rows."""
        for r0 in range(0, self.shape[0], size):
            yield r0, self._rows(slice(r0, r0 + size))

    def __array__(self, dtype=None, copy=None):
        """The whole array, filled chunk by chunk (at ``dtype``: converted per chunk, no float64 copy first)."""
        out = np.empty(self.shape, dtype=np.float64 if dtype is None else dtype)
        with np.errstate(over="ignore"):
            for r0, a in self.chunks():
                out[r0: r0 + a.shape[0]] = a
        return out

    def __matmul__(self, x):
        """``rows @ x`` row chunk by row chunk (the same values: each output row is its own dot products)."""
        x = np.asarray(x)
        return np.concatenate([a @ x for _, a in self.chunks()]) if self.shape[0] else np.asarray(self) @ x

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """Any other numpy arithmetic (``rows - c``, ``rows == other``) on the array built whole."""
        inputs = tuple(np.asarray(a) if isinstance(a, FoldedRows) else a for a in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getattr__(self, name):
        """What else an ndarray has (``.T``, ``.mean``, ``.copy()``): from the array built whole, read-only
        (engine code walks the rows in chunks instead; this is for callers who treat them as the array)."""
        if name.startswith("__") or name in self._OWN:
            raise AttributeError(name)
        a = np.asarray(self)
        a.flags.writeable = False
        return getattr(a, name)

    def same_as(self, W_U, gain) -> bool:
        """Derived from these very arrays (a head's ``W_U`` and ``ln_w``, the same objects): then equal to
        ``gram_rows``' uncentred rows entry for entry, without comparing them."""
        return W_U is self.source[0] and gain is self.source[1]


class DerivedKeys(FoldedRows):
    """The keys ``P(ũ_j − c)`` (``domain.keys`` of the folded rows) of a head whose rows are
    :class:`FoldedRows`, computed on demand: the same float64 values as the keys the fold computes chunk by
    chunk (every entry depends on its own row only), without holding them. A scan whose ``--memory`` budget
    cannot hold the ``V × d`` float64 keys beside the head uses these (``loader.fold(derive_keys=True)``);
    every stage reads them by chunks, gathers or through the one float32 copy (``Problem.search_keys32``)."""

    _OWN = FoldedRows._OWN + ("rows", "domain", "center")

    def __init__(self, rows: FoldedRows, domain, center: np.ndarray):
        self.rows, self.domain, self.center = rows, domain, center
        self.source, self.shape = rows.source, rows.shape

    def _rows(self, r) -> np.ndarray:
        return self.domain.keys(self.rows._rows(r), self.center)

    def same_as(self, W_U, gain) -> bool:
        return False  # keys, not the gram rows ``γ ⊙ u``


def rows_array(rows) -> np.ndarray:
    """``rows`` as a float64 array (a :class:`FoldedRows` built whole; an array as it is)."""
    return np.asarray(rows, dtype=np.float64)


def row_chunks(rows, size: int = 8192):
    """``(r0, rows[r0:r1])`` over all rows of an array or a :class:`FoldedRows`."""
    if isinstance(rows, FoldedRows):
        yield from rows.chunks(size)
        return
    for r0 in range(0, rows.shape[0], size):
        yield r0, rows[r0: r0 + size]


@dataclass
class Problem:
    """The folded head on its domain (DESIGN §1). All arrays float64, C-contiguous, owned by the problem.

    ``rows`` are the folded unembedding rows ũ_j and ``bias`` the folded bias b̃_j (zeros when the bias is
    off or the domain ignores it), both in *internal units*: when the magnitudes of the rows, the bias and
    the radius would put float64 near overflow or underflow they are rescaled by powers of two at fold
    time (exact), and ``margin_unit`` / ``x_unit`` turn internal margins and points back into the caller's
    units (1.0 otherwise). ``keys`` are the screening rows ``P(ũ_j − c)``, centred on the mean row ``c``
    and projected by the domain; adding one vector to every row moves all logits equally, so verdicts
    computed on ``keys`` are verdicts on ``rows``.

    ``rows`` of a head folded exactly (``loader.fold``: float16 / float32 weights and gain, no rescaling) is
    a :class:`FoldedRows`, derived from the head on demand: index it, walk it with :func:`row_chunks`, or
    build it whole with :func:`rows_array` where something needs all of it at once.
    """

    rows: np.ndarray  # [V, d] float64, or a FoldedRows standing for it
    bias: np.ndarray  # [V] float64
    domain: object  # an engine.domain.Domain
    center: np.ndarray  # [d] float64, mean row
    keys: np.ndarray  # [V, d] float64, P(rows - center), or a DerivedKeys standing for it (a tight budget)
    bias_used: bool
    source: str = ""
    texts: list[str] | None = None
    planted: dict | None = None
    warnings: list[str] = field(default_factory=list)
    margin_exp: int = 0  # reported margin = internal margin × 2**margin_exp
    x_exp: int = 0  # reported point = internal point × 2**x_exp
    # The fold's own rounding (engine.loader.fold_parts), in internal units; None: exact. The head as given
    # has rows ``rows + rows_lo + e_j`` with ``||e_j||_1 <= row_err_j`` and bias ``bias + bias_lo ± bias_err``.
    rows_lo: np.ndarray | None = None  # [V, d]
    row_err: np.ndarray | None = None  # [V]
    bias_lo: np.ndarray | None = None  # [V]
    bias_err: np.ndarray | None = None  # [V]
    exact_source: object = None  # the Head folded here: exact rational rows and bias (engine.exact.head_rows)
    row_exp: int = 0  # internal rows = exact γ ⊙ u × 2**row_exp
    # The bias the search and decide stages work with (None: ``bias``): ``bias + bias_lo`` less a common
    # shift, so that a large common part does not drown the differences. Only the verifier proves anything.
    work_bias: np.ndarray | None = None
    work_keys: np.ndarray | None = None  # likewise ``keys`` with the rows' residual added (None: ``keys``)
    bias_exp: int = 0  # internal bias = exact (u·β + b) × 2**bias_exp
    # Arrays derived once and shared by the stages (``search_keys32``); a working problem that shares this
    # problem's keys shares this dict too. Never part of a comparison or a fingerprint.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def V(self) -> int:
        return int(self.rows.shape[0])

    @property
    def d(self) -> int:
        return int(self.rows.shape[1])

    @property
    def radius(self) -> float | None:
        """The radius in internal units."""
        return self.domain.radius

    @property
    def radius_reported(self) -> float | None:
        return None if self.domain.radius is None else _ldexp(self.domain.radius, self.x_exp)

    def report_margin(self, m: float | None) -> float | None:
        """An internal margin (or deficit) in the caller's units; None where it is unknown or out of range."""
        if m is None or not math.isfinite(m):
            return None
        m = _ldexp(m, self.margin_exp) + 0.0  # + 0.0: no -0.0 in reports
        return m if math.isfinite(m) else None

    def report_x(self, x: np.ndarray) -> np.ndarray:
        """An internal point in the caller's units (exact unless it leaves float64's range)."""
        return np.ldexp(np.asarray(x, dtype=np.float64), self.x_exp) if self.x_exp else np.asarray(x, dtype=np.float64)

    def internal_x(self, x: np.ndarray) -> np.ndarray:
        """A point in the caller's units → internal units (for re-verifying a stored witness)."""
        return np.ldexp(np.asarray(x, dtype=np.float64), -self.x_exp) if self.x_exp else np.asarray(x, dtype=np.float64)

    @property
    def search_bias(self) -> np.ndarray:
        return self.bias if self.work_bias is None else self.work_bias

    @property
    def search_keys(self) -> np.ndarray:
        return self.keys if self.work_keys is None else self.work_keys

    @property
    def keys_are_shifted_rows(self) -> bool:
        """``keys`` (and the search's keys) are exactly ``rows − center``: the domain does not project and no
        residual was added for the search."""
        return self.work_keys is None and self.domain.keys_shift_only()

    def search_keys32(self) -> np.ndarray:
        """A float32 copy of ``search_keys``, built once in row chunks (no float64 transient) and shared by the
        search's pricing, the LP's pricing and, where the keys are the verifier's shifted rows, its competitor
        bounds: one ``V × d`` float32 array for the whole scan. Nobody writes to it. Entries beyond float32's
        range are inf (each user checks finiteness, as it did with its own copy)."""
        a = self.derived.get("search_keys32")
        if a is None:
            k = self.search_keys
            a = np.empty(k.shape, dtype=np.float32)
            with np.errstate(over="ignore"):
                for r0 in range(0, k.shape[0], 8192):
                    a[r0: r0 + 8192] = k[r0: r0 + 8192]
            self.derived["search_keys32"] = a
        return a

    @property
    def constant_bias(self) -> bool:
        """Every token has the same bias (exactly, the fold's residual included): then every logit is equal
        at x = 0 (DESIGN §2, margin exactly 0)."""
        if self.bias_err is not None and np.any(self.bias_err):
            return False
        if self.bias_lo is not None and not np.all(self.bias_lo == self.bias_lo[0]):
            return False
        return bool(np.all(self.bias == self.bias[0]))

    @property
    def fold_exact(self) -> bool:
        """The float64 rows and bias are the head's exactly (no residual of the fold)."""
        return all(a is None or not np.any(a) for a in (self.rows_lo, self.row_err, self.bias_lo, self.bias_err))


def _ldexp(m: float, e: int) -> float:
    try:
        return math.ldexp(m, e)
    except OverflowError:
        return math.copysign(math.inf, m)


# ------------------------------------------------------------------------------------------- messages
def ids_text(ids) -> str:
    """``3, 17, 40`` or ``3, 17, ... (and 12 more)``: bad ids named in a message."""
    ids = [int(i) for i in ids]
    shown = ", ".join(str(i) for i in ids[:MAX_IDS_SHOWN])
    return shown + (f" (and {len(ids) - MAX_IDS_SHOWN} more)" if len(ids) > MAX_IDS_SHOWN else "")


def shape_text(a) -> str:
    return "[" + ", ".join(str(int(s)) for s in a.shape) + "]"


# ----------------------------------------------------------------------------------------- conversion
def as_array(a, name: str = "array", where: str = "<arrays>") -> np.ndarray | None:
    """numpy view of an array, tensor or list; bfloat16 becomes float32 (exact), other dtypes are kept.

    The result may share memory with ``a``: callers copy before any arithmetic that writes.
    """
    if a is None:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().to("cpu")
        if a.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            a = a.float()
        try:
            return a.numpy()
        except TypeError as e:
            raise InputError(f"{where}: {name} has dtype {a.dtype}, which is not a float dtype") from e
    arr = np.asarray(a)
    if arr.dtype.name == "bfloat16":  # ml_dtypes bfloat16 (kind 'V')
        arr = arr.astype(np.float32)
    return arr


def _check_float(name: str, a: np.ndarray, where: str) -> None:
    if a.dtype.kind != "f":
        raise InputError(
            f"{where}: {name} has dtype {a.dtype}; expected a float dtype (float16, bfloat16, float32, float64)"
            + ("; integer and bool weights are refused" if a.dtype.kind in "iub" else "")
        )
    if a.dtype.itemsize > 8:  # the engine works in float64: reading these would round the head it proves about
        raise InputError(f"{where}: {name} has dtype {a.dtype} (extended precision), which float64 cannot hold "
                         f"exactly; convert to float64 first (the proofs are then about that head)")


def token_ids(tokens, V: int, where: str = "tokens") -> np.ndarray:
    """Sorted unique int64 ids of ``tokens``: an integer, or a list, tuple, set, range or other iterable of
    integers, or an integer numpy array or torch tensor (0-d or 1-D).

    Raises:
        InputError: a boolean mask (pass ``np.nonzero(mask)[0]``), a bool among the ids (``True`` is not read
            as token 1), non-integer values (``1.5`` is not read as token 1), a string, a shape other than 0-d
            or 1-D, or ids outside ``0 … V-1`` — naming what is wrong.
    """
    if isinstance(tokens, (str, bytes)):
        raise InputError(f"{where}: got a string ({tokens!r}); pass a list of integer token ids")
    if isinstance(tokens, (float, np.floating)):
        raise InputError(f"{where}: token ids must be integers; got the float {float(tokens)!r}")
    torch = sys.modules.get("torch")
    if not isinstance(tokens, (int, np.integer, np.ndarray)) and not (torch is not None
                                                                   and isinstance(tokens, torch.Tensor)):
        try:  # a list, tuple, set, range, generator, dict view ...: its items, each an integer
            items = list(tokens)
        except TypeError:
            raise InputError(f"{where}: cannot read token ids from {type(tokens).__name__}; pass a list of "
                             "integers") from None
        flags = [isinstance(v, (bool, np.bool_)) for v in items]
        if any(flags) and not all(flags):
            pos = flags.index(True)
            raise InputError(f"{where}: token ids must be integers; got the bool {items[pos]!r} at position {pos} "
                             "(a bool is not read as a token id)")
        big = [v for v in items if isinstance(v, (int, np.integer)) and not isinstance(v, bool)
               and not -2**63 <= int(v) < 2**63]
        if big:
            raise InputError(f"token ids {ids_text(big)} are out of range for V = {V}")
        tokens = items
    try:
        arr = as_array(tokens, where, where) if not isinstance(tokens, (int, np.integer)) else np.array([tokens])
        arr = np.asarray(arr)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: cannot read token ids from {type(tokens).__name__}: {e}") from None
    if arr.ndim == 0:  # one id as a 0-d array or tensor, as an int is read
        arr = arr.reshape(1)
    if arr.dtype.kind == "b":
        raise InputError(f"{where}: got a boolean mask of shape {shape_text(arr)}; pass token ids instead "
                         f"(np.nonzero(mask)[0])")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise InputError(f"{where}: token ids must be a 1-D list of integers; got shape {shape_text(arr)}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                frac = np.nonzero(~np.isfinite(arr) | (arr != np.round(arr)))[0]
            shown = ", ".join(repr(float(arr[i])) for i in frac[:MAX_IDS_SHOWN])
            raise InputError(f"{where}: token ids must be integers; got {arr.dtype} values"
                             + (f" such as {shown}" if frac.size else "") + " (pass an integer array)")
        raise InputError(f"{where}: token ids must be integers; got values of dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8 and arr.size and int(arr.max()) > 2**62:
        raise InputError(f"{where}: token ids {ids_text(arr[arr > 2**62])} are out of range for V = {V}")
    ids = np.unique(arr.astype(np.int64))
    bad = ids[(ids < 0) | (ids >= V)]
    if bad.size:
        raise InputError(f"token ids {ids_text(bad)} are out of range for V = {V}")
    return ids


# ----------------------------------------------------------------------------------------- validation
_VECTOR_AXIS = {"b_U": 1, "ln_w": 0, "ln_b": 0}  # which axis of W_U each vector must match


def _check_dims(arrays: dict, where: str) -> None:
    W = arrays["W_U"]
    if W.ndim != 2:
        raise InputError(f"{where}: W_U must be 2-D [d_model, d_vocab]; got shape {shape_text(W)}")
    for k in _VECTOR_AXIS:
        a = arrays[k]
        if a is not None and a.ndim != 1:
            want = "[d_vocab]" if k == "b_U" else "[d_model]"
            raise InputError(f"{where}: {k} must be 1-D {want}; got shape {shape_text(a)}")


def _check_shapes(arrays: dict, where: str) -> list[str]:
    """Mismatched vector lengths → InputError (saying so when W_U looks transposed); returns warnings."""
    W = arrays["W_U"]
    d_model, d_vocab = (int(s) for s in W.shape)

    def mismatched(dm: int, dv: int) -> list[str]:
        return [k for k, ax in _VECTOR_AXIS.items() if arrays[k] is not None and len(arrays[k]) != (dm, dv)[ax]]

    bad = mismatched(d_model, d_vocab)
    given = ", ".join(f"{k} of length {len(arrays[k])}" for k in _VECTOR_AXIS if arrays[k] is not None)
    if bad:
        if d_model != d_vocab and not mismatched(d_vocab, d_model):
            raise InputError(f"{where}: W_U looks transposed: got {shape_text(W)}, expected [d_model, d_vocab] "
                             f"with {given}; store W_U.T")
        parts = [f"{k} has length {len(arrays[k])} but W_U {shape_text(W)} needs "
                 + (f"d_vocab = {d_vocab}" if _VECTOR_AXIS[k] else f"d_model = {d_model}") for k in bad]
        raise InputError(f"{where}: mismatched shapes: " + "; ".join(parts))
    if d_vocab < 2:
        raise InputError(f"{where}: W_U has shape {shape_text(W)}: d_vocab = {d_vocab}; need at least 2 tokens")
    if d_model < 1:
        raise InputError(f"{where}: W_U has shape {shape_text(W)}: d_model = {d_model}; need d_model >= 1")
    if d_model > d_vocab:
        # Real heads have far more tokens than dimensions; a tiny test head may not, so warn, loudly.
        return [f"W_U {shape_text(W)} has more rows (d_model) than columns (d_vocab): it looks transposed; "
                f"W_U must be [d_model, d_vocab] (pass W_U.T if it holds one row per token)"]
    return []


def _check_finite(arrays: dict, where: str) -> None:
    """Non-finite values, named by token id (W_U columns, b_U) or by d_model index (ln_w, ln_b)."""
    bad_cols = np.nonzero(~np.isfinite(arrays["W_U"]).all(axis=0))[0]
    if bad_cols.size:
        raise InputError(f"{where}: W_U has non-finite values in token ids {ids_text(bad_cols)} (column)")
    for k, what in (("b_U", "token ids"), ("ln_w", "d_model indices"), ("ln_b", "d_model indices")):
        a = arrays[k]
        if a is not None:
            bad_i = np.nonzero(~np.isfinite(a))[0]
            if bad_i.size:
                raise InputError(f"{where}: {k} has non-finite values at {what} {ids_text(bad_i)}")


def _norm_name(norm, has_gain: bool, where: str) -> str:
    if isinstance(norm, bytes):
        norm = norm.decode("ascii", errors="replace")
    if norm is None:
        norm = "layernorm" if has_gain else "none"
    if not isinstance(norm, str) or norm not in NORMS:
        raise InputError(f"{where}: unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    return norm


def head_from_arrays(W_U, b_U=None, ln_w=None, ln_b=None, norm: str | None = None, source: str = "<arrays>",
                     texts: list | None = None, gram_center: bool = False, planted: dict | None = None) -> Head:
    """Validate arrays (numpy, torch on any device, lists) and return a :class:`Head`.

    Raises:
        InputError: naming the key, shape, dtype or token ids at fault (DESIGN §6).
    """
    where = source
    arrays = {k: as_array(v, k, where) for k, v in (("W_U", W_U), ("b_U", b_U), ("ln_w", ln_w), ("ln_b", ln_b))}
    if arrays["W_U"] is None:
        raise InputError(f"{where}: W_U is required")
    for k, a in arrays.items():
        if a is not None:
            _check_float(k, a, where)
    _check_dims(arrays, where)
    warnings = _check_shapes(arrays, where)
    norm = _norm_name(norm, arrays["ln_w"] is not None, where)
    _check_finite(arrays, where)
    d_vocab = int(arrays["W_U"].shape[1])
    if texts is not None:
        texts = list(texts)
        if len(texts) != d_vocab:  # a tokenizer smaller than a padded vocabulary: no text for the padding
            texts = (texts + [None] * d_vocab)[:d_vocab]
    return Head(W_U=arrays["W_U"], b_U=arrays["b_U"], ln_w=arrays["ln_w"], ln_b=arrays["ln_b"], norm=norm,
                source=source, texts=texts, planted=planted, gram_center=gram_center, warnings=warnings)
