"""One symmetric pass for both screens (DESIGN §3 steps 2–3, §4): the gram screen and the witness screen
from a single tiled float32 Gram of the gram rows, each pair of row blocks (I ≤ J) visited once.

Gram rows ``g_j`` (float64 ``[V, d]``: the gain-folded rows ``ũ_j``, or TransformerLens-style centred rows).

* gram screen: ``score_t(j) = g_t·g_j``; per row the best and second best over ``j ≠ t`` and the self value.
* witness screen: keys ``k_j`` (the caller's float64 keys, ``P(ũ_j − c)``), per-row scale ``s_t ≥ 0``
  (``R/‖k_t‖`` for the balls, ``1/‖k_t‖²`` for the cone), bias ``b_j``; the witness logits at
  ``x_t = s_t k_t`` are ``l_t(j) = s_t k_t·k_j + b_j``; per row best / second over ``j ≠ t`` and self.

The keys relate to the gram rows through a :class:`KeyMap` ``k̂_j = P(g_j − c)`` (``P`` = projection onto
``1⊥`` when ``sum_zero``, else the identity; no map: ``k̂_j = g_j``, the centred-rows convention), so

    k̂_t·k̂_j = g_t·g_j − a_t a_j − β_t − β_j + γ,   a = σ/√d (σ = row sums; sum_zero only),
                                                    β_j = g_j·Pc,  γ = ‖Pc‖²,

the Gram plus rank-one corrections held in O(V) vectors. One tile ``S = G_IJ`` therefore feeds four
reductions: gram rows I (over columns J), gram rows J (over rows I), and the witness logits of rows I and
of rows J, computed in the epilogue as ``s_t (S − a_t a_j − β_j) + b_j``. That is the real logit minus
``s_t (γ − β_t)``, a constant per row: it moves neither the argmax over j nor any gap, and every value
returned is rescored in float64 from the float64 inputs. The box domain's screen point ``ρ·sign(k_t)`` is
no multiple of ``k_t``, so it is not a Gram of the rows: there, call this with ``keys64=None`` (gram only)
and run the witness screen separately with ``kernels.screen.top2_exact``.

Exactness (as ``kernels.screen.top2_exact``, plus the second index, issue 8): every fast value is within
an a-priori bound ``eps_t`` of its real-arithmetic value (dot error of the precision, the float32
epilogue's roundings, flushed subnormals, float64 rounding of the reference and of the key map, and
``‖k_j − k̂_j‖``). The fast pass keeps a top-3 per row; a row whose best − second or second − third is
``≤ 2 eps_t``, or that has an empty or non-finite slot, or whose magnitudes could overflow float32, is
recomputed in float64 over all columns. Then best / second / self are rescored in float64. Indices equal a
float64 reference on every row (ties aside), and so does the second index.

Pruning: rows are sorted by a key (witness: ``m·‖k̂_j‖ + b_j``; gram only: ``‖g_j‖``) and before each tile
a rigorous upper bound of every fast value a direction could produce (Cauchy–Schwarz, plus ``eps_t``) is
compared with each target row's current third best; a direction whose bound is below every target's third
is skipped, and the GEMM too when all four are. A candidate skipped so could not have entered the fast
top-3, so pruned and unpruned runs give the same fast top-3 and the same result.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from kernels.screen import PRECISION_UNIT, _gather_scores64, dot_error_unit
from kernels.top2 import Top2, top2_reference, top2_torch

NEG_INF = float("-inf")
U32 = 2.0**-24  # float32 unit roundoff (the epilogue is float32 in every precision)
TINY = 2.0**-126  # smallest normal float32: the absolute error of a flushed subnormal (FTZ / DAZ)
# A row whose fast magnitudes could reach this is recomputed in float64: the a-priori bound assumes no
# float32 overflow anywhere in a row's dot products and epilogue (float32 max is ~2^128).
RANGE_LIMIT = 2.0**100
F64_SLACK = 1.0 + 2.0**-40  # rounds a float64-computed norm or bound up past its own rounding error
PRECISIONS = ("ieee", "tf32", "bf16")


@dataclass(frozen=True)
class KeyMap:
    """How the witness keys derive from the gram rows: ``k̂_j = P(g_j − center)``.

    ``center64``: float64 ``[d]`` (None: zero). ``sum_zero``: P projects onto ``1⊥`` (layernorm), else P = I.
    """

    center64: torch.Tensor | None = None
    sum_zero: bool = False


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
    gram_recomputed: int = 0
    witness_recomputed: int = 0
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


# ----------------------------------------------------------------------------------------- validation


def _check_inputs(gram_rows64, keys64, scale64, bias64, key_map) -> None:
    if gram_rows64.dim() != 2:
        raise ValueError(f"gram_rows64 must be [V, d], got shape {tuple(gram_rows64.shape)}")
    V, d = gram_rows64.shape
    given = {"gram_rows64": (gram_rows64, (V, d)), "keys64": (keys64, (V, d)), "scale64": (scale64, (V,)),
             "bias64": (bias64, (V,))}
    if key_map is not None and key_map.center64 is not None:
        given["key_map.center64"] = (key_map.center64, (d,))
    for name, (t, shape) in given.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != torch.float64 or t.device.type != "cpu":
            raise TypeError(f"{name} must be a float64 CPU tensor (the master copy), got {t.dtype} on {t.device}")
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


@dataclass
class _Rows:
    """float64 per-row quantities of one screen, in the original order."""

    norm: torch.Tensor  # [V] upper bound of ‖g_t‖ (gram) or ‖k̂_t‖ (witness)
    eps: torch.Tensor  # [V] |fast value - real value| <= eps for every competitor j of row t
    in_range: torch.Tensor  # [V] bool: no float32 overflow possible in this row's fast values
    ub_scale: torch.Tensor  # [V] fast value of (t, j) <= ub_scale[t] * norm[j] + ub_shift[t] + bias[j]
    ub_shift: torch.Tensor  # [V]


def _norms(x64: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    out = torch.empty(x64.shape[0], dtype=torch.float64)
    for r0 in range(0, x64.shape[0], chunk):
        out[r0:r0 + chunk] = torch.linalg.vector_norm(x64[r0:r0 + chunk], dim=1)
    return out * F64_SLACK


def _dot_eps(norm, nmax, d, precision):
    """|fast g_t·g_j - g_t·g_j| for every j: relative dot error, plus flushed subnormal inputs, products
    and partial sums (absolute, TINY each), plus the float64 reference's own rounding."""
    rel = dot_error_unit(precision, d) + dot_error_unit("float64", d)
    return rel * norm * nmax + 2.0 * TINY * (math.sqrt(d) * (norm + nmax) + 2 * d + 4)


