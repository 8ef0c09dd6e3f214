"""Stage 6 — verification. Trusts nothing it checks (DESIGN §2).

Every claim is re-derived from the folded rows ``problem.rows`` / ``problem.bias`` and the domain, in
float64 with an explicit a-priori rounding allowance (Higham's ``gamma_n = n u / (1 - n u)``, ``u = 2^-53``):

* witness ``x`` → the logits of all V tokens at the certified point ``z`` (``z = x``; for ``layernorm``
  ``z = P x``, the exact projection of ``x`` onto 1⊥, so the float sum of ``x`` need not be 0). Proven
  speakable iff ``z`` lies in the domain and ``l_t(z) - l_j(z) > allowance_j`` for every ``j != t``.
  Tokens ``j`` whose Cauchy–Schwarz bound ``||a_j|| ||x|| + b_j`` is below ``l_t`` cannot win and are skipped
  (a rigorous bound, not a heuristic).
* dual certificate ``lambda`` → ``r = sum lambda_j (u_j - u_t)``, ``c0 = sum lambda_j (b_j - b_t)``,
  ``deficit = c0 - sup_X(-r·x)`` with its rounding error subtracted; proven unspeakable iff positive.
* cone certificate ``(lambda, mu)`` → exact membership of ``u_t`` in the convex hull of the other rows:
  the dense weights ``w = lambda + |mu|/V`` make ``e = sum w_j (u_j - u_t)`` vanish up to rounding, and a
  verified linear solve (approximate inverse ``R`` with a rigorous bound on ``||I - R A||``) shows that a
  correction ``dw`` on a basis of d rows with ``||dw||_inf < min w`` cancels ``e`` exactly, so a nonnegative
  nonzero combination of ``u_j - u_t`` is exactly 0 (Gordan): ``t`` can never win strictly.
* tie → an identical folded row (and bias, outside ``cone``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.evidence import Certificate

U = 2.0**-53


def gamma(n: int) -> float:
    nu = n * U
    return nu / (1.0 - nu)


@dataclass
class WitnessCheck:
    ok: bool
    margin: float  # computed margin l_t(z) - max_{j != t} l_j(z) (normalised for cone)
    allowance: float  # rounding allowance subtracted before the sign test
    runner_up: int  # the j attaining the max (-1 if none)
    message: str = ""


@dataclass
class CertificateCheck:
    ok: bool
    deficit: float  # verified lower bound on the deficit (bounded domains) / slack ratio (cone)
    margin_upper: float | None  # upper bound on the margin implied by the certificate, when proven
    message: str = ""


class Verifier:
    """Holds the float64 shifted rows ``A = rows - c`` (any c works: it cancels exactly in l_t - l_j)."""

    def __init__(self, problem):
        self.p = problem
        self.rows = np.ascontiguousarray(problem.rows, dtype=np.float64)
        self.c = np.asarray(problem.center, dtype=np.float64)
        self.A = self.rows - self.c
        self.A_t = torch.from_numpy(self.A)
        # |fl(u - c) - (u - c)| <= u |fl(u - c)| elementwise (one rounding), so a shifted-row dot carries an
        # extra relative u of ||a|| ||x|| on top of the dot product's own gamma_d.
        self.norms = np.linalg.norm(self.A, axis=1) * (1.0 + gamma(self.p.d + 2))
        self.bias = np.asarray(problem.bias, dtype=np.float64)
        self.V, self.d = self.A.shape
        self.layernorm = problem.domain == "layernorm"
        if self.layernorm:
            self.row_sums = self.A.sum(axis=1)
            self.row_sums_err = gamma(self.d) * np.abs(self.A).sum(axis=1)

    # ------------------------------------------------------------------ domain
    def domain_check(self, x: np.ndarray) -> tuple[bool, str]:
        p = self.p
        if x.shape != (self.d,) or not np.all(np.isfinite(x)):
            return False, f"witness must be a finite vector of length {self.d}"
        if p.domain in ("layernorm", "rmsnorm"):
            n2 = float(np.dot(x, x)) * (1.0 + gamma(self.d + 1))
            r2 = p.radius * p.radius * (1.0 - 2 * U)
            if not n2 <= r2:
                return False, f"witness norm {math.sqrt(n2):.17g} exceeds R = {p.radius:.17g}"
        elif p.domain == "box":
            if not float(np.max(np.abs(x))) <= p.radius:
                return False, f"witness has |x_i| = {float(np.max(np.abs(x))):.17g} > rho = {p.radius:.17g}"
        return True, ""

    # ------------------------------------------------------------------ witnesses
    def witnesses(self, tokens: np.ndarray, X: np.ndarray, batch: int = 192) -> list[WitnessCheck]:
        """Verify witnesses ``X[i]`` for tokens ``tokens[i]`` over all V logits (batched, pruned)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        X = np.asarray(X, dtype=np.float64).reshape(len(tokens), self.d)
        out: list[WitnessCheck | None] = [None] * len(tokens)
        dom_ok = []
        for i in range(len(tokens)):
            ok, msg = self.domain_check(X[i])
            if not ok:
                out[i] = WitnessCheck(False, float("nan"), float("nan"), -1, msg)
            dom_ok.append(ok)
        idx = np.array([i for i in range(len(tokens)) if dom_ok[i]], dtype=np.int64)
        if idx.size == 0:
            return out  # type: ignore[return-value]
        t_all = tokens[idx]
        Xv = X[idx]
        xn = np.linalg.norm(Xv, axis=1) * (1.0 + gamma(self.d + 1))
        own = np.einsum("ij,ij->i", self.A[t_all], Xv) + self.bias[t_all]
        # Batches of similar own logit prune together.
        order = np.argsort(-own, kind="stable")
        for b0 in range(0, idx.size, batch):
            sel = order[b0 : b0 + batch]
            self._witness_batch(idx[sel], t_all[sel], Xv[sel], xn[sel], own[sel], out)
        return out  # type: ignore[return-value]

    def _witness_batch(self, pos, ts, Xb, xn, own, out):
        d = self.d
        g_d = gamma(d + 2) + 2 * U
        # Own logit lower bound, then rows that could reach it (Cauchy–Schwarz, rigorous with slack).
        own_err = g_d * self.norms[ts] * xn + 2 * U * np.abs(own)
        L = own - own_err
        # One bound for the whole batch (largest ||x||, smallest own logit): O(V) memory, not O(V·B).
        xmax = float(xn.max())
        reach = self.norms * xmax * (1 + g_d + 4 * U) + self.bias + 4 * U * np.abs(self.bias)
        cand = np.nonzero(reach >= float(L.min()))[0]
        cand = np.union1d(cand, ts)  # self rows needed for their own logits
        if cand.size > 0.5 * self.V:  # gathering most rows costs more than multiplying them all
            cand = np.arange(self.V)
        # The one heavy product: float64 GEMM through torch (numpy's OpenBLAS threads would compete with torch's).
        Ac = self.A_t if cand.size == self.V else self.A_t[torch.from_numpy(cand)]
        G = (Ac @ torch.from_numpy(np.ascontiguousarray(Xb)).T).numpy()  # [|C|, B]
        Gt = np.einsum("ij,ij->i", self.A[ts], Xb)
        Bt = self.bias[ts]
        M = (Gt[None, :] - G) + (Bt[None, :] - self.bias[cand][:, None])
        E = g_d * (self.norms[cand][:, None] + self.norms[ts][None, :]) * xn[None, :]
        E += 4 * U * (np.abs(G) + np.abs(Gt)[None, :] + np.abs(self.bias[cand])[:, None] + np.abs(Bt)[None, :])
        if self.layernorm:
            sig = Xb.sum(axis=1)
            sig_err = gamma(d) * np.abs(Xb).sum(axis=1)
            ds = self.row_sums[ts][None, :] - self.row_sums[cand][:, None]
            corr = ds * sig[None, :] / d
            M -= corr
            s_abs = np.abs(self.row_sums[ts])[None, :] + np.abs(self.row_sums[cand])[:, None]
            s_err = self.row_sums_err[ts][None, :] + self.row_sums_err[cand][:, None]
            E += ((s_abs + s_err) * (np.abs(sig) + sig_err)[None, :] - s_abs * np.abs(sig)[None, :]) / d
            E += 4 * U * np.abs(corr)
        # The self column is not a competitor.
        self_pos = np.searchsorted(cand, ts)
        M[self_pos, np.arange(len(ts))] = np.inf
        E[self_pos, np.arange(len(ts))] = 0.0
        worst = np.argmin(M - E, axis=0)
        cols = np.arange(len(ts))
        for k in range(len(ts)):
            w = worst[k]
            m, e = float(M[w, k]), float(E[w, k])
            if len(cand) <= 1 or not np.isfinite(m):
                # V == 1 never reaches here (V >= 2 is validated); a lone token wins everywhere.
                out[pos[k]] = WitnessCheck(True, float("inf"), 0.0, -1, "no competitor can reach this token")
                continue
            # Argmin of the bound-adjusted margin gives the binding competitor; report its plain margin.
            mm = float(np.min(M[:, k]))
            scale = 1.0
            if self.p.domain == "cone":
                scale = float(Gt[k])  # normalisation (u_t - c)·x = 1
            ok = (m - e) > 0.0
            margin = mm / scale if scale > 0 else mm
            out[pos[k]] = WitnessCheck(bool(ok), margin, e / abs(scale) if scale > 0 else e, int(cand[w]),
                                       "" if ok else f"token {int(cand[w])} reaches {m:.6g} (allowance {e:.3g})")
        del cols

    def witness(self, t: int, x: np.ndarray) -> WitnessCheck:
        return self.witnesses(np.array([t]), np.asarray(x, dtype=np.float64)[None, :])[0]

    # ------------------------------------------------------------------ certificates
    def certificate(self, t: int, cert: Certificate) -> CertificateCheck:
        comp = np.asarray(cert.competitors, dtype=np.int64)
        lam = np.asarray(cert.weights, dtype=np.float64)
        if comp.ndim != 1 or lam.shape != comp.shape or comp.size == 0:
            return CertificateCheck(False, float("nan"), None, "certificate needs matching non-empty competitors and weights")
        if np.any(comp < 0) or np.any(comp >= self.V) or np.any(comp == t):
            return CertificateCheck(False, float("nan"), None, "certificate names an invalid competitor (out of range or t itself)")
        if len(np.unique(comp)) != comp.size:
            return CertificateCheck(False, float("nan"), None, "certificate repeats a competitor")
        if not np.all(np.isfinite(lam)) or np.any(lam < 0) or not lam.sum() > 0:
            return CertificateCheck(False, float("nan"), None, "certificate weights must be finite, >= 0 and not all 0")
        if self.p.domain == "cone":
            return self._cone_certificate(t, comp, lam, cert.mu)
        return self._dual_certificate(t, comp, lam)

    def _dual_certificate(self, t, comp, lam) -> CertificateCheck:
        p, d, m = self.p, self.d, comp.size
        As = self.A[comp]
        lam_sum = float(lam.sum())
        lam_sum_hi = lam_sum * (1 + gamma(m))
        # r = sum_j lam_j (a_j - a_t), elementwise error bound er (dot of length m+1, plus shift rounding).
        r = lam @ As - lam_sum * self.A[t]
        absum = lam @ np.abs(As) + lam_sum_hi * np.abs(self.A[t])
        er = (gamma(m + 2) + 2 * U) * absum * (1 + 4 * U)
        c0 = float(lam @ self.bias[comp] - lam_sum * self.bias[t])
        c0_err = gamma(m + 2) * float(lam @ np.abs(self.bias[comp]) + lam_sum_hi * abs(self.bias[t])) * (1 + 4 * U)
        if p.domain == "box":
            sup = p.radius * (float(np.abs(r).sum()) + float(er.sum()))
            sup *= 1 + gamma(d + 2)
        else:
            if p.domain == "layernorm":
                rp = r - r.mean()
                # projection rounding: mean (gamma_d relative to sum |r|/d) and one subtraction.
                pe = gamma(d + 2) * float(np.abs(r).sum()) / d + U * np.abs(rp)
                nr = float(np.linalg.norm(rp)) * (1 + gamma(d + 2)) + float(np.linalg.norm(er + pe))
            else:
                nr = float(np.linalg.norm(r)) * (1 + gamma(d + 2)) + float(np.linalg.norm(er))
            sup = p.radius * nr * (1 + 4 * U)
        deficit_lo = (c0 - c0_err) - sup
        deficit_lo -= 4 * U * (abs(c0) + sup)
        ok = deficit_lo > 0
        # m_t <= -deficit/sum(lambda): divide by the sum's upper bound when the deficit is positive, lower
        # bound otherwise, so the reported margin_upper is an upper bound either way.
        lam_sum_lo = lam_sum * (1 - gamma(m))
        deficit = deficit_lo / lam_sum_hi if ok else deficit_lo / lam_sum_lo
        return CertificateCheck(bool(ok), float(deficit), float(-deficit),
                                "" if ok else f"deficit {deficit_lo:.6g} is not positive")

    def _cone_certificate(self, t, comp, lam, mu) -> CertificateCheck:
        if mu is None or not np.isfinite(mu) or mu > 0:
            return CertificateCheck(False, float("nan"), None, "cone certificate needs a finite normalisation multiplier mu <= 0")
        V, d = self.V, self.d
        A = self.A
        # Dense weights over all j != t (see the module docstring): w = lam (on comp) + |mu|/V.
        w = np.full(V, abs(mu) / V)
        w[comp] += lam
        w[t] = 0.0
        W = float(w.sum())
        e = w @ A - W * A[t]
        e_err = (gamma(V + 2) + 2 * U) * (w @ np.abs(A) + W * (1 + gamma(V)) * np.abs(A[t])) * (1 + 4 * U)
        e_inf = float(np.max(np.abs(e) + e_err)) * (1 + 2 * U)
        # Basis: the certificate's support (largest weights first), completed by pivoted QR if short.
        basis = self._cone_basis(t, comp, lam, w)
        if basis is None:
            return CertificateCheck(False, float("nan"), None, "no nonsingular basis of d competitor rows")
        M = (A[basis] - A[t]).T  # [d, d], columns u_j - u_t (shift rounding covered below)
        M_err = U * (np.abs(A[basis]) + np.abs(A[t])).T * (1 + 4 * U) + U * np.abs(M)
        try:
            R = np.linalg.inv(M)
        except np.linalg.LinAlgError:
            return CertificateCheck(False, float("nan"), None, "basis matrix is singular")
        if not np.all(np.isfinite(R)):
            return CertificateCheck(False, float("nan"), None, "basis matrix is singular")
        RM = R @ M
        absR = np.abs(R)
        # |I - R M_exact| <= |I - fl(RM)| + gamma_d |R||M| + |R| |M_err| (+ rounding of I - fl(RM)).
        res = np.abs(np.eye(d) - RM) * (1 + U) + gamma(d + 2) * (absR @ np.abs(M)) * (1 + 4 * U) + (absR @ M_err) * (1 + gamma(d + 2))
        alpha = float(res.sum(axis=1).max()) * (1 + gamma(d + 2))
        if not alpha < 1.0:
            return CertificateCheck(False, float("nan"), None, f"verified solve failed: ||I - R A|| = {alpha:.3g} >= 1")
        inv_norm = float(absR.sum(axis=1).max()) * (1 + gamma(d + 2)) / (1.0 - alpha)
        dw = inv_norm * e_inf * (1 + 4 * U)
        wmin = float(w[basis].min())
        ok = dw < wmin
        return CertificateCheck(bool(ok), float(wmin - dw), float(mu) if ok else None,
                                "" if ok else f"correction {dw:.3g} exceeds the smallest basis weight {wmin:.3g}")

    def _cone_basis(self, t, comp, lam, w) -> np.ndarray | None:
        d = self.d
        order = comp[np.argsort(-lam, kind="stable")]
        basis = list(order[:d])
        if len(basis) < d:
            # Complete with other rows chosen by pivoted QR on the residual space (heaviest weights first).
            rest = np.setdiff1d(np.arange(self.V), np.concatenate([basis, [t]]).astype(np.int64))
            if rest.size == 0:
                return None
            D = (self.A[rest] - self.A[t]).T
            if basis:
                Q, _ = np.linalg.qr((self.A[basis] - self.A[t]).T)
                D = D - Q @ (Q.T @ D)
            need = d - len(basis)
            for _ in range(need):
                nrm = np.linalg.norm(D, axis=0)
                k = int(np.argmax(nrm))
                if nrm[k] <= 1e-12 * (1 + float(np.max(self.norms))):
                    return None
                basis.append(int(rest[k]))
                q = D[:, k] / nrm[k]
                D = D - np.outer(q, q @ D)
                D[:, k] = 0.0
        return np.asarray(basis, dtype=np.int64)

    # ------------------------------------------------------------------ ties
    def tie(self, t: int, j: int) -> bool:
        if j == t or not (0 <= j < self.V):
            return False
        same_row = bool(np.array_equal(self.rows[t], self.rows[j]))
        if self.p.domain == "cone":
            return same_row
        return same_row and float(self.bias[t]) == float(self.bias[j])


def into_domain(problem, x: np.ndarray) -> np.ndarray:
    """Move a candidate point into the domain so that :meth:`Verifier.domain_check` accepts it:
    centre it (layernorm), scale it radially into the ball with room for rounding, clip it to the box."""
    x = np.asarray(x, dtype=np.float64).copy()
    d = x.shape[-1]
    if problem.domain == "layernorm":
        x = x - x.mean(axis=-1, keepdims=True)
    if problem.domain in ("layernorm", "rmsnorm"):
        n = np.linalg.norm(x, axis=-1, keepdims=True)
        lim = problem.radius * (1.0 - 8 * (d + 4) * U)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(n > lim, lim / n, 1.0)
        x = x * f
    elif problem.domain == "box":
        x = np.clip(x, -problem.radius, problem.radius)
    return x
