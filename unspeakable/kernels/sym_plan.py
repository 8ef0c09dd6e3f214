"""What the symmetric screen's two fast passes share: the torch pass (``sym_screen``) and the Triton pass
(``triton_sym``) read one :class:`Plan`, prune with one bound (:func:`block_bounds`) and fill one running
top-K (:class:`State`). Kept apart from both so that neither imports the other's internals."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
# Candidates kept per row by the fast pass. The exact best and second lie among those within 2 eps of the
# fast second; with K slots, up to K - 1 such near ties are settled by float64 rescoring of K dots, not by
# a float64 pass over all V columns (the cost that dominated at tf32 / on uncentred rows).
TOP_K = 6


@dataclass
class Rows:
    """float64 per-row quantities of one screen (original order until sorted by ``_take``)."""

    norm: torch.Tensor  # [V] upper bound of the norm the pruning bound multiplies (‖g_j‖ or ‖k_j‖)
    eps: torch.Tensor  # [V] |fast value - real value (less a per-row constant)| <= eps for every j != t
    in_range: torch.Tensor  # [V] bool: no float32 overflow possible in this row's fast values
    ub_scale: torch.Tensor  # [V] fast value of (t, j) <= ub_scale[t] * norm[j] + ub_shift[t] + bias[j]
    ub_shift: torch.Tensor  # [V]


@dataclass
class Plan:
    """Everything the fast pass reads, in the sorted order ``perm`` (position p holds row ``perm[p]``).

    ``h32`` are the GEMM's rows: the keys when there is a witness screen (its values are then plain
    scaled dots, and the gram's are the same Gram plus rank-one corrections, with error bounds in the
    keys' norms rather than the larger uncentred ones), else the gram rows."""

    perm: torch.Tensor  # [V] int64
    h32: torch.Tensor  # [V, d] float32, rounded as the precision rounds its inputs
    gram: Rows  # sorted
    wit: Rows | None  # sorted
    a32: torch.Tensor | None  # [V] epilogue vectors, float32, sorted
    beta32: torch.Tensor | None
    s32: torch.Tensor | None
    b32: torch.Tensor | None
    bias_sorted: torch.Tensor | None  # float64, for the witness pruning bound
    block: int
    other: Rows | None = None  # sorted: the OtherGram convention's gram bounds, its epilogue vectors
    a2_32: torch.Tensor | None = None
    beta2_32: torch.Tensor | None = None


@dataclass
class BlockBounds:
    """Per block J of sorted rows: ``max_j (m n_j + b_j)`` and the range of ``n_j``, so that for any row
    multiplier u: ``max_j (u n_j + b_j) <= E_J + max((u − m) N_J, (u − m) n_J)`` (linear in n_j)."""

    m: float
    E: torch.Tensor
    nmax: torch.Tensor
    nmin: torch.Tensor


def block_bounds(rows: Rows, bias: torch.Tensor | None, block: int) -> BlockBounds:
    V = rows.norm.shape[0]
    m = float(rows.ub_scale.median()) if V else 0.0
    val = m * rows.norm + (0.0 if bias is None else bias)
    pad = (-V) % block
    def per_block(x, fill, op):  # noqa: E306
        return op(torch.nn.functional.pad(x, (0, pad), value=fill).view(-1, block), dim=1).values
    E = per_block(val, NEG_INF, torch.max)
    E = E + E.abs() * 2.0**-40  # float64 rounding of m n_j + b_j, rounded up
    return BlockBounds(m, E, per_block(rows.norm, NEG_INF, torch.max), per_block(rows.norm, math.inf, torch.min))


class State:
    """Running fast top-K of one screen, in sorted positions: values float32, candidate positions int64."""

    def __init__(self, V: int, k: int = TOP_K):
        self.vals = torch.full((V, k), NEG_INF, dtype=torch.float32)
        self.idx = torch.full((V, k), -1, dtype=torch.int64)


__all__ = ["NEG_INF", "TOP_K", "Rows", "Plan", "BlockBounds", "block_bounds", "State"]
