"""How precisely must the model point? The share of the norm's output set on which each token wins.

**The measure.** For token t, ``share(t)`` is the probability that t is the *strict* argmax of the folded
logits ``l_j(x) = ũ_j·x + b̃_j`` (DESIGN §1) when x is drawn uniformly from the final norm's output set:

==============  =================================================================  ===================
domain          x is uniform on                                                    dimension n
==============  =================================================================  ===================
``layernorm``   the sphere ``‖x‖ = R`` in the centred subspace ``sum(x) = 0``       d − 1
``rmsnorm``     the sphere ``‖x‖ = R``                                             d
``cone``        the unit sphere, no bias (every radius gives the same shares)       d
``box``         the cube ``‖x‖∞ ≤ ρ`` (its volume)                                  d
==============  =================================================================  ===================

The gain and bias are folded exactly as the scan folds them (``loader.fold``). Ties between different rows
have measure zero. *Identical* folded rows (same row and bias; layernorm: same centred row and bias) never
win strictly — the scan calls them unspeakable, reason ``tie`` — yet own a cell together: each member of
such a group is given an equal part of the group's cell, so that the shares of all V tokens sum to 1 (the
entry says ``tie_with``). Note that the share lives on the sphere while the scan's verdicts live on the
ball: a token that wins only inside the ball (a large bias, a short row) is speakable with share 0.

**Three numbers per token.**

* ``log10_share_lower_bound`` — rigorous: a spherical cap ``{x : angle(x, c) ≤ θ}`` that lies inside t's
  region, checked against every one of the V − 1 competitors in float64 with explicit rounding
  allowances (:func:`verify_cap`), its share in closed form, ``½ I_{sin²θ}((n−1)/2, ½)`` (regularised
  incomplete beta, evaluated with mpmath and rounded down). ``cap_angle_deg`` is θ: "the model must point
  within θ of c". The centre c comes from the estimator's particles and a smooth max–min ascent on the
  angular slacks; only the final check is trusted. (box: null — no cap bound is computed there.)
* ``log10_share`` and ``log10_share_ci`` — an estimate with a confidence interval at ``confidence``:
  - ``sampling``: one batched pass of ``samples`` uniform points (a GEMM against all V rows and an argmax)
    serves every token at once; a token with at least ``min_hits`` hits is reported from its count with
    the exact (Clopper–Pearson) binomial interval.
  - ``splitting``: rarer tokens get adaptive multilevel splitting on the margin
    ``m_t(x) = l_t(x) − max_{j≠t} l_j(x)``: ``R`` independent replicates of ``N`` particles each; at every
    level the particles at or below the ``(1 − p0)`` quantile are killed and replaced by clones of the
    survivors, then every particle takes preconditioned Crank–Nicolson steps on the Gaussian behind x
    (x = R·Pz/‖Pz‖ on spheres, ``ρ·erf(z/√2)`` on the cube), which leave the conditional law invariant.
    The estimator of each replicate is ``Π (1 − killed/N) · (final fraction)``, unbiased whatever the
    mixing. Particles meet a *restricted* set J of competitors: the strongest at t's own direction, then
    those strongest where a cheap pilot run's particles end (the rows that cut the cell where its mass
    lies); the final particles are re-scored against all V rows and the fraction that truly wins
    multiplies the estimate, so the estimate is of the head as given (``final_checks`` times, with a sweep
    of pCN moves inside the J-cell between two checks: the average stays unbiased and is less
    correlated). Each move reads a *core* of J (its most often binding rows) first and the rest of J only
    for the proposals that pass the core: the same chain at about half the multiply-adds. The interval comes from
    the spread of the independent replicates (Cox's interval for a log-normal mean), so MCMC correlation
    widens it instead of making it dishonest. Replicates whose final particles all lose against V estimate
    0 (on SmolLM2 the J-cell is 5-50x the token's cell: its cells have thousands of facets, J holds at most
    1024); then the interval is a t interval on the raw estimates, and where its lower end reaches 0 the
    lower end is a distribution-free bound for nonnegative unbiased replicates (:func:`_nonnegative_lower`).
  - ``tie`` members share their group's estimate; ``zero`` is a proof that the share is 0 (one competitor's
    half-space misses the sphere), with interval ``[null, null]`` and the estimate null.
* The estimate lies in its interval, no end above 0 (a share is at most 1), and neither goes below the
  proven bound where there is one (a null lower end becomes the bound; an interval wholly below the bound
  has missed, and its upper end becomes null: "at least the bound", with a note).
* ``samples`` — plain samples (sampling) or replicates × particles (splitting); ``seconds`` — the wall time
  attributed to the token (its share of the batched pass or of its splitting batch; on a two-thread caller
  two batches run at once, so these add up to more than the run's wall time).

Floating point: the splitting's chain uses float32 margins against J (an estimate; points within float32
rounding of a cell's boundary are a negligible set); who wins at a point over all V (the plain pass, the
final checks) is what float64 logits say at the point put back on the set in float64
(:meth:`_Measure.on_set`): a bfloat16 GEMM (float32 where oneDNN lacks bfloat16) with a bound on its error
settles nearly every row, float64 the few it cannot (:meth:`_Measure.wins`), and two rows closer than their
float64 logits' rounding are compared through their difference (:meth:`_Measure._gap`); the lower bound uses
float64 with rounding allowances.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from unspeakable.engine.domain import U, gamma
from unspeakable.engine.head import FoldedRows, Head, InputError, token_ids
from unspeakable.engine.memory import row_norms
from unspeakable.engine.report import csv_float, float_or_none
from unspeakable.kernels import torch_threads

SCHEMA = "unspeakable.volume/1"
MIN_HITS = 100  # plain hits below which a listed token is estimated by splitting
_DEBUG = bool(__import__("os").environ.get("UNSPEAKABLE_VOLUME_DEBUG"))
FIELDS = ("id", "text", "log10_share", "log10_share_ci", "log10_share_lower_bound", "cap_angle_deg", "method",
          "samples", "seconds")


# ------------------------------------------------------------------------------------------------ results
@dataclass
class TokenVolume:
    id: int
    text: str | None
    log10_share: float | None  # None: no estimate (share 0 proven, or not reached)
    log10_share_ci: tuple  # (lo, hi); lo None: no lower end (the share may be 0), hi None: no upper end known
    log10_share_lower_bound: float | None  # rigorous; None where no cap was proven
    cap_angle_deg: float | None
    method: str  # "sampling" | "splitting" | "zero" | "tie"
    samples: int
    seconds: float
    hits: int | None = None  # plain samples on which t won (sampling)
    levels: int | None = None  # splitting levels (the largest over replicates)
    tie_with: list[int] | None = None
    note: str | None = None

    def to_json(self) -> dict:
        out = {"id": int(self.id), "text": None if self.text is None else str(self.text),
               "log10_share": float_or_none(self.log10_share),
               "log10_share_ci": [float_or_none(self.log10_share_ci[0]), float_or_none(self.log10_share_ci[1])],
               "log10_share_lower_bound": float_or_none(self.log10_share_lower_bound),
               "cap_angle_deg": float_or_none(self.cap_angle_deg), "method": self.method, "samples": int(self.samples),
               "seconds": float_or_none(self.seconds)}
        for k in ("hits", "levels", "tie_with", "note"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out


@dataclass
class VolumeReport:
    source: str
    V: int
    d: int
    domain: str
    radius: float | None
    bias: bool
    dimension: int  # n: the sphere is S^(n-1) (or the cube [-ρ, ρ]^n)
    confidence: float
    samples: int
    seed: int
    tokens: list[TokenVolume]
    timings_s: dict
    warnings: list[str] = field(default_factory=list)
    log10_share_sampled_all: object = None  # numpy [V]: log10 of the plain pass's share estimate (-inf: no hit)

    def to_json(self) -> dict:
        out = {"schema": SCHEMA, "source": str(self.source), "V": int(self.V), "d": int(self.d),
               "domain": self.domain, "radius": float_or_none(self.radius), "bias": bool(self.bias),
               "dimension": int(self.dimension), "confidence": float(self.confidence),
               "samples": int(self.samples), "seed": int(self.seed),
               "timings_s": {k: float_or_none(v) for k, v in self.timings_s.items()},
               "tokens": [t.to_json() for t in self.tokens]}
        if self.warnings:
            out["warnings"] = [str(w) for w in self.warnings]
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(("id", "text", "log10_share", "log10_share_ci_lo", "log10_share_ci_hi",
                    "log10_share_lower_bound", "cap_angle_deg", "method", "samples", "seconds"))
        for t in self.tokens:
            w.writerow([t.id, "" if t.text is None else t.text, csv_float(t.log10_share), csv_float(t.log10_share_ci[0]),
                        csv_float(t.log10_share_ci[1]), csv_float(t.log10_share_lower_bound), csv_float(t.cap_angle_deg), t.method,
                        t.samples, csv_float(t.seconds)])
        return buf.getvalue()


# ------------------------------------------------------------------------------------------------ closed forms
def cap_log10_share(theta: float, n: int) -> float:
    """log10 of the share of the sphere S^(n-1) ⊂ R^n inside a cap of angular radius θ, rounded down.

    ``½ I_{sin²θ}((n−1)/2, ½)`` for θ ≤ π/2 and one minus the complement's beyond; n = 1 (two points): the
    cap holds one point for θ < π. Evaluated with mpmath at 40 digits (no underflow at any n), then lowered
    by a relative 1e-12 so the bound is never above the exact value.
    """
    import mpmath

    if not theta > 0:
        return -math.inf
    if theta >= math.pi:
        return 0.0
    if n == 1:
        return math.log10(0.5)
    with mpmath.workdps(40):
        th = mpmath.mpf(theta)
        a, b = mpmath.mpf(n - 1) / 2, mpmath.mpf(1) / 2
        if th <= mpmath.pi / 2:
            s = mpmath.betainc(a, b, 0, mpmath.sin(th) ** 2, regularized=True) / 2
        else:
            s = 1 - mpmath.betainc(a, b, 0, mpmath.sin(th) ** 2, regularized=True) / 2
        v = float(mpmath.log10(s))
    return v - 1e-12 * max(1.0, abs(v)) - 1e-15


def _check_angle(c_theta: float, s_theta: float) -> None:
    if not (0 <= s_theta <= 1 and -1 <= c_theta <= 1):
        raise ValueError("cos/sin out of range")


# ------------------------------------------------------------------------------------------------ geometry
ROW_BLOCK = 8192  # the checks read all V in blocks of this many rows (a point decided in one reads no further)
ETA_SET = 2.0**-20  # how far (relative to R) a float32 point may be from the set for the checks' allowances
PAIR_BUDGET = 2**22  # (point, row) entries the float64 stages examine at a time (:meth:`_Measure._near_logits`)


class _Measure:
    """The uniform law on the norm's output set as a map of a standard Gaussian z ∈ R^d, and the logits.

    Spheres: ``x = R·Pz/‖Pz‖`` (P the domain's projection); the cube: ``x = ρ·erf(z/√2)``. A pCN step on z
    leaves N(0, I) invariant, hence the uniform law on the output set, hence its restriction to any level
    set when moves that leave the set are rejected."""

    def __init__(self, problem, keys: np.ndarray, rows_err: bool = True, bias_err: np.ndarray | None = None,
                 bias_split=None):
        import torch

        self.problem = problem
        dom = problem.domain
        self.box = dom.solver == "lp"
        self.centred = bool(dom.centred)
        self.d = problem.d
        self.n = self.d - 1 if self.centred else self.d
        self.R = 1.0 if dom.radius is None else float(dom.radius)
        self.keys64 = keys  # [V, d] float64: P(rows - c); logits up to a constant in j
        self.bias64 = problem.bias
        with np.errstate(over="ignore"):  # rows past float32's range become inf there: their size_lp is inf
            self.keys = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))  # and float64 decides
        self.gemm_threads = torch.get_num_threads()  # the caller's: the splitting's GEMMs use them
        self.bias = torch.from_numpy(problem.bias.astype(np.float32))
        norms = row_norms(keys)  # in chunks: derived keys (engine.head.DerivedKeys) are never built whole
        # The plain pass and the all-V checks of the splitting's final points run their GEMM in bfloat16 where
        # oneDNN has it (3.8x float32's speed here: 256 points x 49152 rows x 576 in 0.049 s against 0.186 s),
        # the bias as a last column (the points get a 1 there). |L_lp - l| <= e_lp * size_j + c_lp * |L_lp| for
        # every entry (size_j = ‖x‖‖k_j‖ + |b_j| bounds Σ|x_i k_ij| + |b_j|): each input rounded by at most u (bfloat16 2^-9,
        # float32 2^-24), exact products, float32 accumulation (γ_{d+1}), the output rounded to the format.
        # What these bounds cannot decide is decided in float64 (:meth:`wins`).
        try:
            low = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        except (AttributeError, RuntimeError):
            low = torch.float32
        u = (2.0**-9 if low == torch.bfloat16 else 2.0**-24) * (1 + 2.0**-14)
        g32 = (self.d + 1) * 2.0**-24 / (1 - (self.d + 1) * 2.0**-24)
        # + ETA_SET: the checks judge each float32 point put back on the set in float64 (:meth:`on_set`), at most
        # ETA_SET·xmax away, which moves row j's logit by at most ETA_SET·size_j
        self.e_lp = (2 * u + u * u + g32 * (1 + u) ** 2 + ETA_SET) * 1.001
        self.c_lp = u / (1 - u) * 1.001
        xmax = self.R * (math.sqrt(self.d) if self.box else 1 + 1e-5)  # ‖x‖ of any point (float32 on the sphere)
        with np.errstate(over="ignore"):  # inf: nothing about row j is decided in low precision
            self.size_lp = torch.from_numpy((xmax * norms + np.abs(problem.bias)).astype(np.float32)
                                            * np.float32(1 + 1e-6))
        self.size_max = float(self.size_lp.max())
        self.keys_lp = torch.cat([self.keys, self.bias[:, None]], dim=1).to(low)
        # The float64 logits k̃_j·x + b̃_j (keys64 = P(rows − centre), rounded) differ from the head's own, less
        # the common centre·x, by at most key_err[j] anywhere on the output set: the keys' rounding (the
        # difference and the projection: ≤ 4(d+2)u(‖r_j‖ + ‖centre‖) in 2-norm), the fold's rounding of the rows
        # (2u‖r_j‖ where γ ⊙ u may round) and of the bias (``bias_err``), and the float64 dot product's own
        # (≤ γ_d·size_j, taken as 1e-12·size_j). A head whose centre is huge against the rows' differences
        # (one row 1e30 times the others) makes it large: the stages that read the keys then decide little,
        # and the exact stage, which reads the rows, decides the rest.
        rn = row_norms(problem.rows)
        cn = float(np.linalg.norm(problem.center)) if getattr(problem, "center", None) is not None else 0.0
        err = xmax * (4 * (self.d + 2) * U * (rn + cn) + (2 * U * rn if rows_err else 0.0))
        err = err + 1e-12 * (xmax * norms + np.abs(problem.bias))
        if bias_err is not None:
            err = err + bias_err
        self.key_err = err * 1.01
        self.key_err[~np.isfinite(self.key_err)] = np.inf
        self.err_max = float(self.key_err.max()) if len(self.key_err) else 0.0
        # the exact stage reads the rows themselves (no centre: ``r_j·x + b̃_j``, the head's logits up to the
        # same x·centre for every row), within row_err[j] of the head's own
        rerr = xmax * (2 * U * rn if rows_err else 0.0) + 1e-12 * (xmax * rn + np.abs(problem.bias))
        if bias_err is not None:
            rerr = rerr + bias_err
        self.row_err = rerr * 1.01
        self.row_err[~np.isfinite(self.row_err)] = np.inf
        # for the gaps l_t − l_j read from the rows' difference (:meth:`_gap`): each row's fold error alone
        self.xmax = xmax
        # (``bias_split`` = (lo, err): the fold's bias is ``bias + lo`` within ``err``; the gaps and the chain's
        # differences read ``lo`` too, so two biases closer than an ulp of either keep their difference)
        self.bias_lo, split_err = (None, bias_err) if bias_split is None else bias_split
        ferr = np.zeros(len(rn)) + xmax * (2 * U * rn if rows_err else 0.0) + (0.0 if split_err is None else split_err)
        self.fold_err = np.where(np.isfinite(ferr), ferr * 1.01, np.inf)
        self.gid = np.arange(len(rn))  # twin groups (the caller's, :meth:`set_twins`): a row's group's first id
        self.ambiguous: dict[int, int] = {}  # per token, points within row_err of a tie (wins: lost; plain: its)
        self.coarse: set[int] = set()  # tokens whose float32 chain ended finer than float32 resolves (_coarse)

    def diffs(self, t: int, j) -> np.ndarray:
        """``r_t − r_j`` [d, K] for rows j, in float64 from the rows (not keys64 = P(rows − centre), which rounds
        away the rows' differences where the centre is large against them), centred on centred domains."""
        rows = self.problem.rows
        a = (np.asarray(rows[t], dtype=np.float64)[None, :]
             - np.asarray(rows[np.asarray(j, dtype=np.int64)], dtype=np.float64)).T
        return a - a.mean(axis=0, keepdims=True) if self.centred else a

    def bias_diff(self, t, j, with_size: bool = False):
        """``b̃_t − b̃_j`` in float64 for rows j (t a token or an array of them, paired with j), the fold's low
        parts included where it has them. ``with_size``: also a size s with the result within 3u·s +
        fold_err[t] + fold_err[j] of the exact (the two differences and their sum each round once)."""
        db = self.bias64[t] - self.bias64[j]
        if self.bias_lo is None:
            return (db, np.abs(db)) if with_size else db
        dl = self.bias_lo[t] - self.bias_lo[j]
        out = db + dl
        return (out, np.abs(db) + np.abs(dl) + np.abs(out)) if with_size else out

    def set_twins(self, groups: dict[int, list[int]]):
        """The twin groups (token -> sorted members): rows of one group are never a point's rival."""
        self.gid = np.arange(len(self.gid))
        for t, members in groups.items():
            self.gid[t] = members[0]

    def _gap(self, xr, tt, ii, jj):
        """Bounds (lo, hi) of the head's ``l_t(x) − l_j(x)`` at points xr[ii] (on the set, float64) for rows
        tt and jj (arrays of pairs), from the rows' difference: ``(r_t − r_j)·x + (b̃_t − b̃_j)`` in float64
        rounds by at most (d + 5)u·(‖r_t − r_j‖·xmax + |b̃_t − b̃_j|) (the difference's entries, the dot
        product, the bias difference and the sum), then each row's fold error. Two rows 1 ulp apart (each
        logit rounds by more than they differ) are told apart here wherever the fold is exact.

        On centred domains the point is ``P·xr`` (P the projection onto the centred subspace): xr, centred in
        float64, keeps a component along the all-ones vector (Σxr ≠ 0 by its rounding, whose size depends on
        how numpy sums), which moves the product by ``(Σa)(Σxr)/d``, a = r_t − r_j. Both sums are bounded from
        the data (Σxr by ``math.fsum``, Σa from numpy's sum plus γ_{d+1} of its absolute sum, a's own rounding
        u‖a‖₁ included), and their product is added to the allowance; the exact stage removes the term
        (:meth:`_exact_gap`)."""
        rows = self.problem.rows
        a = np.asarray(rows[tt], dtype=np.float64) - np.asarray(rows[jj], dtype=np.float64)
        db, db_size = self.bias_diff(tt, jj, with_size=True)
        x = xr[ii]
        g = np.einsum("ij,ij->i", x, a) + db
        err = (self.d + 5) * U * (np.linalg.norm(a, axis=1) * self.xmax + db_size) * 1.01
        if self.centred:  # |Σa*| from numpy's sum and γ of the absolute sum; |Σx| correctly rounded, per point
            pts, inv = np.unique(ii, return_inverse=True)
            sx = np.abs(_fsums(xr[pts]))[inv] * (1 + 2 * U)  # NaN where it fails: the pair stays open
            with np.errstate(over="ignore", invalid="ignore"):
                sa = np.abs(a.sum(axis=1)) + (gamma(self.d + 1) + U) * np.abs(a).sum(axis=1) * (1 + 2 * U)
                err = err + sa * sx / self.d * (1 + 4 * U)
        err = err + self.fold_err[tt] + self.fold_err[jj]
        with np.errstate(invalid="ignore"):
            open_ = np.flatnonzero(~(g - err > 0) & ~(g + err < 0) & np.isfinite(g))
        if len(open_):  # the sign still open: the same sum without rounding but the last (_exact_gap)
            g2, e2 = self._exact_gap(xr[ii[open_]], np.asarray(tt)[open_], np.asarray(jj)[open_])
            better = e2 < err[open_]
            g[open_[better]], err[open_[better]] = g2[better], e2[better]
        with np.errstate(invalid="ignore"):
            return g - err, g + err  # NaN: neither side proven

    def _exact_gap(self, x, tt, jj):
        """``(g, err)`` for :meth:`_gap`'s open pairs: each product x_i·r_i split error-free (Dekker), and
        r_t·x − r_j·x + (b̃_t − b̃_j) summed by ``math.fsum`` (correctly rounded): off by at most u|g| and the
        rows' fold errors, where (d + 5)u·‖r_t − r_j‖·‖x‖ charged every rounding of a plain dot product (a
        wedge 6e-12 rad wide in d = 768 left a third of its points open). Pairs whose products the split
        cannot make exact (near overflow or underflow) get err = inf.

        On centred domains the sum is the one at ``P·x`` (:meth:`_gap`): ``a·x − (Σa)(Σx)/d`` with a = r_t −
        r_j, the correction from two correctly rounded sums (within 5u of its value). Without it, rows that
        differ by 0.37 along the all-ones vector and 1e-16 across it were compared by the rounding left in
        x's own centring: a third of a group's cell went to the wrong row (0.0815 against 0.0577)."""
        from unspeakable.engine.loader import _two_product

        rows = self.problem.rows
        rt, rj = np.asarray(rows[tt], dtype=np.float64), np.asarray(rows[jj], dtype=np.float64)
        pt, et, bt = _two_product(x, rt)
        pj, ej, bj = _two_product(x, rj)
        lo = self.bias_lo
        tail = [self.bias64[tt], -self.bias64[jj]] + ([] if lo is None else [lo[tt], -lo[jj]])
        cerr = 0.0
        if self.centred:
            sa = _fsums(np.concatenate([rt, -rj], axis=1))
            sx = _fsums(x)
            with np.errstate(over="ignore", invalid="ignore"):
                c = sa * sx / self.d
            tail.append(-c)
            cerr = 5 * U * np.abs(c)
        terms = np.concatenate([pt, et, -pj, -ej, np.stack(tail, axis=1)], axis=1)
        g = _fsums(terms)
        err = U * np.abs(g) + cerr + self.fold_err[tt] + self.fold_err[jj]
        bad = bt.any(axis=1) | bj.any(axis=1) | ~np.isfinite(terms).all(axis=1) | ~np.isfinite(g)
        return g, np.where(bad, np.inf, err * 1.01)

    def lower(self, L, j):
        """A float64 lower bound of the exact logit of rows j [B] whose low-precision logits are L [B] (float64);
        NaN where a row or its logit is past float32's range (inf − inf): no bound, so no proof from it."""
        with np.errstate(invalid="ignore"):
            return L - (self.size_lp[j].double().numpy() * self.e_lp + self.c_lp * np.abs(L))

    def surely_above(self, L, j, lt, t: int) -> np.ndarray:
        """Where row j [B] (low-precision logit L [B], float64) surely beats t (keys' float64 logit lt [B]) in
        the head as given: both allowances of the keys' rounding included; NaN: no."""
        j = np.asarray(j)
        return self.lower(L, j) - self.key_err[j] > lt + float(self.key_err[t])

    def logits_lp(self, x):
        """Logits of all V rows at points x [B, d] in the checks' low precision (:attr:`keys_lp`), bias included."""
        import torch

        xa = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).to(self.keys_lp.dtype)
        with _gemm_threads(self, xa.numel() * self.keys_lp.shape[0]):
            return xa @ self.keys_lp.T

    def wins(self, x, t: int, exclude):
        """Per point x [B, d] (float32) whether t is the strict argmax against all V rows but ``exclude`` (t
        and its twins), as float64 logits decide; and the low-precision logits [B, V] with ``exclude`` at -inf
        (the caller counts strong competitors on them). A point is lost for sure where the low-precision
        maximum beats t's float64 logit by more than its bound; elsewhere every row that its bound cannot put
        below t's logit is evaluated in float64 (a few rows per point)."""
        import torch

        L = self.logits_lp(x)
        L[:, list(exclude)] = -torch.inf
        x64 = self.on_set(x)
        lt = x64 @ self.keys64[t] + self.bias64[t]
        top, arg = L.max(dim=1)
        lost = self.surely_above(top.double().numpy(), arg.numpy(), lt, t)
        return self._decide(x64, t, L, lt, lost, exclude), L

    def _decide(self, x64, t: int, L, lt, lost, exclude):
        """:meth:`wins`'s verdicts from the low-precision logits L [B, V] (``exclude`` at -inf) of the points x64
        [B, d] (float64), t's keys-logits ``lt`` [B] and the points already ``lost`` [B] for sure. ``exclude``
        is left out by id, not by its -inf: where some row's allowance is infinite every entry is in reach,
        -inf included, and t met itself (a tie with itself: "ambiguous", never won)."""
        import torch

        slack = float(self.key_err[t])  # lt against the head's own logit (key_err), its float64 rounding included
        good = np.zeros(len(x64), dtype=bool)
        rest = np.nonzero(~lost)[0]
        if not len(rest):
            return good
        # the rows that may reach t, in float64 from the rows themselves (the point as the keys see it: projected
        # onto the centred subspace), each within row_err of the head's own logit
        xr = x64[rest]
        if self.centred:
            xr = xr - xr.mean(axis=1, keepdims=True)
        rows = self.problem.rows
        er_t = float(self.row_err[t])
        lt_r = xr @ np.asarray(rows[t], dtype=np.float64) + self.bias64[t]
        best = np.full(len(rest), -np.inf)  # the largest upper bound of a competitor's exact logit
        beats = np.zeros(len(rest), dtype=bool)  # some competitor surely above t
        for ii, jj, l64 in self._near_logits(xr, L[torch.from_numpy(rest)], lt[rest] - slack - self.err_max,
                                             exclude=exclude):
            pts, at = _segments(ii)
            best[pts] = np.maximum.reduceat(l64 + self.row_err[jj], at)
            beats[pts] = np.logical_or.reduceat(l64 - self.row_err[jj] > lt_r[ii] + er_t, at)
            # points the logits leave open: the rows that may reach t, read as differences with t's row
            open_ = np.zeros(len(rest), dtype=bool)
            open_[pts] = ~(best[pts] < lt_r[pts] - er_t) & ~beats[pts]
            sel = np.nonzero(open_[ii] & ~(l64 + self.row_err[jj] < lt_r[ii] - er_t))[0]
            if len(sel):
                lo, hi = self._gap(xr, np.full(len(sel), t), ii[sel], jj[sel])
                p2, at2 = _segments(ii[sel])
                best[p2[np.logical_and.reduceat(lo > 0, at2)]] = -np.inf  # every row that may reach t is below it
                beats[p2] |= np.logical_or.reduceat(hi < 0, at2)
        good[rest] = best < lt_r - er_t
        amb = int((~good[rest] & ~beats).sum())
        if amb:
            self.ambiguous[t] = self.ambiguous.get(t, 0) + amb
        return good

    def wins_staged(self, x, t: int, exclude, cand, skip=(), chunk: int = 128, limit: int = 2048):
        """:meth:`wins` read against the candidate rows ``cand`` first: a point where some candidate's logit
        surely beats t's (its low-precision logit less its bound above t's float64 logit) is lost without
        reading the other rows; only the rest are checked against all V. The verdicts are :meth:`wins`'s (a
        candidate that surely beats t is a row that float64 puts above t there). ``cand`` grows as it goes: the
        strongest row of every point read in full (``skip``, t's restricted set, never: inside its cell those
        rows are below t), up to ``limit`` rows. Returns per point whether t wins and its strongest competitor
        found (among the candidates where they decided, over all rows elsewhere)."""
        import torch

        ex = set(int(j) for j in exclude) | set(int(j) for j in skip)
        cand = [j for j in dict.fromkeys(int(j) for j in cand) if j not in ex][:limit]
        have = set(cand)
        good = np.zeros(len(x), dtype=bool)
        strong = np.zeros(len(x), dtype=np.int64)
        x64 = self.on_set(x)
        lt = x64 @ self.keys64[t] + self.bias64[t]
        for c in range(0, len(x), chunk):
            sl = slice(c, min(c + chunk, len(x)))
            rest = np.arange(sl.start, sl.stop)
            if cand:
                ids = torch.tensor(cand, dtype=torch.long)
                xa = torch.cat([x[sl], torch.ones(sl.stop - sl.start, 1)], dim=1).to(self.keys_lp.dtype)
                top, arg = (xa @ self.keys_lp[ids].T).float().max(dim=1)
                rows = ids[arg].numpy()
                lost = self.surely_above(top.double().numpy(), rows, lt[sl], t)
                strong[sl] = rows
                rest = rest[~lost]
            if not len(rest):
                continue
            g, st = self.wins_blocks(x[torch.from_numpy(rest)], t, exclude)
            good[rest] = g
            strong[rest] = st
            for j in strong[rest].tolist():
                if j not in ex and j not in have and len(cand) < limit:
                    cand.append(j)
                    have.add(j)
        return good, strong

    def wins_blocks(self, x, t: int, exclude, block: int | None = None):
        """:meth:`wins` read against all V in blocks of rows: a point where a block's strongest row surely beats
        t is lost there and reads no further block (the verdict :meth:`wins` gives: that row is above t in the
        head as given); the points no block decides are decided as :meth:`wins` does, from their logits over all
        blocks (their maximum is some block's, which did not decide them either). Returns per point whether t
        wins, and its strongest competitor (in the deciding block for the lost ones, over all V for the rest)."""
        import torch

        B, V = len(x), self.keys_lp.shape[0]
        block = block or ROW_BLOCK
        x64 = self.on_set(x)
        lt = x64 @ self.keys64[t] + self.bias64[t]
        xa = torch.cat([x, torch.ones(B, 1)], dim=1).to(self.keys_lp.dtype)
        ex = np.asarray(sorted(int(j) for j in exclude), dtype=np.int64)
        strong = np.zeros(B, dtype=np.int64)
        alive = np.arange(B)
        parts = []
        for off in range(0, V, block):
            Lb = self.block_logits(xa[torch.from_numpy(alive)], off, block, ex)
            top, arg = Lb.max(dim=1)
            arg = arg.numpy() + off
            lost = self.surely_above(top.double().numpy(), arg, lt[alive], t)
            strong[alive[lost]] = arg[lost]
            parts.append((alive, Lb))
            alive = alive[~lost]
            if not len(alive):
                return np.zeros(B, dtype=bool), strong
        L = torch.cat([Lb[torch.from_numpy(np.searchsorted(al, alive))] for al, Lb in parts], dim=1)
        good = np.zeros(B, dtype=bool)
        good[alive] = self._decide(x64[alive], t, L, lt[alive], np.zeros(len(alive), dtype=bool), ex)
        strong[alive] = L.argmax(dim=1).numpy()
        return good, strong

    def block_logits(self, xa, off: int, block: int, exclude: np.ndarray):
        """The low-precision logits of rows ``off`` to ``off + block`` at points ``xa`` [B, d + 1] (a 1 appended:
        the bias column), the rows of ``exclude`` (sorted ids) at -inf: one block of :meth:`logits_lp`."""
        import torch

        kb = self.keys_lp[off:off + block]
        with _gemm_threads(self, xa.numel() * kb.shape[0]):
            Lb = xa @ kb.T
        e = exclude[(exclude >= off) & (exclude < off + kb.shape[0])] - off
        if len(e):
            Lb[:, torch.from_numpy(e)] = -torch.inf
        return Lb

    def argmax64(self, x, L, lo):
        """Per point x [B, d] the argmax of the float64 logits (the first maximum, like torch), over the rows
        whose low-precision logit ``L`` [B, V] may reach ``lo`` [B] (float64: a value some row surely reaches)."""
        import torch

        xr = self.on_set(x)
        if self.centred:  # the point as the keys see it
            xr = xr - xr.mean(axis=1, keepdims=True)
        B = len(lo)
        top = np.full(B, -np.inf)
        arg = np.full(B, -1, dtype=np.int64)
        amb = np.zeros(B, dtype=bool)
        V = L.shape[1]
        for ii, jj, l64 in self._near_logits(xr, L, lo, every_row_if_none=True):
            # pairs sorted by point, rows ascending within: the largest logit (NaN only where nothing else is),
            # then the lowest id at it
            pts, at = _segments(ii)
            top[pts] = np.fmax.reduceat(l64, at)
            seg = np.repeat(np.arange(len(pts)), np.diff(np.r_[at, len(ii)]))
            first = np.minimum.reduceat(np.where(l64 == top[pts][seg], jj, V), at)
            arg[pts] = np.where(first < V, first, jj[at])
            # another row (not a twin: set_twins) within the rows' allowances of the first maximum, an equal
            # float64 logit included, is settled by the rows' difference; where that cannot, the point is
            # counted for the first maximum and noted as ambiguous
            floor = top[ii] - self.row_err[arg[ii]]
            near = (self.gid[jj] != self.gid[arg[ii]]) & ~(l64 + self.row_err[jj] < floor)
            if near.any():  # rows within the logits' allowances of the first maximum: read as differences
                self._settle_argmax(xr, ii[near], jj[near], arg, amb)
        for t in arg[amb].tolist():
            self.ambiguous[t] = self.ambiguous.get(t, 0) + 1
        return torch.from_numpy(arg)

    def _settle_argmax(self, xr, ii, jj, arg, amb):
        """For points ii whose rows jj (not arg's twins) come within the logits' allowances of their first
        maximum arg: the row surely above all the others by :meth:`_gap`, which becomes arg; where none is
        proven, arg stays (the first maximum) and the point is ``amb`` (ambiguous)."""
        lo, hi = self._gap(xr, arg[ii], ii, jj)
        pts, at = _segments(ii)
        done = np.logical_and.reduceat(lo > 0, at)  # arg surely above every rival
        for k in np.nonzero(~done)[0]:  # rare: a tournament among the point's candidates
            p = pts[k]
            cand = np.r_[arg[p], jj[at[k]:at[k + 1] if k + 1 < len(at) else len(jj)]]
            cur = cand[0]
            for j in cand[1:]:
                if self.gid[j] != self.gid[cur] and self._gap(xr, np.array([j]), np.array([p]), np.array([cur]))[0][0] > 0:
                    cur = j  # j surely above the current leader
            # the leader's twins are no rivals (their logit is its own): the first maximum's were left out of jj,
            # a new leader's were not (a twin pair {2, 3} that beat row 4 at a point lost it to "ambiguous",
            # and the point went to row 4)
            others = cand[self.gid[cand] != self.gid[cur]]
            below = self._gap(xr, np.full(len(others), cur), np.full(len(others), p), others)[0] > 0
            if np.all(below):
                arg[p] = cur
            else:  # the point goes to the first maximum (the caller notes it); the rows it may belong to instead
                amb[p] = True  # are noted here: their counts are as uncertain
                for j in {int(self.gid[j]) for j in others[~below]} - {int(self.gid[arg[p]])}:
                    self.ambiguous[j] = self.ambiguous.get(j, 0) + 1

    def _near_logits(self, xr, L, thr, every_row_if_none: bool = False, exclude=()):
        """The float64 logits ``r_j·x_i + b̃_j`` (xr: the points as the keys see them, float64) of the rows j
        whose low-precision logit ``L`` [B, V] may reach ``thr[i]`` (:meth:`_reach`), as (ii, jj, l64) for
        chunks of points of at most ``PAIR_BUDGET`` (point, row) entries: a head whose rows span a huge range (one
        row 1e30 times the others: its centre makes every key's allowance huge) leaves every row within reach
        of every point, and the pairs of a plain-pass chunk took gigabytes. Where most entries of a chunk
        reach, its logits are one dense GEMM over the rows, read in blocks. The pairs come sorted by point,
        rows ascending within. ``every_row_if_none``: a point no row reaches (only where L is -inf throughout)
        gets every row. The rows ``exclude`` never come."""
        import torch

        B, V = L.shape
        rows = self.problem.rows
        step = max(1, PAIR_BUDGET // max(V, 1))
        ex = np.asarray(list(exclude), dtype=np.int64)
        for c in range(0, B, step):
            ii, jj = self._reach(L[c:c + step], thr[c:c + step])
            if len(ex):
                keep = ~np.isin(jj, ex)
                ii, jj = ii[keep], jj[keep]
            n = min(step, B - c)
            if every_row_if_none:
                lone = np.setdiff1d(np.arange(n), ii)
                if len(lone):
                    ii, jj = np.r_[ii, np.repeat(lone, V)], np.r_[jj, np.tile(np.arange(V), len(lone))]
                    order = np.argsort(ii, kind="stable")  # sorted by point again, rows ascending within
                    ii, jj = ii[order], jj[order]
            if not len(ii):
                continue
            xc = xr[c:c + n]
            if len(ii) >= n * V // 4:
                dense = np.empty((n, V))
                for r0 in range(0, V, ROW_BLOCK):
                    dense[:, r0:r0 + ROW_BLOCK] = xc @ np.asarray(rows[r0:r0 + ROW_BLOCK], dtype=np.float64).T
                yield ii + c, jj, dense[ii, jj] + self.bias64[jj]
            else:
                yield ii + c, jj, self._pair_logits(xc, ii, jj)

    def _pair_logits(self, xr, ii, jj, chunk: int = 2**22):
        """``r_j·x_i + b̃_j`` in float64 for the pairs (ii, jj), about ``chunk`` numbers of rows gathered at a
        time (a [pairs, d] gather of them at once would not fit in memory where many rows reach)."""
        rows = self.problem.rows
        out = np.empty(len(ii))
        step = max(1, chunk // max(self.d, 1))
        for c in range(0, len(ii), step):
            i, j = ii[c:c + step], jj[c:c + step]
            out[c:c + step] = np.einsum("ij,ij->i", xr[i], np.asarray(rows[j], dtype=np.float64)) + self.bias64[j]
        return out

    def _reach(self, L, thr):
        """Pairs (i, j) of the rows j whose exact logit may be at least ``thr[i]`` at point i, from the
        low-precision logits L [B, V]: a row's bound is at most e_lp·max size + c_lp·|L|, so L >= low suffices."""
        import torch

        es = self.e_lp * self.size_max
        low = thr - es - self.c_lp * (np.abs(thr) + es) / (1 - self.c_lp)
        with np.errstate(over="ignore", invalid="ignore"):
            low32 = low.astype(np.float32)
        low32 = np.where(low32 > low, np.nextafter(low32, np.float32(-np.inf)), low32)  # rounded down: no row missed
        # nothing non-finite is evidence: a NaN threshold lets every row reach, a NaN logit (a row past float32's
        # range) lets that row reach; float64 from the rows decides them
        low32 = np.where(np.isnan(low32), np.float32(-np.inf), low32)
        ii, jj = torch.nonzero((L >= torch.from_numpy(low32)[:, None]) | torch.isnan(L), as_tuple=True)
        return ii.numpy(), jj.numpy()

    def on_set(self, x) -> np.ndarray:
        """The float32 points x [B, d] as float64 points of the output set itself: on spheres, projected and
        scaled to radius R in float64 (float32's own normalisation leaves them R(1 ± ~1e-7) from the centre,
        and a cell that misses the sphere by less, or a cap thinner than that, was measured as the float32
        shell around it: hits for a share that is 0, a 1e-15 cap estimated at 1e-9); the cube, clipped to it.
        Every check judges these points; its allowances for the low-precision logits, which were computed at
        x, include the distance (``ETA_SET``·xmax at most: a point further away, which float32 rounding
        cannot make, is judged where it is)."""
        x32 = x.double().numpy()
        if self.box:
            return np.clip(x32, -self.R, self.R)
        z = x32 - x32.mean(axis=1, keepdims=True) if self.centred else x32
        with np.errstate(divide="ignore", invalid="ignore"):
            x64 = z * (self.R / np.linalg.norm(z, axis=1, keepdims=True))
            far = ~(np.linalg.norm(x64 - x32, axis=1) <= ETA_SET * self.R)
        if far.any():
            x64[far] = x32[far]
        return x64

    def points(self, z):
        """Points x (torch float32) of Gaussians z [..., d]."""
        import torch

        if self.box:
            return self.R * torch.erf(z * (1.0 / math.sqrt(2.0)))
        if self.centred:
            z = z - z.mean(-1, keepdim=True)
        return z * (self.R / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ ties
def _fsums(a: np.ndarray) -> np.ndarray:
    """``math.fsum`` of each row of ``a`` [n, k] (correctly rounded), NaN where it has no finite value: fsum
    raises on ``inf − inf`` and on an intermediate past float64's range (rows near 1e308), which is no proof
    of anything here."""
    out = np.empty(len(a))
    for i, r in enumerate(a.tolist()):
        try:
            out[i] = math.fsum(r)
        except (OverflowError, ValueError):
            out[i] = math.nan
    return out


def _tie_groups(problem) -> dict[int, list[int]]:
    """token -> sorted members of its group of twins, for groups of two or more: rows whose logits are equal at
    every point of the domain in the head as given (the same row and bias, -0.0 equal to 0.0; layernorm: rows
    that differ by a multiple of the all-ones vector). The candidates are the scan's
    (:func:`engine.pipeline.find_ties`: fingerprints of the rows and bias, read in chunks; on the centred
    domain also of the keys on a coarse grid), each pair proven exactly by :meth:`Verifier.tie`, as the scan's
    ``tie`` verdicts are. The keys (``P(rows − centre)``, rounded) used to decide this by themselves: where
    one row is huge the centre is too, different rows got equal keys, and a group's cell and cap went to
    tokens that do not share it (a "rigorous" bound above the truth); rows that differ by 0.5·1 had keys
    1 ulp apart and were not grouped."""
    from unspeakable.engine.pipeline import find_ties  # the pipeline imports this module
    from unspeakable.engine.verify import Verifier

    cand = find_ties(problem)
    if not cand:
        return {}
    ver = Verifier(problem)
    parent: dict[int, int] = {}

    def root(a: int) -> int:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    for t in sorted(cand):
        for j in cand[t]:
            rt, rj = root(int(t)), root(int(j))
            if rt != rj and ver.tie(int(t), int(j)):
                parent[max(rt, rj)] = min(rt, rj)
    members: dict[int, list[int]] = {}
    for t in sorted(set(parent) | set(parent.values())):
        members.setdefault(root(t), []).append(t)
    return {t: group for group in members.values() if len(group) > 1 for t in group}


def _segments(ii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pairs sorted by point ``ii`` (non-empty): the points, and where each one's pairs start (``reduceat``)."""
    at = np.r_[0, np.nonzero(ii[1:] != ii[:-1])[0] + 1]
    return ii[at], at


# ------------------------------------------------------------------------------------------------ plain pass
def _plain_pass(meas: _Measure, samples: int, seed: int, chunk: int | None = None):
    """Hit counts of every token over ``samples`` uniform points, and the sum of each token's hit points
    (a direction into its cell, for the cap). Ties go to the lowest id (torch's argmax); the caller splits
    tie groups' counts. ``chunk``: points per GEMM, by default as many as keep its [chunk, V] logits near
    256 MB (256 to 4096, a multiple of 16: the same Gaussian draws as one chunk). 4096 at any V held 805 MB
    of logits on SmolLM2, a quarter of the command's peak, and 4.3 GB at V = 262144; on SmolLM2 1024 points
    per chunk ran as fast as 4096, 512 7% and 256 25% slower."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    V = meas.keys.shape[0]
    chunk = chunk or max(256, min(4096, 2**26 // max(V, 1) // 16 * 16))
    counts = torch.zeros(V, dtype=torch.int64)
    sums = torch.zeros(V, meas.d, dtype=torch.float64)
    done = 0
    while done < samples:
        b = min(chunk, samples - done)
        x = meas.points(torch.randn(b, meas.d, generator=gen))
        L = meas.logits_lp(x)
        top = torch.topk(L, 2, dim=1)
        w = top.indices[:, 0].clone()
        v1, v2 = (top.values[:, k].double().numpy() for k in (0, 1))
        # the winner's exact logit surely reaches lo1 (its keys' logit less both allowances); every other
        # row's stays below hi2
        lo1 = meas.lower(v1, w) - meas.key_err[w.numpy()]
        hi2 = v2 + meas.c_lp * np.abs(v2) + meas.e_lp * meas.size_max + meas.err_max
        near = np.nonzero(~(lo1 > hi2))[0]
        if len(near):  # not decided in low precision: float64 over the rows whose keys' logit may reach lo1
            every = len(near) == b  # (a head whose allowances decide nothing: no copy of L)
            w[near] = meas.argmax64(x if every else x[near], L if every else L[near], lo1[near] - meas.err_max)
        counts += torch.bincount(w, minlength=V)
        sums.index_add_(0, w, torch.from_numpy(meas.on_set(x)))
        done += b
    return counts.numpy(), sums.numpy()


def _clopper_pearson(k: int, n: int, conf: float) -> tuple[float, float]:
    from scipy.stats import beta

    a = 1 - conf
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


# ------------------------------------------------------------------------------------------------ splitting
@dataclass
class SplitOptions:
    particles: int = 48  # N per replicate (64 before: with 48 and every final particle checked, SmolLM2's estimates
    # were as precise at 15% less time: sd against a 32-replicate reference 0.166 / 0.192 decades against 0.172 /
    # 0.175 on two sets of 32 random tokens, 3 seeds each; the check's q, not the chain, set half the variance)
    replicates: int = 8  # R independent runs (16 before the pilot: see RESULTS, issue 19)
    keep: float = 0.5  # p0: the fraction of particles kept at each level
    moves: int = 10  # pCN steps per level (30 before the pilot; 5 mixed too little: on the 2^-40 orthant in
    # d = 64 the estimate's sd was 0.25 decades at 5 moves, 0.13 at 10, 8 x 64 particles)
    competitors: int = 256  # initial size of the restricted set J
    check: int = 48  # final particles per replicate re-scored against all V rows, at each of `final_checks`:
    final_checks: int = 2  # with `moves` pCN moves inside the J-cell between two. On SmolLM2 only 2-25% of the
    # J-cell wins against all V: 2 x 32 checked points after a sweep gave a median CI width of 0.74 decades
    # against 0.93 for 1 x 64, at the same cost (32 random tokens, issue 19)
    track: int = 32  # per checked point, its strongest competitors counted as candidates for J
    pilot_particles: int = 32  # the pilot run that picks J (0: none; J then grows only between rounds)
    pilot_replicates: int = 4
    pilot_moves: int = 10
    deep_levels: int = 24  # tokens whose pilot needs more levels (share below ~2^-24 = 6e-8 against its J) get:
    deep_replicates: int = 16  # ... these replicates and moves: the pre-pilot defaults, which held a factor 2
    deep_moves: int = 30  # at 1e-12 (GPT-2 shape); 8 x 64 x 10 moves was off by 2.1-2.4x on 2 of 3 seeds there
    deep_particles: int = 64  # ... and at least these particles per replicate
    rounds: int = 3  # constraint-generation rounds (grow J with the competitors that beat t at the end)
    rerun_below: float = 0.7  # another round when fewer than this share of the checked final particles win
    all_v: bool = True  # a round after one whose checks found no J-cell point winning goes on with levels
    # against all V (_all_v_levels), at `moves` moves per level. Only then: each level's moves read all V rows (on
    # SmolLM2 a 1e-28 token's 10 extra levels cost 12 min at 16 x 64 particles and 30 moves), and not from the
    # pilot's checks: J grows after them (a quarter of SmolLM2's tokens had < 1 in 48 there, fine after growth)
    max_competitors: int = 1024  # J never grows past this (the most frequent violators first): the cost per move
    max_levels: int = 2000
    floor_log10: float = -200.0  # replicates whose estimate falls below 10**floor stop: "not reached"
    batch: int = 16  # tokens per batched run (two run at once on a two-thread caller: 32 tokens are two)
    core: int = 128  # rows of J read first at each move (the most often binding); the rest only where the core
    # margin passes the level: exact either way, 0 reads all of J (issue 19: 2x fewer multiply-adds on SmolLM2)
    mid: int = 384  # ... then J's rows up to this one, and the rest only where those pass too
    step_min: float = 0.02  # the pCN step's floor, and its adaptation after each level: step × exp(adapt × (acc
    adapt: float = 2.0  # − 0.3)), at most × 0.55 a level; acc the level's acceptance
    precise: bool = False  # the chain in float64 (8 digits more, half float32's GEMM speed). Tokens that no
    # replicate reached are run again so, with steps down to 1e-14 that shrink up to × 0.30 a level (PRECISE):
    # a cell only w wide needs steps of about w, and in d = 2 an arc halves at each level, faster than the
    # steps shrank; a cell thinner than float32 resolves (an arc of 2π·1e-8 in d = 2, a zone 1e-7 of the
    # radius wide in d = 768) was "not reached" (issue 19, ninth round)


PRECISE = {"precise": True, "step_min": 1e-14, "adapt": 4.0}  # SplitOptions of the float64 rerun


def _check_int(what: str, v, least: int, below_pow2: int | None = None) -> int:
    """``v`` as an int, or an InputError naming ``what``: an integer (not a bool), at least ``least`` and below
    ``2**below_pow2`` where given (a seed: torch's and numpy's generators take 63 bits)."""
    if (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < least
            or below_pow2 is not None and v >= 2**below_pow2):
        bound = f" and < 2^{below_pow2}" if below_pow2 is not None else ""
        raise InputError(f"{what} must be an integer >= {least}{bound}; got {v!r}")
    return int(v)


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf


def _gemm_threads(meas: _Measure, macs: int):
    """The caller's threads for a GEMM of at least 2^28 multiply-adds, else stay on one: switching costs more
    than a small GEMM gains."""
    return torch_threads(meas.gemm_threads) if meas.gemm_threads > 1 and macs >= 2**28 else contextlib.nullcontext()


def _logits_at(meas: _Measure, x, ids=None):
    """Logits of all V rows (or ``ids``) at points x [B, d] (float32); the GEMM on ``meas.gemm_threads``."""
    with _gemm_threads(meas, x.numel() * (meas.keys.shape[0] if ids is None else len(ids))):
        if ids is None:
            return x @ meas.keys.T + meas.bias
        return x @ meas.keys[ids].T + meas.bias[ids]


def _competitor_sets(meas: _Measure, ts: list[int], excl: dict[int, list[int]], K: int) -> list[np.ndarray]:
    """J_t: the K strongest competitors at t's own screen point (the self-direction scaled into the domain)."""
    import torch

    kt = meas.keys[ts].double()
    if meas.box:
        x = meas.R * torch.sign(kt)
    else:
        x = meas.R * kt / torch.linalg.vector_norm(kt, dim=1, keepdim=True).clamp_min(1e-30)
    L = _logits_at(meas, x.float())
    out = []
    for i, t in enumerate(ts):
        L[i, excl[t]] = -torch.inf
        k = min(K, int(torch.isfinite(L[i]).sum()))
        out.append(torch.topk(L[i], k).indices.numpy())
    return out


def _fit_float32(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The restricted margin's columns ``(a_j, β_j)`` (a [d, K], b [K], float64), each whose largest entry passes
    2^100 divided by a power of two (exact) so that the chain's float32 holds it: a row 1e39 times the others
    overflowed to inf there, its margins were NaN and no replicate reached any cell. A positive factor per
    column keeps the J-cell (the score's zero level set); only its levels inside change, on such heads alone."""
    with np.errstate(over="ignore", invalid="ignore"):
        big = np.maximum(np.abs(a).max(axis=0, initial=0.0), np.abs(b))
        k = np.where(np.isfinite(big) & (big > 2.0**100), np.ceil(np.log2(np.where(big > 0, big, 1.0))) - 100, 0)
    if not k.any():
        return a, b
    return np.ldexp(a, -k.astype(np.int64)[None, :]), np.ldexp(b, -k.astype(np.int64))


def _whole_subspace(meas: _Measure, a: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis of the domain's subspace [d, n] where the columns of ``a`` (in it) surely span all
    of it, else None. Any basis of span{a_j} serves the chain; where |J| ≥ n, J's differences usually span the
    whole subspace, and a Cholesky factor L of their Gram matrix with no diagonal entry below 1e-4 of the
    largest shows it (a direction the columns miss leaves a zero pivot, which float64 rounds to at most about
    √(n·eps) ≈ 4e-7 of the largest entry of L) at a quarter of the pivoted QR's cost; the basis is then fixed:
    the identity, or one of the centred subspace."""
    if a.shape[1] < meas.n:
        return None
    H = getattr(meas, "_basis", None)
    if H is None:
        d = meas.d
        H = meas._basis = np.linalg.qr(np.eye(d) - 1.0 / d)[0][:, :d - 1] if meas.centred else np.eye(d)
    b = H.T @ a if meas.centred else a
    try:
        dg = np.diag(np.linalg.cholesky(b @ b.T))
    except np.linalg.LinAlgError:
        return None
    return H if dg.min() > 1e-4 * dg.max() else None


class _Batch:
    """The restricted margin ``min_{j∈J_t} (a_tj·x + β_tj)`` (``a = k_t − k_j``) of a batch of tokens, and
    the pCN chain that samples x.

    Spheres: the margin depends on the Gaussian z only through its coordinates ``u = Qᵀz`` in an orthonormal
    basis Q of span{a_j} (K' ≤ |J| numbers) and the squared norm ``r²`` of the rest (in the domain's
    subspace of dimension n): ``a_j·x = R (Qᵀa_j)·u / sqrt(‖u‖² + r²)``. A pCN step ``z' = ρz + sξ`` moves u
    the same way and r exactly as ``r'² = (ρr + sω)² + s²χ²_{n−K'−1}`` (ω ~ N(0, 1)), so the chain runs in
    K' + 1 dimensions; a point is rebuilt at the end with the rest's direction uniform, as it is given
    everything else. The cube keeps z in full (its map ``ρ·erf(z/√2)`` works coordinate by coordinate).
    """

    def __init__(self, meas: _Measure, ts: list[int], J: list[np.ndarray], precise: bool = False):
        import scipy.linalg
        import torch

        self.meas, self.T = meas, len(ts)
        self.dtype = dt = torch.float64 if precise else torch.float32  # the chain's states, margins and points
        self.macs = 0  # multiply-adds of the margins so far (the chain's main cost)
        K = max(len(j) for j in J)
        # shorter sets are padded with repeats of their own first row (a repeat leaves the minimum as it is),
        # so that a head without bias keeps B = 0 everywhere and the margins may skip adding it
        J = [np.concatenate([j, np.repeat(j[:1], K - len(j))]) if 0 < len(j) < K else j for j in J]
        diffs = []
        for t, j in zip(ts, J):
            j = np.asarray(j, dtype=np.int64)
            # differences in float64, then rounded: near-identical rows keep their small difference exactly
            a = meas.diffs(t, j)  # [d, K_t]
            diffs.append(_fit_float32(a, meas.bias_diff(t, j)))
        self.B = torch.full((self.T, K), torch.inf, dtype=dt)
        for i, (_, b) in enumerate(diffs):
            self.B[i, :len(b)] = torch.from_numpy(b).to(dt)
        if meas.box:
            self.A = torch.zeros(self.T, meas.d, K, dtype=dt)
            for i, (a, _) in enumerate(diffs):
                self.A[i, :, :a.shape[1]] = torch.from_numpy(a).to(dt)
            self.dim = meas.d
            return
        self.Q = []
        ranks = []
        for a, _ in diffs:
            # the basis of span{a_j} from unit columns: the rank tests are relative to the largest column, and
            # one row 1e30 times the others would otherwise leave every ordinary direction below them
            an = a / np.maximum(np.linalg.norm(a, axis=0, keepdims=True), 1e-300)
            q = _whole_subspace(meas, an)
            if q is None:
                # pivoted: without pivoting, diag(R) of a wide a (|J| > d) sees only its first d columns, and a
                # direction spanned only by later columns would be dropped from the basis
                q, r, _ = scipy.linalg.qr(an, mode="economic", pivoting=True)
                dg = np.abs(np.diag(r))
                q = q[:, dg > 1e-12 * max(float(dg.max(initial=0.0)), 1e-300)]
            self.Q.append(q)
            ranks.append(q.shape[1])
        self.dim = max(ranks)
        self.A = torch.zeros(self.T, self.dim, K, dtype=dt)
        self.mask = torch.zeros(self.T, self.dim, dtype=dt)
        ident = None if meas.centred else getattr(meas, "_basis", None)
        for i, ((a, _), q) in enumerate(zip(diffs, self.Q)):
            qa = a if q is ident else q.T @ a  # the identity basis: a's own coordinates
            self.A[i, :q.shape[1], :a.shape[1]] = torch.from_numpy(qa).to(dt)
            self.mask[i, :q.shape[1]] = 1.0
        self.zero_bias = bool((self.B == 0).all())
        self.full_rank = bool((self.mask == 1).all())  # no coordinate of u to keep at 0
        self.rest = torch.tensor([meas.n - k for k in ranks], dtype=torch.float64)  # dimension of the rest

    # ---- the chain's state: (u [T', M, dim], r² [T', M] or None)
    def initial(self, M: int, gen, npgen):
        import torch

        u = torch.randn(self.T, M, self.dim, generator=gen, dtype=self.dtype)
        if self.meas.box:
            return u, None
        u *= self.mask[:, None, :]
        r2 = torch.from_numpy(_chi2(npgen, self.rest[:, None].expand(self.T, M).numpy())).to(self.dtype)
        return u, r2

    def propose(self, sel, u, r2, rho, st, gen, npgen):
        """One pCN proposal for every particle; rho, st broadcast against [S, M]."""
        import torch

        # into a buffer kept across moves: a fresh [S, M, D] tensor per move cost a third more than the draw
        buf = getattr(self, "_xi", None)
        if buf is None or buf.numel() < u.numel():
            buf = self._xi = torch.empty(u.numel(), dtype=self.dtype)
        xi = torch.randn(u.shape, generator=gen, out=buf[:u.numel()].view(u.shape))
        if not self.meas.box and not self.full_rank:
            xi *= self.mask[sel][:, None, :]
        # the chain's per-move tensors are [S, M, D]: each pass over them costs about a third of the bmm's
        # time here, so no temporaries (addcmul_ for ρu, a norm instead of u*u)
        u2 = xi.mul_(st[..., None]).addcmul_(u, rho[..., None])
        if r2 is None:
            return u2, None
        w = torch.randn(r2.shape, generator=gen, dtype=self.dtype)
        df = (self.rest[sel] - 1).clamp_min(0)[:, None].expand(r2.shape).numpy()
        chi = torch.from_numpy(_chi2(npgen, df)).to(self.dtype)
        r2n = (rho * r2.sqrt() + st * w) ** 2 + st * st * chi
        return u2, torch.where(self.rest[sel][:, None] > 0, r2n, torch.zeros_like(r2n))

    def _selected(self, sel):
        """(A[sel], B[sel]) without a copy per move: A is |J| × dim per token (2.4 MB on SmolLM2), and its copy
        for the active tokens at every move cost a tenth of the chain. All tokens: A itself; else one copy
        per ``sel`` object (a level's moves share theirs)."""
        if len(sel) == self.T:  # sel is sorted and unique (a nonzero): all tokens in order
            return self.A, self.B
        if getattr(self, "_sel_cache", (None,))[0] is not sel:
            self._sel_cache = (sel, self.A[sel], self.B[sel])
        return self._sel_cache[1], self._sel_cache[2]

    def margins(self, sel, u, r2, with_arg: bool = False):
        """Restricted margins [S, M] of the states of tokens ``sel`` (with ``with_arg``, also the binding row's
        position in J [S, M])."""
        import torch

        A, B = self._selected(sel)
        self.macs += u.numel() * A.shape[2]
        if self.meas.box:
            with _gemm_threads(self.meas, u.numel() * A.shape[2]):
                G = torch.bmm(self.meas.points(u), A)
            G += B[:, None, :]
        else:
            scale = self.meas.R / (torch.linalg.vector_norm(u, dim=-1).square_() + r2).clamp_min(1e-30).sqrt()
            with _gemm_threads(self.meas, u.numel() * A.shape[2]):
                G = torch.bmm(u, A)
            if self.zero_bias:  # scale > 0: the minimum first, then one product per particle
                if with_arg:
                    m, arg = G.min(dim=2)
                    return m.mul_(scale), arg
                return G.amin(dim=2).mul_(scale)
            G.mul_(scale[..., None]).add_(B[:, None, :])
        if with_arg:
            return G.min(dim=2)
        return G.amin(dim=2)

    # ---- the restricted margin in stages (spheres): a small *core* of J first, the rest only where needed
    def set_core(self, sel, C: int, C2: int = 0):
        """Order J, for tokens ``sel``, by how often each row was the minimum (the binding facet) at the points
        evaluated in full so far, and cut it into stages: the ``C`` most binding rows (the *core*), the next
        ones up to ``C2``, the rest; the next :meth:`margins_above` reads them in that order. The order changes
        only the cost: the margins it returns are exact wherever they decide anything."""
        import torch

        K = self.A.shape[2]
        if self.meas.box or C <= 0 or C >= K:
            self.core = None
            return
        if getattr(self, "binding", None) is None:
            self.binding = torch.zeros(self.T, K)
        # ties (no count yet) keep J's own order: its first rows are the strongest at t's direction
        perm = torch.argsort(self.binding[sel], dim=1, descending=True, stable=True)  # [S, K]
        A, B = self._selected(sel)
        cuts = [0, C] + ([C2] if C < C2 < K else []) + [K]
        stages = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            idx = perm[:, a:b]
            stages.append((a, torch.gather(A, 2, idx[:, None, :].expand(-1, A.shape[1], -1)),
                           torch.gather(B, 1, idx)))
        self.core = (sel, perm, stages)
        self.binding[sel] *= 0.5  # older levels count less: the binding facets move as the level rises
        self.tally_next = True  # the binding rows are counted at the level's first move only (an argmin costs)

    def margins_above(self, sel, u, r2, thr):
        """Restricted margins [S, M] of the states of tokens ``sel``, exact wherever the exact value is above
        ``thr`` [S, M]; elsewhere some value at or below ``thr`` (an upper bound of the exact one that is already
        at or below it). The core rows of :meth:`set_core` are evaluated for every state, each further stage of
        J only for the states whose margin over the stages before is still above ``thr`` (on average those a
        pCN move accepts, about a third, read all of J): ``min over J ≤ min over any part of J``, so a state that
        fails on a part fails on J. The later stages run token by token, on exactly the states that need them."""
        import torch

        core = getattr(self, "core", None)
        if core is None or self.meas.box or core[0] is not sel:
            if self.meas.box or thr is not None:  # only the run's first margins (thr None) count binding rows here
                return self.margins(sel, u, r2)
            m, arg = self.margins(sel, u, r2, with_arg=True)
            self._tally(sel, arg, torch.ones_like(m, dtype=torch.bool))
            return m
        _, perm, stages = core
        _, A_c, B_c = stages[0]
        S = u.shape[0]
        sq = torch.linalg.vector_norm(u, dim=-1).square_()
        scale = self.meas.R / (sq + r2).clamp_min(1e-30).sqrt()
        tally = self.tally_next
        self.tally_next = False
        self.macs += u.numel() * A_c.shape[2]
        with _gemm_threads(self.meas, u.numel() * A_c.shape[2]):
            G = torch.bmm(u, A_c)
        if not self.zero_bias:
            G.mul_(scale[..., None]).add_(B_c[:, None, :])
        if tally:  # the binding row's position in the order, for the states that read further
            m, best = G.min(dim=2)
        else:
            m = G.amin(dim=2)
        if self.zero_bias:
            m.mul_(scale)
        need = m > thr
        if len(stages) == 1 or not bool(need.any()):
            return m
        for s in range(S):
            idx = torch.nonzero(need[s]).ravel()
            if not len(idx):
                continue
            us, sc, th, ms = u[s, idx], scale[s, idx], thr[s, idx], m[s, idx]
            if tally:
                pos = best[s, idx]
            for off, A_k, B_k in stages[1:]:
                self.macs += us.numel() * A_k.shape[2]
                G = us @ A_k[s]
                if not self.zero_bias:
                    G.mul_(sc[:, None]).add_(B_k[s])
                if tally:
                    v, a = G.min(dim=1)
                else:
                    v = G.amin(dim=1)
                if self.zero_bias:
                    v.mul_(sc)
                if tally:
                    lower = v < ms
                    pos[lower] = a[lower] + off
                ms = torch.minimum(ms, v)
                m[s, idx] = ms
                ok = ms > th
                if tally:  # a state that fails here stops: its binding row so far is the one that failed it
                    self._tally_rows(sel[s], perm[s, pos[~ok]])
                if not bool(ok.any()):
                    break
                idx, us, sc, th, ms = idx[ok], us[ok], sc[ok], th[ok], ms[ok]
                if tally:
                    pos = pos[ok]
            else:
                if tally:
                    self._tally_rows(sel[s], perm[s, pos])
        return m

    def _tally_rows(self, t, cols):
        import torch

        if len(cols):
            self.binding[t].index_add_(0, cols, torch.ones(len(cols)))

    def _tally(self, sel, arg, valid):
        import torch

        if getattr(self, "binding", None) is None:
            self.binding = torch.zeros(self.T, self.A.shape[2])
        cnt = torch.zeros(len(sel), self.A.shape[2])
        cnt.scatter_add_(1, arg, valid.float())
        self.binding[sel] += cnt

    def points(self, i: int, u, r2, gen):
        """Points x [M, d] (the chain's dtype) of token i's states: the rest's direction drawn uniformly."""
        return self.meas.points(self.gauss(i, u, r2, gen))

    def gauss(self, i: int, u, r2, gen):
        """Gaussians z [M, d] (the chain's dtype, in the domain's subspace) of token i's states: the rest's
        direction drawn uniformly, its squared norm r²."""
        import torch

        if self.meas.box:
            return u
        q = self.Q[i]
        k = q.shape[1]
        z = u[:, :k].double().numpy() @ q.T
        if k == self.meas.n:  # J spans the whole subspace: no rest (r² = 0)
            return torch.from_numpy(z).to(self.dtype)
        w = torch.randn(u.shape[0], self.meas.d, generator=gen, dtype=torch.float64).numpy()
        if self.meas.centred:
            w = w - w.mean(axis=1, keepdims=True)
        w = w - (w @ q) @ q.T
        nw = np.linalg.norm(w, axis=1, keepdims=True)
        z = z + w * (np.sqrt(r2.double().numpy())[:, None] / np.maximum(nw, 1e-300))
        return torch.from_numpy(z).to(self.dtype)


def _chi2(npgen, df: np.ndarray) -> np.ndarray:
    """χ² draws with degrees of freedom ``df`` (0 where df = 0)."""
    df = np.asarray(df, dtype=np.float64)
    out = np.zeros(df.shape)
    pos = df > 0
    out[pos] = npgen.chisquare(df[pos])
    return out


def _split_batch(meas: _Measure, ts: list[int], J: list[np.ndarray], opt: SplitOptions, gen, npgen):
    """Adaptive multilevel splitting for a batch of tokens against their restricted sets.

    Returns the batch, per token and replicate: log p_J (natural log; -inf: not reached), levels, and the
    final states (u [T, R, N, dim], r² [T, R, N] or None) with their restricted margins [T, R, N]."""
    T, R, N = len(ts), opt.replicates, opt.particles
    batch = _Batch(meas, ts, J, precise=opt.precise)
    D = batch.dim
    # Every op but the GEMMs on one thread (the caller, _split_tokens, set it; kernels.torch_threads says why)
    return _run_levels(batch, T, R, N, D, opt, gen, npgen)


def _run_levels(batch, T, R, N, D, opt, gen, npgen):
    import torch

    all_rows = torch.arange(T)
    u, r2 = batch.initial(R * N, gen, npgen)
    batch.core = None
    m = batch.margins_above(all_rows, u, r2, None).view(T, R, N)  # in full (no core yet): counts the binding rows
    u = u.view(T, R, N, D)
    r2 = None if r2 is None else r2.view(T, R, N)
    logp = torch.zeros(T, R, dtype=torch.float64)
    levels = torch.zeros(T, R, dtype=torch.int64)
    active = torch.ones(T, R, dtype=torch.bool)
    step = torch.ones(T, R)  # pCN step sqrt(1 - rho^2); 1 = independent proposals
    n_keep = min(N - 1, max(1, int(round(opt.keep * N))))
    floor = opt.floor_log10 * math.log(10)
    for _ in range(opt.max_levels):
        srt = torch.sort(m, dim=2).values
        tau = srt[:, :, N - n_keep - 1]  # the largest killed value
        finish = active & (tau >= 0)  # the next level would pass 0: end with the fraction above 0
        if finish.any():
            frac = (m > 0).double().mean(dim=2)
            logp = torch.where(finish, logp + torch.log(frac), logp)
            active &= ~finish
        # every particle at one value (no progress possible), or below the floor: not reached
        stalled = active & ((srt[:, :, -1] <= tau) | (logp < floor))
        if stalled.any():
            logp = torch.where(stalled, torch.full_like(logp, -math.inf), logp)
            active &= ~stalled
        if not active.any():
            break
        sel = torch.nonzero(active.any(dim=1)).ravel()
        S = len(sel)
        act = active[sel]  # [S, R]
        ms, us, taus = m[sel], u[sel], tau[sel]
        rs = None if r2 is None else r2[sel]
        alive = ms > taus[..., None]  # [S, R, N]
        n_alive = alive.sum(dim=2)
        logp[sel] = torch.where(act, logp[sel] + torch.log(n_alive.double() / N), logp[sel])
        levels[sel] += act.long()
        # the killed are replaced by clones of survivors drawn uniformly
        w = alive.float().view(-1, N)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        src = torch.multinomial(w, N, replacement=True, generator=gen).view(S, R, N)
        src = torch.where(alive, torch.arange(N).expand_as(src), src)
        us = torch.gather(us, 2, src[..., None].expand(-1, -1, -1, D))
        ms = torch.gather(ms, 2, src)
        if rs is not None:
            rs = torch.gather(rs, 2, src)
        # pCN moves of every particle, rejected when they leave the level set
        acc = torch.zeros(S, R)
        st = step[sel]
        rho = torch.sqrt((1 - st * st).clamp_min(0))
        stN, rhoN = st[..., None].expand(S, R, N).reshape(S, R * N), rho[..., None].expand(S, R, N).reshape(S, R * N)
        batch.set_core(sel, opt.core, opt.mid)
        # a finished replicate accepts nothing: its threshold +inf spares it the whole of J
        thr = torch.where(act, taus, torch.full_like(taus, math.inf))[..., None].expand(S, R, N).reshape(S, R * N)
        for _ in range(opt.moves):
            pu, pr = batch.propose(sel, us.view(S, R * N, D), None if rs is None else rs.view(S, R * N),
                                   rhoN, stN, gen, npgen)
            mp = batch.margins_above(sel, pu, pr, thr).view(S, R, N)
            ok = (mp > taus[..., None]) & act[..., None]
            torch.where(ok[..., None], pu.view(S, R, N, D), us, out=us)  # in place: no 4-D allocation per move
            if rs is not None:
                rs = torch.where(ok, pr.view(S, R, N), rs)
            ms = torch.where(ok, mp, ms)
            acc += ok.float().mean(dim=2)
        acc /= opt.moves
        step[sel] = torch.where(act, (st * torch.exp(opt.adapt * (acc - 0.3))).clamp(opt.step_min, 1.0), st)
        u[sel] = torch.where(act[..., None, None], us, u[sel])
        if rs is not None:
            r2[sel] = torch.where(act[..., None], rs, r2[sel])
        m[sel] = torch.where(act[..., None], ms, m[sel])
    else:
        logp = torch.where(active, torch.full_like(logp, -math.inf), logp)
    batch.step = step  # the last level's pCN step, for the final sweeps
    return batch, logp, levels, u, r2, m


def _final_sweep(batch, u, r2, m, logp, moves: int, core: int, mid: int, gen, npgen):
    """``moves`` pCN moves of every final particle that is inside its J-cell (restricted margin > 0), rejected
    when they leave it; the others stay. The moves leave the uniform law on the J-cell invariant, so a
    check of the moved particles is again unbiased for the token's share (given the replicate's Π) and the
    average of several checks is too, with less of the clones' correlation in it."""
    import torch

    T, R, N, D = u.shape
    sel = torch.arange(T)
    inside = torch.isfinite(logp)[..., None] & (m > 0)
    thr = torch.where(inside, torch.zeros_like(m), torch.full_like(m, math.inf)).view(T, R * N)
    st = batch.step
    rho = torch.sqrt((1 - st * st).clamp_min(0))
    stN, rhoN = st[..., None].expand(T, R, N).reshape(T, R * N), rho[..., None].expand(T, R, N).reshape(T, R * N)
    batch.set_core(sel, core, mid)
    u, m = u.clone(), m.clone()
    r2 = None if r2 is None else r2.clone()
    for _ in range(moves):
        pu, pr = batch.propose(sel, u.view(T, R * N, D), None if r2 is None else r2.view(T, R * N), rhoN, stN,
                               gen, npgen)
        mp = batch.margins_above(sel, pu, pr, thr).view(T, R, N)
        ok = mp > thr.view(T, R, N)
        torch.where(ok[..., None], pu.view(T, R, N, D), u, out=u)
        if r2 is not None:
            r2 = torch.where(ok, pr.view(T, R, N), r2)
        m = torch.where(ok, mp, m)
    return u, r2, m


def _check_final(meas: _Measure, batch, k: int, t: int, u, r2, m, logp, excl, opt: SplitOptions, gen,
                 track: bool = True, seen: dict | None = None, J=()):
    """Token k's final particles (the first ``opt.check`` above 0 in each replicate) re-scored against all V
    rows. Returns (per replicate the fraction that truly wins, nan where the replicate did not reach its cell;
    the winning points; with ``track``, how often each row is among the ``opt.track`` strongest competitors at a
    checked point; points checked; points that win). Without ``track``, and with ``seen`` (how often each row
    was a strong competitor of t so far), the points are read against those rows first
    (:meth:`_Measure.wins_staged`; the verdicts are the same) and ``seen`` counts their strongest rows."""
    import torch

    R = logp.shape[0]
    frac = np.full(R, np.nan)
    pos = [torch.nonzero(m[r] > 0).ravel()[:opt.check] if math.isfinite(float(logp[r])) else torch.zeros(0, dtype=torch.long)
           for r in range(R)]
    sizes = [len(p) for p in pos]
    if not sum(sizes):
        return frac, [], {}, 0, 0
    rr = torch.cat([torch.full((n,), r, dtype=torch.long) for r, n in enumerate(sizes)])
    pp = torch.cat(pos)
    x = batch.points(k, u[rr, pp], None if r2 is None else r2[rr, pp], gen)
    if not track and seen is not None:
        cand = sorted(seen, key=lambda j: (-seen[j], j))
        good, strong = meas.wins_staged(x, t, excl[t], cand, skip=J)
        for j in strong.tolist():
            seen[j] = seen.get(j, 0) + 1
        L = None
    else:
        good, L = meas.wins(x, t, excl[t])
    start = 0
    for r, n in enumerate(sizes):
        if n:
            frac[r] = float(good[start:start + n].mean())
        start += n
    top = torch.topk(L, min(opt.track, L.shape[1]), dim=1).indices.ravel().tolist() if track else []
    counts: dict[int, int] = {}
    for j in top:
        counts[j] = counts.get(j, 0) + 1
    if seen is not None:
        for j, n in counts.items():
            seen[j] = seen.get(j, 0) + n
    return frac, [x[torch.from_numpy(good)]], counts, len(good), int(good.sum())


def _all_v_levels(meas: _Measure, batch, k: int, t: int, J: np.ndarray, u, r2, m, logp, excl, opt: SplitOptions,
                  moves: int, gen):
    """Splitting continued inside token k's J-cell, against all V rows: where few of the J-cell's points win
    (the rows outside J cut the cell where its mass lies), the final check's fraction is 0 in most replicates
    and the estimate has nothing to stand on. Each replicate's particles inside the J-cell (uniform there)
    are cloned back to N and the levels go on, on the score

        s(x) = l_t(x) − max_{j ∉ twins} L_j(x) + δ   where the restricted margin is > 0, −inf elsewhere,

    L the checks' low-precision logits (:meth:`_Measure.logits_lp`), l_t float64 and δ the largest error of
    any L_j: s is a deterministic function of x, so its level sets are nested, and every point where t wins
    in exact arithmetic has s > 0. The last level's fraction is that of the points that win as
    :meth:`_Measure.wins` decides. The chain runs on the full Gaussian z (pCN, the uniform law on the output
    set, restricted to each level set by rejection). A proposal is read against J and the rows most often
    strongest so far first, and against all V only where those leave it above the level (most refusals
    cost |J| + 1024 rows instead of V).

    Returns per replicate (log of the J-cell's winning fraction, natural; nan where the replicate did not
    reach its J-cell; -inf where no point won), the levels it took, and the winning points."""
    import torch

    R, N = logp.shape[0], opt.particles
    out, lev, wins = np.full(R, np.nan), np.zeros(R, dtype=np.int64), []
    reps = [r for r in range(R) if math.isfinite(float(logp[r])) and bool((m[r] > 0).any())]
    if not reps:
        return out, lev, wins
    kt64, bt64 = meas.keys64[t], float(meas.bias64[t])
    a1, b1 = _fit_float32(meas.diffs(t, J), meas.bias_diff(t, J))  # the J-cell, as the chain (_Batch) has it
    a1, b1 = torch.from_numpy(a1.astype(np.float32)), torch.from_numpy(b1.astype(np.float32))
    ex_np = np.asarray(sorted(int(j) for j in excl[t]), dtype=np.int64)
    es = meas.e_lp * meas.size_max

    # δ: the largest |L_j − l_j| any row can have, e_lp·size_j + c_lp·|L_j| with |L_j| ≤ size_j(1 + e_lp)/(1 − c_lp)
    # plus the float64 logits' own distance to the head's (key_err: t's and the largest competitor's)
    delta = (es + meas.c_lp * meas.size_max * (1 + meas.e_lp) / (1 - meas.c_lp)) * 1.001 \
        + float(meas.key_err[t]) + meas.err_max
    hits = torch.zeros(meas.keys_lp.shape[0])  # how often each row was the strongest competitor, in full

    def candidates():
        """J and the rows most often strongest so far (up to 1024 more), t and its twins left out: the rows a
        proposal is read against first."""
        ids = torch.unique(torch.cat([torch.from_numpy(np.asarray(J, dtype=np.int64)),
                                      torch.topk(hits, min(1024, int((hits > 0).sum()))).indices]))
        ids = ids[~torch.isin(ids, torch.from_numpy(ex_np))]
        return ids, meas.keys_lp[ids]

    cset = [None]  # (ids, their rows), chosen again at each level; the first scores (thr None) read all V

    def score(z, thr=None):
        """s at z [M, d]; with ``thr`` [M], exact wherever s > thr and some value ≤ thr elsewhere: the candidate
        rows first (their maximum is at most all rows', so s over them is at least s), all V rows only where
        that passes ``thr``."""
        x = meas.points(z)
        gate = ((x @ a1 + b1).amin(dim=1) > 0).numpy()  # the J-cell, as the chain of the first levels saw it
        lt = meas.on_set(x) @ kt64 + bt64
        s = np.full(len(x), -np.inf)
        need = gate.copy()
        if thr is not None and need.any():
            ids, kc = cset[0]
            xa = torch.cat([x, torch.ones(len(x), 1)], dim=1).to(kc.dtype)
            top_c = (xa @ kc.T).float().amax(dim=1).double().numpy()
            # the two GEMMs round a row's logit differently, each within delta of the exact one: s over all
            # rows is at most s_c + 2 delta, so a proposal is refused on the candidates only below that
            s_c = lt - top_c + delta
            s = np.where(gate, s_c, -np.inf)
            need &= s_c + 2 * delta > thr
        idx = np.flatnonzero(need)
        V = meas.keys_lp.shape[0]
        for c in range(0, len(idx), 256):  # 256 points at a time, against blocks of ROW_BLOCK rows
            ic = idx[c:c + 256]
            xc = torch.cat([x[torch.from_numpy(ic)], torch.ones(len(ic), 1)], dim=1).to(meas.keys_lp.dtype)
            top = torch.full((len(ic),), -math.inf)
            arg = torch.zeros(len(ic), dtype=torch.long)
            live = torch.arange(len(ic))
            for off in range(0, V, ROW_BLOCK):
                tb, ab = meas.block_logits(xc[live], off, ROW_BLOCK, ex_np).float().max(dim=1)
                arg[live] = torch.where(tb > top[live], ab + off, arg[live])
                top[live] = torch.maximum(top[live], tb)  # NaN stays NaN: s is then -inf
                if thr is not None:  # s over the rows read so far is at least s: at or below thr, refused
                    live = live[torch.from_numpy(~(lt[ic][live.numpy()] - top[live].double().numpy() + delta
                                                   <= thr[ic][live.numpy()]))]
                    if not len(live):
                        break
            hits.index_add_(0, arg, torch.ones(len(arg)))
            s[ic] = lt[ic] - top.double().numpy() + delta
        s[np.isnan(s)] = -np.inf  # a non-finite logit is no evidence of anything: below every level
        return torch.from_numpy(s), x

    n_keep = min(N - 1, max(1, int(round(opt.keep * N))))
    floor = opt.floor_log10 * math.log(10)
    # the replicates side by side (one GEMM for all their particles), each with its own level, step and count
    zs = []
    for r in reps:
        inside = torch.nonzero(m[r] > 0).ravel()
        z0 = batch.gauss(k, u[r, inside], None if r2 is None else r2[r, inside], gen).float()  # its chain: float32
        zs.append(z0[torch.randint(0, len(inside), (N,), generator=gen)])  # the J-cell's survivors, cloned
    P = len(reps)
    z = torch.stack(zs)  # [P, N, d]
    s, x = score(z.view(P * N, -1))
    s, x = s.view(P, N), x.view(P, N, -1)
    tau = torch.full((P,), -math.inf, dtype=torch.float64)
    logq = np.zeros(P)
    step = batch.step[k, reps].double()
    levels = np.zeros(P, dtype=np.int64)
    act = np.ones(P, dtype=bool)
    while act.any():
        cset[0] = candidates()
        a = torch.from_numpy(np.flatnonzero(act))
        za, sa, xa, ta, st = z[a], s[a], x[a], tau[a], step[a]
        # pCN moves of every particle, rejected where they leave {s > tau} (the J-cell included)
        rho = torch.sqrt((1 - st * st).clamp_min(0)).float()[:, None, None]
        acc = torch.zeros(len(a), dtype=torch.float64)
        for _ in range(moves):
            zp = torch.randn(za.shape, generator=gen).mul_(st.float()[:, None, None]).add_(za * rho)
            sp, xp = score(zp.view(-1, za.shape[2]), ta[:, None].expand(sa.shape).reshape(-1).numpy())
            sp, xp = sp.view(sa.shape), xp.view(xa.shape)
            ok = sp > ta[:, None]
            za, xa = torch.where(ok[..., None], zp, za), torch.where(ok[..., None], xp, xa)
            sa = torch.where(ok, sp, sa)
            acc += ok.double().mean(dim=1) / moves
        step[a] = (st * torch.exp(opt.adapt * (acc - 0.3))).clamp(opt.step_min, 1.0)
        srt = torch.sort(sa, dim=1).values
        nxt = srt[:, N - n_keep - 1]
        for q, r in enumerate(a.tolist()):
            if nxt[q] >= 0 or levels[r] >= opt.max_levels:  # the next level would pass 0: the exact check ends it
                act[r] = False
                cand = torch.nonzero(sa[q] > 0).ravel()
                n_good = 0
                if len(cand) and levels[r] < opt.max_levels:
                    good, _ = meas.wins(xa[q, cand], t, excl[t])
                    wins.append(xa[q, cand][torch.from_numpy(good)])
                    n_good = int(good.sum())
                logq[r] = logq[r] + math.log(n_good / N) if n_good else -math.inf
            elif not srt[q, -1] > nxt[q] or logp[reps[r]] + logq[r] < floor:  # no progress possible: not reached
                act[r] = False
                logq[r] = -math.inf
            else:  # the next level: the particles at or below it replaced by clones of those above
                alive = sa[q] > nxt[q]
                logq[r] += math.log(int(alive.sum()) / N)
                levels[r] += 1
                src = torch.nonzero(alive).ravel()
                pick = torch.where(alive, torch.arange(N), src[torch.randint(0, len(src), (N,), generator=gen)])
                za[q], sa[q], xa[q] = za[q, pick], sa[q, pick], xa[q, pick]
                tau[r] = nxt[q]
        z[a], s[a], x[a] = za, sa, xa
    out[reps] = logq
    lev[reps] = levels
    return out, lev, wins


def _grow(J: np.ndarray, counts: dict, exclude, limit: int) -> np.ndarray:
    """J grown by the most frequent strong competitors (``counts``) not yet in it, up to ``limit`` rows; never t
    or its twins (``exclude``: their logit is −inf in the check, so they appear only when V is tiny)."""
    for j in set(J.tolist()) | set(exclude):
        counts.pop(j, None)
    room = max(0, limit - len(J))
    add = sorted(counts, key=lambda j: (-counts[j], j))[:room]
    return np.concatenate([J, np.array(sorted(add), dtype=np.int64)]) if add else J


def _split_tokens(meas: _Measure, ts: list[int], excl: dict[int, list[int]], opt: SplitOptions, gen):
    """Splitting with constraint generation and the final all-V correction, for a batch of tokens.

    J starts as the ``competitors`` strongest rows at t's own direction. A cheap *pilot* run (its estimate
    is discarded) ends in that J-cell; the competitors strongest at its final points — those that cut the
    J-cell where its mass lies, which t's own direction does not see — fill J up to ``max_competitors``.
    The main run against that J gives the estimate; further rounds (while J has room and fewer than
    ``rerun_below`` of the checked final particles win) grow J the same way and start again. Each run is
    independent of the J it is given, so every replicate stays unbiased for the share of the head as given.

    Returns per token: (replicate estimates p̂_r [R] (linear, may be 0), levels, centre direction or None,
    particles per replicate, J)."""
    with torch_threads(1):
        return _split_tokens_1(meas, ts, excl, opt, gen)


def _split_tokens_1(meas: _Measure, ts: list[int], excl: dict[int, list[int]], opt: SplitOptions, gen):
    import torch

    J = _competitor_sets(meas, ts, excl, opt.competitors)
    npgen = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    deep = [False] * len(ts)
    # levels against all V after the J-cell's, decided before a round from the round before (independent of
    # it), so that the choice does not depend on the estimate it changes
    all_v = [False] * len(ts)
    # per token, how often each row was a strong competitor at a checked point: the rows the next checks read
    # first (the rows that cut a J-cell where its mass lies stay much the same from one check to the next)
    seen: list[dict] = [{} for _ in ts]
    if opt.pilot_particles:
        pil = replace(opt, particles=opt.pilot_particles, replicates=opt.pilot_replicates, moves=opt.pilot_moves)
        batch, logp, levels, u, r2, m = _split_batch(meas, ts, J, pil, gen, npgen)
        # J grows only where it may, where it left rows out (on small heads it holds every competitor), and
        # where the pilot's final particles mostly lose against all V
        grow = opt.max_competitors > opt.competitors
        for k, t in enumerate(ts):
            deep[k] = int(levels[k].max()) > opt.deep_levels
            if grow and len(J[k]) >= opt.competitors:
                _, _, counts, n_checked, n_good = _check_final(
                    meas, batch, k, t, u[k], None if r2 is None else r2[k], m[k], logp[k], excl, pil, gen,
                    seen=seen[k])
                if _DEBUG:
                    print(f"  token {t} pilot: q {n_good}/{n_checked} |J| {len(J[k])} levels {int(levels[k].max())}")
                if n_good < opt.rerun_below * n_checked:  # else J already bounds the cell: a larger one costs
                    J[k] = _grow(J[k], counts, excl[t], opt.max_competitors)
    # deep tokens (the pilot needed more than deep_levels levels): more replicates and moves, chosen before
    # the main run and independently of it, so its replicates stay independent and unbiased
    opt_deep = replace(opt, replicates=max(opt.replicates, opt.deep_replicates), moves=max(opt.moves, opt.deep_moves),
                       particles=max(opt.particles, opt.deep_particles))
    todo = list(range(len(ts)))
    res: dict[int, tuple] = {}
    for rnd in range(opt.rounds):
        again = []
        for is_deep in (False, True):
            group = [i for i in todo if deep[i] == is_deep]
            if not group:
                continue
            o = opt_deep if is_deep else opt
            batch, logp, levels, u, r2, m = _split_batch(meas, [ts[i] for i in group], [J[i] for i in group], o,
                                                         gen, npgen)
            for k, i in enumerate(group):
                if all_v[i]:
                    t = ts[i]
                    lq, lv, inside = _all_v_levels(meas, batch, k, t, J[i], u[k], None if r2 is None else r2[k], m[k],
                                                   logp[k], excl, o, opt.moves, gen)
                    est = np.where(np.isnan(lq), 0.0, np.exp(logp[k].numpy() + np.nan_to_num(lq, nan=-np.inf)))
                    n_in = sum(len(x) for x in inside)
                    centre = torch.cat(inside).double().sum(0).numpy() if n_in else None
                    if _DEBUG:
                        print(f"  token {t} round {rnd}, against all V: levels {levels[k].tolist()} + {lv.tolist()} "
                              f"est {np.log10(np.maximum(est, 1e-320)).round(2).tolist()} |J| {len(J[i])}")
                    res[i] = (est, int((levels[k].numpy() + lv).max()), centre, o.particles)
            checks = [[] for _ in group]
            for c in range(max(1, o.final_checks)):
                if c:  # decorrelate the final particles inside their J-cells, then check them again
                    u, r2, m = _final_sweep(batch, u, r2, m, logp, o.moves, o.core, o.mid, gen, npgen)
                for k, i in enumerate(group):
                    if all_v[i]:
                        checks[k].append((None, [], {}, 0, 0))
                        continue
                    checks[k].append(_check_final(
                        meas, batch, k, ts[i], u[k], None if r2 is None else r2[k], m[k], logp[k], excl, o, gen,
                        track=rnd + 1 < opt.rounds and len(J[i]) < opt.max_competitors,  # else counts go unused
                        seen=seen[i], J=J[i]))
            for k, i in enumerate(group):
                if all_v[i]:  # its estimate is final
                    continue
                t = ts[i]
                frac = np.mean([ch[0] for ch in checks[k]], axis=0)  # nan (not reached) in every check alike
                inside = [x for ch in checks[k] for x in ch[1]]
                counts: dict[int, int] = {}
                for ch in checks[k]:
                    for j, n in ch[2].items():
                        counts[j] = counts.get(j, 0) + n
                n_checked, n_good = sum(ch[3] for ch in checks[k]), sum(ch[4] for ch in checks[k])
                est = np.where(np.isnan(frac), 0.0, np.exp(logp[k].numpy()) * np.nan_to_num(frac))
                centre = torch.cat(inside).double().sum(0).numpy() if inside and sum(len(x) for x in inside) else None
                if _DEBUG:
                    print(f"  token {t} round {rnd}: levels {levels[k].tolist()} est "
                          f"{np.log10(np.maximum(est, 1e-320)).round(2).tolist()} |J| {len(J[i])} q {n_good}/{n_checked}")
                res[i] = (est, int(levels[k].max()), centre, o.particles)
                if _coarse(batch, k, m[k], logp[k]):
                    meas.coarse.add(t)
                if rnd + 1 < opt.rounds and n_good < opt.rerun_below * n_checked:
                    grown = _grow(J[i], counts, excl[t], opt.max_competitors)
                    all_v[i] = opt.all_v and n_checked > 0 and n_good == 0
                    if len(grown) > len(J[i]) or all_v[i]:
                        J[i] = grown
                        again.append(i)
        todo = again
        if not todo:
            break
    return [res[i] + (J[i],) for i in range(len(ts))]


def _coarse(batch, k: int, m, logp) -> bool:
    """Whether token k's float32 chain ended finer than float32 resolves: the median restricted margin of its
    final particles inside the J-cell is below 2^-20 (16 of float32's rounding units) of the margin's size
    R·max‖a_j‖ + max|β_j|. Its cell is then thin (a zone 1e-7 of the radius wide gives 1e-8: the float32
    chain's cell is its own rounding, and estimates came out as low as 1e-4 of the truth) and the token is
    run again in float64. On SmolLM2 the ratio was at least 1.5e-3 (32 tokens)."""
    import torch

    if batch.dtype != torch.float32:
        return False
    inside = torch.isfinite(logp)[..., None] & (m > 0)
    if not bool(inside.any()):
        return False
    A, B = batch.A[k], batch.B[k]
    fin = torch.isfinite(B)
    if not bool(fin.any()):
        return False
    size = batch.meas.R * float(torch.linalg.vector_norm(A[:, fin], dim=0).max()) + float(B[fin].abs().max())
    return float(m[inside].median()) < 2.0**-20 * size


def _cox_interval(est: np.ndarray, conf: float, var_floor: float = 0.0) -> tuple[float, float, float]:
    """(log10 mean, lo, hi) from independent unbiased replicate estimates: Cox's interval for the mean of
    a log-normal on their logs; with zeros among them, a t interval on the raw values, whose lower end, where
    it reaches 0, is replaced by :func:`_nonnegative_lower` at the same one-sided level.

    ``var_floor``: a lower limit for the variance of one replicate's log estimate — that of splitting with
    perfectly mixed particles, ``(levels + 1)/N``. The truth is never below it, and with few replicates
    the sample variance can be (heavy right tails hide in small samples), so the larger one is used."""
    from scipy.stats import t as student

    R = len(est)
    mean = float(np.mean(est))
    q = float(student.isf((1 - conf) / 2, R - 1))  # (ppf(0.5 + conf/2) was inf where 0.5 + conf/2 rounds to 1)
    if mean <= 0:
        return -math.inf, -math.inf, -math.inf
    if np.all(est > 0):
        y = np.log(est)
        s2 = max(float(np.var(y, ddof=1)), var_floor)
        centre = float(np.mean(y)) + s2 / 2
        half = q * math.sqrt(s2 / R + s2 * s2 / (2 * (R - 1)))
        ln10 = math.log(10)
        lo, hi = (centre - half) / ln10, (centre + half) / ln10
    else:
        se = float(np.std(est, ddof=1)) / math.sqrt(R)
        lo = mean - q * se
        if not lo > 0:  # the normal approximation reaches 0: the distribution-free end below instead of none
            lo = _nonnegative_lower(est, (1 - conf) / 2)
        lo, hi = (math.log10(lo) if lo > 0 else -math.inf), math.log10(mean + q * se)
    # the estimate (the replicates' mean: unbiased) inside its interval (Cox's is centred on mean(log) + s²/2,
    # which at a low confidence could leave it outside), and no share above 1
    m = math.log10(mean)
    return m, min(lo, m), min(max(hi, m), 0.0)


def _nonnegative_lower(est: np.ndarray, alpha: float) -> float:
    """A lower confidence bound, at level 1 − ``alpha``, for the mean μ of independent nonnegative estimates
    that are each unbiased for μ — nothing else assumed (the replicates of splitting, zeros included).

    By Markov's inequality each estimate is at least μ/a with probability at most a, independently, so the
    k-th largest of the R estimates is at least μ/a with probability at most P(Bin(R, a) ≥ k). With a_k the
    a at which that is alpha/R, ``max_k a_k X_(k)`` is below μ except with probability at most alpha (a
    union over k). Conservative (Markov is far from tight), and 0 when every estimate is 0."""
    from scipy.stats import beta

    x = np.sort(np.asarray(est, dtype=np.float64))[::-1]
    R = len(x)
    a = beta.ppf(alpha / R, np.arange(1, R + 1), R - np.arange(1, R + 1) + 1)  # P(Bin(R, a) >= k) = alpha / R
    return float(np.max(a * x))


# ------------------------------------------------------------------------------------------------ the cap
def _binding(meas: _Measure, t: int, c: np.ndarray, exclude, k: int) -> np.ndarray:
    """The k competitors whose half-spaces come closest to the direction c (smallest angular slack
    ``α_j − angle(c, â_j)``), from all V rows in float32: the ones the centre search must respect."""
    c = np.asarray(c, dtype=np.float64)
    if meas.centred:
        c = c - c.mean()
    c = c / max(np.linalg.norm(c), 1e-300)
    with torch_threads(1):  # GEMVs and O(V) ops: one thread (kernels.torch_threads)
        return _binding_1(meas, t, c, exclude, k)


def _binding_1(meas: _Measure, t: int, c: np.ndarray, exclude, k: int) -> np.ndarray:
    import torch

    # ‖k_t − k_j‖ and (k_t − k_j)·c from two GEMVs instead of a [V, d] difference (a heuristic: no allowance)
    kt = meas.keys[t]
    sq = getattr(meas, "_sq_norms", None)
    if sq is None:
        sq = meas._sq_norms = (meas.keys.double() ** 2).sum(1)
    na = (sq[t] + sq - 2 * (meas.keys @ kt).double()).clamp_min(0).sqrt().clamp_min(1e-300)
    kc = meas.keys @ torch.from_numpy(c).float()
    p = (kc[t] - kc).double()
    beta = (meas.bias[t] - meas.bias).double()
    slack = torch.arccos((-beta / (meas.R * na)).clamp(-1, 1)) - torch.arccos((p / na).clamp(-1, 1))
    # a row float32 cannot hold (NaN slack) is no evidence of a far half-space: it comes first (a row 1e39 times
    # the others was left out, and the centre went into its half of the sphere: no cap)
    slack = torch.where(torch.isnan(slack), -torch.inf, slack)
    slack[list(exclude)] = torch.inf
    return torch.topk(slack, min(k, int((slack < torch.inf).sum())), largest=False).indices.numpy()


def _cap_centre(meas: _Measure, t: int, comps: np.ndarray, c0: np.ndarray | None, iters: int = 400,
                own: bool = True) -> np.ndarray:
    """A centre c for t's cap: ascent of a smoothed ``min_j (α_j − angle(c, â_j))`` on the unit sphere over
    the competitors ``comps`` (their half-spaces ``â_j·x ≥ cos α_j``), from c0 (else t's own direction),
    with a step that grows on success and halves on failure. Only a heuristic: :func:`verify_cap` checks
    the result against all V rows."""
    rows = meas.problem.rows
    A = rows[t][None, :] - rows[comps]
    beta = meas.bias64[t] - meas.bias64[comps]
    if meas.centred:
        A = A - A.mean(axis=1, keepdims=True)
    na = np.linalg.norm(A, axis=1)
    ok = na > 0
    A, beta, na = A[ok], beta[ok], na[ok]
    if not len(A):
        return meas.keys64[t]
    Ah = A / na[:, None]
    alpha = np.arccos(np.clip(-beta / (meas.R * na), -1.0, 1.0))

    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        if meas.centred:
            v = v - v.mean()
        n = np.linalg.norm(v)
        return v / n if n > 0 else None

    def score(c, temp, with_grad: bool = True, cosv=None):
        # one exp for the weights and the soft minimum, and no gradient for the line search's trials (the
        # same values as computing each apart: the cap centre's cost halves, its result does not change);
        # ``cosv``: Ah @ c where the accepted trial computed it already (the same values again, a GEMV less)
        if cosv is None:
            cosv = np.clip(Ah @ c, -1.0, 1.0)
        g = alpha - np.arccos(cosv)
        lo = g.min()
        e = np.exp(-(g - lo) / temp)
        tot = e.sum()
        soft = lo - temp * math.log(float(tot))
        if not with_grad:
            return lo, soft, cosv
        grad = ((e / tot) / np.sqrt(np.maximum(1 - cosv * cosv, 1e-300))) @ Ah
        return lo, soft, grad

    starts = [c for c in (unit(c0) if c0 is not None else None, unit(meas.keys64[t]) if own or c0 is None else None)
              if c is not None]
    best, best_c = -math.inf, starts[0] if starts else None
    for c in starts:
        eta = 0.05
        cosv = None
        for i in range(iters):
            temp = 0.05 * (0.01 ** (i / iters))
            lo, soft, grad = score(c, temp, True, cosv)
            if lo > best:
                best, best_c = lo, c
            gt = grad - (grad @ c) * c
            ng = np.linalg.norm(gt)
            if not ng > 0:
                break
            for _ in range(30):
                cn = unit(c + eta * gt / ng)
                trial = score(cn, temp, False) if cn is not None else None
                if trial is not None and trial[1] > soft:
                    c, eta, cosv = cn, min(eta * 1.5, 1.0), trial[2]
                    break
                eta *= 0.5
            else:
                break
        lo = score(c, 1e-3, False)[0]
        if lo > best:
            best, best_c = lo, c
    return best_c


def _cap_unit(c: np.ndarray, centred: bool) -> np.ndarray | None:
    """The centre direction verify_cap checks: c in the subspace, scaled to norm 1 (None where c is 0 there)."""
    c = np.array(c, dtype=np.float64)
    if centred:
        c = c - c.mean()
    nc = np.linalg.norm(c)
    return c / nc if nc > 0 else None


def verify_cap(rows: np.ndarray, bias: np.ndarray, t: int, c: np.ndarray, R: float, centred: bool,
               exclude=(), bias_err: np.ndarray | None = None, rows_err: bool = True, row_stats=None,
               gram: np.ndarray | None = None) -> float:
    """The largest θ (radians, rounded down) for which the cap ``{x : ‖x‖ = R, angle(x, c) ≤ θ}`` (in the
    centred subspace when ``centred``) lies inside ``{x : l_t(x) > l_j(x)}`` for every j ≠ t outside
    ``exclude``; 0 when none is proven. Independent of how c was found; float64 with rounding allowances.

    For competitor j let ``a = P(ũ_t − ũ_j)``, ``β = b̃_t − b̃_j``, ``p = a·c``, ``q = ‖a − p c‖`` (c unit in
    the subspace). On the cap, x = R(cos φ c + sin φ v) with v ⊥ c unit and φ ≤ θ, and
    ``min a·x = R·min_{φ≤θ}(p cos φ − q sin φ)``, which is ``R(p cos θ − q sin θ)`` while
    ``p sin θ + q cos θ ≥ 0`` and ``−R‖a‖`` beyond. So θ_j solves ``R(p cos θ − q sin θ) + β = 0``:
    ``θ_j = arccos(−β / (R‖a‖)) − atan2(q, p)``. The claimed θ = min_j θ_j shrunk by a relative 1e-9; it is
    then *checked* at that θ for every j, with p, q and ‖a‖ known to lie in intervals that include every
    rounding: the fold's of the rows (``rows_err``: False when ``γ ⊙ u`` was exact) and of the bias
    (``bias_err``), the float64 dot products (γ_n terms), cos and sin. A failed check retries with θ shrunk
    by 1e-6 … 0.5.

    Two passes, because the exact one costs about ten passes over V × d per token (0.3 s on SmolLM2): first
    every row from its Gram terms — two dot products per row (``rows @ [c, ũ_t]``) and the rows' squared
    norms and sums (``row_stats``, :func:`_row_stats`, shared by all tokens) — with Cauchy–Schwarz
    allowances (p to about 1e-13 ‖ũ‖; q from ``q² = ‖a‖² − p²``, loose where q ≪ ‖a‖); then the rows that
    may set θ (their θ_j over their intervals reaches below the least upper end of any row's) and every row
    whose Gram intervals fail the check are recomputed entry by entry from ``ũ_t − ũ_j`` (tight allowances),
    and θ is lowered where such a row's θ_j is smaller.

    ``gram``: ``rows @ [c', ũ_t]`` [V, 2] where the caller computed it already (c' = ``_cap_unit(c, centred)``;
    several tokens' in one pass over the rows): any float64 summation order, the allowances cover every one.
    """
    if not isinstance(rows, FoldedRows):  # rows derived on demand are read 4096 at a time, never whole
        rows = np.asarray(rows, dtype=np.float64)
    V, d = rows.shape
    c = _cap_unit(c, centred)
    if c is None:
        return 0.0
    mask = np.ones(V, dtype=bool)
    mask[t] = False
    mask[list(exclude)] = False
    idx = np.nonzero(mask)[0]
    if not len(idx):
        return math.pi * (1 - 1e-9)
    g = gamma(d + 8)
    # the cap's centre is c* = Pc/‖Pc‖ (exactly unit, exactly in the subspace); cerr bounds ‖c* − c‖: c's norm
    # differs from 1 by at most g(1 + 2dU), and its component off the subspace is |mean(c)|√d
    cerr = g * (1 + 2 * d * U)
    if centred:
        cerr += 2 * math.sqrt(d) * (abs(float(c.mean())) + g * float(np.abs(c).mean())) * (1 + g)
    berr = np.zeros(V) if bias_err is None else np.asarray(bias_err, dtype=np.float64)
    beta = bias[t] - bias[idx]
    berr_j = U * np.abs(beta) + berr[t] + berr[idx]
    if row_stats is None:
        row_stats = _row_stats(rows)
    # intervals (p_lo, p_hi, q_lo, q_hi, na_lo, na_hi) per competitor: Gram terms, some redone entry by entry
    if gram is not None and np.shape(gram) != (V, 2):
        raise ValueError(f"gram must be rows @ [c, rows[t]] of shape ({V}, 2); got {np.shape(gram)}")
    terms = _cap_terms_gram(rows, t, c, idx, centred, rows_err, row_stats, cerr, gram)
    exact = np.zeros(len(idx), dtype=bool)

    def recompute(sel):
        if not len(sel):
            return
        new = _cap_terms_exact(rows, t, c, idx[sel], centred, rows_err, cerr)
        for k in range(6):
            terms[k][sel] = new[k]
        exact[sel] = True

    def reach(sel, na):  # arccos(−β/(R‖a‖)): the angle from a's direction to j's boundary (π: none)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(na > 0, -beta[sel] / (R * na), np.where(beta[sel] > 0, -np.inf, np.inf))
        return np.where(ratio <= -1.0, np.inf, np.arccos(np.clip(ratio, -1.0, 1.0)))

    def claim(sel):  # θ_j at the intervals' midpoints
        p_lo, p_hi, q_lo, q_hi, na_lo, na_hi = (x[sel] for x in terms)
        return np.minimum(reach(sel, 0.5 * (na_lo + na_hi)) - np.arctan2(0.5 * (q_lo + q_hi), 0.5 * (p_lo + p_hi)),
                          np.pi)

    # θ_j's range over the intervals: atan2(q, p) falls with p and is monotone in q, reach is monotone in ‖a‖,
    # so the corners bound it. Only rows whose lowest θ_j is below the least highest one can set θ: those are
    # redone before θ is claimed
    p_lo, p_hi, q_lo, q_hi, na_lo, na_hi = terms
    every = slice(None)
    th_lo = (np.minimum(reach(every, na_lo), reach(every, na_hi))
             - np.maximum(np.arctan2(q_lo, p_lo), np.arctan2(q_hi, p_lo)))
    th_hi = (np.maximum(reach(every, na_lo), reach(every, na_hi))
             - np.minimum(np.arctan2(q_lo, p_hi), np.arctan2(q_hi, p_hi)))
    recompute(np.nonzero(th_lo <= np.min(th_hi))[0])
    th = float(min(np.min(claim(exact)), math.pi))
    for shrink in (1e-9, 1e-6, 1e-4, 1e-2, 0.1, 0.5):
        while True:
            if not th > 0:
                return 0.0
            th_claim = th * (1 - shrink)
            ok = _cap_holds(th_claim, R, *terms[:4], terms[5], beta, berr_j)
            redo = np.nonzero(~ok & ~exact)[0]
            if not len(redo):
                break
            recompute(redo)  # Gram terms too loose for these rows: entry by entry, and θ as they set it
            th = float(min(th, np.min(claim(redo))))
        if np.all(ok):
            return th_claim
    return 0.0


def _row_stats(rows, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per row its squared norm and its sum (float64), ``chunk`` rows at a time (rows derived on demand are
    never built whole): with two dot products per row they give verify_cap's Gram terms for any token."""
    V = rows.shape[0]
    sq, sm = np.empty(V), np.empty(V)
    for r0 in range(0, V, chunk):
        a = np.asarray(rows[r0:r0 + chunk], dtype=np.float64)
        sq[r0:r0 + len(a)] = np.einsum("ij,ij->i", a, a)
        sm[r0:r0 + len(a)] = a.sum(axis=1)
    return sq, sm


def _cap_terms_gram(rows, t: int, c: np.ndarray, idx: np.ndarray, centred: bool, rows_err: bool, row_stats,
                    cerr: float, Y: np.ndarray | None = None):
    """Intervals ``(p_lo, p_hi, q_lo, q_hi, na_lo, na_hi)`` for the competitors ``idx`` (verify_cap's notation, c* its
    exact centre) from ``rows @ [c, ũ_t]`` and the rows' squared norms and sums. Every float64 dot product of
    n terms errs by at most γ_n Σ|x_i y_i| ≤ γ_n ‖x‖‖y‖ (any summation order); a folded row that rounded errs
    from the exact ``γ ⊙ u`` by at most 2U‖row‖; ``q² = ‖a‖² − p²`` exactly, so q's interval follows from
    those of ‖a‖ and p (its width is about √(γ_d)‖ũ‖ where q ≪ ‖a‖: those rows fail and are redone)."""
    d = rows.shape[1]
    g = gamma(d + 8)
    sq, sm = row_stats
    rt = rows[t]
    if Y is None:
        Y = rows @ np.stack([c, rt], axis=1)  # [V, 2]: r_j·c and r_j·r_t
    nr = np.sqrt(sq) * (1 + g)  # ≥ ‖r_j‖
    eps = 2 * U * nr if rows_err else np.zeros_like(nr)  # ≥ ‖ũ_j − r_j‖ (the fold's rounding)
    nrt, et, nrj, ej = nr[t], eps[t], nr[idx], eps[idx]
    nsum, esum = nrt + nrj, et + ej
    cn = float(np.linalg.norm(c)) * (1 + g)
    # p = (ũ_t − ũ_j)·c* (c* lies in the subspace, so P drops out)
    p = Y[t, 0] - Y[idx, 0]
    perr = (g * nsum * cn + esum * cn + (nsum + esum) * cerr + 2 * U * np.abs(p)) * (1 + 1e-10)
    # ‖P(r_t − r_j)‖² = ‖r_t‖² + ‖r_j‖² − 2 r_t·r_j − (Σ(r_t − r_j))²/d; 4g(‖r_t‖ + ‖r_j‖)² covers the
    # products' γ_d terms, the additions and the rounding of the centring term (which is at most ‖r_t − r_j‖²)
    n2 = sq[t] + sq[idx] - 2 * Y[idx, 1]
    e2 = 4 * g * nsum * nsum
    n2_lo, n2_hi = n2 - e2, n2 + e2
    if centred:
        s = np.abs(sm[t] - sm[idx])
        es = g * math.sqrt(d) * nsum + 2 * U * s  # |Σ r − sum| ≤ γ_d Σ|r| ≤ γ_d √d ‖r‖
        n2_hi = n2_hi - np.maximum(s - es, 0) ** 2 / d
        n2_lo = n2_lo - (s + es) ** 2 / d
    na_hi = (np.sqrt(np.maximum(n2_hi, 0)) * (1 + 4 * U) + esum) * (1 + 1e-10)
    na_lo = np.maximum((np.sqrt(np.maximum(n2_lo, 0)) * (1 - 4 * U) - esum) * (1 - 1e-10), 0)
    p_lo, p_hi = p - perr, p + perr
    pa_hi = np.maximum(np.abs(p_lo), np.abs(p_hi))
    pa_lo = np.where((p_lo <= 0) & (p_hi >= 0), 0.0, np.minimum(np.abs(p_lo), np.abs(p_hi)))
    # q² = ‖a‖² − p², each difference's rounding allowed for (4U of its terms)
    q2_hi = na_hi * na_hi - pa_lo * pa_lo
    q2_lo = na_lo * na_lo - pa_hi * pa_hi
    q_hi = np.sqrt(np.maximum(q2_hi + 4 * U * (na_hi * na_hi + pa_lo * pa_lo), 0)) * (1 + 1e-10)
    q_lo = np.sqrt(np.maximum(q2_lo - 4 * U * (na_lo * na_lo + pa_hi * pa_hi), 0)) * (1 - 1e-10)
    return [p_lo, p_hi, q_lo, q_hi, na_lo, na_hi]


def _cap_terms_exact(rows, t: int, c: np.ndarray, jj: np.ndarray, centred: bool, rows_err: bool, cerr: float):
    """The same intervals for the competitors ``jj``, entry by entry from ``ũ_t − ũ_j`` (tight where q ≪ ‖a‖),
    4096 rows at a time."""
    d = rows.shape[1]
    g = gamma(d + 8)
    out = [[] for _ in range(6)]
    abs_rt, abs_c = np.abs(rows[t])[None, :], np.abs(c)
    rt = rows[t][None, :]
    for s in range(0, len(jj), 4096):
        Rj = rows[jj[s:s + 4096]]  # a copy (fancy indexing, or derived): the fold error below is built in it
        A = rt - Rj
        absA = np.abs(A)
        aerr = U * absA  # the subtraction's rounding, per entry
        if rows_err:  # the fold's rounding of ũ = γ ⊙ u, one product per entry
            fold_err = np.abs(Rj, out=Rj)
            fold_err = np.add(abs_rt, fold_err, out=fold_err)
            aerr += np.multiply(2 * U, fold_err, out=fold_err)
        if centred:
            aerr = aerr + U * absA + g * absA.mean(axis=1, keepdims=True)
            A = A - A.mean(axis=1, keepdims=True)
            absA = np.abs(A)
        p = A @ c
        nerr = np.linalg.norm(aerr, axis=1)
        na = np.linalg.norm(A, axis=1)
        perr = g * (absA @ abs_c) + nerr + cerr * na
        q = np.linalg.norm(A - p[:, None] * c[None, :], axis=1)
        qerr = 3 * g * (na + np.abs(p)) + nerr + 2 * perr + cerr * na
        for k, v in enumerate((p - perr, p + perr, np.maximum(q - qerr, 0), q + qerr, np.maximum(na - nerr, 0),
                               na + nerr)):
            out[k].append(v)
    return [np.concatenate(v) for v in out]


def _cap_holds(theta: float, R: float, p_lo, p_hi, q_lo, q_hi, na_hi, beta, berr) -> np.ndarray:
    """Per competitor, whether the cap of angle θ (0 < θ < π) lies strictly on t's side of its boundary for
    every p, q, ‖a‖ and β in their intervals (β ± berr): the whole sphere does (``β > R‖a‖``), or
    ``f(φ) = p cos φ − q sin φ`` still decreases at θ (``p sin θ + q cos θ > 0``: then its minimum over
    [0, θ] is f(θ)) and ``R f(θ) + β > 0``; 4U of every term covers cos, sin and the arithmetic."""
    ct, st = math.cos(theta), math.sin(theta)
    pa = np.maximum(np.abs(p_lo), np.abs(p_hi))
    slack = 4 * U * (pa + q_hi)
    decreasing = p_lo * st + (q_lo if ct >= 0 else q_hi) * ct - slack > 0
    val = R * ((p_lo if ct >= 0 else p_hi) * ct - q_hi * st) + beta
    holds = decreasing & (val - berr - R * slack - 4 * U * (np.abs(val) + np.abs(beta)) > 0)
    whole = beta - berr - R * na_hi * (1 + 4 * U) - 4 * U * np.abs(beta) > 0
    return holds | whole


def _rows_rounded(head: Head, problem=None) -> bool:
    """Whether the fold's ``γ ⊙ u`` may have rounded: not when there is no gain, nor when both factors have
    at most 24-bit significands (float32, float16, bfloat16: their product is exact in float64), nor when
    ``problem`` is this head's fold and its error-free products found no rounding (``rows_lo``, ``row_err``
    None: a float64 gain of ones or of powers of two, say)."""
    if head.ln_w is None:
        return False
    if (problem is not None and problem.exact_source is head and problem.rows_lo is None
            and problem.row_err is None):
        return False
    short = ("float32", "float16", "bfloat16")
    return not (np.asarray(head.W_U).dtype.name in short and np.asarray(head.ln_w).dtype.name in short)


def _bias_error(head: Head, problem, bias_on: bool):
    """``(err, split)``. ``err``: per token a bound on ``|b̃_j − bias_j|``, how far the exact fold's
    ``b̃_j = u_j·β + b_j`` is from the double the checks read (``problem.bias``, internal units); None (exact)
    without ``ln_b``: ``b_j`` is read as given (float16/32/64, exactly; the rescaling by a power of two is
    checked exact). With ``ln_b`` the fold's compensated sum says it: ``|bias_lo| + bias_err``, and ``split``
    is ``(bias_lo, bound on |b̃_j − bias_j − bias_lo_j|)`` for the readers of differences
    (:meth:`_Measure.bias_diff`); a problem without them (built elsewhere) gets the plain
    ``γ_{d+2} Σ|u_j β| + 2u|b̃_j|``."""
    if not bias_on or head.ln_b is None:
        return None, None
    if problem.bias_err is not None:
        lo = np.zeros(problem.V) if problem.bias_lo is None else np.asarray(problem.bias_lo, dtype=np.float64)
        return (np.abs(lo) + problem.bias_err) * (1 + 4 * U), (lo, problem.bias_err * (1 + 4 * U))
    W = np.abs(np.asarray(head.W_U, dtype=np.float64))
    e = gamma(head.d_model + 2) * (np.abs(np.asarray(head.ln_b, dtype=np.float64)) @ W) + 2 * U * np.abs(problem.bias)
    scale = math.ldexp(1.0, -problem.margin_exp) if problem.margin_exp else 1.0
    return e * scale, None


# ------------------------------------------------------------------------------------------------ entry
def volume(source_or_head, tokens=None, *, domain: str | None = None, radius: float | None = None, bias: bool = True,
           samples: int = 65536, seed: int = 0, confidence: float = 0.95, min_hits: int = MIN_HITS,
           split: SplitOptions | None = None, lower_bound: bool = True, detailed=None, progress=None,
           problem=None) -> VolumeReport:
    """The share of the norm's output set on which each token is the strict argmax (module docstring).

    Args:
        source_or_head: a :class:`Head` or anything :func:`engine.loader.load` accepts.
        tokens: ids to report. Every listed token gets an estimate, an interval and the cap bound; the
            plain pass always covers all V (its hits decide which tokens need splitting). None: all V
            from the plain pass alone — tokens with fewer than ``min_hits`` hits keep the binomial interval
            (``[null, hi]`` with no hit) and no token gets the cap bound (list ids for those: the
            splitting costs about a second per rare token, the bound a fraction of one).
        domain, radius, bias: as for ``scan`` (the fold).
        samples: plain uniform samples (0: skip the pass; every listed token is then split).
        seed: the random seed (results are reproducible for a seed and thread count).
        confidence: of the intervals, in (0, 1).
        min_hits: tokens with fewer plain hits than this are estimated by splitting.
        split: the splitting's knobs (:class:`SplitOptions`).
        lower_bound: compute the rigorous cap bound (sphere domains).
        detailed: ids among ``tokens`` that get splitting (when rare) and the cap bound; the others keep the
            plain pass's estimate and binomial interval (a proof of share 0 still applies to them). None:
            all of ``tokens``. ``scan --volume`` uses it to split only the hardest of its listed tokens.
        progress: a callable taking a message string, or None.
        problem: the head's fold on this domain, radius and bias when the caller has it already (a scan):
            not folded again (at 262144 × 640 a fold holds 2.7 GB).

    Raises:
        InputError: bad token ids, confidence or sample counts.
    """
    from threadpoolctl import threadpool_limits

    # numpy's BLAS on one thread: its calls here are small (the QR of J's differences, the cap's ascent, the
    # float64 points of the checks), and two OpenBLAS threads contending with torch's cost 10-25x on this
    # machine (a 576 x 1024 QR: 1.2 s against 0.05 s on one thread, load 5). torch's GEMMs keep their threads.
    with threadpool_limits(limits=1, user_api="blas"):
        return _volume(source_or_head, tokens, domain=domain, radius=radius, bias=bias, samples=samples, seed=seed,
                       confidence=confidence, min_hits=min_hits, split=split, lower_bound=lower_bound,
                       detailed=detailed, progress=progress, problem=problem)


def _volume(source_or_head, tokens, *, domain, radius, bias, samples, seed, confidence, min_hits, split, lower_bound,
            detailed, progress, problem) -> VolumeReport:
    import torch

    from unspeakable.engine.loader import fold, load

    t_start = time.perf_counter()
    head = load(source_or_head) if not isinstance(source_or_head, Head) else source_or_head
    if not (isinstance(confidence, float | int) and 0 < confidence < 1):
        raise InputError(f"confidence must be in (0, 1); got {confidence!r}")
    samples, seed = _check_int("samples", samples, 0), _check_int("seed", seed, 0, 63)
    split = split or SplitOptions()
    if split.replicates < 2 or split.particles < 2:
        raise InputError("splitting needs at least 2 replicates of at least 2 particles")
    if problem is None:
        problem = fold(head, domain=domain, radius=radius, bias=bias)
    V = problem.V
    if problem.domain.centred and problem.d < 2:  # the centred subspace of R^1 is {0}
        raise InputError(f"the layernorm domain of a head with d = {problem.d} is the single point 0: every row "
                         "ties there, no share to measure")
    listed = tokens is not None
    if not listed:
        ids = np.arange(V)
    else:
        ids = token_ids(tokens, V)  # the scan's own rule: no 1.5 read as token 1, no boolean masks
    if detailed is None:
        detail = {int(t) for t in ids}
    else:
        detail = {int(t) for t in token_ids(detailed, V, "detailed")}
        if not listed or not detail <= {int(t) for t in ids}:
            raise InputError("detailed: ids must be among the listed tokens")
        if not samples and len(detail) < len(ids):
            raise InputError("samples 0 leaves the tokens outside detailed with no estimate; sample, or detail all")
    say = progress or (lambda msg: None)
    timings = {"load_fold": time.perf_counter() - t_start}
    rows_err = _rows_rounded(head, problem)
    fold_bias_err, bias_split = _bias_error(head, problem, problem.bias_used)  # the checks' allowance; the caps'
    meas = _Measure(problem, problem.keys, rows_err, fold_bias_err, bias_split)
    groups = _tie_groups(problem)
    meas.set_twins(groups)
    # the rows each token is not compared with (itself and its twins), for every member of a listed token's
    # group: the splitting and the bound run on a group's first member, which need not be listed itself
    excl = {}
    for t in ids:
        members = groups.get(int(t), [int(t)])
        for m in members:
            excl[m] = sorted(members)
    texts = head.texts

    # ---- the plain pass over all V
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    if samples:
        say(f"plain pass: {samples} samples x {V} tokens")
        counts, sums = _plain_pass(meas, samples, int(torch.randint(0, 2**62, (1,), generator=gen)))
    else:
        counts, sums = np.zeros(V, dtype=np.int64), np.zeros((V, problem.d))
    group_counts = counts.astype(np.float64).copy()
    seen = set()
    for t, members in groups.items():
        if t in seen:
            continue
        tot = counts[members].sum()
        group_counts[members] = tot / len(members)
        seen.update(members)
    timings["sampling"] = time.perf_counter() - t0
    with np.errstate(divide="ignore"):
        sampled_all = np.log10(group_counts / samples) if samples else np.full(V, -np.inf)
    per_plain = timings["sampling"] / V

    results: dict[int, TokenVolume] = {}
    bias_err = fold_bias_err if lower_bound else None

    # ---- proofs of share 0: one competitor's half-space misses the sphere (sphere domains)
    zero = set()
    if listed and not meas.box:
        for t in ids:
            t = int(t)
            if counts[t] or t in groups and any(counts[m] for m in groups[t]):
                continue
            if _zero_share(problem, t, excl[t], meas.R, meas.centred, bias_err):
                zero.add(t)

    # ---- sampling and splitting
    def rep(t):
        return groups[t][0] if t in groups else t

    rare = sorted({rep(int(t)) for t in ids if int(t) not in zero and int(t) in detail
                   and counts[groups.get(int(t), [int(t)])].sum() < min_hits}) if listed else []
    t0 = time.perf_counter()
    split_res: dict[int, tuple] = {}
    chunks = [rare[s:s + split.batch] for s in range(0, len(rare), split.batch)]
    # one batch draws from the run's generator (as before batches ran side by side); several, each from its own,
    # seeded here in order: the same streams however many run at once
    gens = [gen] if len(chunks) == 1 else [
        torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen))) for _ in chunks]

    def run(k):
        say(f"splitting: tokens {k * split.batch + 1}-{k * split.batch + len(chunks[k])} of {len(rare)}")
        tc = time.perf_counter()
        out = _split_tokens(meas, chunks[k], excl, split, gens[k])
        # tokens no float32 replicate reached (no replicate with a winning point): run again, all anew, with the
        # chain in float64. The new run is independent of the first (a fresh stream), so choosing it because
        # the first found nothing leaves its replicates unbiased, as the deep tokens' choice does
        again = [i for i, r in enumerate(out) if not split.precise and (not np.any(np.asarray(r[0]) > 0)
                                                                        or chunks[k][i] in meas.coarse)]
        if again:
            redo = _split_tokens(meas, [chunks[k][i] for i in again], excl, replace(split, **PRECISE), gens[k])
            for i, r in zip(again, redo):
                out[i] = r
        return out, (time.perf_counter() - tc) / len(chunks[k])

    # Two batches at once, each on one thread, where the caller has two threads: apart from its GEMMs the
    # splitting is a long sequence of one-thread element-wise ops, which left the second core idle. The
    # results do not depend on it (each batch has its own seed); torch's thread count is global, so it stays
    # at 1 for the whole section and the GEMMs do not switch it (gemm_threads 1)
    workers = min(2, meas.gemm_threads, len(chunks))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        saved, meas.gemm_threads = meas.gemm_threads, 1
        try:
            with torch_threads(1), ThreadPoolExecutor(workers) as ex:
                outs = list(ex.map(run, range(len(chunks))))
        finally:
            meas.gemm_threads = saved
    else:
        outs = [run(k) for k in range(len(chunks))]
    for chunk, (out, per) in zip(chunks, outs):
        for t, r in zip(chunk, out):
            split_res[t] = r + (per,)
    timings["splitting"] = time.perf_counter() - t0

    # ---- the rigorous cap bounds: one per group of identical rows, two at once on a two-thread caller (numpy's
    # GEMVs and element-wise loops release the GIL), torch on one thread throughout (its setting is global)
    t0 = time.perf_counter()
    bound_for: dict[int, tuple] = {}  # representative -> (centre or None, excluded rows)
    if listed and lower_bound and not meas.box:
        for t in ids:
            t = int(t)
            if t in detail and t not in zero:
                members = groups.get(t)
                rep_t = members[0] if members else t
                if rep_t in split_res:
                    centre = split_res[rep_t][2]
                else:
                    centre = sums[members].sum(0) if members else sums[t]
                bound_for.setdefault(rep_t, (centre, excl[t]))
    row_stats = _row_stats(problem.rows) if bound_for else None  # for verify_cap, once for all tokens

    def centre(rep_t):
        centre, exclude = bound_for[rep_t]
        start = centre if centre is not None and np.linalg.norm(centre) > 0 else meas.keys64[rep_t]
        comps = _binding(meas, rep_t, start, exclude, 512)
        # from the splitting's centre only, where there is one: t's own direction as a second start ended within
        # 1.3e-4 rad of it on 64 SmolLM2 tokens (the bound 0.0017 decades lower on average, 0.018 at most) and
        # cost a sixth to a fifth of the stage
        c = _cap_centre(meas, rep_t, comps, centre, own=False)
        if c is None:  # no direction to start from (t's own row is 0 and no particle won): no cap
            return None
        # a second pass: the competitors binding at the centre found (the first set was seen from the start)
        comps2 = np.union1d(comps, _binding(meas, rep_t, c, exclude, 512))
        return _cap_centre(meas, rep_t, comps2, c, own=False)  # warm: from the first pass's centre only

    def bound(chunk):
        # the tokens' Gram terms rows @ [c', ũ_t] in one pass over the rows (derived rows are derived once per
        # chunk of tokens instead of once per token), then each token's check
        cs = [centre(r) for r in chunk]
        units = [_cap_unit(c, meas.centred) for c in cs]
        cols = [np.stack([u, np.asarray(problem.rows[r], dtype=np.float64)], axis=1)
                for r, u in zip(chunk, units) if u is not None]
        Y = problem.rows @ np.concatenate(cols, axis=1) if cols else None
        out, k = [], 0
        for r, c, u in zip(chunk, cs, units):
            gram = None
            if u is not None:
                gram, k = Y[:, k:k + 2], k + 2
            out.append(verify_cap(problem.rows, problem.bias, r, c, meas.R, meas.centred, exclude=bound_for[r][1],
                                  bias_err=bias_err, rows_err=rows_err, row_stats=row_stats, gram=gram))
        return out

    todo = list(bound_for)
    workers = min(2, meas.gemm_threads, len(todo))
    # chunks of at most 32 tokens whose Gram terms take at most 32 MB, at least one per worker
    size = max(1, min(32, 2**21 // max(problem.V, 1), -(-len(todo) // max(workers, 1))))
    parts = [todo[s:s + size] for s in range(0, len(todo), size)]
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with torch_threads(1), ThreadPoolExecutor(workers) as ex:
            thetas = dict(zip(todo, (th for part in ex.map(bound, parts) for th in part)))
    else:
        thetas = dict(zip(todo, (th for part in map(bound, parts) for th in part)))
    timings["lower_bound"] = time.perf_counter() - t0
    # a float32 run whose whole interval lies below the proven bound has failed where the bound is sure (a cell
    # too thin for its steps: an arc of 2π·1e-6 in d = 2 gave [-6.000054, -6.000054] against -6): run again in
    # float64 (PRECISE), a fresh run, so that choosing it leaves its replicates unbiased
    again = []
    for rep_t, th in thetas.items():
        if rep_t in split_res and th > 0 and not split.precise:
            est, levels, _, n_part, _, _ = split_res[rep_t]
            k = len(groups.get(rep_t, [rep_t]))
            _, _, hi = _cox_interval(est / k, confidence, (levels + 1) / n_part)
            if math.isfinite(hi) and hi < cap_log10_share(th, meas.n) - math.log10(k):
                again.append(rep_t)
    if again:
        t0 = time.perf_counter()
        g2 = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        redo = _split_tokens(meas, again, excl, replace(split, **PRECISE), g2)
        per = (time.perf_counter() - t0) / len(again)
        for rep_t, r in zip(again, redo):
            split_res[rep_t] = r + (split_res[rep_t][-1] + per,)
        timings["splitting"] += time.perf_counter() - t0
    for t in ids:
        t = int(t)
        text = None if texts is None else texts[t]
        members = groups.get(t)
        rep_t = members[0] if members else t
        k = len(members) if members else 1
        tie_with = [m for m in members if m != t] if members else None
        if t in zero:
            results[t] = TokenVolume(t, text, None, (None, None), None, None, "zero", 0, per_plain,
                                     tie_with=tie_with, note="a competitor's half-space misses the sphere: share 0")
            continue
        lb = angle = None
        if rep_t in split_res:
            est, levels, _, n_part, J, per = split_res[rep_t]
            mean, lo, hi = _cox_interval(est / k, confidence, (levels + 1) / n_part)
            tv = TokenVolume(t, text, mean, (lo, hi), None, None, "splitting" if k == 1 else "tie",
                             len(est) * n_part, per, levels=levels, tie_with=tie_with)
            if not math.isfinite(mean):
                tv.log10_share = None
                tv.note = "no replicate reached t's cell: the share may be 0 (or below what this run resolves)"
                tv.log10_share_ci = (None, _upper_from_plain(int(group_counts[t] * k), samples, confidence, k))
        else:
            hits = int(round(group_counts[t] * k))
            lo, hi = _clopper_pearson(hits, samples, confidence)
            tv = TokenVolume(t, text, _log10(hits / samples / k), (_log10(lo / k), _log10(hi / k)), None, None,
                             "sampling" if k == 1 else "tie", samples, per_plain, hits=hits, tie_with=tie_with)
        amb = meas.ambiguous.get(rep_t, 0)
        if amb:
            tv.note = (f"{amb} points lie within the float64 logits' rounding of a tie with another row (the head's "
                       "logits differ by less than its rows' and bias's rounding can change): counted for the first "
                       "maximum in the plain pass and as not won in the checks, so the estimate is uncertain beyond "
                       "its interval" + ("; " + tv.note if tv.note else ""))
        th = thetas.get(rep_t, 0.0) if t in detail else 0.0
        if th > 0:
            angle = math.degrees(th) * (1 - 1e-12)
            lb = cap_log10_share(th, meas.n) - math.log10(k)
            # the share is surely at least lb: neither the estimate nor its interval below it (a plain estimate
            # of a half-circle read 10^-0.3040 against its proven 10^-0.30103). An interval wholly below lb has
            # missed, and its upper end says nothing: it is left open (raising it to lb gave [lb, lb], which
            # misses the truth too; an arc of 2π·1e-6 in d = 2 read [-6.000042, -6.000042] against -6)
            if tv.log10_share is not None:
                tv.log10_share = max(tv.log10_share, lb)
            lo, hi = tv.log10_share_ci
            if hi is not None and hi < lb:
                hi = None
                tv.note = ("the sampling's interval lay wholly below the proven bound (its chain did not resolve "
                           "the cell): the share is at least the bound, its upper end is not known"
                           + ("; " + tv.note if tv.note else ""))
            tv.log10_share_ci = (lb if lo is None else max(lo, lb), hi)
        tv.log10_share_lower_bound, tv.cap_angle_deg = lb, angle
        results[t] = tv
    timings["total"] = time.perf_counter() - t_start
    dom = problem.domain
    return VolumeReport(source=head.source, V=V, d=problem.d, domain=dom.name, radius=problem.radius_reported,
                        bias=problem.bias_used, dimension=meas.n, confidence=float(confidence), samples=int(samples),
                        seed=int(seed), tokens=[results[int(t)] for t in ids], timings_s=timings,
                        warnings=list(problem.warnings), log10_share_sampled_all=sampled_all)


def _upper_from_plain(hits: int, samples: int, conf: float, k: int) -> float | None:
    if not samples:
        return None
    return _log10(_clopper_pearson(hits, samples, conf)[1] / k)


def _row_norms(problem, chunk: int = 8192) -> np.ndarray:
    """‖P ũ_j‖ per row (cached on the problem object for the zero-share filter), 8192 rows at a time: the
    projection of all V rows at once held a second V × d float64 array (1.3 GB at 262144 × 640)."""
    cached = getattr(problem, "_volume_row_norms", None)
    if cached is None:
        rows = problem.rows
        cached = np.empty(rows.shape[0])
        for r0 in range(0, rows.shape[0], chunk):
            cached[r0:r0 + chunk] = np.linalg.norm(problem.domain.project(rows[r0:r0 + chunk]), axis=1)
        problem._volume_row_norms = cached
    return cached


def _zero_share(problem, t: int, exclude, R: float, centred: bool, bias_err) -> bool:
    """A proof that t's share is 0: some competitor j with ``β + R‖a‖ < 0`` (allowances included), i.e.
    ``l_j > l_t`` on the whole sphere."""
    rows, bias = problem.rows, problem.bias
    d = rows.shape[1]
    if problem.constant_bias:  # every logit equal at the sphere's centre: no half-space misses the sphere
        return False
    # necessary: b_j − b_t > R ‖a‖ ≥ R |‖ũ_t‖ − ‖ũ_j‖| (up to rounding): a cheap O(V) filter before the exact test
    norms = _row_norms(problem)
    mask = (bias - bias[t]) * (1 + 1e-6) + 1e-300 > R * np.abs(norms - norms[t]) * (1 - 1e-6)
    mask[list(exclude)] = False
    if not mask.any():
        return False
    A = rows[t][None, :] - rows[mask]
    if centred:
        A = A - A.mean(axis=1, keepdims=True)
    na = (np.linalg.norm(A, axis=1) * (1 + gamma(d + 8)) + gamma(d + 8) * np.abs(A).sum(axis=1)
          + 4 * U * (np.linalg.norm(rows[t]) + np.linalg.norm(rows[mask], axis=1)))
    beta = bias[t] - bias[mask]
    be = np.zeros_like(beta) if bias_err is None else bias_err[t] + bias_err[mask]
    val = beta + R * na * (1 + 4 * U) + be + 4 * U * np.abs(beta)
    return bool(np.any(val < 0))


# ------------------------------------------------------------------------------------------------ scan --volume
@dataclass
class VolumeOptions:
    """What ``scan --volume`` adds to a scan (``scan(..., volume=True | {...} | VolumeOptions(...))``).

    Every token the scan lists gets an entry. A token the scan proved unspeakable wins nowhere (the argmax is
    strict): share 0, method ``unspeakable``, no estimate (members of a ``tie`` split their group's cell, as in
    :func:`volume`). The others get the plain pass's estimate and binomial interval (one GEMM pass over all V);
    ``tokens`` — by default the ``hardest`` listed speakable tokens, smallest proven margin first — also get
    splitting and the rigorous cap bound (10–35 s per rare token on a 2-core CPU). The margin only guides
    this choice: it does not order the shares.
    """

    tokens: object = None  # ids to split and bound; None: the `hardest` listed speakable tokens
    hardest: int = 10
    samples: int = 65536  # plain samples over all V
    seed: int = 0
    confidence: float = 0.95
    split: SplitOptions = field(default_factory=lambda: SplitOptions(particles=128, replicates=8))  # as `volume`'s CLI

    @classmethod
    def resolve(cls, value, V: int) -> VolumeOptions | None:
        """None or False: no volume; True: the defaults; else a :class:`VolumeOptions` or a dict of its fields.
        Checked against V here, so that a scan refuses bad options before any work (:class:`InputError`)."""
        import dataclasses

        if value is None or value is False:
            return None
        if value is True:
            opt = cls()
        elif isinstance(value, cls):
            opt = dataclasses.replace(value)  # the caller's object is left as it is
        elif isinstance(value, dict):
            known = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise InputError(f"volume: unknown options {', '.join(map(str, unknown))}; expected {', '.join(known)}")
            opt = cls(**value)
        else:
            raise InputError(f"volume: expected True, a dict or VolumeOptions; got {type(value).__name__}")
        for name, least in (("samples", 1), ("hardest", 0), ("seed", 0)):
            _check_int(f"volume {name}", getattr(opt, name), least, 63 if name == "seed" else None)
        if isinstance(opt.confidence, bool) or not (isinstance(opt.confidence, float | int) and 0 < opt.confidence < 1):
            raise InputError(f"volume confidence must be in (0, 1); got {opt.confidence!r}")
        if not isinstance(opt.split, SplitOptions) or opt.split.replicates < 2 or opt.split.particles < 2:
            raise InputError("volume split: a SplitOptions with at least 2 replicates of at least 2 particles")
        if opt.tokens is not None:
            opt.tokens = token_ids(opt.tokens, V, "volume tokens")
        return opt


def _hardness(t) -> tuple:
    m = float_or_none(t.margin_lower)
    return (math.inf if m is None else m, t.id)


def for_scan(head, listed: list, opt: VolumeOptions, *, domain=None, radius=None, bias: bool = True,
             progress=None, problem=None) -> tuple[VolumeReport, list[int], list[str]]:
    """Volume entries for a scan's listed tokens (``TokenReport`` objects with their final verdicts).

    Returns the :class:`VolumeReport` over the listed tokens in their order (its plain pass covers all V),
    the ids that were split and bounded, and warnings: ``opt.tokens`` the scan does not list, and any token
    proven unspeakable that the plain pass saw win (two independent methods disagreeing)."""
    zero = {t.id for t in listed if t.verdict == "unspeakable" and (t.certificate or {}).get("kind") != "tie"}
    rest = [t.id for t in listed if t.id not in zero]
    warnings = []
    if opt.tokens is None:
        chosen = [t.id for t in sorted((t for t in listed if t.verdict == "speakable"), key=_hardness)[:opt.hardest]]
    else:
        named = {int(t) for t in opt.tokens}
        chosen = sorted(named & set(rest))
        absent = sorted(named - {t.id for t in listed})
        if absent:
            warnings.append(f"volume: tokens {', '.join(map(str, absent[:10]))}{' …' if len(absent) > 10 else ''} are "
                            f"not listed by this scan (settled by the witness screen and not hard-to-speak, or not "
                            f"scanned): `unspeakable volume SOURCE --tokens ...` estimates them")
    rep = volume(head, rest, domain=domain, radius=radius, bias=bias, samples=opt.samples, seed=opt.seed,
                 confidence=opt.confidence, split=opt.split, detailed=chosen, progress=progress, problem=problem)
    by_id = {tv.id: tv for tv in rep.tokens}
    split_set = set(chosen)
    for t in listed:
        if t.id in zero:
            by_id[t.id] = TokenVolume(t.id, t.text, None, (None, None), None, None, "unspeakable", 0, 0.0,
                                      note=f"share 0: the scan proved it never wins ({t.reason})")
        elif t.id not in split_set and by_id[t.id].hits is not None and by_id[t.id].hits < MIN_HITS:
            by_id[t.id].note = (f"plain pass only ({by_id[t.id].hits} hits in {opt.samples} samples); "
                                f"--volume-tokens {t.id} splits it and proves a cap")
    seen = [t for t in sorted(zero) if np.isfinite(rep.log10_share_sampled_all[t])]
    if seen:
        warnings.append(f"volume: tokens {', '.join(map(str, seen[:10]))} are proven unspeakable yet won plain samples: "
                        f"please report this inconsistency")
    rep.tokens = [by_id[t.id] for t in listed]
    rep.warnings.extend(warnings)
    return rep, chosen, warnings


def scan_summary(rep: VolumeReport, split_ids: list[int], opt: VolumeOptions) -> dict:
    """The top-level ``"volume"`` of a scan report: the measure, the run's settings, which tokens were split
    and why, and the plain pass's histogram of log10 share over all V (bins of 0.25; ``no_hit`` tokens
    were never sampled as the winner)."""
    allv = np.asarray(rep.log10_share_sampled_all, dtype=np.float64)
    fin = allv[np.isfinite(allv)]
    if fin.size:
        lo, hi = math.floor(fin.min() * 4) / 4, math.ceil(fin.max() * 4) / 4 + 0.25
        counts, edges = np.histogram(fin, bins=np.arange(lo, hi + 1e-9, 0.25))
    else:
        counts, edges = np.zeros(0, dtype=np.int64), np.zeros(0)
    return {"measure": ("share of the norm's output set on which the token is the strict argmax; a group of "
                        "identical rows splits its cell equally (engine.volume)"),
            "domain": rep.domain, "dimension": int(rep.dimension), "confidence": float(rep.confidence),
            "samples": int(rep.samples), "seed": int(rep.seed),
            "split": [int(t) for t in split_ids],
            "selection": (f"the {opt.hardest} listed speakable tokens with the smallest margin_lower"
                          if opt.tokens is None else "--volume-tokens"),
            "timings_s": {k: float_or_none(v) for k, v in rep.timings_s.items()},
            "histogram": {"log10_share_edges": [float(e) for e in edges], "tokens": [int(c) for c in counts],
                          "no_hit": int(allv.size - fin.size)}}


def entry_json(tv: TokenVolume) -> dict:
    """A token's ``"volume"`` in a scan report: its :meth:`TokenVolume.to_json` without id and text."""
    return {k: v for k, v in tv.to_json().items() if k not in ("id", "text")}


# ------------------------------------------------------------------------------------------------ output
def _pct(conf: float) -> str:
    """The confidence as a percentage to as many digits as it has (0.999999: "99.9999%", not "100%")."""
    return f"{100 * conf:.10g}%"


def write_json(report: VolumeReport, path) -> None:
    """``report.to_json()`` written atomically (nothing half-written); NaN and inf are refused."""
    import json

    from unspeakable.engine.report import atomic_write

    data = report.to_json()
    with atomic_write(path) as f:
        json.dump(data, f, indent=1, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def write_csv(report: VolumeReport, path) -> None:
    from unspeakable.engine.report import atomic_write

    text = report.to_csv()
    with atomic_write(path) as f:
        f.write(text)


def _fmt(x, nd: int = 2) -> str:
    x = float_or_none(x)
    return "—" if x is None else f"{x:.{nd}f}"


def format_table(report: VolumeReport, max_rows: int = 40) -> str:
    """The console summary: the listed tokens, rarest first."""
    from unspeakable.engine.report import short_repr

    toks = sorted(report.tokens, key=_rarity)
    head = (f"unspeakable volume: {report.source}  V={report.V}  d={report.d}  domain={report.domain} "
            f"(sphere S^{report.dimension - 1})" if report.domain != "box" else
            f"unspeakable volume: {report.source}  V={report.V}  d={report.d}  domain=box")
    lines = [head, f"{'id':>7}  {'text':<18} {'log10 share':>11} {'CI ' + _pct(report.confidence):>17} "
                   f"{'rigorous ≥':>10} {'cap°':>7}  method"]
    for t in toks[:max_rows]:
        ci = f"[{_fmt(t.log10_share_ci[0])}, {_fmt(t.log10_share_ci[1])}]"
        lines.append(f"{t.id:>7}  {short_repr(t.text):<18} {_fmt(t.log10_share):>11} {ci:>17} "
                     f"{_fmt(t.log10_share_lower_bound):>10} {_fmt(t.cap_angle_deg):>7}  {t.method}")
    if len(toks) > max_rows:
        lines.append(f"... {len(toks) - max_rows} more (--out / --csv / --html list all)")
    return "\n".join(lines)


def _rarity(t: TokenVolume):
    """Rarest first: tokens without an estimate (share 0 proven, or no hit) lead, then by estimate."""
    v = float_or_none(t.log10_share)
    return (0, 0.0, t.id) if v is None else (1, v, t.id)


def histogram_png(report: VolumeReport) -> bytes:
    """A histogram of log10 share: the listed tokens' estimates, and the plain pass over all V."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    listed = any(t.method in ("splitting", "zero") or t.log10_share_lower_bound is not None for t in report.tokens)
    est = np.array([v for v in (float_or_none(t.log10_share) for t in report.tokens) if v is not None]) if listed else np.array([])
    allv = report.log10_share_sampled_all
    if allv is not None and report.samples:
        allv = np.asarray(allv)
        fin = allv[np.isfinite(allv)]
        zero = int((~np.isfinite(allv)).sum())
        if fin.size:
            ax.hist(fin, bins=60, color="#9bb7d4", label=f"plain pass, all V ({zero} tokens with no hit "
                                                                 f"in {report.samples} samples)")
    if est.size:
        ax.hist(est, bins=60, color="#c0504d", alpha=0.75, label="listed tokens' estimates")
    if est.size or (allv is not None and report.samples and np.isfinite(allv).any()):
        ax.set_yscale("log")  # a few listed tokens beside thousands of sampled ones stay visible
    ax.set_xlabel("log10 share of the norm's output set on which the token wins")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_html(report: VolumeReport, path) -> None:
    """One self-contained page: the summary, the histogram (base64 PNG) and the token table, rarest first."""
    import base64
    import html as H

    from unspeakable.engine.report import atomic_write

    png = base64.b64encode(histogram_png(report)).decode("ascii")
    rows = []
    for t in sorted(report.tokens, key=_rarity):
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            t.id, H.escape(repr(t.text)) if t.text is not None else "", _fmt(t.log10_share),
            f"[{_fmt(t.log10_share_ci[0])}, {_fmt(t.log10_share_ci[1])}]", _fmt(t.log10_share_lower_bound),
            _fmt(t.cap_angle_deg), H.escape(t.method), t.samples, _fmt(t.seconds, 3))) + "</tr>")
    cols = ("id", "text", "log10 share", f"CI {_pct(report.confidence)}", "rigorous lower bound", "cap angle °",
            "method", "samples", "s")
    where = ("the cube ‖x‖∞ ≤ ρ" if report.domain == "box" else
             f"the sphere of radius {_fmt(report.radius, 4)} in R^{report.dimension}"
             + (" (the centred subspace)" if report.domain == "layernorm" else ""))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>unspeakable volume: {H.escape(report.source)}</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}}th{{background:#f3f3f3}}
td:nth-child(2){{text-align:left;font-family:monospace}}img{{max-width:100%}}</style></head><body>
<h1>How precisely must the model point?</h1>
<p>{H.escape(report.source)}: V = {report.V}, d = {report.d}, domain {report.domain}, bias {report.bias}.
The share of a token is the probability that it is the strict argmax when the hidden state is uniform on
{H.escape(where)} (identical rows split their cell equally: method "tie"). Intervals at {_pct(report.confidence)};
the lower bound is a proven cap inside the token's region ("the model must point within θ of its centre").
Seed {report.seed}, {report.samples} plain samples.</p>
{''.join(f'<p style="color:#8a4b00">warning: {H.escape(w)}</p>' for w in report.warnings)}
<img alt="histogram of log10 share" src="data:image/png;base64,{png}">
<table><thead><tr>{''.join(f'<th>{H.escape(c)}</th>' for c in cols)}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    with atomic_write(path) as f:
        f.write(page)
