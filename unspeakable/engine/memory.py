"""A scan's memory: what it holds for the whole run, and the working set its batches are sized from.

The peak of a scan is the head as loaded plus what the fold and the stages hold for the whole run, plus a
working set that the stages share one after another (DESIGN §7, issue "memory is a budget")::

    resident = W_U as loaded (V·d at its dtype)
             + keys, float64 (8 · V·d), unless the budget (given, or by default what the machine has
               available) cannot hold them: an exact fold then derives them on demand as well, except on
               the box (:func:`hold_keys`, engine.head.DerivedKeys)
             + rows, float64 (8 · V·d), only where the fold rounds (float64 weights with a gain) or rescales:
               an exact fold derives them from W_U on demand (engine.head.FoldedRows); the fold's residual
               8 · V·d more where it has one
             + one float32 copy of the keys (4 · V·d), shared by the search, the LP's pricing and (where the
               keys are the verifier's shifted rows) the verifier
    working  = budget − resident, at least MIN_WORKING (default: what the machine has available beyond
               the resident part, at most DEFAULT_WORKING)

The batches that grow with V are sized from ``working``: the search's tokens per pricing GEMM (an ``[n, V]``
float32 logit matrix and its top-k workspace) and the verifier's witnesses per competitor pass (an ``[V, n]``
float32 pass, its mask and its float64 re-scores). The screens' tiles and the LP's per-token vectors are of
fixed size. The budget is ``--memory GB`` (``ScanOptions.memory``); by default the resident part plus what
the machine has available beyond it, at most DEFAULT_WORKING (a scan never refuses to run for want of a
budget it was not given). A given budget below ``resident + MIN_WORKING`` cannot be met: the scan then runs
with the working set MIN_WORKING and says so in its warnings.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

GB = 10**9
DEFAULT_WORKING = 750 * 10**6  # the default working set never asks for more than this
MIN_WORKING = 64 * 2**20  # the working set never shrinks below this (the smallest batches fit in it)
SEARCH_BYTES_PER_V = 16  # a search batch's working set per token and vocabulary row (Budget.search_batch)
SEARCH_BATCH_MAX = 256  # tokens per search batch when memory allows (engine.search.SearchOptions.batch)
LP_LOCKSTEP = 16  # tokens the LP decides side by side (engine.decide.DecideOptions.lockstep)
WARM_MAX_ROWS = 4096  # the largest restricted problem the LP keeps a Gram of (engine.restricted.WARM_MAX_ROWS)
WARM_MIN_ROWS = 256  # ... never capped below this (engine.restricted.WARM_MIN_ROWS)
WITNESS_BATCH_MAX = 192  # witnesses per verifier pass (engine.verify.Verifier.witnesses)


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key:`` line of a /proc file in bytes (its value is in kB; None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo (None where there is none)."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def current_rss() -> int | None:
    """This process's resident set now (``VmRSS`` of /proc/self/status; None where there is none)."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def default_budget(resident: int) -> int:
    """``resident`` plus what the machine has available beyond it, at most DEFAULT_WORKING (DEFAULT_WORKING
    where /proc/meminfo cannot be read), at least MIN_WORKING."""
    avail = available_bytes()
    spare = DEFAULT_WORKING if avail is None else avail - resident
    return int(resident + min(DEFAULT_WORKING, max(MIN_WORKING, spare)))


def parse_gb(value, where: str = "memory") -> int | None:
    """``--memory GB`` as bytes (None: the default). A positive finite number of gigabytes (10^9 bytes)."""
    if value is None:
        return None
    try:
        gb = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} = {value!r} is not a number of gigabytes") from None
    if not np.isfinite(gb) or gb <= 0:
        raise ValueError(f"{where} = {value!r}; expected a positive number of gigabytes, e.g. 2 or 0.5")
    return int(gb * GB)


def hold_keys(total: int | None, V: int, d: int, rss: int | None) -> bool:
    """Whether a scan holds its float64 keys: when the process as it is now (``rss``, the head loaded), the
    keys, their float32 copy and the smallest working set fit in the budget ``total`` (None: the default,
    what the process holds plus what the machine has available). Otherwise the fold derives them on demand
    where it can (``loader.fold(derive_keys=True)``: the same values, read by chunks and gathers, at the
    price of recomputing them where they are read). Held when nothing is known of the process."""
    if total is None:
        avail = available_bytes()
        total = None if avail is None or rss is None else int(rss) + avail
    if total is None or rss is None:
        return True
    return int(rss) + 12 * V * d + MIN_WORKING <= int(total)


