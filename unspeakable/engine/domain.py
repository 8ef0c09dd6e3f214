"""The domains of the hidden state (DESIGN §1): one object per domain owns its geometry.

==============  ===========================================  ==============================
domain          x ranges over                                class
==============  ===========================================  ==============================
``layernorm``   ``{x : sum(x) = 0, ||x||_2 <= R}``            :class:`CentredBall`
``rmsnorm``     ``{x : ||x||_2 <= R}``                        :class:`Ball`
``box``         ``{x : ||x||_inf <= rho}``                    :class:`Box`
``cone``        all of R^d, bias ignored                      :class:`Cone`
==============  ===========================================  ==============================

Every other module asks the domain: the screen point, the support function ``sup_X v·x`` and its
rigorous float64 upper bound (the deficit of a dual certificate), the adversary's best response used by
the search, the search's line step, moving a point into the domain, the verifier's membership test and
how reported numbers are scaled back to the caller's units. No module outside this one tests a domain's
name.

Functions taking vectors accept numpy arrays or torch tensors (batched over leading axes) and return the
same kind, so the search (torch) and the decide / verify stages (numpy) share one definition.
"""
from __future__ import annotations

import math

import numpy as np

from unspeakable.engine.head import InputError
from unspeakable.engine.memory import row_norms

U = 2.0**-53  # float64 unit roundoff
ETA = 2.0**-1074  # smallest subnormal: the absolute error of one underflowing operation


def gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an n-term float64 dot product."""
    nu = n * U
    return nu / (1.0 - nu)


def _is_torch(v) -> bool:
    return type(v).__module__.startswith("torch")


def _l2(v):
    if _is_torch(v):
        import torch

        return torch.linalg.vector_norm(v, dim=-1)
    return np.linalg.norm(v, axis=-1)


def _l1(v):
    return v.abs().sum(-1) if _is_torch(v) else np.abs(v).sum(axis=-1)


def _sign(v):
    if _is_torch(v):
        import torch

        return torch.sign(v)
    return np.sign(v)


class Domain:
    """Base class; see the module docstring. ``radius`` is R (balls), rho (box) or None (cone)."""

    name = ""
    bounded = True  # False: the cone (scale invariant, bias ignored)
    centred = False  # True: layernorm's sum(x) = 0 (the verifier certifies the projection P x)
    solver = "ball"  # decide's restricted solver: "ball" (exact oracle), "lp" (box) or "cone"
    # The stages read the keys by chunks and gathers only (engine.head.DerivedKeys serves a tight budget);
    # False where the screens need an array of the keys' own size anyway (the box's sign queries)
    lazy_keys = True

    def __init__(self, radius: float | None):
        self.radius = radius

    def __repr__(self) -> str:
        return f"{type(self).__name__}(radius={self.radius!r})"

    # ---- rows
    def project(self, v):
        """The orthogonal projection onto the domain's linear span (identity but for layernorm)."""
        return v

    def null_directions(self, d: int) -> np.ndarray:
        """``[d, f]``: directions x never moves along (their logit differences cannot matter): a Gordan
        certificate may leave a residual in their span (layernorm: the all-ones vector)."""
        return np.zeros((d, 0))

    def keys(self, rows: np.ndarray, center: np.ndarray) -> np.ndarray:
        """Screening rows ``P(rows - center)`` (a new array)."""
        return np.ascontiguousarray(self.project(rows - center))

    def keys_shift_only(self) -> bool:
        """:meth:`keys` is ``rows − center`` exactly (no projection): the same float64 values as the
        verifier's shifted rows and the uncentred gram rows less their mean."""
        return not self.centred and type(self).keys is Domain.keys and type(self).project is Domain.project

    # ---- support function and best response
    def support(self, v):
        """``sup over x in X of v·x`` (batched over leading axes)."""
        raise NotImplementedError

    def best_response(self, v):
        """A maximiser of ``v·x`` over X (0 where v = 0)."""
        raise NotImplementedError

    def screen_queries(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The witness screen's points as ``x_t = scale_t * query_t`` (scale None: 1): the best response
        to the token's own centred row (DESIGN §3 step 3)."""
        n = row_norms(keys)  # in row chunks: no V × d square
        with np.errstate(divide="ignore", invalid="ignore"):
            return keys, np.where(n > 0, self.radius / n, 0.0)

    def screen_points(self, keys: np.ndarray, ids) -> np.ndarray:
        """The screen points of tokens ``ids``, moved inside the domain so that they verify."""
        q, s = self.screen_queries(keys[ids])  # row-wise: the same values as for all rows, at O(|ids| d)
        return self.into(q if s is None else q * s[:, None])

    def logit_size(self, keys: np.ndarray) -> np.ndarray:
        """``sup_X |k·x|`` per row: the size of the logits the rows can produce (for relative tolerances)."""
        return self.support(keys)

    # ---- points
    def into(self, x: np.ndarray) -> np.ndarray:
        """Move candidate points into the domain with room for rounding (a new array)."""
        raise NotImplementedError

    def onto(self, x: np.ndarray) -> np.ndarray:
        """A direction scaled (positively) onto the domain's boundary: with a constant bias the argmax at x
        and at any positive multiple of x agree, so a cone witness becomes one of this domain."""
        return self.into(self.best_response(np.asarray(x, dtype=np.float64)))

    def contains(self, x: np.ndarray) -> tuple[bool, str]:
        """Rigorous membership of one float64 point (what the verifier certifies is this point)."""
        if not np.all(np.isfinite(x)):
            return False, "witness must be a finite vector"
        return True, ""

    # ---- certificates
    def support_upper(self, r: np.ndarray, er: np.ndarray) -> float:
        """A rigorous float64 upper bound of ``sup_X (-r_true·x)`` for every ``r_true`` with
        ``|r_true - r| <= er`` elementwise (the certificate's ``sup`` term, DESIGN §2)."""
        raise NotImplementedError

    # ---- search
    def line_step(self, v, w, D, gmax):
        """argmin over γ in [0, gmax] of ``support(v + γ w) + γ D`` (torch, batched): the pairwise
        Frank–Wolfe step of the search."""
        raise NotImplementedError

    def search_domain(self) -> "Domain":
        """The bounded domain the search runs in (the cone searches the unit ball without bias)."""
        return self

    # ---- units
    def units(self, e_logit: int, e_x: int) -> tuple[int, int]:
        """``(margin_exp, x_exp)``: reported margin = internal margin × 2**margin_exp, reported x = x ×
        2**x_exp, for rows scaled by ``2**-e_logit`` and x by ``2**-e_x`` at fold time (exact)."""
        return e_logit, e_x


class Ball(Domain):
    """``rmsnorm``: ``||x||_2 <= R``."""

    name = "rmsnorm"

    def support(self, v):
        return self.radius * _l2(self.project(v))

    def best_response(self, v):
        v = self.project(v)
        n = _l2(v)
        if _is_torch(v):
            import torch

            n = n[..., None]
            return torch.where(n > 0, self.radius * v / n.clamp_min(1e-300), torch.zeros_like(v))
        n = np.asarray(n)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, self.radius * v / np.where(n > 0, n, 1.0), 0.0)

    def into(self, x):
        x = np.array(self.project(np.asarray(x, dtype=np.float64)), dtype=np.float64)
        d = x.shape[-1]
        n = np.linalg.norm(x, axis=-1, keepdims=True)
        lim = self.radius * (1.0 - 8 * (d + 4) * U)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(n > lim, lim / n, 1.0)
        return x * f

    def contains(self, x):
        ok, msg = super().contains(x)
        if not ok:
            return ok, msg
        n2 = float(np.dot(x, x)) * (1.0 + gamma(x.size + 1)) + (x.size + 1) * ETA
        r2 = self.radius * self.radius * (1.0 - 2 * U)
        if not n2 <= r2:
            return False, f"witness norm {math.sqrt(n2):.17g} exceeds R = {self.radius:.17g}"
        return True, ""

    def support_upper(self, r, er):
        d = r.shape[-1]
        nr = float(np.linalg.norm(r)) * (1 + gamma(d + 2)) + float(np.linalg.norm(er)) * (1 + gamma(d + 2))
        return self.radius * (nr + (d + 2) * ETA) * (1 + 4 * U)

    def line_step(self, v, w, D, gmax):
        """Closed form: with q(γ) = Aγ² + Bγ + C the stationary point solves ρ(2Aγ + B) = −2D sqrt(q);
        squaring gives γ = −B/2A − (D/2A) sqrt((4AC − B²)/(Aρ² − D²)) when Aρ² > D². Otherwise |D|
        dominates the norm's slope and the function is monotone. Convexity makes clipping exact."""
        import torch

        rho = self.radius
        A = (w * w).sum(-1)
        B = 2.0 * (v * w).sum(-1)
        C = (v * v).sum(-1)
        K = A * rho * rho - D * D
        disc = (4.0 * A * C - B * B).clamp_min(0.0)
        safeA = A.clamp_min(1e-300)
        g = -B / (2 * safeA) - (D / (2 * safeA)) * torch.sqrt(disc / K.clamp_min(1e-300))
        mono = torch.where(D < 0, gmax, torch.zeros_like(gmax))
        g = torch.where((K > 0) & (A > 0), g, mono)
        return torch.minimum(torch.maximum(g, torch.zeros_like(g)), gmax)


class CentredBall(Ball):
    """``layernorm``: ``sum(x) = 0, ||x||_2 <= R`` — LayerNorm's output before its affine part."""

    name = "layernorm"
    centred = True

    def project(self, v):
        return v - v.mean(-1, keepdims=True) if not _is_torch(v) else v - v.mean(-1, keepdim=True)

    def null_directions(self, d):
        return np.ones((d, 1))

    def support_upper(self, r, er):
        d = r.shape[-1]
        rp = r - r.mean()
        # projection rounding: the mean (gamma_d relative to sum |r| / d) and one subtraction per entry.
        pe = gamma(d + 2) * float(np.abs(r).sum()) / d + U * np.abs(rp) + 2 * ETA
        nr = float(np.linalg.norm(rp)) * (1 + gamma(d + 2)) + float(np.linalg.norm(er + pe)) * (1 + gamma(d + 2))
        return self.radius * (nr + (d + 2) * ETA) * (1 + 4 * U)


