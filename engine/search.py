"""Stage 4 — primal–dual search for the tokens the screens left open (DESIGN §2, §3 step 4).

For a bounded domain the margin is a minimax over the simplex of competitor weights λ:

    m_t = min_λ f(λ),   f(λ) = ρ N*(v) + c,   v = Σ λ_j (k_t − k_j),   c = Σ λ_j (b_t − b_j)

with ``N* = ||·||_2`` on balls (keys already lie in 1⊥ for layernorm) and ``||·||_1`` on the box. Any λ gives an
upper bound (a certificate, deficit ``−f(λ)``), and the adversary's best response ``x(λ) = ρ v/||v||``
(box: ``ρ sign(v)``) is a point of the domain whose margin over all V is a lower bound (a witness). The FW
gradient at λ is the margin against each competitor at ``x(λ)``, so one batched GEMM over all V both prices
new competitors and scores the witness.

The search runs pairwise Frank–Wolfe on a per-token active set (refreshed from a full pricing pass every
``inner`` steps), batched over tokens; tokens leave the batch as soon as either bound crosses 0. It is
deliberately cheap (a few pricing rounds): it settles the easy tokens in bulk and hands the rest, with
their best competitors, to the exact LP stage. Everything it returns is a claim for ``engine.verify``. Cone: a bounded surrogate (unit ball, no bias) searches for
witnesses only; cone certificates need exact hull membership and come from the LP.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from engine.evidence import Candidate, Certificate
from engine.verify import into_domain


def _norm_star(v: torch.Tensor, box: bool) -> torch.Tensor:
    return v.abs().sum(-1) if box else torch.linalg.vector_norm(v, dim=-1)


def _best_response(v: torch.Tensor, rho: float, box: bool) -> torch.Tensor:
    if box:
        return rho * torch.sign(v)
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return torch.where(n > 0, rho * v / n.clamp_min(1e-300), torch.zeros_like(v))


def _step_ball(v, w, D, gmax, rho):
    """argmin over γ ∈ [0, gmax] of ρ||v + γw|| + γD, in closed form.

    With q(γ) = Aγ² + Bγ + C (A = ||w||², B = 2 v·w, C = ||v||²) the stationary point solves
    ρ(2Aγ + B) = −2D sqrt(q); squaring gives γ = −B/2A − (D/2A) sqrt((4AC − B²)/(Aρ² − D²)) when
    Aρ² > D². Otherwise |D| dominates the norm's slope (at most ρ sqrt(A)) and the function is monotone.
    Convexity makes clipping to [0, gmax] exact.
    """
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


def _step_box(v, w, D, gmax, rho, iters: int = 50):
    """argmin over γ ∈ [0, gmax] of ρ||v + γw||_1 + γD (convex, piecewise linear): bisection on the slope."""
    lo = torch.zeros_like(D)
    hi = gmax.clone()

    def slope(g):
        return rho * (w * torch.sign(v + g[:, None] * w)).sum(-1) + D

    full = slope(hi) <= 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        neg = slope(mid) < 0
        lo = torch.where(neg, mid, lo)
        hi = torch.where(neg, hi, mid)
    return torch.where(full, gmax, hi)


def search(
    problem,
    tokens: np.ndarray,
    *,
    keys32: torch.Tensor | None = None,
    batch: int = 256,
    active: int = 64,
    add: int = 16,
    rounds: int = 8,
    inner: int = 30,
    rel_tol: float = 1e-7,
) -> list[Candidate]:
    """Search witnesses / certificates for ``tokens``; returns one Candidate per token (same order)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0:
        return []
    cone = problem.domain == "cone"
    box = problem.domain == "box"
    rho = 1.0 if cone else float(problem.radius)
    keys64 = torch.from_numpy(problem.keys)
    if keys32 is None:
        keys32 = keys64.to(torch.float32)
    bias64 = torch.zeros(problem.V, dtype=torch.float64) if cone else torch.from_numpy(problem.bias)
    bias32 = bias64.to(torch.float32)
    scale = rho * float((keys64.abs().sum(1) if box else torch.linalg.vector_norm(keys64, dim=1)).max())
    scale += float(bias64.abs().max()) + 1e-300
    out: list[Candidate] = []
    with threadpool_limits(limits=1, user_api="blas"):
        for b0 in range(0, tokens.size, batch):
            out.extend(_search_one_batch(problem, tokens[b0 : b0 + batch], keys64, keys32, bias64, bias32, rho, box,
                                         cone, active, add, rounds, inner, rel_tol * scale))
    return out


def _search_one_batch(problem, toks, keys64, keys32, bias64, bias32, rho, box, cone, active, add, rounds, inner, tol):
    K, add = min(active, problem.V - 1), min(add, problem.V - 1)
    return _search_batch(problem, toks, keys64, keys32, bias64, bias32, rho, box, cone, K, min(add, K), rounds, inner,
                         tol)