def _gram_rows(g64, precision) -> _Rows:
    V, d = g64.shape
    norm = _norms(g64)
    nmax = float(norm.max()) if V else 0.0
    eps = _dot_eps(norm, nmax, d, precision)
    in_range = norm * nmax * 2.0 < RANGE_LIMIT
    return _Rows(norm, eps, in_range, norm, eps)  # f(t, j) <= ‖g_t‖ ‖g_j‖ + eps_t


@dataclass
class _Corrections:
    """``G_tj - a_t a_j - beta_t - beta_j + gamma = k̂_t·k̂_j`` (a is None without sum_zero)."""

    a: torch.Tensor | None
    beta: torch.Tensor | None
    gamma: float


def _corrections(g64, key_map: KeyMap | None) -> _Corrections:
    if key_map is None:
        return _Corrections(None, None, 0.0)
    d = g64.shape[1]
    p = torch.zeros(d, dtype=torch.float64) if key_map.center64 is None else key_map.center64.clone()
    a = None
    if key_map.sum_zero:
        p -= p.mean()  # P c, with P the projection onto 1⊥
        a = g64.sum(dim=1) / math.sqrt(d)
    beta = g64 @ p  # P g_j · P c = g_j · P c (P symmetric, idempotent)
    return _Corrections(a, beta, float(p @ p))


def _model_keys(g64, r0, r1, key_map: KeyMap | None) -> torch.Tensor:
    """``k̂_j = P(g_j − c)`` for rows r0:r1, in float64."""
    k = g64[r0:r1].clone()
    if key_map is None:
        return k
    if key_map.center64 is not None:
        k -= key_map.center64
    if key_map.sum_zero:
        k -= k.mean(dim=1, keepdim=True)
    return k