class Box(Domain):
    """``box``: ``||x||_inf <= rho`` (the seed's LP with rho = 1; Grivas et al. with rho = 100)."""

    name = "box"
    solver = "lp"
    lazy_keys = False  # its screen queries sign(k_j) are a V × d array of their own

    def support(self, v):
        return self.radius * _l1(v)

    def best_response(self, v):
        return self.radius * _sign(v)

    def screen_queries(self, keys):
        return self.radius * np.sign(keys), None

    def into(self, x):
        return np.clip(np.asarray(x, dtype=np.float64), -self.radius, self.radius)

    def onto(self, x):
        x = np.asarray(x, dtype=np.float64)
        m = np.max(np.abs(x), axis=-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.into(np.where(m > 0, x * (self.radius / np.where(m > 0, m, 1.0)), 0.0))

    def contains(self, x):
        ok, msg = super().contains(x)
        if ok and not float(np.max(np.abs(x))) <= self.radius:
            return False, f"witness has |x_i| = {float(np.max(np.abs(x))):.17g} > rho = {self.radius:.17g}"
        return ok, msg

    def support_upper(self, r, er):
        d = r.shape[-1]
        return self.radius * (float(np.abs(r).sum()) + float(er.sum()) + d * ETA) * (1 + gamma(d + 2))

    def line_step(self, v, w, D, gmax, iters: int = 50):
        """Convex and piecewise linear in γ: bisection on the slope."""
        import torch

        rho = self.radius
        lo, hi = torch.zeros_like(D), gmax.clone()

        def slope(g):
            return rho * (w * torch.sign(v + g[:, None] * w)).sum(-1) + D

        full = slope(hi) <= 0
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            neg = slope(mid) < 0
            lo, hi = torch.where(neg, mid, lo), torch.where(neg, hi, mid)
        return torch.where(full, gmax, hi)


class Cone(Domain):
    """``cone``: all of R^d, bias ignored — "is u_t a vertex of the convex hull of all u_j". Scale
    invariant: margins are reported for the normalisation ``(u_t − c)·x = 1``."""

    name = "cone"
    bounded = False
    solver = "cone"

    def __init__(self, radius=None):
        super().__init__(None)

    def screen_queries(self, keys):
        n = row_norms(keys)
        with np.errstate(divide="ignore", invalid="ignore"):
            return keys, np.where(n > 0, 1.0 / (n * n), 0.0)  # k_t·x_t = 1

    def logit_size(self, keys):
        return np.ones(keys.shape[0])

    def into(self, x):
        return np.array(x, dtype=np.float64)

    def search_domain(self):
        return Ball(1.0)

    def support(self, v):
        raise ValueError("the cone is unbounded: it has no finite support function")

    def units(self, e_logit, e_x):
        # The normalised margin is scale invariant; x scales inversely to the rows.
        return 0, -e_logit


DOMAINS = {"layernorm": CentredBall, "rmsnorm": Ball, "box": Box, "cone": Cone}


def domain_for(name: str | None, norm: str, d_model: int, radius=None) -> tuple[Domain, list[str]]:
    """The domain of a head with final norm ``norm`` (``name`` None: the norm's own; none → cone) and
    the warnings a user should see. Raises :class:`InputError` for an unknown domain or a bad radius."""
    warnings: list[str] = []
    if name is None:
        name = {"layernorm": "layernorm", "rmsnorm": "rmsnorm"}.get(norm, "cone")
        if name == "cone":
            warnings.append("the head has no final norm: domain cone, where the bias is ignored "
                            "(--domain box keeps it and bounds the hidden state)")
    if name not in DOMAINS:
        raise InputError(f"unknown domain {name!r}; expected one of {', '.join(DOMAINS)}")
    cls = DOMAINS[name]
    if issubclass(cls, Ball) and norm != name:
        other = "no final norm" if norm == "none" else f"a final {norm}"
        warnings.append(f"domain {name} on a head with {other}: the verdicts assume a {name} in front of the "
                        f"unembedding")
    if radius is not None:
        if not cls.bounded:
            raise InputError("domain cone is unbounded: --radius does not apply (use layernorm, rmsnorm or box)")
        try:
            radius = float(radius)
        except (TypeError, ValueError):
            raise InputError(f"radius {radius!r} is not a number") from None
        if not math.isfinite(radius) or radius <= 0:
            raise InputError(f"radius must be finite and > 0; got {radius!r}")
    elif cls.bounded:
        radius = 1.0 if cls is Box else math.sqrt(d_model)
    return cls(radius), warnings