@dataclass(frozen=True)
class Budget:
    """The budget in bytes and the sizes derived from it for a ``V × d`` problem."""

    total: int
    resident: int
    V: int
    d: int
    keys_held: bool = True  # False: the float64 keys are derived on demand (engine.head.DerivedKeys)

    @classmethod
    def for_problem(cls, problem, head_bytes: int, total: int | None = None, rss: int | None = None) -> "Budget":
        """``rss``: the process's resident set now (after the fold; :func:`current_rss`), which also counts
        the interpreter and its libraries: the resident part is then at least that plus the float32 keys
        still to be built."""
        V, d = problem.V, problem.d
        keys32 = 4 * V * d
        held = keys32  # the shared float32 keys; rows and keys derived from the head (FoldedRows) are not held
        held += sum(8 * V * d for a in (problem.keys, problem.rows, problem.rows_lo, problem.work_keys)
                    if isinstance(a, np.ndarray))
        resident = int(head_bytes) + held
        if rss is not None:
            resident = max(resident, int(rss) + (0 if "search_keys32" in problem.derived else keys32))
        return cls(default_budget(resident) if total is None else int(total), resident, V, d,
                   isinstance(problem.keys, np.ndarray))

    @property
    def working(self) -> int:
        return max(MIN_WORKING, self.total - self.resident)

    @property
    def met(self) -> bool:
        """The resident part alone fits in the budget."""
        return self.resident + MIN_WORKING <= self.total

    def per_row(self, bytes_per_row: int, cap: int, floor: int = 8) -> int:
        """How many batch rows of ``bytes_per_row`` each fit in the working set (between floor and cap)."""
        return int(max(floor, min(cap, self.working // max(1, bytes_per_row))))

    @property
    def search_batch(self) -> int:
        # the [n, V] float32 logits, topk's workspace and the float64 re-scores of the threats: ~4 float32 rows
        # (measured: 16.1 · V bytes per token at 65536 x 640)
        return self.per_row(SEARCH_BYTES_PER_V * self.V, SEARCH_BATCH_MAX)

    @property
    def witness_batch(self) -> int:
        # the [V, n] float32 pass and its mask (~2 float32 columns), or, where that pass cannot bound the
        # competitors, the float64 margins and their errors of the candidates, up to all V (2 float64 columns)
        return self.per_row((2 * 4 + 2 * 8) * self.V, WITNESS_BATCH_MAX)

    @property
    def lp_warm_rows(self) -> int:
        # the LP decides LP_LOCKSTEP tokens side by side, each holding its restricted problem's Gram and its
        # Cholesky factor (2 · 8 · m² bytes) up to m rows: m such that all of them fit in the working set
        m = math.isqrt(self.working // (LP_LOCKSTEP * 16))
        return int(max(WARM_MIN_ROWS, min(WARM_MAX_ROWS, m)))

    def to_json(self) -> dict:
        return {"budget_bytes": self.total, "resident_bytes": self.resident, "working_bytes": self.working,
                "keys_held": self.keys_held,
                "search_batch": self.search_batch, "witness_batch": self.witness_batch,
                "lp_warm_rows": self.lp_warm_rows}


def row_norms(a: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """``np.linalg.norm(a, axis=1)`` row chunk by row chunk (the same values) without its ``V × d`` square."""
    out = np.empty(a.shape[0])
    for r0 in range(0, a.shape[0], chunk):
        out[r0: r0 + chunk] = np.linalg.norm(a[r0: r0 + chunk], axis=1)
    return out


def abs_max(a: np.ndarray, chunk: int = 8192) -> float:
    """``max |a|`` without an ``|a|`` copy (0.0 for an empty array)."""
    return max((float(np.max(np.abs(a[r0: r0 + chunk]), initial=0.0)) for r0 in range(0, a.shape[0], chunk)),
               default=0.0)
