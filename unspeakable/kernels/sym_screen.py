"""One symmetric pass for both screens (DESIGN §3 steps 2–3, §4): the gram screen and the witness screen
from a single tiled float32 Gram, each pair of row blocks (I ≤ J) visited once.

Gram rows ``g_j`` (float64 ``[V, d]``: the gain-folded rows ``ũ_j``, or TransformerLens-style centred rows).

* gram screen: ``score_t(j) = g_t·g_j``; per row the best and second best over ``j ≠ t`` and the self value.
* witness screen: keys ``k_j`` (the caller's float64 keys, ``P(ũ_j − c)``), per-row scale ``s_t ≥ 0``
  (``R/‖k_t‖`` for the balls, ``1/‖k_t‖²`` for the cone), bias ``b_j``; the witness logits at
  ``x_t = s_t k_t`` are ``l_t(j) = s_t k_t·k_j + b_j``; per row best / second over ``j ≠ t`` and self.

The GEMM runs on the keys (when there is a witness screen; else on the gram rows). The gram rows relate
to the keys through a :class:`KeyMap`, ``k̂_j = P(g_j − c)`` (``P`` = projection onto ``1⊥`` when
``sum_zero``, else the identity; no map: ``k̂_j = g_j``, the centred-rows convention), so

    g_t·g_j = k̂_t·k̂_j + a_t a_j + β_t + β_j + γ,   a = σ/√d (σ = row sums; sum_zero only),
                                                    β_j = k̂_j·Pc,  γ = ‖Pc‖²,

the keys' Gram plus rank-one corrections held in O(V) vectors. One tile ``S = K_I K_J^T`` therefore feeds
four reductions, two epilogues each way: witness ``s_t S_tj + b_j`` and gram ``S_tj + a_t a_j + β_j`` (the
real ``g_t·g_j`` less ``β_t + γ``, a constant per row that moves neither the argmax over j nor any gap),
for the rows of I over the columns J and for the rows of J over the rows I. Every value returned is
rescored in float64 from the float64 inputs. Running the GEMM on the (centred) keys keeps its error bound
in their norms, several times smaller than the uncentred rows' on a real head. The box domain's screen
point ``ρ·sign(k_t)`` is no multiple of ``k_t``, so it is not a Gram of the rows: there, call this with
``keys64=None`` (gram only) and run the witness screen separately with ``kernels.screen.top2_exact``.

Exactness (as ``kernels.screen.top2_exact``, plus the second index, issue 8): every fast value is within
an a-priori bound ``eps_t`` of the float64 reference's value (dot error of the precision, the float32
epilogue's roundings, flushed subnormals, float64 rounding of the reference and of the corrections, and
the measured residual ``‖k_j − k̂_j‖`` between the caller's keys and the map). The fast pass keeps the top
K = ``sym_plan.TOP_K`` candidates per row. The reference's best and second lie among the candidates whose fast
value is ≥ fast second − 2 eps_t; those are rescored in float64 and ordered by the reference's rule (value,
then first index). A row where that set may extend past the K kept (the K-th is still near), with an empty
or non-finite slot, or whose magnitudes could overflow float32, is recomputed in float64 over all
columns. Indices equal the float64 reference on every row (ties aside), the second index included.

Pruning: rows are sorted by a key (witness: ``m·‖k_j‖ + b_j``; gram only: ``‖g_j‖``) and before each tile
a rigorous upper bound of every fast value a direction could produce (Cauchy–Schwarz per block, plus
``eps_t``) is compared with each target row's current K-th best; a direction whose bound is below every
target's K-th is skipped, and the GEMM too when all four are. A candidate skipped so could not have
entered the fast top-K, so pruned and unpruned runs keep the same candidates and give the same result.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from unspeakable.kernels import torch_threads
from unspeakable.kernels.screen import dot_error_unit
from unspeakable.kernels.screen import row_block as _block, row_gather as _gather, row_tiles as _tiles
from unspeakable.kernels.sym_plan import NEG_INF, BlockBounds, Plan, Rows, State, block_bounds
from unspeakable.kernels.top2 import Top2, take_best, top2_reference, top2_torch

U32 = 2.0**-24  # float32 unit roundoff (the epilogue is float32 in every precision)
TINY = 2.0**-126  # smallest normal float32: the absolute error of a flushed subnormal (FTZ / DAZ)
# A row whose fast magnitudes could reach this is recomputed in float64: the a-priori bound assumes no
# float32 overflow anywhere in a row's dot products and epilogue (float32 max is ~2^128).
RANGE_LIMIT = 2.0**100
F64_SLACK = 1.0 + 2.0**-40  # rounds a float64-computed norm or bound up past its own rounding error
PRECISIONS = ("ieee", "tf32", "bf16")
# Rows per block of the torch pass. 2048 looked 14 % faster under load (GEMM per flop), but on the quiet
# machine 1024 wins: GPT-2 shape 16.3 / 17.0 s at 1024 against 19.3 / 19.0 s at 2048 (alternated runs): a
# 1024 x 1024 float32 tile (4 MB) stays in cache through its epilogues, a 2048 x 2048 one (16 MB) does not.
TORCH_BLOCK = 1024


@dataclass(frozen=True)
class KeyMap:
    """How the witness keys derive from the gram rows: ``k̂_j = P(g_j − center)``.

    ``center64``: float64 ``[d]`` (None: zero). ``sum_zero``: P projects onto ``1⊥`` (layernorm), else P = I.
    """

    center64: torch.Tensor | None = None
    sum_zero: bool = False


@dataclass(frozen=True)
class OtherGram:
    """A second gram convention counted in the same pass (the report names both, DESIGN §3.2): its rows
    ``g'_j`` relate to the witness keys as the main gram rows do, ``k̂_j = P(g'_j − center)`` (``key_map``;
    None: ``k̂_j = g'_j``). ``rows()`` returns them as float64 ``[V, d]`` CPU (never written here): it is
    called once to bound the pass's error and once more, after the float32 operands are freed, to rescore
    the kept candidates, so a copy made for it never lives beside the float32 pass. It may also return rows
    computed on demand: any object of that ``shape`` whose ``[r0:r1]`` and ``[index array]`` give float64
    numpy rows (the engine's ``FoldedRows``); the pass then reads them block by block and row by row and
    builds them whole only for rows it recomputes over all V."""

    rows: Callable[[], torch.Tensor]
    key_map: KeyMap | None = None


@dataclass
class SymScreenStats:
    """What the pass did. ``tiles``: row-block pairs I ≤ J; ``tiles_skipped``: pairs whose GEMM was pruned;
    ``directions`` / ``directions_skipped``: (tile, reduction) pairs and those pruned."""

    backend: str
    precision: str
    block: int
    tiles: int = 0
    tiles_skipped: int = 0
    directions: int = 0
    directions_skipped: int = 0
    gram_recomputed: int = 0  # rows recomputed in float64 over all V columns
    witness_recomputed: int = 0
    gram_rescored: int = 0  # rows whose near-tied kept candidates were rescored in float64
    witness_rescored: int = 0
    other_recomputed: int = 0  # the same for the OtherGram convention, when one was counted
    other_rescored: int = 0
    out_of_range_rows: int = 0
    times_s: dict = field(default_factory=dict)

    @property
    def skipped_fraction(self) -> float:
        return self.tiles_skipped / self.tiles if self.tiles else 0.0

    def to_json(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items()}, "skipped_fraction": self.skipped_fraction}


@dataclass
class SymScreen:
    """Both screens: float64 values, int64 indices, on the CPU. ``witness`` is None when no keys were given."""

    gram: Top2
    witness: Top2 | None
    stats: SymScreenStats
    other: Top2 | None = None  # the OtherGram convention's gram screen (None: not asked, or the backend has none)


# ----------------------------------------------------------------------------------------- validation


def _check_inputs(gram_rows64, keys64, scale64, bias64, key_map) -> None:
    if len(gram_rows64.shape) != 2:
        raise ValueError(f"gram_rows64 must be [V, d], got shape {tuple(gram_rows64.shape)}")
    V, d = gram_rows64.shape
    if not isinstance(gram_rows64, torch.Tensor):  # rows computed on demand (see OtherGram): block by block
        _check_lazy(gram_rows64, V, d, "gram_rows64")
    given = {"scale64": (scale64, (V,)), "bias64": (bias64, (V,))}
    if isinstance(gram_rows64, torch.Tensor):
        given["gram_rows64"] = (gram_rows64, (V, d))
    if isinstance(keys64, torch.Tensor):
        given["keys64"] = (keys64, (V, d))
    elif keys64 is not None:  # keys computed on demand, like the gram rows
        _check_lazy(keys64, V, d, "keys64")
    if key_map is not None and key_map.center64 is not None:
        given["key_map.center64"] = (key_map.center64, (d,))
    for name, (t, shape) in given.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != torch.float64 or t.device.type != "cpu":
            raise TypeError(f"{name} must be a float64 CPU tensor (the master copy), got {t.dtype} on {t.device}")
        # A finite sum proves every entry finite (inf and NaN propagate) in one vectorised pass; only a
        # non-finite sum (bad entries, or an overflow) pays for the elementwise check.
        if not bool(torch.isfinite(t.sum())):
            bad = (~torch.isfinite(t)).nonzero()
            if bad.numel():
                raise ValueError(f"{name} has {bad.shape[0]} non-finite entries, first at {bad[0].tolist()}")
    if keys64 is None and (scale64 is not None or bias64 is not None or key_map is not None):
        raise ValueError("scale64, bias64 and key_map describe the witness screen: they need keys64")
    if keys64 is not None and scale64 is None:
        raise ValueError("the witness screen needs scale64 (x_t = scale64[t] * keys64[t])")
    if scale64 is not None and bool((scale64 < 0).any()):
        raise ValueError("scale64 must be >= 0 (x_t = s_t k_t points along the token's own key)")


# ------------------------------------------------------------------------------- float64 row quantities


def _whole(x64) -> torch.Tensor:
    return x64 if isinstance(x64, torch.Tensor) else torch.from_numpy(np.asarray(x64, dtype=np.float64))


def _norms(x64, chunk: int = 8192) -> torch.Tensor:
    out = torch.empty(x64.shape[0], dtype=torch.float64)
    for r0 in range(0, x64.shape[0], chunk):
        out[r0:r0 + chunk] = torch.linalg.vector_norm(_block(x64, r0, r0 + chunk), dim=1)
    return out * F64_SLACK


def _dot_eps(norm, nmax, d, precision):
    """|fast h_t·h_j - h_t·h_j| for every j: relative dot error of the precision, plus flushed subnormal
    inputs, products and partial sums (absolute, TINY each), plus the float64 reference's own rounding."""
    rel = dot_error_unit(precision, d) + dot_error_unit("float64", d)
    return rel * norm * nmax + 2.0 * TINY * (math.sqrt(d) * (norm + nmax) + 2 * d + 4)


def _gram_only_rows(g64, precision) -> Rows:
    """Gram screen on a GEMM of the gram rows themselves: the fast value is the dot, no epilogue."""
    V, d = g64.shape
    norm = _norms(g64)
    nmax = float(norm.max()) if V else 0.0
    eps = _dot_eps(norm, nmax, d, precision)
    in_range = norm * nmax * 2.0 < RANGE_LIMIT
    return Rows(norm, eps, in_range, norm, eps)  # f(t, j) <= ‖g_t‖ ‖g_j‖ + eps_t


@dataclass
class _Corrections:
    """``g_t·g_j = k̂_t·k̂_j + a_t a_j + beta_t + beta_j + gamma`` for the model keys ``k̂ = P(g − c)``
    (a = σ/√d with σ the row sums, sum_zero only; beta_j = k̂_j·Pc; gamma = ‖Pc‖²), and the norms of k̂
    and of the residual ``k − k̂`` between the caller's keys and the model."""

    a: torch.Tensor | None
    beta: torch.Tensor | None
    gamma: float
    khat_norm: torch.Tensor
    resid_norm: torch.Tensor


def _model_keys(g64, r0, r1, key_map: KeyMap | None) -> torch.Tensor:
    """``k̂_j = P(g_j − c)`` for rows r0:r1, in float64."""
    k = _block(g64, r0, r1).clone()
    if key_map is None:
        return k
    if key_map.center64 is not None:
        k -= key_map.center64
    if key_map.sum_zero:
        k -= k.mean(dim=1, keepdim=True)
    return k


def _corrections(g64, keys64, key_map: KeyMap | None, chunk: int = 8192) -> _Corrections:
    V, d = g64.shape
    p = torch.zeros(d, dtype=torch.float64)
    if key_map is not None and key_map.center64 is not None:
        p = key_map.center64 - (key_map.center64.mean() if key_map.sum_zero else 0.0)  # P c
    a = None
    if key_map is not None and key_map.sum_zero:
        a = torch.cat([_block(g64, r0, r0 + chunk).sum(dim=1) for r0 in range(0, V, chunk)]) / math.sqrt(d)
    beta = None if not bool(p.any()) else torch.empty(V, dtype=torch.float64)
    kn, en = torch.empty(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    same = keys64 is g64 and key_map is None
    for r0 in range(0, V, chunk):
        r1 = min(V, r0 + chunk)
        kh = _model_keys(g64, r0, r1, key_map)
        kn[r0:r1] = torch.linalg.vector_norm(kh, dim=1)
        if beta is not None:
            beta[r0:r1] = kh @ p
        if not same:
            en[r0:r1] = torch.linalg.vector_norm(_block(keys64, r0, r1) - kh, dim=1)
    # The residual is itself computed in float64: pad it by the rounding of a difference of that size.
    en = (en + 4.0 * 2.0**-53 * kn) * F64_SLACK
    return _Corrections(a, beta, float(p @ p), kn * F64_SLACK, en)


def _witness_rows(keys64, scale64, bias64, precision) -> Rows:
    """Bounds for the epilogue value ``f = s_t S_tj + b_j`` (S the float32 Gram of the keys; two roundings)."""
    V, d = keys64.shape
    kn = _norms(keys64)
    kmax = float(kn.max())
    bmax = 0.0 if bias64 is None else float(bias64.abs().max())
    s = scale64
    mag = s * kn * kmax  # |s_t S_tj| and every partial result
    eps = 2.0 * (s * _dot_eps(kn, kmax, d, precision) + 2.0 * U32 * (mag + bmax) + TINY * (kn * kmax + 4.0))
    eps = eps + 8.0 * 2.0**-53 * (mag + bmax)  # the float64 reference's s * dot + b
    in_range = (2.0 * kn * kmax * torch.clamp(s, min=1.0) + bmax < RANGE_LIMIT) & (s < RANGE_LIMIT)
    return Rows(kn, eps, in_range, s * kn * F64_SLACK, eps)  # f(t, j) <= s_t ‖k_t‖ ‖k_j‖ + b_j + eps_t


def _gram_from_keys_rows(g64, keys64, corr: _Corrections, precision) -> Rows:
    """Bounds for the gram epilogue on the keys' Gram: ``f = S_tj + a_t a_j + beta_j`` (three float32
    roundings), the real ``g_t·g_j`` less the row constant ``beta_t + gamma``, up to the residual."""
    V, d = g64.shape
    gn, kn = _norms(g64), _norms(keys64)
    gmax, kmax = float(gn.max()), float(kn.max())
    a_abs = torch.zeros(V, dtype=torch.float64) if corr.a is None else corr.a.abs()
    beta = torch.zeros(V, dtype=torch.float64) if corr.beta is None else corr.beta
    amax, bemax = float(a_abs.max()), float(beta.abs().max())
    inner = kn * kmax + a_abs * amax + bemax  # |f| and every partial result
    eps = 2.0 * (_dot_eps(kn, kmax, d, precision) + 4.0 * U32 * inner + TINY * (inner + 8.0))
    khmax, emax = float(corr.khat_norm.max()), float(corr.resid_norm.max())
    # |k_t·k_j − k̂_t·k̂_j| for the caller's keys k = k̂ + e, and float64 rounding of a, beta, gamma and of the
    # reference's g_t·g_j (generous: (d+4)^1.5 ulps of every magnitude involved).
    mismatch = corr.resid_norm * (khmax + emax) + corr.khat_norm * emax
    f64 = 8.0 * (d + 4) ** 1.5 * 2.0**-53 * (gn * gmax + kn * kmax + a_abs * amax + bemax + beta.abs() + corr.gamma)
    eps = eps + mismatch + f64
    in_range = 2.0 * inner < RANGE_LIMIT
    # f(t, j) <= g_t·g_j − beta_t − gamma + eps_t <= ‖g_t‖ ‖g_j‖ − beta_t − gamma + eps_t
    shift = eps - beta - corr.gamma
    return Rows(gn, eps, in_range, gn, shift + shift.abs() * 2.0**-40)


# ------------------------------------------------------------------------------- sorted fast operands


def round_inputs(x32: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 operands as the precision's dot sees them: TF32 keeps 10 mantissa bits, bf16 7 (round to
    nearest even). Used by the torch backend to reproduce those precisions on the CPU."""
    if precision == "ieee":
        return x32
    if precision == "bf16":
        return x32.to(torch.bfloat16).to(torch.float32)
    b = x32.contiguous().view(torch.int32)
    return ((b + 0xFFF + ((b >> 13) & 1)) & -0x2000).view(torch.float32)


def _sorted_f32(x64: torch.Tensor, perm: torch.Tensor, precision: str, chunk: int = 1024) -> torch.Tensor:
    """``x64[perm]`` as float32, filled in chunks through one reused float64 buffer: no float64 copy of
    the whole matrix."""
    out = torch.empty(x64.shape, dtype=torch.float32)
    buf = torch.empty((min(chunk, x64.shape[0]), x64.shape[1]), dtype=torch.float64)
    for r0 in range(0, x64.shape[0], chunk):
        m = min(chunk, x64.shape[0] - r0)
        _gather(x64, perm[r0:r0 + m], out=buf[:m])
        out[r0:r0 + m] = round_inputs(buf[:m].to(torch.float32), precision)
    return out


def _take(rows: Rows | None, perm) -> Rows | None:
    return None if rows is None else Rows(*(getattr(rows, f)[perm] for f in rows.__dataclass_fields__))


def _check_lazy(g, V: int, d: int, name: str) -> None:
    """Rows computed on demand: float64 numpy rows of shape ``(V, d)`` by ``[r0:r1]`` and ``[index array]``,
    every entry finite (checked block by block)."""
    if tuple(g.shape) != (V, d) or np.dtype(getattr(g, "dtype", None)) != np.float64:
        raise ValueError(f"{name} must give float64 rows of shape {(V, d)}")
    if not all(bool(torch.isfinite(_block(g, r0, r0 + 8192)).all()) for r0 in range(0, V, 8192)):
        raise ValueError(f"{name} has non-finite entries")


def _other_rows(other: OtherGram, V: int, d: int):
    g = other.rows()
    if not isinstance(g, torch.Tensor):
        _check_lazy(g, V, d, "OtherGram.rows()")
        return g
    if tuple(g.shape) != (V, d) or g.dtype != torch.float64 or g.device.type != "cpu":
        raise ValueError(f"OtherGram.rows() must return a float64 CPU tensor of shape {(V, d)}")
    if not bool(torch.isfinite(g.sum())) and not bool(torch.isfinite(g).all()):
        raise ValueError("OtherGram.rows() has non-finite entries")
    return g


def _plan(g64, keys64, scale64, bias64, key_map, precision, block, other: OtherGram | None = None) -> Plan:
    corr = None
    if keys64 is None:
        gram, wit = _gram_only_rows(g64, precision), None
        key = gram.norm
    else:
        corr = _corrections(g64, keys64, key_map)
        gram = _gram_from_keys_rows(g64, keys64, corr, precision)
        wit = _witness_rows(keys64, scale64, bias64, precision)
        key = float(wit.ub_scale.median()) * wit.norm + (0.0 if bias64 is None else bias64)
        if other is not None:  # its float64 rows live only here, before the float32 operands exist
            g2 = _other_rows(other, *g64.shape)
            corr2 = _corrections(g2, keys64, other.key_map)
            other_rows = _gram_from_keys_rows(g2, keys64, corr2, precision)
            del g2
    # Descending key: blocks of likely winners come first and raise every row's K-th best early.
    perm = torch.argsort(key, descending=True, stable=True)
    if other is not None:
        other_rows = _take(other_rows, perm)
    f32 = lambda t: None if t is None else t[perm].to(torch.float32)  # noqa: E731
    plan = Plan(perm, _sorted_f32(g64 if keys64 is None else keys64, perm, precision), _take(gram, perm),
                 _take(wit, perm), None, None, None, None, None, block)
    if keys64 is not None:
        plan.a32, plan.beta32, plan.s32, plan.b32 = f32(corr.a), f32(corr.beta), f32(scale64), f32(bias64)
        plan.bias_sorted = None if bias64 is None else bias64[perm]
        if other is not None:
            plan.other, plan.a2_32, plan.beta2_32 = other_rows, f32(corr2.a), f32(corr2.beta)
    return plan


# ---------------------------------------------------------------------------------------------- pruning


def _needed(rows: Rows, bb: BlockBounds, vals: torch.Tensor, t0: int, t1: int, jb: int) -> bool:
    """Whether some target row t0:t1 could take a candidate of block jb into its fast top-K."""
    u = rows.ub_scale[t0:t1]
    du = u - bb.m
    ub = bb.E[jb] + torch.maximum(du * bb.nmax[jb], du * bb.nmin[jb]) + rows.ub_shift[t0:t1]
    # Not (ub < K-th): a NaN bound or K-th value keeps the direction (never skip on a non-number).
    return bool((~(ub < vals[t0:t1, -1].double())).any())


# ----------------------------------------------------------------------------------------- torch pass


def _fold(T: torch.Tensor, dim: int, vals: torch.Tensor, idx: torch.Tensor, t0: int, c0: int) -> None:
    """Fold the candidates of tile ``T`` into the running top-K of its targets.

    dim=1: the targets are T's rows (sorted positions t0 + i), the candidates its columns (c0 + j);
    dim=0: the transpose. Ties among fast values need no rule here: equal fast values are within 2 eps of
    each other, so they are rescored in float64 and ordered by the reference's rule.
    """
    m = T.amax(dim=dim)
    th = vals[t0:t0 + m.shape[0], -1]
    # Only rows whose tile max beats their K-th best need the candidates (a NaN max counts as a hit: it
    # reaches the state, and a non-finite slot sends the row to float64).
    hit = (~(m <= th)).nonzero().squeeze(1)
    if hit.numel() == 0:
        return
    sub = T.index_select(1 - dim, hit)
    cv, ci = torch.topk(sub, min(vals.shape[1], T.shape[dim]), dim=dim)
    if dim == 0:
        cv, ci = cv.T, ci.T
    # -inf is the masked self column (or an empty slot): never a competitor, index -1.
    ci = torch.where(cv == NEG_INF, -1, ci + c0)
    rows = hit + t0
    tv, tj = torch.topk(torch.cat([vals[rows], cv], 1), vals.shape[1], dim=1)
    vals[rows] = tv
    idx[rows] = torch.cat([idx[rows], ci], 1).gather(1, tj)


def _epilogue(S, W, plan: Plan, r0, r1, c0, c1, screen: str, transpose: bool) -> torch.Tensor:
    """Fast values of one screen on the tile, targets t in rows (``transpose`` False: rows r0:r1) or in
    columns (True: rows c0:c1), candidates j the other side. One pass each (out= into a buffer):

    * witness: ``s_t S_tj + b_j`` (addcmul);
    * gram (and "other", the OtherGram convention, with its own a and beta): ``S_tj + a_t a_j + beta_j``
      (addr, add); S itself when there are no corrections.
    """
    tr, cr = ((c0, c1), (r0, r1)) if transpose else ((r0, r1), (c0, c1))
    shape_t = (1, -1) if transpose else (-1, 1)  # broadcast of a per-target vector
    shape_c = (-1, 1) if transpose else (1, -1)  # of a per-candidate vector
    if screen == "witness":
        s = plan.s32[tr[0]:tr[1]].view(shape_t)
        if plan.b32 is None:
            return torch.mul(S, s, out=W)
        return torch.addcmul(plan.b32[cr[0]:cr[1]].view(shape_c), S, s, out=W)
    a32, beta32 = (plan.a32, plan.beta32) if screen == "gram" else (plan.a2_32, plan.beta2_32)
    T = S
    if a32 is not None:
        T = torch.addr(S, a32[r0:r1], a32[c0:c1], out=W)  # a a^T is symmetric: same both ways
    if beta32 is not None:
        T = torch.add(T, beta32[cr[0]:cr[1]].view(shape_c), out=W)
    return T


def _tile_torch(plan, bufs, states, r0, r1, c0, c1, dirs, gemm_threads: int = 1) -> None:
    """One tile pair: S = H_I H_J^T once (``gemm_threads``), then the needed reductions among the four (six
    with an OtherGram) on the calling thread."""
    n, m = r1 - r0, c1 - c0
    S, W = (b[:n * m].view(n, m) for b in bufs)
    with torch_threads(gemm_threads):
        torch.mm(plan.h32[r0:r1], plan.h32[c0:c1].T, out=S)
    _reduce_tile(plan, S, W, states, r0, r1, c0, c1, dirs)


def _reduce_tile(plan, S, W, states, r0, r1, c0, c1, dirs) -> None:
    diag = r0 == c0
    # Witness first: a gram epilogue without corrections is S itself, and its masked diagonal (-inf) would
    # turn the witness's s_t * S_tt into NaN where s_t = 0 (the grams only add finite terms to -inf).
    for screen, st, k in (("witness", states[1], 2), ("gram", states[0], 0), ("other", states[2], 4)):
        for transpose in (False, True):
            if not dirs[k + transpose]:
                continue
            T = _epilogue(S, W, plan, r0, r1, c0, c1, screen, transpose)
            if diag:
                T.fill_diagonal_(NEG_INF)  # self is no competitor: -inf never wins a max
            _fold(T, 0 if transpose else 1, st.vals, st.idx, c0 if transpose else r0, r0 if transpose else c0)


def _fast_torch(plan: Plan, prune: bool, stats: SymScreenStats, gemm_threads: int):
    """The symmetric schedule: for I, for J >= I, tile (I, J) updates rows I and rows J. Returns the
    states of the gram, witness and other screens (None where there is none)."""
    V, B = plan.h32.shape[0], plan.block
    gs, ws = State(V), (None if plan.wit is None else State(V))
    os_ = None if plan.other is None else State(V)
    gb = block_bounds(plan.gram, None, B)
    wb = None if plan.wit is None else block_bounds(plan.wit, plan.bias_sorted, B)
    ob = None if plan.other is None else block_bounds(plan.other, None, B)
    bufs = [torch.empty(B * B, dtype=torch.float32) for _ in range(2)]
    for ib, r0 in enumerate(range(0, V, B)):
        r1 = min(V, r0 + B)
        for jb, c0 in enumerate(range(r0, V, B), start=ib):
            c1 = min(V, c0 + B)
            dirs = _directions(plan, (gb, wb, ob), (gs, ws, os_), (r0, r1, ib), (c0, c1, jb), prune)
            stats.tiles += 1
            stats.directions += sum(x is not None for x in dirs)
            stats.directions_skipped += sum(x is False for x in dirs)
            if not any(dirs):
                stats.tiles_skipped += 1
                continue
            _tile_torch(plan, bufs, (gs, ws, os_), r0, r1, c0, c1, dirs, gemm_threads)
    return gs, ws, os_


def _directions(plan, bounds, states, I, J, prune) -> list:
    """[gram rows I, gram rows J, witness rows I, witness rows J, other rows I, other rows J]: True
    (reduce), False (pruned) or None (does not exist: the diagonal tile's column reductions are its row
    reductions; no witness; no other gram)."""
    (r0, r1, ib), (c0, c1, jb) = I, J
    diag = r0 == c0
    out = []
    for rows, bb, st in zip((plan.gram, plan.wit, plan.other), bounds, states):
        for (t0, t1), blk, exists in (((r0, r1), jb, True), ((c0, c1), ib, not diag)):
            if rows is None or not exists:
                out.append(None)
            else:
                out.append(True if not prune else _needed(rows, bb, st.vals, t0, t1, blk))
    return out


# ------------------------------------------------------------------------------------ exact recovery


def _slots_to_original(st: State, perm: torch.Tensor):
    """The state in the original row order, candidate positions mapped back to token ids (-1: empty)."""
    V = perm.shape[0]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(V)
    pos = st.idx[inv]
    return inv, st.vals[inv].double(), torch.where(pos >= 0, perm[pos.clamp(min=0)], -1)


def _pair_scores64(q64, keys64, rows, cols, scale64, bias64, chunk: int = 1024) -> torch.Tensor:
    """float64 scores of the pairs (rows[i], cols[i]), as the reference computes them (dot, then scale,
    then bias), in cache-sized chunks gathered into two reused buffers (no fresh pages per chunk; measured
    faster than large chunks or ``vecdot``). ``rows = cols = None``: every row's self score."""
    n = q64.shape[0] if rows is None else rows.shape[0]
    out = torch.empty(n, dtype=torch.float64)
    qa = torch.empty((min(chunk, n), q64.shape[1]), dtype=torch.float64)
    kb = torch.empty_like(qa)
    for c0 in range(0, n, chunk):
        m = min(chunk, n - c0)
        if rows is None:
            torch.mul(_block(q64, c0, c0 + m), _block(keys64, c0, c0 + m), out=qa[:m])
        else:
            _gather(q64, rows[c0:c0 + m], out=qa[:m])
            _gather(keys64, cols[c0:c0 + m], out=kb[:m])
            qa[:m].mul_(kb[:m])
        torch.sum(qa[:m], dim=1, out=out[c0:c0 + m])
    return _pair_affine(out, scale64, bias64, rows, cols)


def _pair_affine(out, scale64, bias64, rows, cols):
    """``scale[row] * dot + bias[col]``, as the reference applies them (after the dot)."""
    if scale64 is not None:
        out = out * (scale64 if rows is None else scale64[rows])
    if bias64 is not None:
        out = out + (bias64 if cols is None else bias64[cols])
    return out


def _first_two(vals: torch.Tensor, ids: torch.Tensor):
    """Best and second of each row over slots (value, then the smaller id: the reference's tie rule)."""
    b_val, b_idx = take_best(vals, ids)
    taken = ids == b_idx[:, None]
    s_val, s_idx = take_best(vals.masked_fill(taken, NEG_INF), ids.masked_fill(taken, -1))
    return b_val, b_idx, s_val, s_idx


def _recover(st: State, rows: Rows, perm, q64, keys64, scale64, bias64) -> tuple[Top2, int, int]:
    """Exact best / second indices, values rescored in float64.

    The float64 reference's best and second lie among the j whose fast value is >= (fast second) − 2 eps
    (each fast value is within eps of the reference's). When those all sit in the kept top-K, their
    float64 scores decide (O(K) dots per row); otherwise (more near ties than slots, a non-finite or
    missing slot, or a row out of float32 range) the row is recomputed in float64 over all V columns.
    Returns (result, rows recomputed over all V, rows decided by rescoring more than two candidates).
    """
    V = perm.shape[0]
    K = st.vals.shape[1]
    inv, v, cand = _slots_to_original(st, perm)
    eps, in_range = rows.eps[inv], rows.in_range[inv]
    need = min(K, V - 1)  # slots that must be filled: every row has V - 1 competitors
    f2 = v[:, 1] if need >= 2 else torch.full((V,), NEG_INF, dtype=torch.float64)
    # not (v < f2 - 2 eps): NaN counts as near, so a non-finite value is never ruled out
    near = ~(v < (f2 - 2.0 * eps)[:, None]) & (cand >= 0)
    full = ~in_range
    if need > 0:
        full |= (cand[:, :need] < 0).any(dim=1) | (~torch.isfinite(v[:, :need])).any(dim=1)
    if V - 1 > K:
        full |= near[:, K - 1]  # the last slot is near: more near ties may lie outside the top-K
    # Every other row decides among its near slots by their float64 scores (usually the two best only).
    pr, ps = (near & ~full[:, None]).nonzero(as_tuple=True)
    scores = torch.full_like(v, NEG_INF)
    scores[pr, ps] = _pair_scores64(q64, keys64, pr, cand[pr, ps], scale64, bias64)
    best_val, best_idx, second_val, second_idx = _first_two(scores, torch.where(near, cand, -1))
    gap_small = ~(v[:, 0] - f2 > 2.0 * eps)
    rescored = int((((near.sum(dim=1) > 2) | gap_small) & ~full).sum())
    redo = full.nonzero().squeeze(1)
    if redo.numel():
        ex = top2_torch(_gather(q64, redo), _tiles(keys64), redo, scale=None if scale64 is None else scale64[redo],
                        bias=bias64, block_rows=256, block_cols=8192)
        best_idx[redo], second_idx[redo] = ex.best_idx, ex.second_idx
        for val, idx in ((best_val, best_idx), (second_val, second_idx)):  # rescored like every other row
            val[redo] = _pair_scores64(q64, keys64, redo, idx[redo].clamp(min=0), scale64, bias64)
            val[redo] = torch.where(idx[redo] >= 0, val[redo], NEG_INF)
    self_val = _pair_scores64(q64, keys64, None, None, scale64, bias64)
    return Top2(best_val, best_idx, second_val, second_idx, self_val), int(redo.numel()), rescored


# ----------------------------------------------------------------------------------------------- entry


def sym_screen(
    gram_rows64: torch.Tensor,
    keys64: torch.Tensor | None = None,
    scale64: torch.Tensor | None = None,
    bias64: torch.Tensor | None = None,
    key_map: KeyMap | None = None,
    *,
    backend: str = "torch",
    device: torch.device | str = "cpu",
    precision: str = "ieee",
    block: int | None = None,
    prune: bool = True,
    other: OtherGram | None = None,
) -> SymScreen:
    """Gram screen and (optionally) witness screen in one symmetric pass, indices exact.

    Args:
        gram_rows64: float64 ``[V, d]`` CPU, the gram screen's rows ``g_j`` (never written), or rows computed
            on demand as :class:`OtherGram` describes (read block by block and row by row).
        keys64: float64 ``[V, d]``, the witness keys ``k_j``; None: gram screen only (the box domain,
            whose screen point is not a multiple of ``k_t``, runs its witness screen with
            ``kernels.screen.top2_exact`` instead). May be ``gram_rows64`` itself (centred rows), or keys
            computed on demand, read like lazy gram rows.
        scale64: float64 ``[V]`` ≥ 0, ``x_t = scale64[t] · keys64[t]`` (R/‖k_t‖ balls, 1/‖k_t‖² cone).
        bias64: float64 ``[V]`` or None (no bias: cone).
        key_map: ``keys64 ≈ P(gram_rows64 − center)``; None: ``keys64 ≈ gram_rows64``. Any difference
            between keys64 and the map (float64 rounding, or none at all) is measured and covered by the
            error bound, so a loose map costs recomputations, never exactness.
        backend: "torch" (float32 tiles on the CPU) or "triton" (CUDA, or Triton's interpreter).
        device: where the fast pass runs ("cpu" for torch).
        precision: "ieee", "tf32" or "bf16" (torch backend: operands rounded so, to reproduce them).
        block: rows per block (tile = block × block); default ``TORCH_BLOCK`` (torch), the kernel's tile (triton).
        prune: skip tile reductions that rigorous bounds show cannot change any fast top-K.
        other: a second gram convention (:class:`OtherGram`) reduced from the same tiles (two more
            epilogues); needs keys64. The Triton backend has no third epilogue: there ``other`` is None
            in the result and the caller counts it by a separate pass.

    Returns:
        :class:`SymScreen`: ``gram``, ``witness`` and ``other`` as ``Top2`` over ``j ≠ t`` (float64 values,
        int64 indices, first index on ties as the float64 reference) with self values, and the stats.
    """
    _check_inputs(gram_rows64, keys64, scale64, bias64, key_map)
    if other is not None and keys64 is None:
        raise ValueError("other (a second gram convention) is reduced from the keys' Gram: it needs keys64")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    gemm_threads = torch.get_num_threads()
    # The torch backend runs everything but its GEMMs on one thread (see kernels.torch_threads).
    with torch_threads(1) if backend == "torch" else contextlib.nullcontext():
        return _sym_screen(gram_rows64, keys64, scale64, bias64, key_map, backend, device, precision, block, prune,
                           gemm_threads, other)


def _sym_screen(gram_rows64, keys64, scale64, bias64, key_map, backend, device, precision, block, prune,
                gemm_threads, other) -> SymScreen:
    V = gram_rows64.shape[0]
    user_block = block
    block = block or (TORCH_BLOCK if backend == "torch" else 0)
    stats = SymScreenStats(backend=backend, precision=precision, block=block)
    t0 = time.perf_counter()
    plan = _plan(gram_rows64, keys64, scale64, bias64, key_map, precision, max(1, min(block or 64, max(V, 1))),
                 other if backend == "torch" else None)
    t1 = time.perf_counter()
    gs, ws, os_ = _fast(plan, backend, device, prune, stats, precision, user_block, gemm_threads)
    plan.h32 = None  # the float32 operands are done with: free them before any float64 copy is made
    t2 = time.perf_counter()
    stats.out_of_range_rows = sum(int((~r.in_range).sum()) for r in (plan.gram, plan.wit, plan.other) if r is not None)
    gram, witness = _recover_both(gs, ws, plan, gram_rows64, keys64, scale64, bias64, stats)
    other_top2 = None
    if os_ is not None:
        g2 = _other_rows(other, *gram_rows64.shape)
        other_top2, stats.other_recomputed, stats.other_rescored = _recover(os_, plan.other, plan.perm, g2, g2,
                                                                            None, None)
        del g2
    stats.times_s = {"prepare": t1 - t0, "fast": t2 - t1, "recover": time.perf_counter() - t2}
    return SymScreen(gram, witness, stats, other_top2)


def _recover_both(gs, ws, plan, gram_rows64, keys64, scale64, bias64, stats):
    gram, stats.gram_recomputed, stats.gram_rescored = _recover(gs, plan.gram, plan.perm, gram_rows64,
                                                               gram_rows64, None, None)
    witness = None
    if keys64 is not None:
        witness, stats.witness_recomputed, stats.witness_rescored = _recover(ws, plan.wit, plan.perm, keys64,
                                                                             keys64, scale64, bias64)
    return gram, witness


def _fast(plan, backend, device, prune, stats, precision, block, gemm_threads):
    """The one place the fast pass's backend is chosen."""
    if backend == "triton":
        from unspeakable.kernels.triton_sym import fast_triton

        return (*fast_triton(plan, device, prune, stats, precision=precision, block=block), None)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"the torch backend of sym_screen runs on the CPU, got device {device!r}")
    return _fast_torch(plan, prune, stats, gemm_threads)


def sym_screen_reference(
    gram_rows64: torch.Tensor,
    keys64: torch.Tensor | None = None,
    scale64: torch.Tensor | None = None,
    bias64: torch.Tensor | None = None,
    key_map: KeyMap | None = None,
    other: OtherGram | None = None,
    **_ignored,
) -> SymScreen:
    """Float64 reference with the same signature: untiled V × V float64 (small inputs only); key_map is
    validated and otherwise unused (the witness reads keys64 directly)."""
    _check_inputs(gram_rows64, keys64, scale64, bias64, key_map)
    V = gram_rows64.shape[0]
    ids = torch.arange(V)
    gram_rows64 = _whole(gram_rows64)
    gram = top2_reference(gram_rows64, gram_rows64, ids)
    witness = None
    if keys64 is not None:
        witness = top2_reference(keys64, keys64, ids, scale=scale64, bias=bias64)
    o = None
    if other is not None:
        g2 = _other_rows(other, *gram_rows64.shape)
        g2 = _whole(g2)
        o = top2_reference(g2, g2, ids)
    return SymScreen(gram, witness, SymScreenStats(backend="reference", precision="float64", block=V), o)


__all__ = ["sym_screen", "sym_screen_reference", "KeyMap", "OtherGram", "SymScreen", "SymScreenStats", "PRECISIONS", "round_inputs"]