def _search_batch(problem, toks, keys64, keys32, bias64, bias32, rho, box, cone, K, add, rounds, inner, tol):
    t0 = time.perf_counter()
    B, V = toks.size, problem.V
    T = torch.from_numpy(toks)
    kt_all = keys64[T]
    bt_all = bias64[T]
    x_all = _best_response(kt_all, rho, box)  # the screen point
    S_all = torch.zeros((B, K), dtype=torch.int64)
    lam_all = torch.zeros((B, K), dtype=torch.float64)
    best_lower = torch.full((B,), -np.inf, dtype=torch.float64)
    best_x = x_all.clone()
    best_upper = torch.full((B,), np.inf, dtype=torch.float64)
    best_S = torch.zeros((B, K), dtype=torch.int64)
    best_lam = torch.zeros((B, K), dtype=torch.float64)
    iters = torch.zeros(B, dtype=torch.int64)
    done = torch.zeros(B, dtype=torch.bool)
    first = True
    for _ in range(rounds):
        act = (~done).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        n = act.numel()
        ar = torch.arange(n)
        Ta, kt, bt, x = T[act], kt_all[act], bt_all[act], x_all[act]
        # ---- full pricing at x: float32 GEMM over all V, exact float64 margins for the threats found.
        logits = (x.to(torch.float32) @ keys32.T) + bias32
        own = (kt * x).sum(1) + bt
        marg32 = own.to(torch.float32)[:, None] - logits
        marg32[ar, Ta] = float("inf")
        kk = K if first else add
        cand = torch.topk(-marg32, kk, dim=1).indices
        m64 = own[:, None] - ((keys64[cand] * x[:, None, :]).sum(-1) + bias64[cand])
        lower = torch.minimum(m64.min(1).values, marg32.min(1).values.to(torch.float64))
        better = lower > best_lower[act]
        best_lower[act] = torch.where(better, lower, best_lower[act])
        best_x[act[better]] = x[better]
        # ---- active set: heaviest current atoms, then the new threats (duplicates are harmless).
        if first:
            S = cand
            lam = torch.zeros((n, K), dtype=torch.float64)
            lam[:, 0] = 1.0
            first = False
        else:
            S, lam = S_all[act], lam_all[act]
            order = torch.argsort(-lam, dim=1, stable=True)[:, : K - add]
            S = torch.cat([torch.gather(S, 1, order), cand], dim=1)
            lam = torch.cat([torch.gather(lam, 1, order), torch.zeros((n, add), dtype=torch.float64)], dim=1)
            lam = lam / lam.sum(1, keepdim=True)
        A = kt[:, None, :] - keys64[S]  # a_j = k_t − k_j
        beta = bt[:, None] - bias64[S]
        v = torch.einsum("bk,bkd->bd", lam, A)
        c = (lam * beta).sum(1)
        # ---- pairwise Frank–Wolfe on the active set.
        for _ in range(inner):
            xi = _best_response(v, rho, box)
            g = torch.einsum("bkd,bd->bk", A, xi) + beta  # margin vs each active competitor at x(λ)
            jf = g.argmin(1)
            ja = torch.where(lam > 0, g, torch.full_like(g, -np.inf)).argmax(1)
            w = A[ar, jf] - A[ar, ja]
            D = beta[ar, jf] - beta[ar, ja]
            gmax = lam[ar, ja]
            step = _step_box(v, w, D, gmax, rho) if box else _step_ball(v, w, D, gmax, rho)
            step = torch.where(jf == ja, torch.zeros_like(step), step)
            v = v + step[:, None] * w
            c = c + step * D
            lam[ar, jf] += step
            lam[ar, ja] -= step
            lam.clamp_(min=0.0)
        iters[act] += inner
        # f(λ) recomputed from λ itself (not the running sums) for the certificate bound.
        lam = lam / lam.sum(1, keepdim=True)
        v = torch.einsum("bk,bkd->bd", lam, A)
        c = (lam * beta).sum(1)
        f = rho * _norm_star(v, box) + c
        S_all[act], lam_all[act] = S, lam
        if not cone:
            imp = f < best_upper[act]
            best_upper[act] = torch.where(imp, f, best_upper[act])
            best_S[act[imp]] = S[imp]
            best_lam[act[imp]] = lam[imp]
        x_all[act] = _best_response(v, rho, box)
        done |= (best_lower > tol) | (best_upper < -tol)
    elapsed = (time.perf_counter() - t0) / B
    out = []
    for i in range(B):
        cert = None
        if not cone and torch.isfinite(best_upper[i]):
            nz = (best_lam[i] > 0).nonzero().squeeze(1)
            ids, inv = np.unique(best_S[i, nz].numpy(), return_inverse=True)
            ww = np.zeros(ids.size)
            np.add.at(ww, inv, best_lam[i, nz].numpy())
            cert = Certificate(ids.astype(np.int64), ww / ww.sum())
        wx = best_x[i].numpy()
        if cone:
            s = float((kt_all[i] * best_x[i]).sum())  # normalisation (k_t − c)·x = 1
            wx = wx / s if s > 0 else wx
        out.append(Candidate(
            token=int(toks[i]), witness=wx if cone else into_domain(problem, wx), certificate=cert,
            lower=float(best_lower[i]), upper=float("inf") if cone else float(best_upper[i]),
            reason="search", time_s=elapsed, iterations=int(iters[i]),
        ))
    return out

