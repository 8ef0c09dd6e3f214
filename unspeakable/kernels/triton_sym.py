"""Triton kernel for the symmetric screen pass (semantics and exactness in ``kernels/sym_screen.py``).

Schedule. The rows (already sorted by ``sym_screen``) are cut into blocks of BLOCK rows and each pair of
blocks I ≤ J is visited once. One launch runs one *round* of the round-robin (circle) schedule: a set of
pairs in which every block appears at most once, so each program owns the rows of both its blocks and
writes their candidates without atomics or races. nb blocks (nb even) take nb − 1 rounds of nb/2 pairs,
plus one launch for the nb diagonal pairs (I, I). After each launch the host folds the candidates into
the running top-K (``torch.topk`` over 2K slots per row, on the device).

Per program: one BLOCK × BLOCK fp32 accumulator ``S = H_I H_J^T`` built over d in BLOCK_K chunks by
``tl.dot``, then up to four epilogues on it — gram rows I (over columns J), gram rows J (over rows I),
witness rows I, witness rows J — each ``gram: S + a_t a_j + beta_j`` / ``witness: s_t S + b_j``, masked
(-inf never wins a max: the ragged edge and the self column on the diagonal), and a top-K extraction of
the rows whose tile maximum beats their current K-th value (read at launch; the extraction stops as soon
as no row of the tile has another candidate above it). Pruning: before the GEMM, each direction's
rigorous bound (Cauchy–Schwarz, per block, see ``sym_screen.block_bounds``) is compared with the
targets' K-th values; a pair none of whose directions is needed skips the GEMM and is counted.

Precision: "ieee" (fp32 FMA), "tf32" or "bf16" (operands cast by the launcher, fp32 accumulator); the
epilogue is fp32 in every case, as ``sym_screen``'s error bounds assume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from unspeakable.kernels import BackendError, triton_interpret
from unspeakable.kernels.sym_plan import TOP_K, State, block_bounds
from unspeakable.kernels.triton_top2 import PRECISIONS, config_table_key


@dataclass(frozen=True)
class SymConfig:
    block: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"b{self.block}k{self.block_k}w{self.num_warps}s{self.num_stages}"


# Small enough for the interpreter, big enough for tl.dot (16) and ragged edges at odd test shapes.
TEST_CONFIG = SymConfig(16, 16, num_warps=4, num_stages=1)

# Per architecture and precision, best first; every one compiles without spilling (python -m unspeakable.kernels.aot
# --kernel sym). The four epilogues and the top-K extraction keep several BLOCK x BLOCK tiles live, so the
# tiles are smaller than the one-sided top-2 kernel's.
_CONFIGS = {
    (80, "tf32"): (SymConfig(64, 32, 4, 3),),
    (80, "bf16"): (SymConfig(64, 32, 4, 3),),
    (80, "ieee"): (SymConfig(64, 16, 4, 2),),
    (90, "tf32"): (SymConfig(64, 32, 4, 3),),
    (90, "bf16"): (SymConfig(64, 64, 4, 3),),
    (90, "ieee"): (SymConfig(64, 16, 4, 2),),
}


def sym_configs_for(cc: int | tuple[int, int], precision: str = "tf32") -> list[SymConfig]:
    """Tile configurations for compute capability ``cc`` (sm_8x: the sm_80 table; sm_90+: sm_90's)."""
    return list(_CONFIGS[config_table_key(cc, precision, "the symmetric screen kernel")])


@triton.jit
def _needed(ub_ptr, blk_ptr, th_ptr, m_ref, rows, row_ok, other_block):
    """Whether some target row could take a candidate of block ``other_block`` into its top-K.

    ub(t, J) = E_J + max((u_t − m) N_J, (u_t − m) n_J) + shift_t, padded for its own fp32 rounding (the
    inputs were rounded up by the host). Not (ub < th): a NaN keeps the direction."""
    u = tl.load(ub_ptr + rows * 2, mask=row_ok, other=0.0)
    shift = tl.load(ub_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
    e = tl.load(blk_ptr + other_block * 3)
    n_hi = tl.load(blk_ptr + other_block * 3 + 1)
    n_lo = tl.load(blk_ptr + other_block * 3 + 2)
    du = u - m_ref
    ub = e + tl.maximum(du * n_hi, du * n_lo) + shift
    ub = ub + (tl.abs(e) + (tl.abs(du) + tl.abs(m_ref)) * n_hi + tl.abs(shift)) * 3.0e-6
    th = tl.load(th_ptr + rows, mask=row_ok, other=float("inf"))
    return tl.max((~(ub < th) & row_ok).to(tl.int32), axis=0) > 0


@triton.jit
def _topk_rows(T, th, targets, target_ok, cand0, local, out_v_ptr, out_i_ptr, K: tl.constexpr,
               BLOCK: tl.constexpr):
    """Up to K best columns of each row of T that beat the row's K-th value ``th`` (first column among
    equal values), stored at [target, k]; slots left unwritten keep the launcher's -inf / -1."""
    go = tl.max(((tl.max(T, axis=1) > th) & target_ok).to(tl.int32), axis=0) > 0
    for k in tl.static_range(K):
        if go:
            m = tl.max(T, axis=1)
            ok = (m > th) & target_ok
            first = tl.min(tl.where(T == m[:, None], local[None, :], BLOCK), axis=1)
            tl.store(out_v_ptr + targets * K + k, m, mask=ok)
            tl.store(out_i_ptr + targets * K + k, cand0 + first.to(tl.int64), mask=ok)
            T = tl.where(local[None, :] == first[:, None], float("-inf"), T)
            go = tl.max(ok.to(tl.int32), axis=0) > 0


@triton.jit
def sym_kernel(
    h_ptr, pairs_ptr, a_ptr, beta_ptr, s_ptr, b_ptr,
    g_th_ptr, w_th_ptr, g_ub_ptr, w_ub_ptr, g_blk_ptr, w_blk_ptr,
    g_cv_ptr, g_ci_ptr, w_cv_ptr, w_ci_ptr, needs_ptr,
    V, D, stride_h, g_mref, w_mref,
    HAS_WITNESS: tl.constexpr, HAS_A: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRUNE: tl.constexpr, PRECISION: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # int64 offsets: row * stride passes 2^31 for V * d >= 2^31 (262144 x 8192), and the positions written
    # out are int64 like every index of the screens.
    pid = tl.program_id(0).to(tl.int64)
    bi = tl.load(pairs_ptr + 2 * pid).to(tl.int64)
    bj = tl.load(pairs_ptr + 2 * pid + 1).to(tl.int64)
    diag = bi == bj
    off_diag = bi != bj
    local = tl.arange(0, BLOCK)
    ri = bi * BLOCK + local
    rj = bj * BLOCK + local
    ri_ok = ri < V
    rj_ok = rj < V
    # Which of the four reductions exist (the diagonal's column reductions are its row reductions) and,
    # pruning, are needed; recorded per pair as bits 1, 2, 4, 8 for the stats.
    need_gi = bi == bi
    need_gj = off_diag
    need_wi = bi != bi
    need_wj = bi != bi
    if HAS_WITNESS:
        need_wi = bi == bi
        need_wj = off_diag
    if PRUNE:
        need_gi = _needed(g_ub_ptr, g_blk_ptr, g_th_ptr, g_mref, ri, ri_ok, bj)
        need_gj = need_gj & _needed(g_ub_ptr, g_blk_ptr, g_th_ptr, g_mref, rj, rj_ok, bi)
        if HAS_WITNESS:
            need_wi = _needed(w_ub_ptr, w_blk_ptr, w_th_ptr, w_mref, ri, ri_ok, bj)
            need_wj = need_wj & _needed(w_ub_ptr, w_blk_ptr, w_th_ptr, w_mref, rj, rj_ok, bi)
    tl.store(needs_ptr + pid, need_gi.to(tl.int32) + 2 * need_gj.to(tl.int32) + 4 * need_wi.to(tl.int32)
             + 8 * need_wj.to(tl.int32))
    if need_gi | need_gj | need_wi | need_wj:
        acc = tl.zeros([BLOCK, BLOCK], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            x = tl.load(h_ptr + ri[:, None] * stride_h + ks[None, :], mask=ri_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(h_ptr + rj[None, :] * stride_h + ks[:, None], mask=k_ok[:, None] & rj_ok[None, :], other=0.0)
            if PRECISION == "bf16":
                acc = tl.dot(x, y, acc)  # bf16 tiles (cast by the launcher), fp32 accumulator
            else:
                acc = tl.dot(x, y, acc, input_precision=PRECISION)
        # -inf never wins a max: the ragged edge is no candidate, the self column (diagonal) no competitor.
        valid = ri_ok[:, None] & rj_ok[None, :] & ~(diag & (local[:, None] == local[None, :]))
        _epilogues(acc, valid, ri, rj, ri_ok, rj_ok, local, bi, bj, a_ptr, beta_ptr, s_ptr, b_ptr,
                   g_th_ptr, w_th_ptr, g_cv_ptr, g_ci_ptr, w_cv_ptr, w_ci_ptr, need_gi, need_gj, need_wi, need_wj,
                   HAS_A, HAS_BETA, HAS_BIAS, K, BLOCK)


@triton.jit
def _epilogues(acc, valid, ri, rj, ri_ok, rj_ok, local, bi, bj, a_ptr, beta_ptr, s_ptr, b_ptr,
               g_th_ptr, w_th_ptr, g_cv_ptr, g_ci_ptr, w_cv_ptr, w_ci_ptr, need_gi, need_gj, need_wi, need_wj,
               HAS_A: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr, K: tl.constexpr,
               BLOCK: tl.constexpr):
    """The four reductions of one tile (gram / witness, rows I / rows J)."""
    if need_wi:
        s_i = tl.load(s_ptr + ri, mask=ri_ok, other=0.0)
        t = acc * s_i[:, None]
        if HAS_BIAS:
            t = t + tl.load(b_ptr + rj, mask=rj_ok, other=0.0)[None, :]
        t = tl.where(valid, t, float("-inf"))
        th = tl.load(w_th_ptr + ri, mask=ri_ok, other=float("inf"))
        _topk_rows(t, th, ri, ri_ok, bj * BLOCK, local, w_cv_ptr, w_ci_ptr, K, BLOCK)
    if need_wj:
        s_j = tl.load(s_ptr + rj, mask=rj_ok, other=0.0)
        t = acc * s_j[None, :]
        if HAS_BIAS:
            t = t + tl.load(b_ptr + ri, mask=ri_ok, other=0.0)[:, None]
        t = tl.trans(tl.where(valid, t, float("-inf")))
        th = tl.load(w_th_ptr + rj, mask=rj_ok, other=float("inf"))
        _topk_rows(t, th, rj, rj_ok, bi * BLOCK, local, w_cv_ptr, w_ci_ptr, K, BLOCK)
    if HAS_A:
        acc = acc + tl.load(a_ptr + ri, mask=ri_ok, other=0.0)[:, None] * tl.load(a_ptr + rj, mask=rj_ok, other=0.0)[None, :]
    if need_gi:
        t = acc
        if HAS_BETA:
            t = t + tl.load(beta_ptr + rj, mask=rj_ok, other=0.0)[None, :]
        t = tl.where(valid, t, float("-inf"))
        th = tl.load(g_th_ptr + ri, mask=ri_ok, other=float("inf"))
        _topk_rows(t, th, ri, ri_ok, bj * BLOCK, local, g_cv_ptr, g_ci_ptr, K, BLOCK)
    if need_gj:
        t = acc
        if HAS_BETA:
            t = t + tl.load(beta_ptr + ri, mask=ri_ok, other=0.0)[:, None]
        t = tl.trans(tl.where(valid, t, float("-inf")))
        th = tl.load(g_th_ptr + rj, mask=rj_ok, other=float("inf"))
        _topk_rows(t, th, rj, rj_ok, bi * BLOCK, local, g_cv_ptr, g_ci_ptr, K, BLOCK)


# ------------------------------------------------------------------------------------------------ host


def round_robin(nb: int) -> list[list[tuple[int, int]]]:
    """Rounds of block pairs (I < J), each block at most once per round, every pair exactly once
    (circle method; an odd nb gets a dummy block whose pairs are dropped), then the diagonal round."""
    n = nb + (nb % 2)
    rounds = []
    for r in range(n - 1):
        pairs = [(r, n - 1)] + [((r + k) % (n - 1), (r - k) % (n - 1)) for k in range(1, n // 2)]
        rounds.append([(min(p), max(p)) for p in pairs if max(p) < nb])
    rounds.append([(i, i) for i in range(nb)])
    return [r for r in rounds if r]


def _runnable(kernel):
    """The kernel, if it can run as asked (see kernels.triton_top2._runnable)."""
    compiled = isinstance(kernel, triton.runtime.jit.JITFunction)
    if compiled == triton_interpret() or compiled != isinstance(tl.zeros, triton.runtime.jit.JITFunction):
        raise BackendError(
            f"TRITON_INTERPRET is {'set' if triton_interpret() else 'unset'} now but the kernels were "
            f"imported {'compiled' if compiled else 'interpreted'}; set or unset it before importing triton"
        )
    return kernel


def _up32(x64: torch.Tensor) -> torch.Tensor:
    """float32 >= x64 elementwise (rounded up), so that a bound stays a bound on the device."""
    x = x64.to(torch.float32)
    return torch.where(x.double() < x64, torch.nextafter(x, torch.full_like(x, float("inf"))), x)


def _down32(x64: torch.Tensor) -> torch.Tensor:
    x = x64.to(torch.float32)
    return torch.where(x.double() > x64, torch.nextafter(x, torch.full_like(x, float("-inf"))), x)


def _bounds_on(rows, bias_sorted, block, dev):
    """Per-row (ub_scale, ub_shift) and per-block (E, N, n) of sym_screen's pruning bound, as fp32."""
    bb = block_bounds(rows, bias_sorted, block)
    ub = torch.stack([rows.ub_scale.to(torch.float32), _up32(rows.ub_shift)], dim=1)
    # u - m is formed on the device: pad u's rounding into the shift instead (|du| N covers it, see _needed).
    blk = torch.stack([_up32(bb.E), _up32(bb.nmax), _down32(bb.nmin.clamp(max=3e38))], dim=1)
    return ub.contiguous().to(dev), blk.contiguous().to(dev), float(bb.m)


# Devices on which d is padded to a multiple of 16 (exact: zero columns add nothing; it gives the
# 16-divisible row stride of the spill-free vectorised build). Not in the interpreter, whose tests need
# the kernel's own masking of a ragged d.
_PAD_D_DEVICES = ("cuda",)


def _operand(h32: torch.Tensor, precision: str, dev: torch.device) -> tuple[torch.Tensor, str]:
    """The GEMM operand on the device and the PRECISION to launch with. ``h32`` is already rounded as the
    precision rounds its inputs (``sym_screen.round_inputs``), so the casts below are exact."""
    h = h32.to(dev)
    if dev.type in _PAD_D_DEVICES and h.shape[1] % 16:
        h = torch.nn.functional.pad(h, (0, 16 - h.shape[1] % 16))
    if precision != "bf16":
        return h.contiguous(), precision
    if triton_interpret():
        # The interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584); bf16-valued
        # fp32 operands in an ieee dot are the same dot (bf16 x bf16 products are exact in fp32).
        return h.contiguous(), "ieee"
    return h.to(torch.bfloat16).contiguous(), "bf16"


def _default_config(dev: torch.device, precision: str, block: int | None) -> SymConfig:
    if dev.type != "cuda":
        return TEST_CONFIG if not block else SymConfig(block, 16, 4, 1)
    config = sym_configs_for(torch.cuda.get_device_capability(dev), precision)[0]
    return config if not block else SymConfig(block, config.block_k, config.num_warps, config.num_stages)


def _existing(pairs: torch.Tensor, has_witness: bool) -> torch.Tensor:
    """Bit mask of the reductions each pair has (before pruning)."""
    off = (pairs[:, 0] != pairs[:, 1]).to(torch.int32)
    bits = 1 + 2 * off
    return bits + (4 + 8 * off if has_witness else 0)


def fast_triton(plan, device, prune: bool, stats, precision: str = "ieee", block: int | None = None):
    """The fast pass of ``sym_screen`` on the GPU (or in Triton's interpreter): per row the fast top-K
    of both screens, in sorted positions, returned on the CPU as ``sym_screen.State``."""
    dev = torch.device(device)
    if dev.type != "cuda" and not triton_interpret():
        raise BackendError(f"the triton backend needs a CUDA device (got {dev}) or TRITON_INTERPRET=1")
    config = _default_config(dev, precision, block)
    B, K = config.block, TOP_K
    V = plan.h32.shape[0]
    h, kernel_precision = _operand(plan.h32, precision, dev)
    f32 = lambda t: None if t is None else t.to(dev).contiguous()  # noqa: E731
    a, beta, s, b = f32(plan.a32), f32(plan.beta32), f32(plan.s32), f32(plan.b32)
    g_ub, g_blk, g_m = _bounds_on(plan.gram, None, B, dev)
    has_w = plan.wit is not None
    w_ub, w_blk, w_m = _bounds_on(plan.wit, plan.bias_sorted, B, dev) if has_w else (g_ub, g_blk, 0.0)
    states = [State(V, K) for _ in range(2 if has_w else 1)]
    dv = [(st.vals.to(dev), st.idx.to(dev)) for st in states]
    dummy = h
    for rnd in round_robin(triton.cdiv(V, B)):
        pairs = torch.tensor(rnd, dtype=torch.int32, device=dev)
        cands = [(torch.full((V, K), float("-inf"), device=dev), torch.full((V, K), -1, dtype=torch.int64, device=dev))
                 for _ in dv]
        needs = torch.empty(len(rnd), dtype=torch.int32, device=dev)
        th = [v[:, K - 1].contiguous() for v, _ in dv]
        wc = cands[1] if has_w else cands[0]
        _runnable(sym_kernel)[(len(rnd),)](
            h, pairs, a if a is not None else dummy, beta if beta is not None else dummy, s if s is not None else dummy,
            b if b is not None else dummy, th[0], th[1] if has_w else th[0], g_ub, w_ub, g_blk, w_blk,
            cands[0][0], cands[0][1], wc[0], wc[1], needs,
            V, h.shape[1], h.stride(0), g_m, w_m,
            HAS_WITNESS=has_w, HAS_A=a is not None, HAS_BETA=beta is not None, HAS_BIAS=b is not None,
            PRUNE=prune, PRECISION=kernel_precision, K=K, BLOCK=B, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
        )
        dv = [_merge(v, i, cv, ci) for (v, i), (cv, ci) in zip(dv, cands)]
        _count(stats, pairs, needs, has_w)
    stats.block = B
    for st, (v, i) in zip(states, dv):
        st.vals, st.idx = v.cpu(), i.cpu()
    return states[0], (states[1] if has_w else None)


def _merge(vals, idx, cv, ci):
    """Running top-K ∪ this round's candidates → top-K (each pair is visited once: no repeats)."""
    tv, tj = torch.topk(torch.cat([vals, cv], 1), vals.shape[1], dim=1)
    return tv, torch.cat([idx, ci], 1).gather(1, tj)


def _count(stats, pairs, needs, has_w) -> None:
    have = _existing(pairs, has_w)
    needs = needs.cpu()
    stats.tiles += pairs.shape[0]
    stats.tiles_skipped += int((needs == 0).sum())
    popcount = lambda x: sum(((x >> k) & 1) for k in range(4))  # noqa: E731
    stats.directions += int(popcount(have.cpu()).sum())
    stats.directions_skipped += int((popcount(have.cpu()) - popcount(needs)).sum())


__all__ = ["fast_triton", "sym_configs_for", "SymConfig", "TEST_CONFIG", "round_robin", "PRECISIONS"]
