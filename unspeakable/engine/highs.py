"""The only module that talks to HiGHS (``highspy``).

Modelled on scipy's ``_linprog_highs.py``: every HiGHS model status goes through one table
(:data:`_MODEL_STATUS`) with an explicit ``unrecognized`` fallback, and a solution is read only when the
status is optimal and HiGHS says the values are valid. Everything else comes back as an :class:`LPResult`
with ``success=False`` and ``x = row_duals = objective = None``: a solver limit or error is never a number.

Dual convention. ``LPResult.row_duals`` are *shadow prices in the sense of the objective*: the rate at
which the optimal objective moves when the row's active bound is raised. For ``sense="max"`` a binding
``a·x <= u`` row therefore has a dual ``>= 0``, which is λ of DESIGN §2 as is. Measured, not assumed:
HiGHS 1.16's ``row_dual`` already is this shadow price for both senses and both bound sides
(``tests/test_highs.py`` checks it against finite differences of the optimum), so :func:`_shadow_prices`,
the one place a sign conversion would go, passes it through.

:class:`LP` keeps one ``Highs`` instance so that constraint generation can add rows and columns and
re-solve from the previous basis (dual simplex, warm started). Deterministic: one thread, fixed seed,
presolve off (a warm-started re-solve skips presolve anyway; off keeps the first solve on the same path).
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass

import numpy as np

# The public ``highspy.Highs`` subclass prints a banner on stdout the first time one is built and installs
# Python callbacks on every instance; the core class it wraps does neither, and is all we use.
from highspy import HighsModelStatus, HighsStatus, ObjSense
from highspy import _Highs as _CoreHighs

INF = math.inf
_NO_ITERATION_LIMIT = 2**31 - 1  # HiGHS's kHighsIInf, the option's default


class Status(str, enum.Enum):
    """Our solve status; ``str`` values so that reasons can quote them."""

    OPTIMAL = "optimal"
    INFEASIBLE = "infeasible"
    UNBOUNDED = "unbounded"
    UNBOUNDED_OR_INFEASIBLE = "unbounded or infeasible"
    TIME_LIMIT = "time limit"
    ITERATION_LIMIT = "iteration limit"
    OBJECTIVE_LIMIT = "objective limit"
    SOLUTION_LIMIT = "solution limit"
    INTERRUPTED = "interrupted"
    MEMORY_LIMIT = "memory limit"
    EMPTY = "empty model"
    NOT_SOLVED = "not solved"
    ERROR = "error"
    UNKNOWN = "unknown"
    UNRECOGNIZED = "unrecognized"


# Every HighsModelStatus of highspy 1.16, by name (names are stable across versions, values need not be).
_MODEL_STATUS: dict[str, Status] = {
    "kNotset": Status.NOT_SOLVED,
    "kLoadError": Status.ERROR,
    "kModelError": Status.ERROR,
    "kPresolveError": Status.ERROR,
    "kSolveError": Status.ERROR,
    "kPostsolveError": Status.ERROR,
    "kModelEmpty": Status.EMPTY,
    "kOptimal": Status.OPTIMAL,
    "kInfeasible": Status.INFEASIBLE,
    "kUnboundedOrInfeasible": Status.UNBOUNDED_OR_INFEASIBLE,
    "kUnbounded": Status.UNBOUNDED,
    "kObjectiveBound": Status.OBJECTIVE_LIMIT,
    "kObjectiveTarget": Status.OBJECTIVE_LIMIT,
    "kTimeLimit": Status.TIME_LIMIT,
    "kIterationLimit": Status.ITERATION_LIMIT,
    "kUnknown": Status.UNKNOWN,
    "kSolutionLimit": Status.SOLUTION_LIMIT,
    "kInterrupt": Status.INTERRUPTED,
    "kHighsInterrupt": Status.INTERRUPTED,
    "kMemoryLimit": Status.MEMORY_LIMIT,
}


def status_of(model_status) -> Status:
    """Map a ``HighsModelStatus`` (or anything else) to :class:`Status`; unknown values → ``UNRECOGNIZED``."""
    if not isinstance(model_status, HighsModelStatus):
        return Status.UNRECOGNIZED
    return _MODEL_STATUS.get(getattr(model_status, "name", ""), Status.UNRECOGNIZED)


@dataclass
class LPResult:
    status: Status
    success: bool  # True only for an optimal solve with valid primal and dual values
    message: str  # HiGHS's own words for the model status (plus ours when we downgrade)
    objective: float | None = None
    x: np.ndarray | None = None  # primal column values
    row_duals: np.ndarray | None = None  # shadow prices, see the module docstring
    nit: int = 0  # simplex iterations of this solve
    time_s: float = 0.0


# HiGHS takes matrix entries of 1e15 and above for infinite and drops those below 1e-9: problems whose rows
# leave [2^LP_EXP_MIN, 2^LP_EXP_MAX] are handed to it scaled by a power of two (exact; the caller scales back).
LP_EXP_MIN, LP_EXP_MAX = -10, 30


def lp_exponent(size: float) -> int:
    """``e`` such that entries of size ``size`` reach HiGHS as ``size · 2^-e`` (about 1): 0 where ``size`` is
    comfortable already (then nothing changes), and where it is 0 or not finite."""
    if not math.isfinite(size) or size <= 0 or LP_EXP_MIN <= math.frexp(size)[1] <= LP_EXP_MAX:
        return 0
    return math.frexp(size)[1]


def _shadow_prices(row_dual: np.ndarray, sense: str) -> np.ndarray:
    """HiGHS row duals → d(objective)/d(active row bound), in the objective's own sense. HiGHS 1.16 reports
    exactly that for ``min`` and for ``max`` (checked by finite differences in ``tests/test_highs.py``); if a
    version flips the ``max`` convention, this is the one place to change."""
    return np.asarray(row_dual, dtype=np.float64).copy()


def _csr(A, n_cols: int):
    """Dense array or scipy.sparse matrix → (starts, indices, values) of its rows, int32 / float64."""
    if hasattr(A, "tocsr"):
        A = A.tocsr()
        A.sum_duplicates()
        if A.shape[1] != n_cols:
            raise ValueError(f"constraint matrix has {A.shape[1]} columns, expected {n_cols}")
        return (A.indptr[:-1].astype(np.int32), A.indices.astype(np.int32), A.data.astype(np.float64))
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[1] != n_cols:
        raise ValueError(f"constraint matrix has shape {A.shape}, expected (m, {n_cols})")
    rows, cols = np.nonzero(A)
    counts = np.bincount(rows, minlength=A.shape[0])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return starts, cols.astype(np.int32), A[rows, cols].astype(np.float64)


def _bounds(v, n: int, name: str) -> np.ndarray:
    out = np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()
    if np.any(np.isnan(out)):
        raise ValueError(f"{name} contains NaN")
    return out


class LP:
    """A HiGHS LP kept alive for warm-started re-solves.

    ``lower <= A x <= upper`` rows, ``col_lower <= x <= col_upper`` bounds, objective ``cost·x`` maximised
    (``sense="max"``) or minimised. Infinite bounds are ``±inf``.
    """

    def __init__(self, cost, col_lower, col_upper, *, sense: str = "max", threads: int = 1):
        if sense not in ("max", "min"):
            raise ValueError(f"sense must be 'max' or 'min', got {sense!r}")
        cost = np.asarray(cost, dtype=np.float64).ravel()
        self.sense = sense
        h = _CoreHighs()
        for name, value in (("output_flag", False), ("threads", int(threads)), ("presolve", "off"),
                            ("solver", "simplex"), ("simplex_strategy", 1), ("random_seed", 0)):
            self._check(h.setOptionValue(name, value), f"setOptionValue({name})")
        self._h = h
        self._inf = float(h.getInfinity())
        self._n = 0
        self._m = 0
        self.add_cols(cost, col_lower, col_upper)
        self._check(h.changeObjectiveSense(ObjSense.kMaximize if sense == "max" else ObjSense.kMinimize),
                    "changeObjectiveSense")

    # ------------------------------------------------------------------ building
    @property
    def num_cols(self) -> int:
        return self._n

    @property
    def num_rows(self) -> int:
        return self._m

    def _clip(self, v: np.ndarray) -> np.ndarray:
        return np.clip(v, -self._inf, self._inf)

    @staticmethod
    def _check(status, what: str):
        if status == HighsStatus.kError:
            raise RuntimeError(f"HiGHS {what} failed")

    def add_cols(self, cost, lower, upper, A=None) -> np.ndarray:
        """Add columns; ``A`` [num_rows, k] holds their entries in the existing rows (default: none).
        Returns the new column indices."""
        cost = np.asarray(cost, dtype=np.float64).ravel()
        k = cost.size
        lo, up = self._clip(_bounds(lower, k, "col_lower")), self._clip(_bounds(upper, k, "col_upper"))
        if A is None:
            starts = np.zeros(k, dtype=np.int32)
            idx = np.zeros(0, dtype=np.int32)
            val = np.zeros(0, dtype=np.float64)
        else:
            At = A.T if hasattr(A, "tocsr") else np.asarray(A, dtype=np.float64).T
            starts, idx, val = _csr(At, self._m)  # rows of A^T are the new columns
        self._check(self._h.addCols(k, cost, lo, up, int(val.size), starts, idx, val), "addCols")
        new = np.arange(self._n, self._n + k)
        self._n += k
        return new

    def add_rows(self, A, lower, upper) -> np.ndarray:
        """Add rows ``lower <= A x <= upper`` (``A`` dense [k, num_cols] or scipy.sparse). Returns their indices."""
        starts, idx, val = _csr(A, self._n)
        k = starts.size
        lo, up = self._clip(_bounds(lower, k, "row_lower")), self._clip(_bounds(upper, k, "row_upper"))
        self._check(self._h.addRows(k, lo, up, int(val.size), starts, idx, val), "addRows")
        new = np.arange(self._m, self._m + k)
        self._m += k
        return new

    # ------------------------------------------------------------------ solving
    def solve(self, *, time_limit: float | None = None, iteration_limit: int | None = None) -> LPResult:
        """Solve (warm started from the last basis when there is one)."""
        h = self._h
        # HiGHS (< 2.0) compares time_limit with the run time accumulated over all runs of this instance.
        limit = INF if time_limit is None else h.getRunTime() + max(float(time_limit), 0.0)
        self._check(h.setOptionValue("time_limit", limit if math.isfinite(limit) else self._inf),
                    "setOptionValue(time_limit)")
        # Options persist on the instance: always set the iteration limit, back to "none" when not given.
        it_limit = _NO_ITERATION_LIMIT if iteration_limit is None else max(int(iteration_limit), 0)
        self._check(h.setOptionValue("simplex_iteration_limit", it_limit), "setOptionValue(simplex_iteration_limit)")
        t0 = time.perf_counter()
        run_status = h.run()
        elapsed = time.perf_counter() - t0
        model_status = h.getModelStatus()
        status = status_of(model_status)
        try:
            message = h.modelStatusToString(model_status)
        except Exception:  # a status HiGHS itself cannot name
            message = str(model_status)
        info = h.getInfo()
        nit = int(getattr(info, "simplex_iteration_count", 0) or 0)
        if run_status == HighsStatus.kError and status == Status.OPTIMAL:
            status, message = Status.ERROR, f"{message} (but run() returned an error)"
        if status != Status.OPTIMAL:
            return LPResult(status, False, message, nit=max(nit, 0), time_s=elapsed)
        sol = h.getSolution()
        if not (sol.value_valid and sol.dual_valid):
            return LPResult(Status.ERROR, False, f"{message} (but HiGHS holds no valid primal/dual values)",
                            nit=nit, time_s=elapsed)
        x = np.asarray(sol.col_value, dtype=np.float64).copy()
        duals = _shadow_prices(sol.row_dual, self.sense)
        obj = float(info.objective_function_value)
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(duals)) and math.isfinite(obj)):
            return LPResult(Status.ERROR, False, f"{message} (but the solution is not finite)", nit=nit, time_s=elapsed)
        return LPResult(Status.OPTIMAL, True, message, obj, x, duals, nit, elapsed)


def solve_lp(c, A, row_lower, row_upper, col_lower, col_upper, *, sense: str = "max",
             time_limit: float | None = None, iteration_limit: int | None = None) -> LPResult:
    """One-shot LP: ``sense c·x`` subject to ``row_lower <= A x <= row_upper``, ``col_lower <= x <= col_upper``.
    HiGHS refusing the model (e.g. matrix entries of 1e15 and more) is an unsuccessful result, as a solver
    limit is: never an exception out of a caller's proof attempt."""
    try:
        lp = LP(c, col_lower, col_upper, sense=sense)
        if A is not None and A.shape[0] > 0:
            lp.add_rows(A, row_lower, row_upper)
    except RuntimeError as e:  # _check: a kError status of HiGHS's
        return LPResult(Status.ERROR, False, str(e))
    return lp.solve(time_limit=time_limit, iteration_limit=iteration_limit)
