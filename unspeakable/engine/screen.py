"""Stages 2–3 — the gram screen (seed-faithful hard-to-speak) and the witness screen (DESIGN §3).

Both are the same top-2 competitor op (``kernels.screen.top2_exact``), tiled so that the V × V matrix is
never held, with indices equal to a float64 reference:

* gram: ``score[t, j] = g_t · g_j`` on the gram rows; ``hard_to_speak(t) ⇔ max_{j≠t} score ≥ score[t, t]``
  (a tie is not a win) and ``gram_argmax`` is the first index of the row maximum, as ``argmax(-1)``.
* witness: the logits at the centred self-direction scaled into the domain, ``x_t = R k_t/||k_t||`` (balls),
  ``rho·sign(k_t)`` (box), ``k_t/||k_t||²`` (cone, so that ``k_t·x_t = 1``); margin = self − best competitor.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from unspeakable.engine.head import FoldedRows
from unspeakable.kernels.screen import row_gather, top2_exact
from unspeakable.kernels.sym_screen import KeyMap, OtherGram, sym_screen


@dataclass
class GramScreen:
    argmax: np.ndarray  # [V] int64, first index of the row maximum (self included)
    best: np.ndarray  # [V] float64, max over j != t
    best_idx: np.ndarray  # [V] int64
    second: np.ndarray  # [V] float64
    self_val: np.ndarray  # [V] float64
    hard_to_speak: np.ndarray  # [V] bool
    recomputed: int
    time_s: float


@dataclass
class WitnessScreen:
    margin: np.ndarray  # [V] float64: l_t(x_t) - max_{j != t} l_j(x_t)
    runner_up: np.ndarray  # [V] int64
    recomputed: int
    time_s: float


def _rows64(rows):
    """Gram rows or keys for ``kernels.sym_screen``: a float64 tensor over the array, or rows derived on
    demand (engine.head.FoldedRows, DerivedKeys) as they are: the pass reads them block by block and row by
    row."""
    return rows if isinstance(rows, FoldedRows) else torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64))


def gram_screen(rows64: np.ndarray, ids: np.ndarray | None = None, *, backend: str = "torch", device="cpu",
                precision: str = "ieee") -> GramScreen:
    """Gram screen for the rows ``ids`` (default: all V) against all V rows."""
    t0 = time.perf_counter()
    V = rows64.shape[0]
    ids = np.arange(V, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.size == V and np.array_equal(ids, np.arange(V)):  # all rows: one symmetric pass, each pair once
        res = sym_screen(_rows64(rows64), backend=backend, device=device, precision=precision)
        return _gram_result(res.gram, ids, res.stats.gram_recomputed, t0)
    g, ti = _rows64(rows64), torch.from_numpy(ids)  # rows derived on demand: read by blocks and gathers
    res, redo = top2_exact(row_gather(g, ti), g, ti, backend=backend, device=device, precision=precision)
    return _gram_result(res, ids, redo, t0)


def hard_to_speak(self_val: np.ndarray, best: np.ndarray) -> np.ndarray:
    """The gram criterion: some other row scores at least the token's own (``best >= self``)."""
    return best >= self_val


def gram_argmax(ids: np.ndarray, self_val: np.ndarray, best: np.ndarray, best_idx: np.ndarray) -> np.ndarray:
    """argmax(-1) over each whole gram row, which keeps the first index of the maximum: the token itself
    only if strictly larger than every competitor, or equal to the best competitor and earlier in the
    vocabulary, or without any competitor (``best_idx < 0``, V = 1)."""
    return np.where((self_val > best) | ((self_val == best) & (ids < best_idx)) | (best_idx < 0), ids,
                    best_idx).astype(np.int64)


def _gram_result(res, ids: np.ndarray, redo: int, t0: float) -> GramScreen:
    best = res.best_val.numpy()
    best_idx = res.best_idx.numpy()
    selfv = res.self_val.numpy()
    return GramScreen(gram_argmax(ids, selfv, best, best_idx), best, best_idx.astype(np.int64),
                      res.second_val.numpy(), selfv, hard_to_speak(selfv, best), redo, time.perf_counter() - t0)


def witness_points(problem, tokens: np.ndarray) -> np.ndarray:
    """The screen points of ``tokens``, moved inside the domain by a few ulps so they verify."""
    return problem.domain.screen_points(problem.keys, tokens)


