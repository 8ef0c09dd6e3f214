"""What the search and decide stages hand to verification: claims, not verdicts.

A :class:`Candidate` carries a witness point and/or a dual certificate for one token together with the
bounds its producer believes. Nothing here is trusted: ``engine.verify`` re-checks every witness over all
V logits in float64 and every certificate from the folded rows, and only then is a verdict issued.

Conventions (DESIGN §2), with ``k_j`` the folded rows ``problem.rows`` (any shift of all rows by one vector
gives the same answers) and ``b_j`` the folded bias:

* witness ``x`` — a point of the domain: ``layernorm``: ``sum(x) = 0, ||x||_2 <= R`` (verification projects
  ``x`` onto 1⊥ exactly, so a float rounding of the sum is harmless); ``rmsnorm``: ``||x||_2 <= R``; ``box``:
  ``||x||_inf <= rho``; ``cone``: any ``x`` (scale invariant; reported margin is for ``(k_t - c)·x = 1``).
* certificate ``lambda`` — weights ``>= 0`` over competitors ``j != t`` summing to 1. For the bounded domains
  ``r = sum_j lambda_j (k_j - k_t)``, ``c0 = sum_j lambda_j (b_j - b_t)`` and the deficit
  ``delta = c0 - sup_X(-r·x)`` (box: ``c0 - rho ||r||_1``; ball: ``c0 - R ||P r||_2``) bounds every x at once:
  ``delta > 0`` proves unspeakable and ``margin_upper = -delta``.
  For ``cone`` the certificate also carries ``mu``, the multiplier of the normalisation row
  ``(k_t - c)·x = 1``: ``sum_j lambda_j (k_j - k_t) = -mu (k_t - c)`` up to rounding, ``mu < 0`` for a token
  inside the hull (the LP optimum), and verification proves exact membership of ``k_t`` in the hull of the
  others from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Certificate:
    competitors: np.ndarray  # [m] int64 token ids j != t
    weights: np.ndarray  # [m] float64 lambda_j >= 0, sum 1
    mu: float | None = None  # Gordan certificates only: multiplier of the cone's normalisation row
    zero: bool = False  # a "margin exactly 0" claim: a Gordan certificate in a bounded domain, constant bias

    def to_json(self) -> dict:
        out = {"competitors": [int(j) for j in self.competitors], "weights": [float(w) for w in self.weights]}
        if self.mu is not None:
            out["mu"] = float(self.mu)
        return out


@dataclass
class Candidate:
    """One token's claimed evidence from search or decide (unverified)."""

    token: int
    witness: np.ndarray | None = None  # [d] float64
    certificate: Certificate | None = None
    lower: float = float("-inf")  # claimed margin lower bound (from the witness)
    upper: float = float("inf")  # claimed margin upper bound (from the certificate / LP optimum)
    reason: str = ""  # who produced it and how it ended: "search", "lp", "lp: time limit", ...
    time_s: float = 0.0
    iterations: int = 0
