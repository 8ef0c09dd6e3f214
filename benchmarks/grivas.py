"""A Grivas-style peer: Braid Reflect, then the Chebyshev LP for the classes it does not settle.

After Grivas, Luo and Lopez, "Low-Rank Softmax Can Have Unargmaxable Classes in Theory but Rarely in
Practice" (ACL 2022, arXiv 2203.06462) and their code (github.com/andreasgrv/unargmaxable,
``stollen/__init__.py``), re-written here from its description, per class ``t`` of a softmax layer
``W [V, d]``, ``b [V]`` with the input in the box ``[−ρ, ρ]^d`` (ρ = 100 by default there):

1. once per layer: the rank check, ``svd(W, compute_uv=False)`` and ``matrix_rank(W as float64)``;
2. Braid Reflect: start at ``x = w_t``; while the argmax ``j`` of ``Wx + b`` is not ``t`` (at most
   ``patience`` = 100 times), reflect ``x`` across the braid hyperplane ``(w_t − w_j)·x + b_t − b_j = 0``.
   The class is settled (argmaxable) when ``t`` wins at a point inside the box. In the weights' dtype
   (float32 for the paper's models);
3. otherwise the exact step: maximise the radius ``r ≥ ε`` of a ball inside the region where ``t`` wins,
   ``(w_j − w_t)·x + ‖w_j − w_t‖·r ≤ b_t − b_j`` for every ``j ≠ t``, ``x`` in the box. Optimal:
   argmaxable; infeasible: bounded (unargmaxable). The paper used Gurobi's barrier method, one thread,
   feasibility tolerance ε/10; here HiGHS through ``scipy.optimize.linprog`` (the paper's code has this
   call, with ``highs-ipm``, commented out as its alternative), with a time limit per class.

The paper runs classes in parallel processes (``STOLLEN_NUM_PROCESSES``), each single-threaded: the
benchmark times one process with one BLAS thread (two OpenBLAS threads on a shared 2-core machine made a
4096 × 256 matvec 100× slower) and divides the extrapolated total by the number of cores.
"""
from __future__ import annotations

import time

import numpy as np

EPSILON = 1e-8


def rank_check(W: np.ndarray) -> int:
    """The paper's set-up per layer: singular values of W, then its rank in float64 (two SVDs)."""
    np.linalg.svd(W, compute_uv=False)
    return int(np.linalg.matrix_rank(W.astype(np.float64)))


def braid_reflect(W: np.ndarray, b: np.ndarray, t: int, rho: float, patience: int = 100) -> tuple[bool, int]:
    """``(settled, reflections)``: settled when ``t`` is the argmax at a point of the box."""
    x = W[t].copy()
    j = int(np.argmax(W @ x + b))
    it = 0
    for it in range(patience):
        if j == t:
            break
        n = W[t] - W[j]
        norm = np.linalg.norm(n)
        n = n / norm
        x = x - 2.0 * (n @ x + (b[t] - b[j]) / norm) * n
        j = int(np.argmax(W @ x + b))
    return bool(j == t and np.all(np.abs(x) <= rho)), it


def chebyshev_lp(W: np.ndarray, b: np.ndarray, t: int, rho: float, time_limit: float, method: str = "highs") -> str:
    """The exact step over all V − 1 constraints: ``argmaxable``, ``bounded`` or the solver's status.
    ``method``: scipy's HiGHS choice (``highs``: HiGHS picks, dual simplex on these LPs; ``highs-ipm``: the
    interior point method, nearest to the paper's barrier, 4–7× slower here on dense heads)."""
    from scipy.optimize import linprog

    braid = np.delete(W - W[t], t, axis=0)
    braid_b = np.delete(b - b[t], t)
    A = np.hstack([braid, np.linalg.norm(braid, axis=1, keepdims=True)])
    c = np.zeros(W.shape[1] + 1)
    c[-1] = -1.0  # maximise r
    bounds = [(-rho, rho)] * W.shape[1] + [(EPSILON, None)]
    res = linprog(c, A_ub=A, b_ub=-braid_b, bounds=bounds, method=method,
                  options={"time_limit": float(time_limit), "primal_feasibility_tolerance": EPSILON * 0.1})
    return {0: "argmaxable", 2: "bounded"}.get(res.status, "time limit" if res.status == 1 else f"status {res.status}")


def class_is_bounded(W, b, W64, b64, t: int, rho: float, time_limit: float, lp_only: bool = False,
                     method: str = "highs") -> dict:
    """One class through the pipeline, timed: Braid Reflect on ``W, b`` (weights' dtype), the LP on the
    float64 copies when the search does not settle it (``lp_only``: the LP alone, for its per-class time)."""
    t0 = time.perf_counter()
    settled, its = (False, 0) if lp_only else braid_reflect(W, b, t, rho)
    t1 = time.perf_counter()
    status = "argmaxable (search)" if settled else chebyshev_lp(W64, b64, t, rho, time_limit, method)
    t2 = time.perf_counter()
    return {"token": t, "search_s": t1 - t0, "reflections": its, "settled_by_search": settled,
            "lp_s": None if settled else t2 - t1, "status": status, "time_s": t2 - t0}