def _key_norms_and_residuals(g64, keys64, key_map, chunk: int = 8192):
    """(‖k̂_j‖, ‖k_j − k̂_j‖) upper bounds: the residual covers the caller's keys differing from the map."""
    V = g64.shape[0]
    kn = torch.empty(V, dtype=torch.float64)
    en = torch.zeros(V, dtype=torch.float64)
    same = keys64 is g64 and key_map is None
    for r0 in range(0, V, chunk):
        r1 = min(V, r0 + chunk)
        kh = _model_keys(g64, r0, r1, key_map)
        kn[r0:r1] = torch.linalg.vector_norm(kh, dim=1)
        if not same:
            en[r0:r1] = torch.linalg.vector_norm(keys64[r0:r1] - kh, dim=1)
    # The residual is itself computed in float64: pad it by the rounding of a difference of that size.
    en = (en + 4.0 * 2.0**-53 * kn) * F64_SLACK
    return kn * F64_SLACK, en


def _witness_rows(g64, keys64, scale64, bias64, key_map, corr: _Corrections, precision) -> _Rows:
    """Bounds for the epilogue value ``f = s_t (S - a_t a_j - beta_j) + b_j`` (float32, four roundings)."""
    V, d = g64.shape
    gn = _norms(g64)
    nmax = float(gn.max())
    err_s = _dot_eps(gn, nmax, d, precision)
    a_abs = torch.zeros(V, dtype=torch.float64) if corr.a is None else corr.a.abs()
    b_abs = torch.zeros(V, dtype=torch.float64) if corr.beta is None else corr.beta.abs()
    amax, bemax = float(a_abs.max()), float(b_abs.max())
    bmax = 0.0 if bias64 is None else float(bias64.abs().max())
    inner = gn * nmax + a_abs * amax + bemax  # |S - a a - beta| and every partial result inside it
    s = scale64
    eps = 2.0 * (s * (err_s + 6.0 * U32 * inner) + 3.0 * U32 * (s * inner + bmax) + TINY * (inner + 8.0 + 8.0 * s))
    kn, en = _key_norms_and_residuals(g64, keys64, key_map)
    kmax, emax = float(kn.max()), float(en.max())
    # |k_t·k_j − (G − a a − beta − beta + gamma)|: the caller's keys vs the map, plus float64 rounding of
    # a, beta, gamma, the map and the reference's own dot (generous: (d+4)^1.5 ulps of the magnitudes).
    pn = math.sqrt(max(corr.gamma, 0.0))
    f64 = 8.0 * (d + 4) ** 1.5 * 2.0**-53 * ((gn + pn) * (nmax + pn) + kn * kmax)
    mismatch = en * (kmax + emax) + kn * emax + f64
    eps = eps + s * mismatch + 8.0 * 2.0**-53 * (s * kn * kmax + bmax)  # the reference's s * dot + b
    in_range = (inner * torch.clamp(s, min=1.0) + bmax < RANGE_LIMIT) & (s < RANGE_LIMIT)
    beta_t = torch.zeros(V, dtype=torch.float64) if corr.beta is None else corr.beta
    # f(t, j) = s_t (k̂_t·k̂_j + beta_t − gamma) + b_j ± eps_t <= s_t ‖k̂_t‖ ‖k̂_j‖ + s_t (beta_t − gamma) + b_j + eps_t
    shift = s * (beta_t - corr.gamma + mismatch) + eps
    return _Rows(kn, eps, in_range, s * kn * F64_SLACK, shift + shift.abs() * 2.0**-40)


# ------------------------------------------------------------------------------- sorted fast operands


@dataclass
class _Plan:
    """Everything the fast pass reads, in the sorted order ``perm`` (position p holds row ``perm[p]``)."""

    perm: torch.Tensor  # [V] int64
    g32: torch.Tensor  # [V, d] float32 gram rows, rounded as the precision rounds its inputs
    gram: _Rows  # sorted
    wit: _Rows | None  # sorted
    a32: torch.Tensor | None  # [V] epilogue vectors, float32, sorted
    beta32: torch.Tensor | None
    s32: torch.Tensor | None
    b32: torch.Tensor | None
    bias_sorted: torch.Tensor | None  # float64, for the pruning bound
    block: int


