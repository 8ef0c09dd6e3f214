"""Stage 6 — verification. Trusts nothing it checks (DESIGN §2).

Every claim is re-derived from the folded rows ``problem.rows`` / ``problem.bias`` and the domain, in
float64 with an explicit a-priori rounding allowance (Higham's ``gamma_n = n u / (1 - n u)``, ``u = 2^-53``,
plus an absolute ``ETA = 2^-1074`` per operation that may underflow). Any non-finite intermediate
(overflow, NaN) fails the check: it is never read as a bound.

* witness ``x`` → the logits of all V tokens at the certified point ``z`` (``z = x``; for ``layernorm``
  ``z = P x``, the exact projection of ``x`` onto 1⊥, so the float sum of ``x`` need not be 0). Proven
  speakable iff ``z`` lies in the domain and ``l_t(z) - l_j(z) > allowance_j`` for every ``j != t``.
  Tokens ``j`` whose Cauchy–Schwarz bound ``||a_j|| ||x|| + b_j`` is below ``l_t`` cannot win and are skipped
  (a rigorous bound, not a heuristic); the reported margin is over all V (skipped rows that could be the
  runner-up are scored too) and is a rigorous lower bound (the allowance subtracted). Competitors are first
  bounded in float32 with a rigorous error (per batch of witnesses; for the screens' self-direction
  witnesses, one symmetric Gram of the verifier's own rows, ``engine.verify_sym``) and only those the bound
  cannot exclude are scored in float64.
* dual certificate ``lambda`` → ``r = sum lambda_j (u_j - u_t)``, ``c0 = sum lambda_j (b_j - b_t)``,
  ``deficit = c0 - sup_X(-r·x)`` with its rounding error subtracted; proven unspeakable iff positive.
* Gordan certificate ``(lambda, mu)`` (``cone``; and ``zero``: a bounded domain whose bias is constant,
  where every logit is equal at x = 0) → exact membership of ``u_t`` in the convex hull of the other rows
  (in the domain's span): the dense weights ``w = lambda + |mu|/V`` make ``e = sum w_j (u_j - u_t)`` vanish
  up to rounding, and a verified linear solve (approximate inverse ``R`` with a rigorous bound on
  ``||I - R A||``) shows that a correction ``dw`` on a basis of rows with ``||dw||_inf < min w`` cancels ``e``
  exactly, so a nonnegative nonzero combination of ``u_j - u_t`` is exactly 0 (or exactly in the span of
  the domain's null directions): ``t`` can never win strictly. Coordinates on which all rows agree carry
  no information and are dropped first, so rows that do not span R^d are handled in their span.
* tie → an identical folded row and bias, compared by value (``0.0 == -0.0``); where the fold rounds, the
  head's own rows and biases in rationals decide (two different rows may round to one double).
* the head as given (issue 18) → the float64 fold is not the head: ``problem.rows_lo`` (the exact residual of
  each gain product) and ``bias_lo`` (a compensated ``u·β + b``) enter every margin, certificate residual and
  Gordan sum, and ``row_err`` / ``bias_err`` (what even they miss) every allowance. Bias differences are taken
  exactly (TwoSum), so a large common part cancels. A witness the a-priori allowance cannot settle is
  re-checked difference first (:meth:`Verifier._refine`). A certificate the float check cannot settle is
  tried in exact rationals from the head (``engine.exact``): the weights as given (deficit > 0, or exactly 0:
  t can at best tie), else exact weights on the certificate's support (the LP's active set first, then a
  support of at most d' + 1 rows found by a float LP), within ``EXACT_TIME_S``; past it, no proof.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from unspeakable.engine import exact, verify_sym
from unspeakable.engine.domain import ETA, U, gamma
from unspeakable.engine.evidence import Certificate
from unspeakable.engine.head import FoldedRows, row_chunks
from unspeakable.engine.memory import WITNESS_BATCH_MAX, abs_max


PAIRWISE_MIN_V = 1024  # below this the exhaustive float64 check costs little


@dataclass
class WitnessCheck:
    ok: bool
    margin: float  # rigorous lower bound on l_t(z) - max_{j != t} l_j(z) (normalised for cone); NaN if none
    allowance: float  # rounding allowance subtracted before the sign test
    runner_up: int  # the j attaining the max (-1 if none)
    message: str = ""


class Closest(NamedTuple):
    """At one point, a token's closest competitor: ``margin = l_t - l_j`` in float64, its rounding
    ``allowance`` (the true margin is >= margin - allowance), and ``runner_up = j`` (-1 if none)."""

    margin: float
    allowance: float
    runner_up: int

    @property
    def proven(self) -> float:
        """The rigorous lower bound ``margin - allowance`` (NaN when either is not a number)."""
        return self.margin - self.allowance


@dataclass
class CertificateCheck:
    ok: bool
    deficit: float  # verified lower bound on the deficit (bounded domains) / slack (Gordan)
    margin_upper: float | None  # upper bound on the margin implied by the certificate, when proven
    message: str = ""
    allowance: float = math.inf  # the float check's rounding allowance (how far from deciding it was)
    # An exact proof's own certificate (engine.exact): competitors and rational weights w >= 0, sum 1, with
    # deficit >= 0 exactly (r = Σ w_j (ũ_j − ũ_t) is 0 up to null directions, or the λ as given). None: the
    # certificate as given was proven.
    exact: tuple | None = None


def _fail(msg: str) -> CertificateCheck:
    return CertificateCheck(False, float("nan"), None, msg)


def _finite(*xs) -> bool:
    return all(bool(np.all(np.isfinite(x))) for x in xs)


class ShiftedRows:
    """``A = rows − c``, rows computed on demand (the same float64 values every time): holding all of it
    would cost another V × d float64 array. ``A[ids]``, ``A[t]`` and ``A[:, cols]`` as for an array."""

    def __init__(self, rows: np.ndarray, c: np.ndarray):
        self.rows, self.c, self.shape = rows, c, rows.shape

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            return self.rows[idx] - self.c[idx[1]]
        return self.rows[idx] - self.c

    def chunks(self, size: int = 8192):
        """``(r0, A[r0:r1])`` over all rows."""
        for r0 in range(0, self.shape[0], size):
            yield r0, self[r0: r0 + size]


class KeyRows:
    """The problem's keys standing for ``A`` where they are ``rows − center`` computed as :class:`ShiftedRows`
    computes it (the same float64 values, already held): read-only, with :meth:`chunks`."""

    def __init__(self, keys):
        if isinstance(keys, FoldedRows):  # keys derived on demand (engine.head.DerivedKeys): read-only already
            self.a = keys
        else:
            self.a = keys.view()
            self.a.flags.writeable = False
        self.shape = tuple(keys.shape)

    def __getitem__(self, idx):
        return self.a[idx]

    def chunks(self, size: int = 8192):
        return row_chunks(self.a, size)


class KeptColumns:
    """``A[:, keep]`` of a row source (an array or :class:`ShiftedRows`) row by row, on demand: ``[ids]`` and
    ``[t]`` as for the array, without its ``V × len(keep)`` copy."""

    def __init__(self, A, keep: np.ndarray):
        self.A, self.keep, self.shape = A, keep, (A.shape[0], keep.size)

    def __getitem__(self, idx):
        return self.A[idx][..., self.keep]


def _weighted_sums(w: np.ndarray, chunks, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(w @ A, w @ |A|)`` over ``(r0, A[r0:r1])`` chunks of A's rows."""
    s, s_abs = np.zeros(n), np.zeros(n)
    for r0, a in chunks:
        wc = w[r0: r0 + a.shape[0]]
        s += wc @ a
        s_abs += wc @ np.abs(a)
    return s, s_abs