def witness_screen(problem, ids: np.ndarray | None = None, *, backend: str = "torch", device="cpu",
                   precision: str = "ieee") -> WitnessScreen:
    """Witness screen for the tokens ``ids`` (default: all V) over all V competitors."""
    t0 = time.perf_counter()
    q, s = problem.domain.screen_queries(problem.keys)
    keys = _rows64(problem.keys)  # derived keys (engine.head.DerivedKeys) are read by blocks and gathers
    V = keys.shape[0]
    ids = np.arange(V, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    bias = torch.from_numpy(problem.bias) if np.any(problem.bias) else None  # zero in the cone
    res, redo = top2_exact(
        torch.from_numpy(np.ascontiguousarray(q[ids])), keys, torch.from_numpy(ids),
        scale64=None if s is None else torch.from_numpy(s[ids]), bias64=bias,
        backend=backend, device=device, precision=precision,
    )
    margin = res.self_val.numpy() - res.best_val.numpy()
    return WitnessScreen(margin, res.best_idx.numpy().astype(np.int64), redo, time.perf_counter() - t0)


def screens(grows: np.ndarray, centred_rows: bool, norm: str, problem, ids: np.ndarray, *, backend: str = "torch",
            device="cpu", precision: str = "ieee", other_rows=None) -> tuple[GramScreen, WitnessScreen, dict]:
    """Both screens over the tokens ``ids``: one symmetric pass (``kernels.sym_screen``: one float32 Gram
    of the rows, each pair of row blocks visited once, two epilogues) when all V are scanned and the
    witness keys derive from the gram rows; otherwise the two separate passes. Returns the screens and the
    pass's statistics (tiles skipped, rows recomputed in float64).

    ``other_rows``: a callable returning the gram rows of the other convention (centred when ``grows``
    are not, and the reverse; float64 ``[V, d]``). When the pass can reduce them from the same tiles, its
    hard-to-speak count is returned as ``stats["other_gram"] = {"centred": bool, "hard_to_speak": int}``;
    otherwise the key is absent and the caller counts it by a pass of its own.
    """
    t0 = time.perf_counter()
    key_map = _key_map(centred_rows, norm, problem)
    if ids.size != problem.V or key_map is None:
        g = gram_screen(grows, ids, backend=backend, device=device, precision=precision)
        return g, witness_screen(problem, ids, backend=backend, device=device, precision=precision), {"passes": 2}
    q, s = problem.domain.screen_queries(problem.keys)
    scaled_key = s is not None and q is problem.keys  # the box's screen point is no multiple of its key
    other_map = _key_map(not centred_rows, norm, problem) if other_rows is not None and scaled_key else None
    other = None if other_map is None else OtherGram(
        lambda: _rows64(other_rows()), None if other_map is _SAME_ROWS else other_map)
    res = sym_screen(_rows64(grows),
                     _rows64(problem.keys) if scaled_key else None,
                     torch.from_numpy(s) if scaled_key else None,
                     torch.from_numpy(problem.bias) if scaled_key and np.any(problem.bias) else None,
                     key_map if scaled_key and key_map is not _SAME_ROWS else None,
                     backend=backend, device=device, precision=precision, other=other)
    st = res.stats
    g = _gram_result(res.gram, ids, st.gram_recomputed, t0)
    extra = {}
    if res.other is not None:
        other_gram = _gram_result(res.other, ids, st.other_recomputed, t0)  # the criterion's one definition
        extra["other_gram"] = {"centred": not centred_rows, "hard_to_speak": int(other_gram.hard_to_speak.sum())}
    if res.witness is None:
        w = witness_screen(problem, ids, backend=backend, device=device, precision=precision)
    else:
        margin = res.witness.self_val.numpy() - res.witness.best_val.numpy()
        w = WitnessScreen(margin, res.witness.best_idx.numpy().astype(np.int64), st.witness_recomputed,
                          time.perf_counter() - t0)
    return g, w, {"passes": 1 if res.witness is not None else 2, **st.to_json(), **extra}


_SAME_ROWS = KeyMap()  # marker: the witness keys are the gram rows themselves


def _key_map(centred_rows: bool, norm: str, problem):
    """How the witness keys derive from the gram rows, or None when they do not (then two passes)."""
    if problem.margin_exp or problem.x_exp:
        return None  # rows rescaled at fold time: the gram rows (as loaded) are not the problem's rows
    if not centred_rows:
        return KeyMap(torch.from_numpy(problem.center), sum_zero=problem.domain.centred)
    # TransformerLens-style rows are P(ũ − c) with P the layernorm projection when the norm is one
    return _SAME_ROWS if (norm == "layernorm") == problem.domain.centred else None
