"""Top-2 competitor screen: for each query row, the best and second-best score over all keys except
its own column, plus its own (self) score.

    score[i, j] = scale[i] * ((queries[i] - center) · keys[j]) + bias[j]

``best`` / ``second`` run over ``j != self_index[i]`` (self_index < 0: no column is excluded). Ties keep
the first index of the maximum, as ``torch.argmax`` does, so results are reproducible whatever the tiling.
The gram screen is ``queries = keys = W_U.T``; the witness screen is the scaled self-direction against
the centred keys with the bias epilogue (DESIGN §3).

This file holds the pure-torch implementation used on the CPU (tiled over query rows and key columns, so
peak memory is O(block_rows · block_cols), never V × V) and the float64 reference it is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class Top2:
    best_val: torch.Tensor  # [B] float
    best_idx: torch.Tensor  # [B] int64, -1 when there is no competitor (V == 1)
    second_val: torch.Tensor  # [B]
    second_idx: torch.Tensor  # [B] int64, -1 when fewer than 2 competitors
    self_val: torch.Tensor  # [B]; NaN where self_index < 0
    third_val: torch.Tensor | None = None  # [B] the third largest competitor value, when the pass keeps it


def _check(queries, keys, self_index, scale, center, bias):
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"queries and keys must be 2-D, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    B, d = queries.shape
    V, dk = keys.shape
    if d != dk:
        raise ValueError(f"queries have d={d} but keys have d={dk}")
    if self_index is not None and tuple(self_index.shape) != (B,):
        raise ValueError(f"self_index must have shape ({B},), got {tuple(self_index.shape)}")
    if scale is not None and tuple(scale.shape) != (B,):
        raise ValueError(f"scale must have shape ({B},), got {tuple(scale.shape)}")
    if center is not None and tuple(center.shape) != (d,):
        raise ValueError(f"center must have shape ({d},), got {tuple(center.shape)}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
    return B, V, d


def take_best(vals: torch.Tensor, idx: torch.Tensor):
    """Row-wise max over candidates, first (smallest) index among equal maxima. vals/idx: [B, k]."""
    best = vals.max(dim=1).values
    # Smallest index among the maxima; idx -1 marks an empty slot and never wins (its value is -inf).
    big = torch.iinfo(torch.int64).max
    cand = torch.where((vals == best[:, None]) & (idx >= 0), idx, torch.full_like(idx, big))
    bidx = cand.min(dim=1).values
    bidx = torch.where(bidx == big, torch.full_like(bidx, -1), bidx)
    return best, bidx


def merge_top2(a_val, a_idx, a_sec, a_sidx, b_val, b_idx, b_sec, b_sidx):
    """Merge two partial top-2 results (tie rule: smaller index first)."""
    vals = torch.stack([a_val, a_sec, b_val, b_sec], dim=1)
    idx = torch.stack([a_idx, a_sidx, b_idx, b_sidx], dim=1)
    best, bidx = take_best(vals, idx)
    vals2 = torch.where(idx == bidx[:, None], torch.full_like(vals, NEG_INF), vals)
    idx2 = torch.where(idx == bidx[:, None], torch.full_like(idx, -1), idx)
    sec, sidx = take_best(vals2, idx2)
    return best, bidx, sec, sidx


def top2_torch(
    queries: torch.Tensor,
    keys: torch.Tensor,
    self_index: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    block_rows: int = 1024,
    block_cols: int = 8192,
) -> Top2:
    """Tiled top-2 screen in the dtype of ``queries`` / ``keys`` (float32 or float64)."""
    B, V, d = _check(queries, keys, self_index, scale, center, bias)
    dev, dt = queries.device, queries.dtype
    if self_index is None:
        self_index = torch.full((B,), -1, dtype=torch.int64, device=dev)
    self_index = self_index.to(torch.int64)
    out_best = torch.full((B,), NEG_INF, dtype=dt, device=dev)
    out_bidx = torch.full((B,), -1, dtype=torch.int64, device=dev)
    out_sec = torch.full((B,), NEG_INF, dtype=dt, device=dev)
    out_sidx = torch.full((B,), -1, dtype=torch.int64, device=dev)
    out_self = torch.full((B,), float("nan"), dtype=dt, device=dev)
    out_third = torch.full((B,), NEG_INF, dtype=dt, device=dev)
    for r0 in range(0, B, block_rows):
        r1 = min(B, r0 + block_rows)
        q = queries[r0:r1]
        if center is not None:
            q = q - center
        if scale is not None:
            # Scaling the query row is the same product up to one rounding (covered by the error bound).
            q = q * scale[r0:r1, None]
        (out_best[r0:r1], out_bidx[r0:r1], out_sec[r0:r1], out_sidx[r0:r1], out_third[r0:r1],
         out_self[r0:r1]) = _row_block(q, keys, self_index[r0:r1], bias, block_cols)
    return Top2(out_best, out_bidx, out_sec, out_sidx, out_self, out_third)


def _row_block(q, keys, si, bias, block_cols: int):
    """One block of query rows against every key tile: best, second (with indices), third value, self."""
    n, V, dt, dev = q.shape[0], keys.shape[0], q.dtype, q.device
    best = torch.full((n,), NEG_INF, dtype=dt, device=dev)
    bidx = torch.full((n,), -1, dtype=torch.int64, device=dev)
    sec, sidx, third = best.clone(), bidx.clone(), best.clone()
    selfv = torch.full((n,), float("nan"), dtype=dt, device=dev)
    for c0 in range(0, V, block_cols):
        c1 = min(V, c0 + block_cols)
        kt = keys[c0:c1].T
        s = q @ kt if bias is None else torch.addmm(bias[c0:c1], q, kt)
        # Self columns in this tile: read the self score, then -inf so it never wins a max.
        # (Index math in int64: row * V overflows int32 at V = 50257.)
        in_tile = (si >= c0) & (si < c1)
        if bool(in_tile.any()):
            rows_hit = in_tile.nonzero().squeeze(1)
            cols_hit = si[rows_hit] - c0
            selfv[rows_hit] = s[rows_hit, cols_hit]
            s[rows_hit, cols_hit] = NEG_INF
        b_val, b_idx, c_val, c_idx = _tile_top2(s)
        # The third value over both parts: the largest of what the merge leaves (values only: it is
        # what tells whether the second index is exact, kernels.screen).
        t_val = torch.topk(s, 3, dim=1).values[:, 2] if s.shape[1] >= 3 else torch.full_like(b_val, NEG_INF)
        pool = torch.stack([best, sec, third, b_val, c_val, t_val], dim=1)
        best, bidx, sec, sidx = merge_top2(best, bidx, sec, sidx, b_val, b_idx + c0 * (b_idx >= 0),
                                           c_val, c_idx + c0 * (c_idx >= 0))
        third = torch.topk(pool, 3, dim=1).values[:, 2]
    return best, bidx, sec, sidx, third, selfv


def _tile_top2(s: torch.Tensor):
    """Top-2 of each row of a tile with the tie rule (first index among equal values); -1 for -inf.

    ``torch.topk`` does not promise which of equal values it returns, so rows where the top three values
    are not strictly ordered (ties) are redone with explicit first-index searches. Ties are rare, and
    exact for duplicates, which is why they get the slow path rather than every row.
    """
    n, m = s.shape
    k = min(3, m)
    tv, ti = torch.topk(s, k, dim=1)
    b_val, b_idx = tv[:, 0], ti[:, 0]
    if k >= 2:
        c_val, c_idx = tv[:, 1], ti[:, 1]
        tie = tv[:, 0] == tv[:, 1]
        if k == 3:
            tie |= tv[:, 1] == tv[:, 2]
    else:
        c_val = torch.full_like(b_val, NEG_INF)
        c_idx = torch.full_like(b_idx, -1)
        tie = torch.zeros_like(b_val, dtype=torch.bool)
    if bool(tie.any()):
        rows = tie.nonzero().squeeze(1)
        sr = s[rows]
        bv = sr.max(dim=1).values
        bi = _first_index_of(sr, bv)
        sr[torch.arange(rows.numel(), device=s.device), bi] = NEG_INF
        cv = sr.max(dim=1).values
        ci = _first_index_of(sr, cv)
        b_val, b_idx, c_val, c_idx = b_val.clone(), b_idx.clone(), c_val.clone(), c_idx.clone()
        b_val[rows], b_idx[rows], c_val[rows], c_idx[rows] = bv, bi, cv, ci
    b_idx = torch.where(torch.isneginf(b_val), torch.full_like(b_idx, -1), b_idx)
    c_idx = torch.where(torch.isneginf(c_val), torch.full_like(c_idx, -1), c_idx)
    return b_val, b_idx, c_val, c_idx


def _first_index_of(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """First column where row i equals v[i] (argmax of a boolean keeps the first True)."""
    return torch.argmax((s == v[:, None]).to(torch.uint8), dim=1).to(torch.int64)


def top2_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    self_index: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> Top2:
    """Float64 reference: the same result computed untiled in float64 (small inputs only)."""
    B, V, d = _check(queries, keys, self_index, scale, center, bias)
    q = queries.to(torch.float64)
    if center is not None:
        q = q - center.to(torch.float64)
    s = q @ keys.to(torch.float64).T
    if scale is not None:
        s = s * scale.to(torch.float64)[:, None]
    if bias is not None:
        s = s + bias.to(torch.float64)[None, :]
    selfv = torch.full((B,), float("nan"), dtype=torch.float64)
    if self_index is not None:
        si = self_index.to(torch.int64)
        ok = si >= 0
        selfv[ok] = s[ok.nonzero().squeeze(1), si[ok]]
        s[ok.nonzero().squeeze(1), si[ok]] = NEG_INF
    best = s.max(dim=1).values if V else torch.full((B,), NEG_INF, dtype=torch.float64)
    bidx = _first_index_of(s, best)
    bidx = torch.where(torch.isneginf(best), torch.full_like(bidx, -1), bidx)
    s2 = s.clone()
    has = bidx >= 0
    s2[has.nonzero().squeeze(1), bidx[has]] = NEG_INF
    sec = s2.max(dim=1).values
    sidx = _first_index_of(s2, sec)
    sidx = torch.where(torch.isneginf(sec), torch.full_like(sidx, -1), sidx)
    return Top2(best, bidx, sec, sidx, selfv)
