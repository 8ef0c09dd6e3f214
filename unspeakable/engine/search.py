"""Stage 4 — primal–dual search for the tokens the screens left open (DESIGN §2, §3 step 4).

For a bounded domain the margin is a minimax over the simplex of competitor weights λ:

    m_t = min_λ f(λ),   f(λ) = sup_X v·x + c,   v = Σ λ_j (k_t − k_j),   c = Σ λ_j (b_t − b_j)

Any λ gives an upper bound (a certificate, deficit ``−f(λ)``), and the adversary's best response
``x(λ)`` (the domain's :meth:`~engine.domain.Domain.best_response` to v) is a point of the domain whose
margin over all V is a lower bound (a witness). The FW gradient at λ is the margin against each
competitor at ``x(λ)``, so one batched GEMM over all V both prices new competitors and scores the witness.

The search runs pairwise Frank–Wolfe on a per-token active set (refreshed from a full pricing pass every
``inner`` steps), batched over tokens; tokens leave the batch as soon as either bound crosses 0. It is
deliberately cheap (a few pricing rounds): it settles the easy tokens in bulk and hands the rest, with
their best competitors, to the exact LP stage. Everything it returns is a claim for ``engine.verify``.
Cone: the domain's bounded surrogate (the unit ball, no bias) searches for witnesses only; cone
certificates need exact hull membership and come from the decide stage.

Where the witness screen's runner-up is given, the search first tries a *near point*: the same
Frank–Wolfe steps against the runner-up and the hubs alone (no pass over V), then one pricing pass over V
at those points. Most tokens the screen leaves open on a real head lose at their screen point to that one
row, and their near point already wins: on SmolLM2, 7843 of 8595 open tokens, each for one pricing pass
instead of several. The others (on a synthetic cloud, nearly all) search on from their screen points, for
one pricing pass more.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from unspeakable.engine.evidence import Candidate, Certificate
from unspeakable.engine.head import FoldedRows
from unspeakable.kernels import torch_threads


@dataclass
class SearchOptions:
    batch: int = 256  # tokens advanced together
    active: int = 64  # competitors in each token's active set
    add: int = 16  # new competitors per pricing round
    rounds: int = 8  # pricing rounds
    inner: int = 30  # pairwise FW steps per round
    hubs: int = 16  # of the first active set: the rows with the largest reach anywhere in the domain
    rel_tol: float = 1e-7  # a bound this far past 0 (relative to the logits' size) ends a token's search


@dataclass
class _Setup:
    """What every batch reads: the rows in float64 and float32, the bias, the search domain."""

    dom: object
    certify: bool  # False in the cone: no certificates from the bounded surrogate
    keys64: torch.Tensor  # or _Gathered
    keys32: torch.Tensor
    bias64: torch.Tensor
    bias32: torch.Tensor
    K: int
    add: int
    tol: float
    gemm_threads: int  # the caller's torch threads, for the pricing GEMM
    hubs: torch.Tensor  # [h + 1] ids of the largest reach sup_X l_j(x), largest first (h + 1: one may be the token)


@dataclass
class _State:
    """One batch's iterates and best bounds (tensors over the batch)."""

    T: torch.Tensor
    kt: torch.Tensor
    bt: torch.Tensor
    x: torch.Tensor
    S: torch.Tensor
    lam: torch.Tensor
    best_lower: torch.Tensor
    best_x: torch.Tensor
    best_upper: torch.Tensor
    best_S: torch.Tensor
    best_lam: torch.Tensor
    done: torch.Tensor


