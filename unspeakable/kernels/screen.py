"""Exact top-2 screen: a fast pass in the backend's precision, then exact recovery.

The fast pass (torch float32 on the CPU; Triton in IEEE fp32, TF32 or bf16 on CUDA) finds each row's best
competitor. Every score it computes is within ``eps[i]`` of the real-arithmetic score (a priori bound
below). A row whose fast best and second best are within ``2 * eps[i]`` might have its argmax wrong, so
it is recomputed in float64 over all columns. Then best / second / self values of every row are rescored
in float64 from the float64 inputs. The result therefore equals a float64 reference on every row whose
real-arithmetic top-2 gap exceeds the float64 rounding error ("ties aside", DESIGN §4).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from unspeakable.kernels import resolve_backend
from unspeakable.kernels.top2 import Top2, top2_torch

U32 = 2.0**-24
# Unit roundoff of the *inputs* to the dot products for each fast precision.
PRECISION_UNIT = {"ieee": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8, "float64": 2.0**-53}


def dot_error_unit(precision: str, d: int) -> float:
    """Relative bound: |fast(q·k) - q·k| <= unit * ||q||_2 * ||k||_2 for float64-given q, k.

    Inputs rounded to the fast precision (relative u_in each), products and a length-d sum accumulated in
    fp32 (Higham's gamma_d with u = 2^-24; float64 for the reference), and a factor 2 of slack.
    """
    u_in = PRECISION_UNIT[precision]
    u_acc = 2.0**-53 if precision == "float64" else U32
    gamma = (d + 2) * u_acc / max(1e-300, 1.0 - (d + 2) * u_acc)
    return 2.0 * (2.0 * u_in + u_in * u_in + gamma)


def row_error_bounds(queries64, keys_norm_max, scale64, center64, bias64, precision: str) -> torch.Tensor:
    """eps[i] >= |fast score[i, j] - exact score[i, j]| for every j (float64 tensor [B])."""
    q = queries64 if center64 is None else queries64 - center64
    qn = torch.linalg.vector_norm(q, dim=1)
    d = queries64.shape[1]
    sc = torch.ones_like(qn) if scale64 is None else scale64.abs()
    eps = dot_error_unit(precision, d) * sc * qn * keys_norm_max
    if bias64 is not None:
        bmax = float(bias64.abs().max()) if bias64.numel() else 0.0
        # bias rounded to fp32 and one fp32 add after scaling.
        eps = eps + 4.0 * U32 * (bmax + sc * qn * keys_norm_max)
    # The float64 reference has its own (tiny) rounding; cover it too.
    eps = eps + dot_error_unit("float64", d) * sc * qn * keys_norm_max
    return eps


def _fast_top2(backend, queries, keys, self_index, scale, center, bias, precision, **kw) -> Top2:
    if backend == "triton":
        from unspeakable.kernels.triton_top2 import top2_triton

        return top2_triton(queries, keys, self_index, scale=scale, center=center, bias=bias, precision=precision, **kw)
    return top2_torch(queries, keys, self_index, scale=scale, center=center, bias=bias, **kw)


def _gather_scores64(q64, keys64, idx, scale64, bias64, chunk: int = 8192):
    """float64 scores of row i against column idx[i] (NaN / -inf where idx < 0), gathered in chunks so
    no V x d copy of the keys is made."""
    ok = idx >= 0
    safe = idx.clamp(min=0)
    s = torch.empty(idx.shape[0], dtype=torch.float64)
    for c0 in range(0, idx.shape[0], chunk):
        c1 = min(idx.shape[0], c0 + chunk)
        s[c0:c1] = (q64[c0:c1] * row_gather(keys64, safe[c0:c1])).sum(dim=1)
    if scale64 is not None:
        s = s * scale64
    if bias64 is not None:
        s = s + bias64[safe]
    return torch.where(ok, s, torch.full_like(s, float("-inf")))


# ------------------------------------------------------------------- rows computed on demand
# A float64 "tensor" here may also be rows computed on demand (the engine's FoldedRows / DerivedKeys: numpy
# float64 rows by ``[r0:r1]`` and ``[index array]``, a ``shape``), read block by block and row by row.


def row_block(x64, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of a float64 tensor (a view) or of rows computed on demand."""
    return x64[r0:r1] if isinstance(x64, torch.Tensor) else torch.from_numpy(x64[r0:r1])


def row_gather(x64, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x64[idx]`` (into ``out`` when given) for a tensor or rows computed on demand."""
    if isinstance(x64, torch.Tensor):
        return torch.index_select(x64, 0, idx, out=out) if out is not None else x64[idx]
    g = torch.from_numpy(np.asarray(x64[idx.numpy()], dtype=np.float64).reshape(idx.shape[0], x64.shape[1]))
    return g if out is None else out.copy_(g)


class _RowTiles:
    """Rows computed on demand as ``top2_torch`` reads its keys (``dim()``, ``shape``, ``[c0:c1]`` as float64
    tensors, one column tile at a time): a full recomputation never builds them whole."""

    def __init__(self, x64):
        self.x64, self.shape = x64, torch.Size(x64.shape)

    def dim(self) -> int:
        return 2

    def __getitem__(self, s: slice) -> torch.Tensor:
        return row_block(self.x64, s.start, s.stop)


def row_tiles(x64):
    """``x64`` as ``top2_torch``'s keys: the tensor, or tiles over rows computed on demand."""
    return x64 if isinstance(x64, torch.Tensor) else _RowTiles(x64)


def _float32_rows(x64, device, chunk: int = 8192) -> torch.Tensor:
    """``x64`` as a contiguous float32 tensor on ``device``, converted block by block (no float64 copy)."""
    if isinstance(x64, torch.Tensor):
        return x64.to(device=device, dtype=torch.float32).contiguous()
    out = torch.empty(tuple(x64.shape), dtype=torch.float32)
    for r0 in range(0, x64.shape[0], chunk):
        out[r0:r0 + chunk] = row_block(x64, r0, r0 + chunk)
    return out.to(device)


def _max_row_norm(x64, chunk: int = 8192) -> float:
    return max((float(torch.linalg.vector_norm(row_block(x64, r0, r0 + chunk), dim=1).max())
                for r0 in range(0, x64.shape[0], chunk)), default=0.0)


def top2_exact(
    queries64: torch.Tensor,
    keys64: torch.Tensor,
    self_index: torch.Tensor | None = None,
    *,
    scale64: torch.Tensor | None = None,
    center64: torch.Tensor | None = None,
    bias64: torch.Tensor | None = None,
    backend: str = "torch",
    device: torch.device | str = "cpu",
    precision: str = "ieee",
    block_rows: int = 1024,
) -> tuple[Top2, int]:
    """Top-2 screen whose indices equal the float64 reference, values rescored in float64.

    All ``*64`` arguments are float64 tensors on the CPU (the master copy); ``keys64`` may also be rows
    computed on demand (read by blocks and gathers; its float32 copy is the one array of its size made).
    Returns the result (on the CPU, float64 values) and the number of rows recomputed in float64.
    """
    device = torch.device(device)
    B = queries64.shape[0]
    keys_fast = _float32_rows(keys64, device)
    keys_norm_max = _max_row_norm(keys64)
    f32 = lambda t: None if t is None else t.to(device=device, dtype=torch.float32).contiguous()  # noqa: E731
    si = None if self_index is None else self_index.to(device)
    fast = _fast_top2(
        backend, f32(queries64), keys_fast, si, f32(scale64), f32(center64), f32(bias64), precision,
        **({"block_rows": block_rows} if backend == "torch" else {}),
    )
    best_idx = fast.best_idx.cpu().clone()
    second_idx = fast.second_idx.cpu().clone()
    eps = row_error_bounds(queries64, keys_norm_max, scale64, center64, bias64, precision)
    gap = fast.best_val.cpu().double() - fast.second_val.cpu().double()
    # Near tie between the two best competitors: the fast argmax may be wrong. (gap is +inf or NaN when
    # there is at most one competitor; NaN never compares <=, and one competitor is always exact.) Likewise
    # between the second and the third, for the second index, where the fast pass keeps the third value.
    near = gap <= 2.0 * eps
    if fast.third_val is not None:
        near |= (fast.second_val.cpu().double() - fast.third_val.cpu().double()) <= 2.0 * eps
    redo = near.nonzero().squeeze(1)
    q64 = queries64 if center64 is None else queries64 - center64
    if redo.numel():
        exact = top2_torch(
            queries64[redo], row_tiles(keys64), None if self_index is None else self_index[redo].cpu(),
            scale=None if scale64 is None else scale64[redo], center=center64, bias=bias64,
            block_rows=256, block_cols=8192,
        )
        best_idx[redo] = exact.best_idx
        second_idx[redo] = exact.second_idx
    best_val = _gather_scores64(q64, keys64, best_idx, scale64, bias64)
    second_val = _gather_scores64(q64, keys64, second_idx, scale64, bias64)
    if self_index is None:
        self_val = torch.full((B,), math.nan, dtype=torch.float64)
    else:
        s_idx = self_index.cpu()
        self_val = _gather_scores64(q64, keys64, s_idx, scale64, bias64)
        self_val = torch.where(s_idx >= 0, self_val, torch.full_like(self_val, math.nan))
    return Top2(best_val, best_idx, second_val, second_idx, self_val), int(redo.numel())


__all__ = ["top2_exact", "row_error_bounds", "dot_error_unit", "resolve_backend", "PRECISION_UNIT"]