def round_inputs(x32: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 operands as the precision's dot sees them: TF32 keeps 10 mantissa bits, bf16 7 (round to
    nearest even). Used by the torch backend to reproduce those precisions on the CPU."""
    if precision == "ieee":
        return x32
    if precision == "bf16":
        return x32.to(torch.bfloat16).to(torch.float32)
    b = x32.contiguous().view(torch.int32)
    return ((b + 0xFFF + ((b >> 13) & 1)) & -0x2000).view(torch.float32)


def _sorted_f32(x64: torch.Tensor, perm: torch.Tensor, precision: str, chunk: int = 8192) -> torch.Tensor:
    """``x64[perm]`` as float32, filled in chunks: no float64 copy of the whole matrix."""
    out = torch.empty(x64.shape, dtype=torch.float32)
    for r0 in range(0, x64.shape[0], chunk):
        out[r0:r0 + chunk] = round_inputs(x64[perm[r0:r0 + chunk]].to(torch.float32), precision)
    return out


def _take(rows: _Rows | None, perm) -> _Rows | None:
    return None if rows is None else _Rows(*(getattr(rows, f)[perm] for f in rows.__dataclass_fields__))


def _plan(g64, keys64, scale64, bias64, key_map, precision, block) -> _Plan:
    gram = _gram_rows(g64, precision)
    wit = None
    if keys64 is not None:
        corr = _corrections(g64, key_map)
        wit = _witness_rows(g64, keys64, scale64, bias64, key_map, corr, precision)
        m = float(wit.ub_scale.median())
        key = m * wit.norm + (0.0 if bias64 is None else bias64)
    else:
        key = gram.norm
    # Descending key: blocks of likely winners come first and raise every row's third best early.
    perm = torch.argsort(key, descending=True, stable=True)
    f32 = lambda t: None if t is None else t[perm].to(torch.float32)  # noqa: E731
    plan = _Plan(perm, _sorted_f32(g64, perm, precision), _take(gram, perm), _take(wit, perm),
                 None, None, None, None, None, block)
    if keys64 is not None:
        plan.a32, plan.beta32, plan.s32 = f32(corr.a), f32(corr.beta), f32(scale64)
        plan.b32 = f32(bias64)
        plan.bias_sorted = None if bias64 is None else bias64[perm]
    return plan


# ---------------------------------------------------------------------------------------------- pruning


@dataclass
class _BlockBounds:
    """Per block J of sorted rows: ``max_j (m n_j + b_j)`` and the range of ``n_j``, so that for any row
    multiplier u: ``max_j (u n_j + b_j) <= E_J + max((u − m) N_J, (u − m) n_J)`` (linear in n_j)."""

    m: float
    E: torch.Tensor
    nmax: torch.Tensor
    nmin: torch.Tensor


def _block_bounds(rows: _Rows, bias: torch.Tensor | None, block: int) -> _BlockBounds:
    V = rows.norm.shape[0]
    m = float(rows.ub_scale.median()) if V else 0.0
    val = m * rows.norm + (0.0 if bias is None else bias)
    pad = (-V) % block
    def per_block(x, fill, op):  # noqa: E306
        return op(torch.nn.functional.pad(x, (0, pad), value=fill).view(-1, block), dim=1).values
    E = per_block(val, NEG_INF, torch.max)
    E = E + E.abs() * 2.0**-40  # float64 rounding of m n_j + b_j, rounded up
    return _BlockBounds(m, E, per_block(rows.norm, NEG_INF, torch.max), per_block(rows.norm, math.inf, torch.min))


def _needed(rows: _Rows, bb: _BlockBounds, vals: torch.Tensor, t0: int, t1: int, jb: int) -> bool:
    """Whether some target row t0:t1 could take a candidate of block jb into its fast top-3."""
    u = rows.ub_scale[t0:t1]
    du = u - bb.m
    ub = bb.E[jb] + torch.maximum(du * bb.nmax[jb], du * bb.nmin[jb]) + rows.ub_shift[t0:t1]
    # Not (ub < third): a NaN bound or third keeps the direction (never skip on a non-number).
    return bool((~(ub < vals[t0:t1, 2].double())).any())


# ----------------------------------------------------------------------------------------- torch pass


def _fold(T: torch.Tensor, dim: int, vals: torch.Tensor, idx: torch.Tensor, t0: int, c0: int) -> None:
    """Fold the candidates of tile ``T`` into the running top-3 of its targets.

    dim=1: the targets are T's rows (sorted positions t0 + i), the candidates its columns (c0 + j);
    dim=0: the transpose. Ties among fast values need no rule here: equal values in a row's top-3 leave a
    gap of 0 and send the row to the float64 recomputation, whose tie rule is the reference's.
    """
    m = T.amax(dim=dim)
    th = vals[t0:t0 + m.shape[0], 2]
    # Only rows whose tile max beats their third best need the candidates (a NaN max counts as a hit: it
    # reaches the state, and a non-finite slot sends the row to float64).
    hit = (~(m <= th)).nonzero().squeeze(1)
    if hit.numel() == 0:
        return
    sub = T.index_select(1 - dim, hit)
    cv, ci = torch.topk(sub, min(3, T.shape[dim]), dim=dim)
    if dim == 0:
        cv, ci = cv.T, ci.T
    # -inf is the masked self column (or an empty slot): never a competitor, index -1.
    ci = torch.where(cv == NEG_INF, -1, ci + c0)
    rows = hit + t0
    tv, tj = torch.topk(torch.cat([vals[rows], cv], 1), 3, dim=1)
    vals[rows] = tv
    idx[rows] = torch.cat([idx[rows], ci], 1).gather(1, tj)


def _witness_tile(D, W, plan: _Plan, r0, r1, c0, c1, transpose: bool) -> torch.Tensor:
    """Epilogue values ``s_t (S − a_t a_j − beta_j) + b_j`` of the tile, targets t in rows (``transpose``
    False: rows r0:r1) or in columns (True: rows c0:c1); D = S − a a^T already."""
    tr, cr = ((c0, c1), (r0, r1)) if transpose else ((r0, r1), (c0, c1))
    shape_t = (1, -1) if transpose else (-1, 1)  # broadcast of a per-target vector
    shape_c = (-1, 1) if transpose else (1, -1)  # of a per-candidate vector
    if plan.beta32 is not None:
        torch.sub(D, plan.beta32[cr[0]:cr[1]].view(shape_c), out=W)
        W.mul_(plan.s32[tr[0]:tr[1]].view(shape_t))
    else:
        torch.mul(D, plan.s32[tr[0]:tr[1]].view(shape_t), out=W)
    if plan.b32 is not None:
        W.add_(plan.b32[cr[0]:cr[1]].view(shape_c))
    return W


class _State:
    """Running fast top-3 of one screen, in sorted positions: values float32, candidate positions int64."""

    def __init__(self, V: int):
        self.vals = torch.full((V, 3), NEG_INF, dtype=torch.float32)
        self.idx = torch.full((V, 3), -1, dtype=torch.int64)


def _tile_torch(plan, bufs, states, r0, r1, c0, c1, dirs) -> None:
    """One tile pair: S = G_IJ once, then the needed reductions among the four."""
    n, m = r1 - r0, c1 - c0
    S, D, W = (b[:n * m].view(n, m) for b in bufs)
    torch.mm(plan.g32[r0:r1], plan.g32[c0:c1].T, out=S)
    diag = r0 == c0
    gs, ws = states
    if dirs[2] or dirs[3]:
        if plan.a32 is not None:
            torch.addr(S, plan.a32[r0:r1], plan.a32[c0:c1], alpha=-1, out=D)
        else:
            D = S
        for k, transpose in ((2, False), (3, True)):
            if dirs[k]:
                Wt = _witness_tile(D, W, plan, r0, r1, c0, c1, transpose)
                if diag:
                    Wt.fill_diagonal_(NEG_INF)  # self is no competitor: -inf never wins a max
                _fold(Wt, 0 if transpose else 1, ws.vals, ws.idx, c0 if transpose else r0, r0 if transpose else c0)
    if diag:
        S.fill_diagonal_(NEG_INF)  # self is no competitor: -inf never wins a max
    if dirs[0]:
        _fold(S, 1, gs.vals, gs.idx, r0, c0)
    if dirs[1]:
        _fold(S, 0, gs.vals, gs.idx, c0, r0)


def _fast_torch(plan: _Plan, prune: bool, stats: SymScreenStats) -> tuple[_State, _State | None]:
    """The symmetric schedule: for I, for J >= I, tile (I, J) updates rows I and rows J."""
    V, B = plan.g32.shape[0], plan.block
    gs, ws = _State(V), (None if plan.wit is None else _State(V))
    gb = _block_bounds(plan.gram, None, B)
    wb = None if plan.wit is None else _block_bounds(plan.wit, plan.bias_sorted, B)
    bufs = [torch.empty(B * B, dtype=torch.float32) for _ in range(3)]
    for ib, r0 in enumerate(range(0, V, B)):
        r1 = min(V, r0 + B)
        for jb, c0 in enumerate(range(r0, V, B), start=ib):
            c1 = min(V, c0 + B)
            dirs = _directions(plan, gb, wb, gs, ws, (r0, r1, ib), (c0, c1, jb), prune)
            stats.tiles += 1
            stats.directions += len([k for k in range(4) if dirs[k] is not None])
            stats.directions_skipped += len([k for k in range(4) if dirs[k] is False])
            if not any(dirs):
                stats.tiles_skipped += 1
                continue
            _tile_torch(plan, bufs, (gs, ws), r0, r1, c0, c1, dirs)
    return gs, ws


def _directions(plan, gb, wb, gs, ws, I, J, prune) -> list:
    """[gram rows I, gram rows J, witness rows I, witness rows J]: True (reduce), False (pruned) or None
    (does not exist: the diagonal tile's column reductions are its row reductions; no witness)."""
    (r0, r1, ib), (c0, c1, jb) = I, J
    diag = r0 == c0
    out = []
    for rows, bb, st in ((plan.gram, gb, gs), (plan.wit, wb, ws)):
        for (t0, t1), blk, exists in (((r0, r1), jb, True), ((c0, c1), ib, not diag)):
            if rows is None or not exists:
                out.append(None)
            else:
                out.append(True if not prune else _needed(rows, bb, st.vals, t0, t1, blk))
    return [out[0], out[1], out[2], out[3]]


# ------------------------------------------------------------------------------------ exact recovery


def _untrusted(st: _State, rows: _Rows, V: int) -> torch.Tensor:
    """Rows whose fast top-3 cannot be trusted to order the real values: out of float32 range, an empty
    or non-finite slot among the first min(3, V − 1), or a gap within 2 eps (best/second or second/third)."""
    k = min(3, V - 1)
    v = st.vals.double()
    bad = ~rows.in_range
    if k > 0:
        bad |= (st.idx[:, :k] < 0).any(dim=1) | (~torch.isfinite(v[:, :k])).any(dim=1)
    for s in range(min(2, k - 1)):
        # not (gap > 2 eps): a NaN gap is untrusted too
        bad |= ~(v[:, s] - v[:, s + 1] > 2.0 * rows.eps)
    return bad


def _recover(st: _State, rows: _Rows, perm, q64, keys64, scale64, bias64) -> tuple[Top2, int]:
    """Exact best / second indices (float64 recomputation of untrusted rows), values rescored in float64."""
    V = perm.shape[0]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(V)
    bad_sorted = _untrusted(st, rows, V)
    pos = st.idx[inv]  # original row order, candidate positions
    cand = torch.where(pos >= 0, perm[pos.clamp(min=0)], -1)
    best_idx, second_idx = cand[:, 0].clone(), cand[:, 1].clone()
    redo = bad_sorted[inv].nonzero().squeeze(1)
    if redo.numel():
        ex = top2_torch(q64[redo], keys64, redo, scale=None if scale64 is None else scale64[redo], bias=bias64,
                        block_rows=256, block_cols=8192)
        best_idx[redo], second_idx[redo] = ex.best_idx, ex.second_idx
    best_val = _gather_scores64(q64, keys64, best_idx, scale64, bias64)
    second_val = _gather_scores64(q64, keys64, second_idx, scale64, bias64)
    self_val = _gather_scores64(q64, keys64, torch.arange(V), scale64, bias64)
    return Top2(best_val, best_idx, second_val, second_idx, self_val), int(redo.numel())


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
) -> SymScreen:
    """Gram screen and (optionally) witness screen in one symmetric pass, indices exact.

    Args:
        gram_rows64: float64 ``[V, d]`` CPU, the gram screen's rows ``g_j`` (never written).
        keys64: float64 ``[V, d]``, the witness keys ``k_j``; None: gram screen only (the box domain,
            whose screen point is not a multiple of ``k_t``, runs its witness screen with
            ``kernels.screen.top2_exact`` instead). May be ``gram_rows64`` itself (centred rows).
        scale64: float64 ``[V]`` ≥ 0, ``x_t = scale64[t] · keys64[t]`` (R/‖k_t‖ balls, 1/‖k_t‖² cone).
        bias64: float64 ``[V]`` or None (no bias: cone).
        key_map: ``keys64 ≈ P(gram_rows64 − center)``; None: ``keys64 ≈ gram_rows64``. Any difference
            between keys64 and the map (float64 rounding, or none at all) is measured and covered by the
            error bound, so a loose map costs recomputations, never exactness.
        backend: "torch" (float32 tiles on the CPU) or "triton" (CUDA, or Triton's interpreter).
        device: where the fast pass runs ("cpu" for torch).
        precision: "ieee", "tf32" or "bf16" (torch backend: operands rounded so, to reproduce them).
        block: rows per block (tile = block × block); default 1024 (torch), the kernel's tile (triton).
        prune: skip tile reductions that rigorous bounds show cannot change any fast top-3.

    Returns:
        :class:`SymScreen`: ``gram`` and ``witness`` as ``Top2`` over ``j ≠ t`` (float64 values, int64
        indices, first index on ties as the float64 reference) with self values, and the stats.
    """
    _check_inputs(gram_rows64, keys64, scale64, bias64, key_map)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    V = gram_rows64.shape[0]
    block = block or (1024 if backend == "torch" else 0)
    stats = SymScreenStats(backend=backend, precision=precision, block=block)
    t0 = time.perf_counter()
    plan = _plan(gram_rows64, keys64, scale64, bias64, key_map, precision, max(1, min(block or 64, max(V, 1))))
    t1 = time.perf_counter()
    gs, ws = _fast(plan, backend, device, prune, stats)
    t2 = time.perf_counter()
    stats.out_of_range_rows = int((~plan.gram.in_range).sum()) + (0 if plan.wit is None else int((~plan.wit.in_range).sum()))
    gram, stats.gram_recomputed = _recover(gs, plan.gram, plan.perm, gram_rows64, gram_rows64, None, None)
    witness = None
    if keys64 is not None:
        witness, stats.witness_recomputed = _recover(ws, plan.wit, plan.perm, keys64, keys64, scale64, bias64)
    stats.times_s = {"prepare": t1 - t0, "fast": t2 - t1, "recover": time.perf_counter() - t2}
    return SymScreen(gram, witness, stats)