def search(problem, tokens: np.ndarray, *, keys32: torch.Tensor | None = None,
           options: SearchOptions | None = None, runner_up: np.ndarray | None = None) -> list[Candidate]:
    """Search witnesses / certificates for ``tokens``; returns one Candidate per token (same order).
    ``runner_up``: per token, the row that beats it at its screen point (the witness screen's); the search
    then starts from the near point (module docstring)."""
    opt = options or SearchOptions()
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0:
        return []
    if runner_up is not None:
        runner_up = np.asarray(runner_up, dtype=np.int64)
        if runner_up.shape != tokens.shape:
            raise ValueError(f"runner_up has shape {runner_up.shape}; expected {tokens.shape}, one per token")
    setup = _setup(problem, keys32, opt)
    out: list[Candidate] = []
    # Everything but the pricing GEMM on one thread (kernels.torch_threads): the FW steps are many small
    # ops, 2x slower on two threads under load here (768 SmolLM2 tokens: 20.7 s against 10.3 s, load 5).
    with threadpool_limits(limits=1, user_api="blas"), torch_threads(1):
        for b0 in range(0, tokens.size, opt.batch):
            ru = None if runner_up is None else runner_up[b0: b0 + opt.batch]
            out.extend(_search_batch(problem, setup, tokens[b0: b0 + opt.batch], opt, ru))
    return out


class _Gathered:
    """Keys derived on demand (engine.head.DerivedKeys) as the search reads its float64 keys: gathers by an
    index tensor (fresh tensors, as ``tensor[idx]`` gives) and ``shape``."""

    def __init__(self, keys):
        self.keys, self.shape = keys, torch.Size(keys.shape)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.keys[idx.numpy()])


