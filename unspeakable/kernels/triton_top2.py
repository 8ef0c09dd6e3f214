"""Triton kernel for the top-2 competitor screen (semantics in ``kernels/top2.py``).

One program owns BLOCK_M query rows and sweeps every key column in BLOCK_N tiles; each tile's scores are
a BLOCK_M x BLOCK_N fp32 accumulator built over d in BLOCK_K chunks by ``tl.dot``. The epilogue scales the
tile per row, adds the bias per column, reads the self score, masks the self column and the ragged edge
to -inf, and folds the tile into a running top-2 held in registers. The V x V score matrix never exists.

Centre and bf16: done by the launcher, not in the kernel. ``q - center`` is computed in fp32 (as
``top2_torch`` does) over row chunks of at most ``_CENTER_CHUNK_ELEMS`` elements, and for "bf16" the
(centred) queries and the keys are cast to bf16 once. Then both dot operands reach shared memory
straight from global memory (cp.async / TMA-able); an in-kernel subtraction or cast would stage every
tile through registers and made the tuned configurations spill (see ``python -m unspeakable.kernels.aot``).

Precision: "ieee" (fp32 FMA), "tf32" (tensor cores, inputs rounded to 10 mantissa bits), "bf16" (7
bits). The accumulator is fp32 in every case; ``kernels.screen.dot_error_unit`` bounds the error and
``top2_exact`` recomputes near-tie rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from unspeakable.kernels import BackendError, triton_interpret
from unspeakable.kernels.top2 import Top2

PRECISIONS = ("ieee", "tf32", "bf16")
_CENTER_CHUNK_ELEMS = 1 << 26  # 256 MB of fp32 centred queries at most per launch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"


# The interpreter runs each program in numpy, at a cost per operation rather than per element: a tile
# this size keeps the tests quick and still leaves ragged edges at every odd test shape. Every test that
# runs the kernel uses it.
TEST_CONFIG = TileConfig(32, 128, 64, num_warps=4, num_stages=1)  # (block_m, block_n, block_k, ...)

# Per architecture and precision, best first. Chosen so that every one compiles without spilling
# (``python -m unspeakable.kernels.aot``; the d % 16 == 0 specialisation of real heads: 768, 1600, 4096).
_CONFIGS = {
    # sm_80: mma.sync m16n8k8 (tf32) / m16n8k16 (bf16), cp.async pipelining, 164 KiB shared memory.
    (80, "tf32"): (TileConfig(128, 128, 16, 8, 4), TileConfig(64, 128, 16, 4, 4)),
    (80, "bf16"): (TileConfig(128, 128, 32, 8, 3), TileConfig(64, 128, 32, 4, 4)),
    # fp32 FMA: operands go from shared memory through registers, so smaller tiles.
    (80, "ieee"): (TileConfig(64, 64, 16, 8, 3),),
    # sm_90: wgmma, one warpgroup (4 warps) per 64 rows of BLOCK_M; 228 KiB shared memory.
    (90, "tf32"): (TileConfig(128, 128, 32, 8, 3), TileConfig(64, 128, 64, 4, 4)),
    (90, "bf16"): (TileConfig(128, 128, 64, 8, 3), TileConfig(64, 128, 64, 4, 3)),
    (90, "ieee"): (TileConfig(64, 64, 16, 8, 3),),
}


def configs_for(cc: int | tuple[int, int], precision: str = "tf32") -> list[TileConfig]:
    """Tile configurations for compute capability ``cc`` (80, 90 or (8, 0), (9, 0)); best first.

    sm_8x uses the sm_80 table, sm_90 and newer the sm_90 table (tuned for, and checked on, 80 and 90).
    """
    return list(_CONFIGS[config_table_key(cc, precision, "the top-2 kernel")])


def config_table_key(cc: int | tuple[int, int], precision: str, kernel: str) -> tuple[int, str]:
    """``(80 or 90, precision)``: the tuned table a compute capability uses (sm_8x → 80, sm_90+ → 90), after
    checking the precision and that the GPU has TF32/bf16 tensor cores (sm_80+). Shared by every kernel."""
    if isinstance(cc, tuple):
        cc = cc[0] * 10 + cc[1]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if cc < 80:
        raise ValueError(f"{kernel} needs sm_80 or newer (TF32/bf16 tensor cores); got sm_{cc}")
    return (90 if cc >= 90 else 80, precision)


@triton.jit
def _tile_top2(s, local, BLOCK_N: tl.constexpr):
    """Row-wise best and second of a [BLOCK_M, BLOCK_N] tile with tile-local column indices. Ties keep
    the first index of the maximum (the smallest column among equal values), as torch.argmax does."""
    best = tl.max(s, axis=1)
    best_i = tl.min(tl.where(s == best[:, None], local[None, :], BLOCK_N), axis=1)
    s = tl.where(local[None, :] == best_i[:, None], float("-inf"), s)
    second = tl.max(s, axis=1)
    second_i = tl.min(tl.where(s == second[:, None], local[None, :], BLOCK_N), axis=1)
    return best, best_i, second, second_i


@triton.jit
def _merge_top2(best, best_i, second, second_i, t_best, t_best_i, t_second, t_second_i):
    """Fold a tile's top-2 into the running top-2. Every running column precedes every tile column
    (tiles are visited left to right), so on equal values the running entry wins: first index."""
    take = t_best > best
    new_second_i = tl.where(take, tl.where(best >= t_second, best_i, t_second_i),
                            tl.where(second >= t_best, second_i, t_best_i))
    new_second = tl.where(take, tl.maximum(best, t_second), tl.maximum(second, t_best))
    return tl.maximum(best, t_best), tl.where(take, t_best_i, best_i), new_second, new_second_i


@triton.jit
def top2_kernel(
    q_ptr, k_ptr, self_ptr, scale_ptr, bias_ptr,
    best_val_ptr, best_idx_ptr, second_val_ptr, second_idx_ptr, self_val_ptr,
    B, V, D,
    stride_qm, stride_kn,
    HAS_SELF: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # int64 offsets: int32 would overflow on a flat V x V index already at V = 50257 (50257^2 > 2^31),
    # and row * stride passes 2^31 for B * d >= 2^31. Column *indices* stay int32 (V < 2^31, checked by
    # the launcher): half the registers of int64 in the running top-2.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    if HAS_SELF:
        self_idx = tl.load(self_ptr + rows, mask=row_ok, other=-1)
    else:
        self_idx = tl.full([BLOCK_M], -1, tl.int64)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK_M], -1, tl.int32)
    second = tl.full([BLOCK_M], float("-inf"), tl.float32)
    second_i = tl.full([BLOCK_M], -1, tl.int32)
    self_v = tl.full([BLOCK_M], float("nan"), tl.float32)
    local = tl.arange(0, BLOCK_N)  # column within the tile
    for n0 in range(0, V, BLOCK_N):
        cols = n0 + local.to(tl.int64)
        col_ok = cols < V
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            q = tl.load(q_ptr + rows[:, None] * stride_qm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            k = tl.load(k_ptr + cols[None, :] * stride_kn + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            if PRECISION == "bf16":
                acc = tl.dot(q, k, acc)  # bf16 tiles (cast by the launcher), fp32 accumulator
            else:
                acc = tl.dot(q, k, acc, input_precision=PRECISION)
        if HAS_SCALE:
            acc = acc * scale[:, None]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
        # -inf never wins a max: the ragged edge is no column, the self column is no competitor.
        s = tl.where((local < V - n0)[None, :], acc, float("-inf"))
        if HAS_SELF:
            self_here = (self_idx >= n0) & (self_idx < n0 + BLOCK_N) & (self_idx < V)
            is_self = local[None, :] == tl.where(self_here, self_idx - n0, -1).to(tl.int32)[:, None]
            self_v = tl.where(self_here, tl.max(tl.where(is_self, acc, float("-inf")), axis=1), self_v)
            s = tl.where(is_self, float("-inf"), s)
        t_best, t_best_i, t_second, t_second_i = _tile_top2(s, local, BLOCK_N)
        best, best_i, second, second_i = _merge_top2(best, best_i, second, second_i,
                                                     t_best, t_best_i + n0, t_second, t_second_i + n0)
    # A -inf "winner" is an empty slot (fewer competitors than slots): index -1, as the reference.
    best_i = tl.where(best == float("-inf"), -1, best_i)
    second_i = tl.where(second == float("-inf"), -1, second_i)
    tl.store(best_val_ptr + rows, best, mask=row_ok)
    tl.store(best_idx_ptr + rows, best_i.to(tl.int64), mask=row_ok)
    tl.store(second_val_ptr + rows, second, mask=row_ok)
    tl.store(second_idx_ptr + rows, second_i.to(tl.int64), mask=row_ok)
    tl.store(self_val_ptr + rows, self_v, mask=row_ok)


def _runnable(kernel):
    """The kernel, if it can run as asked. ``triton.jit`` picks compiled or interpreted when a function is
    defined, so TRITON_INTERPRET must be set (or not) before triton, whose tl.zeros / tl.max are jit
    functions too, and this module are imported, and stay so."""
    compiled = isinstance(kernel, triton.runtime.jit.JITFunction)
    if compiled == triton_interpret() or compiled != isinstance(tl.zeros, triton.runtime.jit.JITFunction):
        raise BackendError(
            f"TRITON_INTERPRET is {'set' if triton_interpret() else 'unset'} now but the kernels were "
            f"imported {'compiled' if compiled else 'interpreted'}; set or unset it before importing triton"
        )
    return kernel


def _allocate(B: int, device: torch.device) -> Top2:
    """Output buffers; the kernel writes every row, so they start uninitialised."""
    f = lambda: torch.empty(B, dtype=torch.float32, device=device)  # noqa: E731
    i = lambda: torch.empty(B, dtype=torch.int64, device=device)  # noqa: E731
    return Top2(f(), i(), f(), i(), f())


def _default_config(device: torch.device, precision: str) -> TileConfig:
    if device.type != "cuda":
        return TEST_CONFIG
    return configs_for(torch.cuda.get_device_capability(device), precision)[0]


# Devices on which d is padded to a multiple of 16 (see _operand). Not in the interpreter, whose tests
# need the kernel's own masking of a ragged d.
_PAD_D_DEVICES = ("cuda",)


def _operand(x: torch.Tensor, precision: str) -> tuple[torch.Tensor, str]:
    """A dot operand as the kernel reads it, and the PRECISION to launch with.

    On the GPU, d is padded with zero columns to a multiple of 16: exact (zero terms add nothing), and
    it gives the 16-divisible row strides Triton's JIT specialises on, i.e. the vectorised spill-free
    build that ``python -m unspeakable.kernels.aot`` checks (an unaligned d compiles scalar loads that spill).
    """
    d = x.shape[1]
    if x.device.type in _PAD_D_DEVICES and d % 16:
        x = torch.nn.functional.pad(x, (0, 16 - d % 16))
    if precision != "bf16":
        return x, precision
    if triton_interpret():
        # The interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584). bf16 x bf16
        # products are exact in fp32, so bf16-rounded fp32 operands in an ieee dot are the same dot.
        return x.to(torch.bfloat16).to(torch.float32), "ieee"
    return x.to(torch.bfloat16), "bf16"


def _launch_top2(queries, keys, self_index, scale, center, bias, precision, config) -> Top2:
    B, d = queries.shape
    V = keys.shape[0]
    out = _allocate(B, queries.device)
    keys_op, kernel_precision = _operand(keys, precision)
    dummy = queries  # stands in for absent optional pointers; never read (the switch is off)
    chunk = max(B, 1) if center is None else max(config.block_m, _CENTER_CHUNK_ELEMS // max(d, 1))
    for r0 in range(0, B, chunk):
        r1 = min(B, r0 + chunk)
        q = queries[r0:r1] if center is None else queries[r0:r1] - center
        q_op, _ = _operand(q, precision)
        grid = (triton.cdiv(r1 - r0, config.block_m),)
        _runnable(top2_kernel)[grid](
            q_op, keys_op,
            dummy if self_index is None else self_index[r0:r1],
            dummy if scale is None else scale[r0:r1],
            dummy if bias is None else bias,
            out.best_val[r0:r1], out.best_idx[r0:r1], out.second_val[r0:r1], out.second_idx[r0:r1],
            out.self_val[r0:r1],
            r1 - r0, V, keys_op.shape[1],
            q_op.stride(0), keys_op.stride(0),
            HAS_SELF=self_index is not None, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
            PRECISION=kernel_precision,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
            # Pinned, not Triton's changing default: the epilogue may fuse scale * acc + bias into one FMA
            # (one rounding instead of two, inside the bound of kernels.screen.row_error_bounds).
            enable_fp_fusion=True,
        )
    return out


def _check_inputs(queries, keys, self_index, scale, center, bias, precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"queries and keys must be 2-D, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    B, d = queries.shape
    V = keys.shape[0]
    if V >= 2**31:
        raise ValueError(f"V = {V} keys: column indices are int32 in the kernel (V < 2^31)")
    expected = {"keys": (V, d), "self_index": (B,), "scale": (B,), "center": (d,), "bias": (V,)}
    given = {"queries": queries, "keys": keys, "self_index": self_index, "scale": scale, "center": center,
             "bias": bias}
    for name, t in given.items():
        if t is None:
            continue
        if name in expected and tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
        want = torch.int64 if name == "self_index" else torch.float32
        if t.dtype != want:
            raise TypeError(f"{name} must be {want}, got {t.dtype}")
        if t.device != queries.device:
            raise ValueError(f"{name} is on {t.device} but queries are on {queries.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if queries.device.type != "cuda" and not triton_interpret():
        raise BackendError(f"top2_triton needs CUDA tensors (got {queries.device}) or TRITON_INTERPRET=1")


def top2_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    self_index: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    precision: str = "ieee",
    config: TileConfig | None = None,
) -> Top2:
    """Top-2 screen on the GPU (or in Triton's interpreter under ``TRITON_INTERPRET=1``).

    Args:
        queries: [B, d] float32. keys: [V, d] float32. self_index: [B] integer (-1: none excluded).
        scale: [B], center: [d], bias: [V], all float32. precision: "ieee", "tf32" or "bf16".
        config: tile configuration; default the first of ``configs_for`` the device and precision
            (``TEST_CONFIG`` in the interpreter).

    Returns:
        ``Top2`` on the input device: float32 values, int64 indices.
    """
    if self_index is not None and not self_index.is_floating_point() and self_index.dtype != torch.int64:
        self_index = self_index.to(torch.int64)
    _check_inputs(queries, keys, self_index, scale, center, bias, precision)
    if config is None:
        config = _default_config(queries.device, precision)
    return _launch_top2(queries, keys, self_index, scale, center, bias, precision, config)


__all__ = ["top2_triton", "configs_for", "TileConfig", "TEST_CONFIG", "PRECISIONS"]