def _fast(plan, backend, device, prune, stats):
    if backend == "triton":
        from kernels.triton_sym import fast_triton

        return fast_triton(plan, device, prune, stats)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"the torch backend of sym_screen runs on the CPU, got device {device!r}")
    return _fast_torch(plan, prune, stats)


def sym_screen_reference(
    gram_rows64: torch.Tensor,
    keys64: torch.Tensor | None = None,
    scale64: torch.Tensor | None = None,
    bias64: torch.Tensor | None = None,
    key_map: KeyMap | None = None,
    **_ignored,
) -> SymScreen:
    """Float64 reference with the same signature: untiled V × V float64 (small inputs only); key_map is
    validated and otherwise unused (the witness reads keys64 directly)."""
    _check_inputs(gram_rows64, keys64, scale64, bias64, key_map)
    V = gram_rows64.shape[0]
    ids = torch.arange(V)
    gram = top2_reference(gram_rows64, gram_rows64, ids)
    witness = None
    if keys64 is not None:
        witness = top2_reference(keys64, keys64, ids, scale=scale64, bias=bias64)
    return SymScreen(gram, witness, SymScreenStats(backend="reference", precision="float64", block=V))


__all__ = ["sym_screen", "sym_screen_reference", "KeyMap", "SymScreen", "SymScreenStats", "PRECISIONS", "round_inputs"]