def _setup(problem, keys32, opt: SearchOptions) -> _Setup:
    dom = problem.domain.search_domain()
    k = problem.search_keys
    keys64 = _Gathered(k) if isinstance(k, FoldedRows) else torch.from_numpy(k)
    if keys32 is None:  # the problem's shared copy where it has one (a Ray task's slim problem has not)
        shared = getattr(problem, "search_keys32", None)
        keys32 = torch.from_numpy(shared() if shared is not None else np.asarray(k, dtype=np.float32))
    bias64 = torch.from_numpy(problem.search_bias)  # zeros in the cone
    # in row chunks: a projection of all V keys at once would be a transient V × d float64 copy
    reach = np.concatenate([dom.support(problem.search_keys[r0: r0 + 8192]) for r0 in range(0, problem.V, 8192)])
    size = float(np.abs(reach).max()) + float(bias64.abs().max()) + 1e-300
    K = min(opt.active, problem.V - 1)
    h = max(0, min(opt.hubs, K // 4))
    with np.errstate(invalid="ignore"):
        hubs = np.argsort(-(reach + problem.search_bias), kind="stable")[: h + 1] if h else np.zeros(0, dtype=np.int64)
    return _Setup(dom, problem.domain.bounded, keys64, keys32, bias64, bias64.to(torch.float32), K,
                  min(opt.add, K), opt.rel_tol * size, torch.get_num_threads(), torch.from_numpy(hubs))


def _search_batch(problem, st: _Setup, toks: np.ndarray, opt: SearchOptions,
                  runner_up: np.ndarray | None = None) -> list[Candidate]:
    t0 = time.perf_counter()
    B, K = toks.size, st.K
    T = torch.from_numpy(toks)
    kt, bt = st.keys64[T], st.bias64[T]
    x = st.dom.best_response(kt)  # the screen point
    s = _State(T, kt, bt, x, torch.zeros((B, K), dtype=torch.int64), torch.zeros((B, K), dtype=torch.float64),
               torch.full((B,), -np.inf, dtype=torch.float64), x.clone(), torch.full((B,), np.inf, dtype=torch.float64),
               torch.zeros((B, K), dtype=torch.int64), torch.zeros((B, K), dtype=torch.float64),
               torch.zeros(B, dtype=torch.bool))
    if runner_up is not None:  # the near points first: one pricing pass says which of them win already
        s.x = _near_points(st, T, kt, bt, torch.from_numpy(runner_up), opt.inner)
        _price(st, s, torch.arange(B), 1)
        s.done |= s.best_lower > st.tol
        s.x = torch.where(s.done[:, None], s.x, x)  # the others search on from their screen points
    for r in range(opt.rounds):
        act = (~s.done).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        _round(st, s, act, first=r == 0, inner=opt.inner)
        s.done |= (s.best_lower > st.tol) | (s.best_upper < -st.tol)
    elapsed = (time.perf_counter() - t0) / B
    return [_candidate(problem, st, s, i, int(toks[i]), elapsed, opt) for i in range(B)]


def _near_points(st: _Setup, T: torch.Tensor, kt, bt, R: torch.Tensor, inner: int) -> torch.Tensor:
    """The best response to pairwise Frank–Wolfe on the active set {runner-up} ∪ hubs: no pass over V."""
    V = st.keys64.shape[0]
    R = torch.where((R < 0) | (R >= V) | (R == T), (T + 1) % V, R)  # always a competitor
    S = torch.cat([R[:, None], st.hubs[None, :].expand(T.numel(), -1)], 1)
    S = torch.where(S == T[:, None], R[:, None], S)  # the token itself is no competitor: its runner-up again
    A = st.keys64[S].neg_().add_(kt[:, None, :])
    beta = bt[:, None] - st.bias64[S]
    lam = torch.zeros(S.shape, dtype=torch.float64)
    lam[:, 0] = 1.0
    lam = _pairwise_fw(st.dom, A, beta, lam, inner)
    return st.dom.best_response(torch.einsum("bk,bkd->bd", lam / lam.sum(1, keepdim=True), A))


def _round(st: _Setup, s: _State, act: torch.Tensor, first: bool, inner: int) -> None:
    """One pricing pass over all V at the current points, then ``inner`` pairwise FW steps for the tokens
    whose point the pass did not find winning (a winner's search is over: no steps spent on it)."""
    cand = _price(st, s, act, st.K if first else st.add)
    go = ~(s.best_lower[act] > st.tol)
    if not bool(go.any()):
        return
    act, cand = act[go], cand[go]
    S, lam = _active_set(st, s, act, cand, first)
    A = st.keys64[S].neg_().add_(s.kt[act][:, None, :])  # a_j = k_t − k_j, in the gathered copy (no second one)
    beta = s.bt[act][:, None] - st.bias64[S]
    lam = _pairwise_fw(st.dom, A, beta, lam, inner)
    # f(λ) recomputed from λ itself (not the running sums) for the certificate bound.
    lam = lam / lam.sum(1, keepdim=True)
    v = torch.einsum("bk,bkd->bd", lam, A)
    f = st.dom.support(v) + (lam * beta).sum(1)
    s.S[act], s.lam[act] = S, lam
    if st.certify:
        imp = f < s.best_upper[act]
        s.best_upper[act] = torch.where(imp, f, s.best_upper[act])
        s.best_S[act[imp]] = S[imp]
        s.best_lam[act[imp]] = lam[imp]
    s.x[act] = st.dom.best_response(v)


def _price(st: _Setup, s: _State, act: torch.Tensor, kk: int) -> torch.Tensor:
    """float32 GEMM over all V at the active tokens' points; exact float64 margins for the threats found
    update the best witness. Returns the ``kk`` most threatening competitors per token."""
    n = act.numel()
    Ta, kt, bt, x = s.T[act], s.kt[act], s.bt[act], s.x[act]
    with torch_threads(st.gemm_threads):
        logits = torch.addmm(st.bias32[None, :], x.to(torch.float32), st.keys32.T)
    own = (kt * x).sum(1) + bt
    logits[torch.arange(n), Ta] = -float("inf")  # the token itself is no competitor
    # The most threatening competitors are the largest logits (the token's own logit is one number per
    # row): no [n, V] margin matrix. The float32 margin own − max logit is the minimum of own − logit,
    # float32 subtraction being monotone.
    top, cand = torch.topk(logits, kk, dim=1)
    m64 = own[:, None] - (st.keys64[cand].mul_(x[:, None, :]).sum(-1) + st.bias64[cand])
    # A float32 margin is only a hint; the claimed lower bound is the float64 one over the threats found
    # and the float32 minimum (verification recomputes everything in float64 anyway).
    lower = torch.minimum(m64.min(1).values, (own.to(torch.float32) - top[:, 0]).to(torch.float64))
    better = lower > s.best_lower[act]
    s.best_lower[act] = torch.where(better, lower, s.best_lower[act])
    s.best_x[act[better]] = x[better]
    return cand


def _active_set(st: _Setup, s: _State, act, cand, first: bool):
    """Heaviest current atoms, then the new threats (duplicates are harmless). The first set is the
    threats at the screen point and the hubs: rows whose logit can be large anywhere in the domain. The
    threats alone are local to the screen point: the first FW point moves away from it, where a hub
    (measured on SmolLM2: a few tokens of the largest norm) beat nearly every first point by tens of
    logits, and the search took one pricing pass more per token to learn so."""
    n = act.numel()
    if first:
        lam = torch.zeros((n, st.K), dtype=torch.float64)
        lam[:, 0] = 1.0
        h = st.hubs.numel() - 1
        if h <= 0:
            return cand, lam
        hub = st.hubs[None, :].expand(n, -1)
        mine = hub == s.T[act][:, None]  # the token itself is no competitor: drop it, else the last hub
        keep = ~mine
        keep[:, -1] &= mine.any(1)
        return torch.cat([cand[:, : st.K - h], hub[keep].view(n, h)], 1), lam
    S, lam = s.S[act], s.lam[act]
    order = torch.argsort(-lam, dim=1, stable=True)[:, : st.K - st.add]
    S = torch.cat([torch.gather(S, 1, order), cand], dim=1)
    lam = torch.cat([torch.gather(lam, 1, order), torch.zeros((n, st.add), dtype=torch.float64)], dim=1)
    return S, lam / lam.sum(1, keepdim=True)


def _pairwise_fw(dom, A: torch.Tensor, beta: torch.Tensor, lam: torch.Tensor, inner: int) -> torch.Tensor:
    """Pairwise Frank–Wolfe on the active sets: move weight from the best-scoring atom in use to the
    worst-scoring one, with the exact line step of the domain."""
    ar = torch.arange(A.shape[0])
    v = torch.einsum("bk,bkd->bd", lam, A)
    live = torch.ones(A.shape[0], dtype=torch.bool)
    for _ in range(inner):
        g = torch.einsum("bkd,bd->bk", A, dom.best_response(v)) + beta  # margin vs each atom at x(λ)
        live &= g.min(1).values <= 0  # x(λ) beats every atom: a witness for the pricing pass to check
        if not bool(live.any()):
            break
        jf = g.argmin(1)
        ja = torch.where(lam > 0, g, torch.full_like(g, -np.inf)).argmax(1)
        w = A[ar, jf] - A[ar, ja]
        step = dom.line_step(v, w, beta[ar, jf] - beta[ar, ja], lam[ar, ja])
        step = torch.where((jf == ja) | ~live, torch.zeros_like(step), step)
        v = v + step[:, None] * w
        lam[ar, jf] += step
        lam[ar, ja] -= step
        lam.clamp_(min=0.0)
    return lam


def _candidate(problem, st: _Setup, s: _State, i: int, token: int, elapsed: float, opt) -> Candidate:
    cert = None
    if st.certify and torch.isfinite(s.best_upper[i]):
        nz = (s.best_lam[i] > 0).nonzero().squeeze(1)
        ids, inv = np.unique(s.best_S[i, nz].numpy(), return_inverse=True)
        ww = np.zeros(ids.size)
        np.add.at(ww, inv, s.best_lam[i, nz].numpy())
        cert = Certificate(ids.astype(np.int64), ww / ww.sum())
    wx = s.best_x[i].numpy()
    if st.certify:
        wx = problem.domain.into(wx)
    else:
        nx = float((s.kt[i] * s.best_x[i]).sum())  # the cone's normalisation (k_t − c)·x = 1
        wx = wx / nx if nx > 0 else wx
    return Candidate(token=token, witness=wx, certificate=cert, lower=float(s.best_lower[i]),
                     upper=float(s.best_upper[i]) if st.certify else float("inf"), reason="search",
                     time_s=elapsed, iterations=opt.rounds * opt.inner)