class Verifier:
    """Checks claims against the float64 shifted rows ``A = rows - c`` (any c works: it cancels exactly in
    l_t - l_j), computed on demand (:class:`ShiftedRows`)."""

    def __init__(self, problem, full: bool = False):
        self.p = problem
        self.full = full  # True: re-score every competitor of every witness in float64 (audits)
        self.A32 = None  # float32 copy of the rows for the competitor bounds, built on first use
        self.batch = WITNESS_BATCH_MAX  # witnesses per competitor pass (engine.memory.Budget.witness_batch)
        self.dom = problem.domain
        self.rows = problem.rows  # an array or a FoldedRows (engine.head): indexed, never written
        self.c = np.asarray(problem.center, dtype=np.float64)
        self.A = KeyRows(problem.keys) if self._keys_are_shifted_rows() else ShiftedRows(self.rows, self.c)
        self.bias = np.asarray(problem.bias, dtype=np.float64)
        self.V, self.d = self.A.shape
        # The fold's residual (module docstring, "the head as given"): the exact rows are A + lo (+ e_j with
        # ||e_j||_1 <= rerr_j), the exact bias bias + blo (± berr). Zeros where the fold is exact.
        z = np.zeros(self.V)
        self.lo = problem.rows_lo if problem.rows_lo is not None and np.any(problem.rows_lo) else None
        self.rerr = z if problem.row_err is None else np.asarray(problem.row_err, dtype=np.float64)
        self.blo = z if problem.bias_lo is None else np.asarray(problem.bias_lo, dtype=np.float64)
        self.berr = z if problem.bias_err is None else np.asarray(problem.bias_err, dtype=np.float64)
        self.Ln = z if self.lo is None else np.linalg.norm(self.lo, axis=1) * (1 + gamma(self.d + 2)) + self.d * ETA
        self.An = np.empty(self.V)
        if self.dom.centred:
            self.row_sums, self.row_sums_err = np.empty(self.V), np.empty(self.V)
        for r0, a in self.A.chunks():
            self.An[r0: r0 + a.shape[0]] = np.linalg.norm(a, axis=1)
            if self.dom.centred:
                if self.lo is not None:  # the sums of the exact rows A + lo
                    a = np.concatenate([a, self.lo[r0: r0 + a.shape[0]]], axis=1)
                self.row_sums[r0: r0 + a.shape[0]] = a.sum(axis=1)
                self.row_sums_err[r0: r0 + a.shape[0]] = gamma(a.shape[1]) * np.abs(a).sum(axis=1) + a.shape[1] * ETA
        # |fl(u - c) - (u - c)| <= u |fl(u - c)| elementwise (one rounding), so a shifted-row dot carries an
        # extra relative u of ||a|| ||x|| on top of the dot product's own gamma_d. ``norms`` bounds the exact
        # rows' norms (the residual included); ``fold_err`` the part of a logit's error at ||x|| = 1 and
        # ``bias_size`` the exact bias's size.
        self.norms = (self.An + self.Ln + self.rerr) * (1.0 + gamma(self.d + 2)) + (self.d + 2) * ETA
        self.fold_err = (gamma(self.d + 2) * self.Ln + self.rerr) * (1 + 4 * U)
        self.bias_size = (np.abs(self.bias) + np.abs(self.blo) + self.berr) * (1 + 4 * U)
        # The float32 competitor passes see the bias less a common shift (which changes no comparison), so that
        # a large common part (a common offset folded through ln_b) does not drown their error bounds; the
        # shift's own rounding is bias_c_err per logit.
        ref = float(np.median(self.bias)) if self.V else 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            self.bias_c = self.bias - ref
            self.bias_c_err = float(U * np.max(np.abs(self.bias_c), initial=0.0)) * (1 + 4 * U)

    # ------------------------------------------------------------------ witnesses
    def witnesses(self, tokens: np.ndarray, X: np.ndarray, batch: int | None = None) -> list[WitnessCheck]:
        """Verify witnesses ``X[i]`` for tokens ``tokens[i]`` over all V logits (batched, pruned; ``batch``
        witnesses per float32 competitor pass, default ``self.batch``: the scan sizes it from its budget)."""
        batch = self.batch if batch is None else int(batch)
        tokens = np.asarray(tokens, dtype=np.int64)
        X = np.asarray(X, dtype=np.float64).reshape(len(tokens), self.d)
        out: list[WitnessCheck | None] = [None] * len(tokens)
        for i in range(len(tokens)):
            ok, msg = self.dom.contains(X[i])
            if not ok:
                out[i] = WitnessCheck(False, float("nan"), float("nan"), -1, msg)
        idx = np.array([i for i in range(len(tokens)) if out[i] is None], dtype=np.int64)
        if idx.size == 0:
            return out  # type: ignore[return-value]
        t_all, Xv = tokens[idx], X[idx]
        xn = self._xnorm(Xv)
        own = np.einsum("ij,ij->i", self.A[t_all], Xv) + self.bias[t_all]
        order = np.argsort(-own, kind="stable")  # batches of similar own logit prune together
        for b0 in range(0, idx.size, batch):
            sel = order[b0: b0 + batch]
            self._witness_batch(idx[sel], t_all[sel], Xv[sel], xn[sel], own[sel], out)
        return out  # type: ignore[return-value]

    def _xnorm(self, X: np.ndarray) -> np.ndarray:
        """Rigorous upper bounds of the points' norms."""
        return np.linalg.norm(X, axis=1) * (1.0 + gamma(self.d + 1)) + (self.d + 1) * ETA

    def self_witnesses(self, tokens: np.ndarray, points, chunk: int = 4096) -> list[WitnessCheck]:
        """As :meth:`witnesses` for ``X = points(ids)`` (chunks of ``tokens``), for witnesses that are mostly
        multiples of their own rows (the screens' self-directions): their competitors are bounded by one
        symmetric pass of the verifier's own (``engine.verify_sym``) and rescored in float64; the others,
        and every column that pass cannot settle, are checked as :meth:`witnesses` does. The points are
        asked for in chunks, so all V of them are never held at once."""
        tokens = np.asarray(tokens, dtype=np.int64)
        sp = None
        if not self.full and self.V >= PAIRWISE_MIN_V and np.unique(tokens).size == tokens.size:
            sp = verify_sym.self_pairs(self.A, self.bias_c, self.dom.centred, tokens, points, chunk,
                                       fold_extra=lambda xn: self._fold_extra(xn) + self.bias_c_err)
        out: list[WitnessCheck] = []
        for c0 in range(0, tokens.size, chunk):
            ids = tokens[c0: c0 + chunk]
            X = np.asarray(points(ids), dtype=np.float64)
            cols = np.full(ids.size, -1) if sp is None else sp.col[c0: c0 + ids.size].copy()
            if sp is not None:
                cols[~sp.holds_for(self.A, self.dom.centred, ids, X, c0)] = -1
            out.extend(self._self_chunk(ids, X, cols, sp))
        return out

    def _self_chunk(self, ids, X, cols, sp) -> list[WitnessCheck]:
        res: list[WitnessCheck | None] = [None] * ids.size
        fast = np.array([i for i in range(ids.size) if cols[i] >= 0 and self.dom.contains(X[i])[0]], dtype=np.int64)
        mm = None
        if fast.size:
            J = np.concatenate([sp.J_of[c] for c in cols[fast]])
            K = np.repeat(np.arange(fast.size), [sp.J_of[c].size for c in cols[fast]])
            mm = self._min_pairs(J, K, ids[fast], X[fast], self._xnorm(X[fast]))
        if mm is None:
            fast = np.zeros(0, dtype=np.int64)
        else:
            self._conclude(fast, ids[fast], X[fast], mm, res)
        rest = np.setdiff1d(np.arange(ids.size), fast)
        for i, wc in zip(rest, self.witnesses(ids[rest], X[rest]) if rest.size else ()):
            res[i] = wc
        return res  # type: ignore[return-value]

    def _reach(self, xmax: float) -> np.ndarray:
        """Rigorous upper bound of every row's logit at any point of norm <= xmax (Cauchy–Schwarz)."""
        g_d = gamma(self.d + 2) + 2 * U
        with np.errstate(over="ignore", invalid="ignore"):
            r = self.norms * xmax * (1 + g_d + 4 * U) + self.bias + self.blo + self.berr \
                + 4 * U * self.bias_size + 4 * ETA
        return np.where(np.isfinite(r), r, np.inf)

    def _witness_batch(self, pos, ts, Xb, xn, own, out):
        mm = None if self.full or self.V < PAIRWISE_MIN_V else self._pairwise_min(ts, Xb, xn)
        if mm is None:  # exhaustive: every competitor the Cauchy–Schwarz bound cannot drop, in float64
            g_d = gamma(self.d + 2) + 2 * U
            own_err = g_d * self.norms[ts] * xn + 2 * U * np.abs(own) + (self.d + 4) * ETA
            reach = self._reach(float(xn.max()))  # one bound for the whole batch: O(V) memory, not O(V·B)
            cand = np.union1d(np.nonzero(reach >= float((own - own_err).min()))[0], ts)
            mm = self._exact_min(cand, ts, Xb, xn, reach)
        self._conclude(pos, ts, Xb, mm, out)

    # ------------------------------------------------------------------ bounded competitors
    def _pairwise_min(self, ts, Xb, xn):
        """Per token the :class:`Closest` competitor over all V from the verifier's own float32 pass with
        a rigorous error bound: a competitor whose upper bound is below another's lower bound is neither the
        runner-up nor a threat; the rest (usually a handful) are scored in float64. None: no bound here
        (a non-finite float32 value, or too many competitors left) — the caller checks exhaustively."""
        cand = self._candidates(ts, Xb, xn)
        return None if cand is None else self._min_pairs(*cand, ts, Xb, xn)

    def _min_pairs(self, J, K, ts, Xb, xn):
        """Per column k, the :class:`Closest` competitor among the candidate pairs ``(J[p], K[p] = k)`` in
        float64 (None: some column has none)."""
        M, E = self._pair_margins(J, K, ts, Xb, xn)
        order = np.lexsort((M - E, K))  # per token, the smallest bound-adjusted margin first
        first = order[np.unique(K[order], return_index=True)[1]]
        if first.size != len(ts):
            return None
        return [Closest(float(M[i]), float(E[i]), int(J[i])) for i in first]

    def _keys_are_shifted_rows(self) -> bool:
        """The problem's search keys are ``rows − center`` computed as :class:`ShiftedRows` computes ``A``
        (no projection, no residual added), so their float32 copy is ``A``'s."""
        p = self.p
        return (getattr(p, "keys_are_shifted_rows", False) and p.keys.shape == tuple(p.rows.shape)
                and np.array_equal(p.center, self.c))

    def _candidates(self, ts, Xb, xn):
        """Pairs (j, k) whose logit may be the largest competitor of token ``ts[k]`` at ``z_k`` (z = x; layernorm
        z = P x). One fused float32 pass ``A32 x32 + b32`` over [V, B]; every logit is within ``E_k`` of its
        float32 value (inputs rounded to float32, Higham's bound for any order, the bias add, float32
        underflow, layernorm's ``s_j sum(x) / d``, all bounded by the largest row), so a row more than ``2 E_k``
        below the column's best competitor is out."""
        if torch.get_float32_matmul_precision() != "highest":
            return None  # float32 GEMMs may then run in reduced precision: the bound assumes IEEE float32
        if self.A32 is None:
            with np.errstate(over="ignore"):
                if self._keys_are_shifted_rows():  # the same float32 values: share the problem's copy
                    A32 = torch.from_numpy(self.p.search_keys32())
                else:
                    A32 = torch.empty((self.V, self.d), dtype=torch.float32)
                    for r0, a in self.A.chunks():
                        A32[r0: r0 + a.shape[0]] = torch.from_numpy(a.astype(np.float32))
                b32 = torch.from_numpy(self.bias_c.astype(np.float32))
            # by row blocks: torch.isfinite of the whole [V, d] array costs ~7 bytes per entry of temporaries
            # (1.1 GiB at 262144 x 640, measured: the scan's peak)
            finite = all(bool(torch.isfinite(A32[r0: r0 + 8192]).all()) for r0 in range(0, self.V, 8192)) \
                and bool(torch.isfinite(b32).all())
            self.A32 = (A32, b32) if finite else False
        if self.A32 is False:
            return None
        A32, b32 = self.A32
        with np.errstate(over="ignore", invalid="ignore"):
            X32 = Xb.astype(np.float32)
        if not np.all(np.isfinite(X32)):
            return None
        base = torch.addmm(b32[:, None], A32, torch.from_numpy(X32).T)
        base[torch.from_numpy(ts), torch.arange(len(ts))] = float("-inf")  # the token itself is no competitor
        top = base.max(dim=0).values
        if not bool(torch.isfinite(top).all()):
            return None
        E = torch.from_numpy(self._column_error(Xb, xn)).float()
        near = base >= (top - 2 * E)[None, :]
        del base
        # counted before they are listed: when the bound prunes little, the [V, B] pairs' indices would be
        # the largest allocation of the scan (two int64 per pair)
        if int(near.sum()) > 8 * len(ts) + self.V // 4:
            return None
        J, K = torch.nonzero(near, as_tuple=True)
        return J.numpy().astype(np.int64), K.numpy().astype(np.int64)

    def _column_error(self, Xb, xn) -> np.ndarray:
        """``E_k`` >= |fl32(A32 x32 + b32)_jk − A_j·z_k − b_j| for every j (float64, rounded up generously)."""
        u, d = 2.0**-24, self.d
        an, bn = float(self.An.max()), float(np.abs(self.bias_c).max())
        size = an * xn + bn  # >= |logit| and |float32 logit| up to the bound itself
        E = verify_sym.dot_error32(d) * an * xn + 4 * u * (size + bn) + 2.0**-148 * (math.sqrt(d) * (an + xn) + d + 2)
        E += self._fold_extra(xn) + self.bias_c_err  # the fold's residual and the shift's rounding
        if self.dom.centred:
            sig = np.abs(Xb.sum(axis=1)) + gamma(d) * np.abs(Xb).sum(axis=1) + d * ETA
            E += float(np.max(np.abs(self.row_sums) + self.row_sums_err)) * sig / d * (1 + 8 * U)
        return E * (1 + 2.0**-20) + 2.0**-140

    def _fold_extra(self, xn):
        """``>= |(lo_j + e_j)·z| + |blo_j| + berr_j`` for every j at points of norm ``xn``: what a pass over the
        rounded rows and bias misses of the exact logits (0 when the fold is exact)."""
        if self.lo is None and not self.rerr.any() and not self.blo.any() and not self.berr.any():
            return 0.0 * xn
        lm = float(np.max(self.Ln + self.rerr))
        bm = float(np.max(np.abs(self.blo) + self.berr))
        return (lm * xn + bm) * (1 + 8 * U) + 4 * ETA

    def _centred_terms(self, rows, sig, sig_err):
        """layernorm: ``A_j·P x = A_j·x - s_j sum(x) / d`` — per pair, the correction ``s_j sum(x) / d`` for
        rows ``rows`` and the points' sums ``sig`` (error ``sig_err``), and its error bound (row sums carry
        their own)."""
        s, s_err = self.row_sums[rows], self.row_sums_err[rows]
        corr = s * sig / self.d
        err = ((np.abs(s) + s_err) * (np.abs(sig) + sig_err) - np.abs(s) * np.abs(sig)) / self.d
        return corr, err + 4 * U * np.abs(corr) + 4 * ETA

    def _pair_margins(self, J, K, ts, Xb, xn, chunk: int = 8192):
        """``M[p] = l_t(z_k) - l_j(z_k)`` and allowance ``E[p]`` for pairs ``p = (J[p], K[p])``, in float64."""
        d = self.d
        g_d = gamma(d + 2) + 2 * U
        G = np.concatenate([np.einsum("ij,ij->i", self.A[J[c: c + chunk]], Xb[K[c: c + chunk]])
                            for c in range(0, J.size, chunk)] or [np.zeros(0)])
        Gt = np.einsum("ij,ij->i", self.A[ts], Xb)[K]
        Bt, bc = self.bias[ts][K], self.bias[J]
        with np.errstate(over="ignore", invalid="ignore"):
            db, db_err = _two_diff(Bt, bc)  # the bias difference exactly (large equal biases cancel)
            M = ((Gt - G) + db_err) + db
            E = g_d * (self.norms[J] + self.norms[ts][K]) * xn[K]
            E += 4 * U * (np.abs(G) + np.abs(Gt) + np.abs(db) + np.abs(M)) + (2 * d + 16) * ETA
            if self.lo is not None:  # the exact rows' residual, in the margin (its own rounding is in fold_err)
                gl = np.concatenate([np.einsum("ij,ij->i", self.lo[J[c: c + chunk]], Xb[K[c: c + chunk]])
                                     for c in range(0, J.size, chunk)] or [np.zeros(0)])
                M += np.einsum("ij,ij->i", self.lo[ts], Xb)[K] - gl
            M, E = self._fold_terms(M, E, ts[K], J, xn[K])
            if self.dom.centred:
                sig = Xb.sum(axis=1)
                sig_err = gamma(d) * np.abs(Xb).sum(axis=1) + d * ETA
                ct, et = self._centred_terms(ts[K], sig[K], sig_err[K])
                cj, ej = self._centred_terms(J, sig[K], sig_err[K])
                corr = ct - cj
                M -= corr
                E += et + ej + 4 * U * np.abs(corr)
        bad = ~(np.isfinite(M) & np.isfinite(E))
        M[bad], E[bad] = -np.inf, np.inf  # an overflowing comparison proves nothing
        return M, E

    def _fold_terms(self, M, E, t, j, xn):
        """Margins and allowances of pairs (t, j) (broadcast) with the fold's bias residual added and its
        remaining error allowed for (``fold_err``, ``berr``); unchanged when the fold is exact."""
        if self.lo is None and not (self.rerr.any() or self.blo.any() or self.berr.any()):
            return M, E
        dbl = self.blo[t] - self.blo[j]
        M = M + dbl
        E = E + (self.fold_err[t] + self.fold_err[j]) * xn + self.berr[t] + self.berr[j]
        E = E + 4 * U * (np.abs(dbl) + np.abs(M)) + 4 * ETA
        return M, E

    # Witnesses per batch re-checked difference-first when the a-priori allowance was too coarse, and the work
    # that may cost (V d per witness): a few at GPT-2 size, all of them on small heads.
    REFINE_MAX, REFINE_WORK = 64, 2e8

    def _refine(self, t: int, x: np.ndarray):
        """The :class:`Closest` competitor of token t at x over all V, difference first:
        ``l_t − l_j = (A_t − A_j)·z + (lo_t − lo_j)·z + (b_t − b_j)``, so the allowance scales with
        ``|A_t − A_j|`` (0 for equal rounded rows) rather than with ``|A_t| + |A_j|``: near-duplicate rows and
        rows that the fold rounded together are told apart. O(V d) per witness."""
        d, best = self.d, Closest(math.inf, 0.0, -1)
        absx, xn = np.abs(x), float(self._xnorm(x[None, :])[0])
        sig = float(x.sum())
        sig_err = gamma(d) * float(absx.sum()) + d * ETA
        for r0, a in self.A.chunks():
            with np.errstate(over="ignore", invalid="ignore"):
                D = self.A[t] - a  # one rounding per entry: |err| <= u |D|
                ids = np.arange(r0, r0 + a.shape[0])
                if self.lo is not None:
                    L = self.lo[t] - self.lo[ids]
                    D2 = D + L  # the exact row difference, rounded once more
                    err_rows = U * (np.abs(D) + np.abs(D2)) + U * np.abs(L)
                    D = D2
                else:
                    err_rows = U * np.abs(D)
                aD = np.abs(D) + err_rows
                M = D @ x
                E = gamma(d + 2) * (aD @ absx) + (err_rows @ absx) + (d + 4) * ETA
                if self.dom.centred:  # z = P x: subtract (sum D)(sum x) / d
                    sD = D.sum(axis=1)
                    sD_err = gamma(d) * aD.sum(axis=1) + err_rows.sum(axis=1) + d * ETA
                    corr = sD * sig / d
                    M = M - corr
                    E += ((np.abs(sD) + sD_err) * (abs(sig) + sig_err) - np.abs(sD) * abs(sig)) / d \
                        + 4 * U * np.abs(corr) + 4 * ETA
                db, de = _two_diff(self.bias[t], self.bias[ids])
                M = (M + de) + db
                E += 4 * U * (np.abs(M) + np.abs(db)) + 4 * ETA
                M, E = self._fold_terms(M, E, t, ids, xn)
            bad = ~(np.isfinite(M) & np.isfinite(E))
            M[bad], E[bad] = -math.inf, math.inf  # an overflowing comparison proves nothing
            if r0 <= t < r0 + a.shape[0]:
                M[t - r0], E[t - r0] = math.inf, 0.0  # t is not its own competitor
            i = int(np.argmin(M - E))
            if M[i] - E[i] < best.proven:
                best = Closest(float(M[i]), float(E[i]), r0 + i)
        return best

    def _conclude(self, pos, ts, Xb, mm, out):
        fails = [k for k in range(len(ts)) if math.isfinite(mm[k].margin) and mm[k].margin > 0 >= mm[k].proven]
        fails = fails[: int(min(self.REFINE_MAX, self.REFINE_WORK // max(1, self.V * self.d)))]
        if fails:
            mm = list(mm)
            for k in fails:
                mm[k] = self._refine(int(ts[k]), np.asarray(Xb[k], dtype=np.float64))
        for k in range(len(ts)):
            m_k, e_k, w = mm[k].margin, mm[k].allowance, mm[k].runner_up
            if not (math.isfinite(m_k) and math.isfinite(e_k)):
                out[pos[k]] = WitnessCheck(False, float("nan"), float("nan"), -1,
                                           "non-finite intermediate: no proof")
                continue
            scale = 1.0
            if not self.dom.bounded:
                scale = float(self.A[ts[k]] @ Xb[k])  # normalisation (u_t - c)·x = 1
                if not scale > 0:
                    out[pos[k]] = WitnessCheck(False, float("nan"), float("nan"), w, "(u_t - c)·x <= 0")
                    continue
            ok = (m_k - e_k) > 0.0
            out[pos[k]] = WitnessCheck(bool(ok), (m_k - e_k) / scale, e_k / scale, w,
                                       "" if ok else f"token {w} reaches {m_k:.6g} (allowance {e_k:.3g})")

    def _exact_min(self, cand, ts, Xb, xn, reach):
        """Per token the :class:`Closest` competitor over all V: rows outside ``cand`` whose reach could
        exceed the best competitor found are scored too (then no skipped row can be the runner-up)."""
        best = self._closest(cand, ts, Xb, xn)
        out_rows = np.setdiff1d(np.arange(self.V), cand, assume_unique=True)
        if out_rows.size == 0:
            return best
        with np.errstate(invalid="ignore"):
            top = self._own(ts, Xb) - np.array([b.margin for b in best])  # best competitor's logit, about
            thr = float(np.min(top)) - max(b.allowance for b in best)
        extra = out_rows if not math.isfinite(thr) else out_rows[reach[out_rows] >= thr]
        if extra.size == 0:
            return best
        best2 = self._closest(extra, ts, Xb, xn, self_in=False)
        return [b2 if b2.proven < b.proven else b for b, b2 in zip(best, best2)]

    def _closest(self, cand, ts, Xb, xn, self_in: bool = True, block_bytes: int = 16 * 2**20) -> list[Closest]:
        """Per column the :class:`Closest` row of ``cand``: the smallest bound-adjusted margin ``M − E`` of
        :meth:`_margins` (the first row of the smallest, as one argmin over all of them), computed from blocks
        of ``cand`` (about ``block_bytes`` per float64 ``[rows, B]`` array), so the ``[|cand|, B]`` margins,
        up to all V rows, never exist whole."""
        B = len(ts)
        cols = np.arange(B)
        best_v, best_m, best_e = np.full(B, np.inf), np.full(B, np.inf), np.zeros(B)
        best_j = np.full(B, -1, dtype=np.int64)
        step = max(256, block_bytes // (8 * max(B, 1)))
        for c0 in range(0, cand.size, step):
            c = cand[c0: c0 + step]
            M, E = self._margins(c, ts, Xb, xn, self_in=False)
            if self_in:  # the token's own row is no competitor
                r, k = np.nonzero(c[:, None] == ts[None, :])
                M[r, k], E[r, k] = np.inf, 0.0
            with np.errstate(invalid="ignore"):
                w = np.argmin(M - E, axis=0)
                v = M[w, cols] - E[w, cols]
                upd = v < best_v
            best_v[upd], best_m[upd], best_e[upd], best_j[upd] = v[upd], M[w, cols][upd], E[w, cols][upd], c[w][upd]
        return [Closest(float(best_m[k]), float(best_e[k]), int(best_j[k]) if np.isfinite(best_m[k]) else -1)
                for k in cols]

    def _own(self, ts, Xb):
        return np.einsum("ij,ij->i", self.A[ts], Xb) + self.bias[ts]

    def _margins(self, cand, ts, Xb, xn, self_in: bool = True):
        """``M[i, k] = l_t(x_k) - l_{cand[i]}(x_k)`` and its allowance ``E`` (the self entry: +inf, 0)."""
        d = self.d
        g_d = gamma(d + 2) + 2 * U
        # The one heavy product: float64 GEMM through torch (numpy's OpenBLAS threads would compete with torch's).
        Xt = torch.from_numpy(np.ascontiguousarray(Xb)).T
        G = np.concatenate([(torch.from_numpy(self.A[cand[c0: c0 + 8192]]) @ Xt).numpy()
                            for c0 in range(0, cand.size, 8192)] or [np.zeros((0, len(ts)))])  # [|C|, B]
        Gt = np.einsum("ij,ij->i", self.A[ts], Xb)
        Bt, bc = self.bias[ts], self.bias[cand]
        with np.errstate(over="ignore", invalid="ignore"):
            db, db_err = _two_diff(Bt[None, :], bc[:, None])  # the bias difference exactly
            M = ((Gt[None, :] - G) + db_err) + db
            E = g_d * (self.norms[cand][:, None] + self.norms[ts][None, :]) * xn[None, :]
            E += 4 * U * (np.abs(G) + np.abs(Gt)[None, :] + np.abs(db) + np.abs(M))
            E += (2 * d + 16) * ETA  # products and sums that underflow
            if self.lo is not None:  # the exact rows' residual, in the margin (its own rounding is in fold_err)
                M += np.einsum("ij,ij->i", self.lo[ts], Xb)[None, :] - self.lo[cand] @ Xb.T
            M, E = self._fold_terms(M, E, ts[None, :], cand[:, None], xn[None, :])
            if self.dom.centred:
                self._centred_correction(M, E, cand, ts, Xb)
        if self_in:
            sp = np.searchsorted(cand, ts)
            M[sp, np.arange(len(ts))] = np.inf
            E[sp, np.arange(len(ts))] = 0.0
        bad = ~(np.isfinite(M) & np.isfinite(E))
        if self_in:
            bad[sp, np.arange(len(ts))] = False
        M[bad], E[bad] = -np.inf, np.inf  # an overflowing comparison proves nothing
        return M, E

    def _centred_correction(self, M, E, cand, ts, Xb):
        """layernorm certifies z = P x: l_t(z) - l_j(z) = (a_t - a_j)·x - (s_t - s_j) sum(x) / d."""
        d = self.d
        sig = Xb.sum(axis=1)
        sig_err = gamma(d) * np.abs(Xb).sum(axis=1) + d * ETA
        ds = self.row_sums[ts][None, :] - self.row_sums[cand][:, None]
        corr = ds * sig[None, :] / d
        M -= corr
        s_abs = np.abs(self.row_sums[ts])[None, :] + np.abs(self.row_sums[cand])[:, None]
        s_err = self.row_sums_err[ts][None, :] + self.row_sums_err[cand][:, None]
        E += ((s_abs + s_err) * (np.abs(sig) + sig_err)[None, :] - s_abs * np.abs(sig)[None, :]) / d
        E += 4 * U * np.abs(corr) + 4 * ETA

    def witness(self, t: int, x: np.ndarray) -> WitnessCheck:
        return self.witnesses(np.array([t]), np.asarray(x, dtype=np.float64)[None, :])[0]

    # ------------------------------------------------------------------ certificates
    def certificate(self, t: int, cert: Certificate) -> CertificateCheck:
        """A dual certificate (bounded domains), a Gordan certificate (cone), or with ``cert.zero`` the
        Gordan certificate of a "margin exactly 0" claim in a bounded domain with constant bias."""
        comp = np.asarray(cert.competitors, dtype=np.int64)
        lam = np.asarray(cert.weights, dtype=np.float64)
        if comp.ndim != 1 or lam.shape != comp.shape or comp.size == 0:
            return _fail("certificate needs matching non-empty competitors and weights")
        if np.any(comp < 0) or np.any(comp >= self.V) or np.any(comp == t):
            return _fail("certificate names an invalid competitor (out of range or t itself)")
        if len(np.unique(comp)) != comp.size:
            return _fail("certificate repeats a competitor")
        if not np.all(np.isfinite(lam)) or np.any(lam < 0) or not lam.sum() > 0:
            return _fail("certificate weights must be finite, >= 0 and not all 0")
        if cert.zero:
            if not self.dom.bounded or not self.p.constant_bias:
                return _fail("margin exactly 0 needs a bounded domain and a constant bias")
            chk = self._gordan(t, comp, lam, cert.mu, self.dom.null_directions(self.d))
            return CertificateCheck(chk.ok, chk.deficit, 0.0 if chk.ok else None, chk.message, exact=chk.exact)
        if not self.dom.bounded:
            return self._gordan(t, comp, lam, cert.mu, np.zeros((self.d, 0)))
        chk = self._dual_certificate(t, comp, lam)
        if chk.ok or not (chk.deficit + 2 * chk.allowance >= 0):  # proven, or clearly negative: exact cannot help
            return chk
        return self._dual_exact(t, comp, lam, chk)

    def exact_weights(self, t: int, cert: Certificate, w: list) -> CertificateCheck:
        """A certificate with exact rational weights ``w`` (one per competitor), checked as stated in rationals
        from the head as given: deficit ``>= 0`` (cone: ``r = 0``; ``cert.zero``: a constant bias and ``r`` in
        the span of the null directions)."""
        comp = np.asarray(cert.competitors, dtype=np.int64)
        if comp.ndim != 1 or comp.size == 0 or len(w) != comp.size or np.any(comp < 0) or np.any(comp >= self.V) \
                or np.any(comp == t) or np.unique(comp).size != comp.size:
            return _fail("exact weights need distinct valid competitors, one weight each")
        w = [Fraction(v) for v in w]
        if any(v < 0 for v in w) or not sum(w) > 0 or comp.size * self.d > exact.MAX_ENTRIES:
            return _fail("exact weights must be >= 0, not all 0, and of a checkable size")
        r, c0 = exact.combination(self.p, t, comp, w)
        ws = sum(w, Fraction(0))
        if cert.zero or not self.dom.bounded:
            if cert.zero and not (self.dom.bounded and self.p.constant_bias):
                return _fail("margin exactly 0 needs a bounded domain and a constant bias")
            F = self.dom.null_directions(self.d)
            ok = all(v == 0 for v in r) or (F.shape[1] == 1 and len(set(r)) == 1)
            return CertificateCheck(ok, 0.0, 0.0 if ok else None, "" if ok else "the exact residual is not 0",
                                    exact=(comp, [v / ws for v in w]) if ok else None)
        sign, lo = exact.deficit_sign(self.p, r, c0)
        if sign < 0:
            return _fail("the exact deficit is negative")
        dl = exact._down(Fraction(lo) / ws) if lo > 0 else 0.0
        return CertificateCheck(True, dl, -dl, "proven in exact rational arithmetic", exact=(comp, [v / ws for v in w]))

    # Exact proofs are tried for certificates within their float allowance of deciding, at these sizes and
    # within this much time per certificate (past it: no proof, never a verdict).
    EXACT_TIME_S = 5.0

    def _dual_exact(self, t, comp, lam, chk) -> CertificateCheck:
        """A dual certificate the float check could not settle, in exact rationals from the head as given:
        first the weights as given (``δ > 0``), then the support-restricted exact solve for weights ``w`` with
        ``Σ w_j (ũ_j − ũ_t) = 0`` (up to null directions) and ``Σ w_j (b̃_j − b̃_t) >= 0``: deficit >= 0, so t
        can at best tie (margin exactly 0 when equality holds)."""
        if comp.size * self.d > exact.MAX_ENTRIES:
            return chk
        deadline = time.monotonic() + self.EXACT_TIME_S
        w = [Fraction(float(v)) for v in lam]
        r, c0 = exact.combination(self.p, t, comp, w)
        sign, lo = exact.deficit_sign(self.p, r, c0)
        ls = sum(w, Fraction(0))
        if sign > 0:
            dl = exact._down(Fraction(lo) / ls) if lo > 0 else 0.0
            return CertificateCheck(True, dl, -dl, "proven in exact rational arithmetic")
        if sign == 0:  # deficit exactly 0: t can at best tie; the weights as given are the exact proof
            return CertificateCheck(True, 0.0, 0.0, "proven in exact rational arithmetic (deficit exactly 0)",
                                    exact=(comp, [v / ls for v in w]))
        F = self.dom.null_directions(self.d)
        for attempt in range(2):
            found = exact.null_weights(self.p, t, comp, lam, F, deadline) if attempt == 0 else \
                self._sparse_null(t, F, deadline, bias=True)
            if found is None:
                continue
            S, w = found
            _, c0 = exact.combination(self.p, t, S, w)
            if c0 >= 0:
                break
        else:
            return chk
        dl = exact._down(c0)
        return CertificateCheck(True, dl, -dl, "proven in exact rational arithmetic (deficit >= 0: t can at most tie)",
                                exact=(S, w))

    def _dual_certificate(self, t, comp, lam) -> CertificateCheck:
        m = comp.size
        As = self.A[comp]
        lam_sum = float(lam.sum())
        lam_sum_hi = lam_sum * (1 + gamma(m))
        with np.errstate(over="ignore", invalid="ignore"):
            # r = sum_j lam_j (a_j - a_t), elementwise error bound er (dot of length m+1, plus shift rounding).
            r = lam @ As - lam_sum * self.A[t]
            absum = lam @ np.abs(As) + lam_sum_hi * np.abs(self.A[t])
            er = (gamma(m + 2) + 2 * U) * absum * (1 + 4 * U) + (m + 2) * ETA
            if self.lo is not None:  # the exact rows' residual in r, and the rounding of adding it
                rl = lam @ self.lo[comp] - lam_sum * self.lo[t]
                er = er + gamma(m + 2) * (lam @ np.abs(self.lo[comp]) + lam_sum_hi * np.abs(self.lo[t])) * (1 + 4 * U)
                r = r + rl
                er = er + U * np.abs(r) + ETA
            db, de = _two_diff(self.bias[comp], self.bias[t])  # b_j - b_t exactly: large equal biases cancel
            c0 = float(lam @ db + lam @ de)
            c0_err = gamma(m + 2) * float(lam @ (np.abs(db) + np.abs(de))) * (1 + 4 * U) + (m + 2) * ETA
            if self.blo.any() or self.berr.any() or self.rerr.any():  # the bias residual; what it misses
                cl = float(lam @ self.blo[comp] - lam_sum * self.blo[t])
                c0_err += gamma(m + 2) * float(lam @ np.abs(self.blo[comp]) + lam_sum_hi * abs(self.blo[t])) \
                    + float(lam @ self.berr[comp] + lam_sum_hi * self.berr[t]) + U * abs(c0 + cl) + ETA
                c0 = c0 + cl
                # rows' residual e_j (||e_j||_1 <= rerr_j): sup_X |e·x| <= ||e||_1 max|x_i| <= ||e||_1 radius
                c0_err += float(lam @ self.rerr[comp] + lam_sum_hi * self.rerr[t]) * self.dom.radius
                c0_err *= 1 + 8 * U
            sup = self.dom.support_upper(r, er)
            deficit_lo = (c0 - c0_err) - sup
            slack = c0_err + 4 * U * (abs(c0) + sup) + 4 * ETA
            deficit_lo -= 4 * U * (abs(c0) + sup) + 4 * ETA
        if not _finite(r, er, c0, c0_err, sup, deficit_lo):
            return _fail("non-finite intermediate in the deficit: no proof")
        ok = deficit_lo > 0
        # m_t <= -deficit/sum(lambda): divide by the sum's upper bound when the deficit is positive, lower
        # bound otherwise, so the reported margin_upper is an upper bound either way.
        lam_sum_lo = lam_sum * (1 - gamma(m))
        deficit = deficit_lo / lam_sum_hi if ok else deficit_lo / lam_sum_lo
        allowance = (slack + self.dom.radius * float(np.sum(er))) / lam_sum_lo
        return CertificateCheck(bool(ok), float(deficit), float(-deficit),
                                "" if ok else f"deficit {deficit_lo:.6g} is not positive", allowance=float(allowance))

    def _gordan(self, t, comp, lam, mu, F) -> CertificateCheck:
        if mu is None or not np.isfinite(mu):
            return _fail("a Gordan certificate needs a finite normalisation multiplier mu <= 0")
        mu = min(float(mu), 0.0)  # mu only guides the weights; a rounding-noise mu > 0 means 0
        chk = self._gordan_float(t, comp, lam, mu, F)
        if chk.ok:
            return chk
        # Degenerate supports (an edge point, rows equal after projection) defeat the float64 solve: settle
        # them exactly in rationals on the certificate's own support (the LP's active set first, more of
        # its rows only if needed; never all V: that grows cubically), within a time bound. The proven
        # bound is then 0, not mu.
        pos = lam > 0
        deadline = time.monotonic() + self.EXACT_TIME_S
        found = exact.null_weights(self.p, t, comp[pos], lam[pos], F, deadline)
        if found is None:  # mu < 0 spreads the proof over other rows: find a small support by a float LP
            found = self._sparse_null(t, F, deadline, bias=False)
        if found is not None:
            return CertificateCheck(True, 0.0, 0.0, "proven in exact rational arithmetic", exact=found)
        return chk

    SPARSE_LP_ENTRIES = 4_000_000  # the support-finding LP's size limit (rows × d)

    def _sparse_null(self, t, F, deadline, bias: bool):
        """A support of at most ``d' + 1`` rows whose convex combination meets ``ũ_t`` (up to F; with ``bias``
        also ``Σ w_j (b̃_j − b̃_t) >= 0``), from a float feasibility LP over all rows (a vertex of it has
        that few nonzeros), then the exact solve on it. None: no proof."""
        from unspeakable.engine.highs import lp_exponent, solve_lp

        if self.V * self.d > self.SPARSE_LP_ENTRIES or time.monotonic() > deadline:
            return None
        pool = np.setdiff1d(np.arange(self.V), [t])
        K = self.p.keys  # P(rows − c): a combination meeting u_t up to F is one meeting P u_t
        D = (K[pool] - K[t]).T  # [d, n]
        # rows D w = 0 and the bias row (>= 0) each scaled by a power of two (the same w): what HiGHS takes
        scaled = lambda a: np.ldexp(a, -lp_exponent(abs_max(a)))  # noqa: E731
        A = np.vstack([scaled(D), np.ones((1, pool.size))]
                      + ([scaled(self.bias[pool] - self.bias[t])[None, :]] if bias else []))
        lo_r = np.concatenate([np.zeros(self.d), [1.0]] + ([[0.0]] if bias else []))
        hi_r = np.concatenate([np.zeros(self.d), [1.0]] + ([[np.inf]] if bias else []))
        res = solve_lp(np.zeros(pool.size), A, lo_r, hi_r, np.zeros(pool.size), np.full(pool.size, np.inf),
                       sense="min", time_limit=max(0.1, deadline - time.monotonic()))
        if not res.success or res.x is None:
            return None
        w = np.asarray(res.x)
        sup = np.nonzero(w > 1e-12 * float(w.max(initial=0.0)))[0]
        if sup.size == 0:
            return None
        return exact.null_weights(self.p, t, pool[sup], w[sup], F, deadline)

    def _gordan_float(self, t, comp, lam, mu, F) -> CertificateCheck:
        hi, lo = np.full(self.d, -np.inf), np.full(self.d, np.inf)  # coordinates where the rows differ at all
        for _, a in row_chunks(self.rows):
            hi, lo = np.maximum(hi, a.max(axis=0, initial=-np.inf)), np.minimum(lo, a.min(axis=0, initial=np.inf))
        keep = np.nonzero(hi != lo)[0] if self.V else np.zeros(0, dtype=np.int64)
        if self.lo is not None or self.rerr.any():
            keep = np.arange(self.d)  # the exact rows may differ where the rounded ones agree
        A, F = KeptColumns(self.A, keep), F[keep]
        w = np.full(self.V, abs(mu) / self.V)  # dense weights over all j != t (module docstring)
        w[comp] += lam
        w[t] = 0.0
        W = float(w.sum())
        # w @ A and w @ |A| in row chunks (no V × d copy of A or |A|): a sum of V products in another order,
        # which the gamma(V + 2) bound covers as it covers any order
        wA, wabsA = _weighted_sums(w, ((r0, a[:, keep]) for r0, a in self.A.chunks()), keep.size)
        e = wA - W * A[t]
        e_err = (gamma(self.V + 2) + 2 * U) * (wabsA + W * (1 + gamma(self.V)) * np.abs(A[t])) * (1 + 4 * U)
        if self.lo is not None:  # the exact rows' residual: in e, with its rounding
            L = KeptColumns(self.lo, keep)
            wL, wabsL = _weighted_sums(w, ((r0, self.lo[r0: r0 + 8192][:, keep]) for r0 in range(0, self.V, 8192)),
                                       keep.size)
            e = e + (wL - W * L[t])
            e_err = e_err + (gamma(self.V + 2) + 2 * U) * (wabsL + W * np.abs(L[t])) * (1 + 4 * U) \
                + U * np.abs(e) + ETA
        if self.rerr.any():  # ||e_j||_1 <= rerr_j bounds every entry of e_j
            e_err = e_err + float(w @ self.rerr + W * self.rerr[t]) * (1 + 4 * U)
        if F.shape[1]:
            # The part of e along the null directions costs nothing (theta is free): take it out first, so
            # the bound below is on what the weights must correct, not on theta.
            Ft = F @ np.linalg.lstsq(F, e, rcond=None)[0]
            e = e - Ft
            e_err = e_err + U * (np.abs(e) + np.abs(Ft)) * (1 + 4 * U) + gamma(F.shape[1] + 2) * np.abs(Ft)
        e_inf = (float(np.max(np.abs(e) + e_err, initial=0.0)) + (self.V + 2) * ETA) * (1 + 2 * U)
        if not _finite(e, e_err, e_inf):
            return _fail("non-finite residual: no proof")
        if keep.size == 0:  # all rows identical: every token ties everywhere
            return CertificateCheck(True, float(w.max()), float(mu))
        basis = self._gordan_basis(t, comp, lam, A, F)
        if basis is None:
            return _fail("no nonsingular basis of competitor rows")
        M = np.concatenate([(A[basis] - A[t]).T, F], axis=1)  # square, columns u_j - u_t, then F
        M_err = np.concatenate([U * (np.abs(A[basis]) + np.abs(A[t])).T * (1 + 4 * U), np.zeros_like(F)], axis=1)
        M_err += U * np.abs(M) + ETA
        if self.lo is not None or self.rerr.any():  # the exact rows differ from A by the fold's residual
            n_b = basis.size
            R = np.zeros_like(M_err)
            if self.lo is not None:
                R[:, :n_b] += (np.abs(self.lo[basis][:, keep]) + np.abs(self.lo[t][keep])).T
            R[:, :n_b] += (self.rerr[basis] + self.rerr[t])[None, :]
            M_err += R * (1 + 4 * U)
        bound = _solve_bound(M, M_err, e_inf)
        if bound is None:
            return _fail("verified solve failed: the basis matrix is singular or too ill-conditioned")
        wmin = float(w[basis].min()) if basis.size else math.inf
        ok = bound < wmin
        return CertificateCheck(bool(ok), float(wmin - bound), float(mu) if ok else None,
                                "" if ok else f"correction {bound:.3g} exceeds the smallest basis weight {wmin:.3g}")

    def _gordan_basis(self, t, comp, lam, A, F) -> np.ndarray | None:
        """``d' - f`` competitor rows (largest weights first, completed by pivoted QR) that, with F, span."""
        need = A.shape[1] - F.shape[1]
        if need < 0:
            return None
        order = comp[np.argsort(-lam, kind="stable")]
        D0 = np.concatenate([(A[order] - A[t]).T, F], axis=1)
        basis = _independent(D0, list(range(order.size)), F.shape[1], need)
        chosen = [int(order[i]) for i in basis]
        if len(chosen) < need:
            rest = np.setdiff1d(np.arange(self.V), np.concatenate([chosen, [t]]).astype(np.int64))
            D = np.concatenate([(A[chosen] - A[t]).T, F, (A[rest] - A[t]).T], axis=1)
            more = _independent(D, list(range(len(chosen) + F.shape[1], D.shape[1])), len(chosen) + F.shape[1],
                                need - len(chosen))
            chosen += [int(rest[i - len(chosen) - F.shape[1]]) for i in more]
        return np.asarray(chosen, dtype=np.int64) if len(chosen) == need else None

    # ------------------------------------------------------------------ ties
    def tie(self, t: int, j: int) -> bool:
        """Identical folded rows and bias, by value (0.0 == -0.0), up to the domain's null directions; the
        cone's bias is zero."""
        if j == t or not (0 <= j < self.V):
            return False
        if self.p.fold_exact:
            if self.bias[t] != self.bias[j]:
                return False
            # Rows that differ along a null direction (layernorm: by a multiple of the all-ones vector) give
            # equal logits at every point of the domain: exact check in rationals.
            return exact.differ_by(self.rows[t], self.rows[j], self.dom.null_directions(self.d))
        # The rounded fold may make different tokens equal (or equal ones different): the head as given decides.
        if not np.array_equal(self.rows[t], self.rows[j]) and not self.dom.null_directions(self.d).shape[1]:
            return False
        rt, rj = exact.problem_rows(self.p, [t, j])
        diff = {a - b for a, b in zip(rt, rj)}
        if not (diff == {0} or (self.dom.null_directions(self.d).shape[1] and len(diff) == 1)):
            return False
        bt, bj = exact.problem_bias(self.p, [t, j])
        return bt == bj


def _two_diff(a, b):
    """``(s, e)`` with ``a − b = s + e`` exactly (Knuth's TwoSum; exact also under underflow). Non-finite
    inputs give non-finite outputs, which the callers refuse."""
    s = a - b
    z = s - a
    e = (a - (s - z)) - (b + z)
    return s, e


def _independent(D: np.ndarray, cols: list[int], n_fixed: int, need: int) -> list[int]:
    """Greedy pivoted Gram–Schmidt: up to ``need`` of ``cols`` (in order of preference) independent of the
    first ``n_fixed`` columns of D and of each other. Returns positions into D's columns."""
    Q = np.zeros((D.shape[0], 0))
    if n_fixed:
        Q, _ = np.linalg.qr(D[:, :n_fixed])
    scale = float(np.max(np.linalg.norm(D, axis=0), initial=0.0)) + 1e-300
    picked: list[int] = []
    for c in cols:
        if len(picked) == need:
            break
        v = D[:, c] - Q @ (Q.T @ D[:, c])
        v = v - Q @ (Q.T @ v)
        n = float(np.linalg.norm(v))
        if n > 1e-10 * scale:
            Q = np.concatenate([Q, (v / n)[:, None]], axis=1)
            picked.append(c)
    return picked


def _solve_bound(M: np.ndarray, M_err: np.ndarray, e_inf: float) -> float | None:
    """A rigorous bound on ``||y||_inf`` for the exact solution of ``M_exact y = -e`` with
    ``|M_exact - M| <= M_err`` and ``||e||_inf <= e_inf``: approximate inverse R, ``alpha = ||I - R M||`` bounded
    rigorously; None when alpha >= 1 (no proof)."""
    n = M.shape[0]
    try:
        R = np.linalg.inv(M)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(R)):
        return None
    absR = np.abs(R)
    # |I - R M_exact| <= |I - fl(RM)| + gamma_n |R||M| + |R| |M_err| (+ rounding of I - fl(RM)).
    res = np.abs(np.eye(n) - R @ M) * (1 + U) + gamma(n + 2) * (absR @ np.abs(M)) * (1 + 4 * U) \
        + (absR @ M_err) * (1 + gamma(n + 2)) + n * ETA
    alpha = float(res.sum(axis=1).max()) * (1 + gamma(n + 2))
    if not alpha < 1.0:
        return None
    inv_norm = float(absR.sum(axis=1).max()) * (1 + gamma(n + 2)) / (1.0 - alpha)
    bound = inv_norm * e_inf * (1 + 4 * U)
    return bound if math.isfinite(bound) else None
