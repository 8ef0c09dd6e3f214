"""The pipeline, top-down: load → screen → search → decide → verify → report (DESIGN §3).

Public entry points (also re-exported from ``engine``):

* ``scan(W_U, b_U=None, *, ln_w=None, ln_b=None, norm=None, domain=None, ...) -> ScanReport`` — arrays.
* ``scan_head(head, *, domain=None, radius=None, bias=True, tokens=None, device="auto", backend="auto",
  workers=1, checkpoint=None, resume=False, progress=False) -> ScanReport`` — a loaded :class:`Head`.
* ``gram_head(head, *, center=None, device="auto", backend="auto") -> ScanReport`` (kind "gram").
* ``check(source_or_head, tokens, *, domain=None, radius=None, bias=True) -> list[TokenReport]``.
* ``bench_head(head, *, tokens=None, ...) -> dict`` — per-stage throughput.

Every verdict goes through ``engine.verify``: a witness re-checked over all V logits in float64, a
certificate re-derived from the folded rows, or an identical row (tie). Anything else is ``undecided``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

from engine.evidence import Candidate
from engine.load import Head, InputError, Problem, fold, gram_rows, load
from engine.report import ScanReport, TokenReport
from engine.screen import gram_screen, witness_points, witness_screen
from engine.search import search
from engine.verify import Verifier
from kernels import resolve_backend

CHECKPOINT_SCHEMA = "unspeakable.checkpoint/1"


# --------------------------------------------------------------------------------------------- helpers
def _as_numpy(a):
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu").numpy()
    return np.asarray(a)


def find_ties(problem: Problem) -> dict[int, int]:
    """token -> another token with an identical folded row (and bias, outside cone)."""
    M = problem.rows if problem.domain == "cone" else np.hstack([problem.rows, problem.bias[:, None]])
    M = np.ascontiguousarray(M)
    view = M.view(np.dtype((np.void, M.dtype.itemsize * M.shape[1]))).ravel()
    _, inv, counts = np.unique(view, return_inverse=True, return_counts=True)
    ties: dict[int, int] = {}
    dup_groups = np.nonzero(counts > 1)[0]
    if dup_groups.size == 0:
        return ties
    for g in dup_groups:
        members = np.nonzero(inv == g)[0]
        for i, t in enumerate(members):
            ties[int(t)] = int(members[1] if i == 0 else members[0])
    return ties


def _fingerprint(problem: Problem) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(problem.rows).tobytes())
    h.update(np.ascontiguousarray(problem.bias).tobytes())
    h.update(f"{problem.domain}|{problem.radius!r}|{problem.bias_used}".encode())
    return h.hexdigest()


def _finite(x):
    return None if x is None or not np.isfinite(x) else float(x)


class _Checkpoint:
    """Decided tokens written incrementally and atomically (temp file + os.replace)."""

    def __init__(self, path: str | None, fingerprint: str, resume: bool):
        self.path = path
        self.fp = fingerprint
        self.done: dict[int, dict] = {}
        if path and resume and os.path.exists(path):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot resume from {path}: {e}") from e
            if data.get("schema") != CHECKPOINT_SCHEMA or data.get("fingerprint") != fingerprint:
                raise InputError(f"cannot resume from {path}: it belongs to a different input or settings")
            self.done = {int(k): v for k, v in data["tokens"].items()}

    def add(self, reports: list[TokenReport]):
        for r in reports:
            self.done[r.id] = r.__dict__.copy()
        if not self.path:
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"schema": CHECKPOINT_SCHEMA, "fingerprint": self.fp,
                           "tokens": {str(k): v for k, v in self.done.items()}}, f)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def remove(self):
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


# --------------------------------------------------------------------------------------------- verdicts
def _verdicts(verifier: Verifier, cands: list[Candidate]) -> list[tuple]:
    """Verify candidates (witnesses in one batched pass); for each return
    (verdict, reason, margin_lower, margin_upper, certificate-json). Only verified numbers are reported:
    a checked point's margin is a lower bound even when it is <= 0, a checked certificate's deficit an
    upper bound even when the token is speakable."""
    with_w = [i for i, c in enumerate(cands) if c.witness is not None]
    wchecks = {}
    if with_w:
        X = np.stack([np.asarray(cands[i].witness, dtype=np.float64) for i in with_w])
        for i, wc in zip(with_w, verifier.witnesses(np.array([cands[i].token for i in with_w]), X)):
            wchecks[i] = wc
    out = []
    for i, cand in enumerate(cands):
        lower = upper = None
        wc = wchecks.get(i)
        cc = verifier.certificate(cand.token, cand.certificate) if cand.certificate is not None else None
        if cc is not None:
            upper = _finite(cc.margin_upper)
        if wc is not None:
            if wc.ok:
                out.append(("speakable", f"witness ({cand.reason})", _finite(wc.margin), upper,
                            {"kind": "witness", "x": [float(v) for v in cand.witness], "runner_up": wc.runner_up,
                             "allowance": float(wc.allowance)}))
                continue
            lower = _finite(wc.margin)
        if cc is not None and cc.ok:
            cj = cand.certificate.to_json()
            cj["kind"] = "cone" if verifier.p.domain == "cone" else "dual"
            cj["deficit"] = float(cc.deficit)
            out.append(("unspeakable", f"certificate ({cand.reason})", lower, upper, cj))
            continue
        out.append(("undecided", cand.reason or "no proof", lower, upper, None))
    return out


def _verdict_from(verifier: Verifier, cand: Candidate):
    return _verdicts(verifier, [cand])[0]


def _log(progress, msg):
    if progress:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- scan
def scan_head(
    head: Head,
    *,
    domain: str | None = None,
    radius: float | None = None,
    bias: bool = True,
    tokens=None,
    device: str = "auto",
    backend: str = "auto",
    workers: int = 1,
    checkpoint: str | None = None,
    resume: bool = False,
    progress: bool = False,
    gram_center: bool | None = None,
    decide_time_limit: float = 30.0,
    load_time: float = 0.0,
    keep_checkpoint: bool = False,
) -> ScanReport:
    t_start = time.perf_counter()
    timings = {"load": load_time, "screen": 0.0, "search": 0.0, "decide": 0.0, "verify": 0.0}
    t0 = time.perf_counter()
    problem = fold(head, domain=domain, radius=radius, bias=bias)
    backend, dev = resolve_backend(backend, device)
    V = problem.V
    ids = np.arange(V, dtype=np.int64) if tokens is None else np.unique(np.asarray(tokens, dtype=np.int64))
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        bad = [int(t) for t in ids if t < 0 or t >= V]
        raise InputError(f"token ids {', '.join(map(str, bad[:10]))} are out of range for V = {V}")
    grows = gram_rows(head, gram_center)
    timings["load"] += time.perf_counter() - t0

    # ---- screens
    t0 = time.perf_counter()
    g = gram_screen(grows, ids, backend=backend, device=dev)
    del grows
    w = witness_screen(problem, ids, backend=backend, device=dev)
    timings["screen"] = time.perf_counter() - t0
    _log(progress, f"screens: {time.perf_counter() - t0:.1f}s, {int(g.hard_to_speak.sum())} hard-to-speak")

    verifier = Verifier(problem)
    ties = find_ties(problem)
    pos = {int(t): i for i, t in enumerate(ids)}
    verdict = np.zeros(ids.size, dtype=np.int8)  # 1 speakable, -1 unspeakable, 0 undecided
    mlo = np.full(ids.size, np.nan)
    mhi = np.full(ids.size, np.nan)
    listed: dict[int, TokenReport] = {}
    texts = problem.texts

    def base(t):
        i = pos[t]
        return TokenReport(id=int(t), text=None if texts is None else texts[t], gram_argmax=int(g.argmax[i]),
                           hard_to_speak=bool(g.hard_to_speak[i]))

    # ---- ties
    for t in ids:
        t = int(t)
        j = ties.get(t)
        if j is not None and verifier.tie(t, j):
            r = base(t)
            r.verdict, r.reason, r.margin_upper = "unspeakable", "tie", 0.0
            r.certificate = {"kind": "tie", "tie_with": j}
            listed[t] = r
            verdict[pos[t]] = -1
            mhi[pos[t]] = 0.0

    # ---- verify the witness screen's winners
    t0 = time.perf_counter()
    screen_win = np.array([t for t in ids if int(t) not in listed and w.margin[pos[int(t)]] > 0], dtype=np.int64)
    if screen_win.size:
        checks = verifier.witnesses(screen_win, witness_points(problem, screen_win))
        for t, c in zip(screen_win, checks):
            i = pos[int(t)]
            if c.ok:
                verdict[i] = 1
                mlo[i] = c.margin
    timings["verify"] += time.perf_counter() - t0
    for t in ids:
        t = int(t)
        i = pos[t]
        if verdict[i] == 1 and g.hard_to_speak[i]:
            r = base(t)
            r.verdict, r.reason, r.margin_lower = "speakable", "witness (screen)", _finite(mlo[i])
            r.certificate = {"kind": "witness", "x": "self-direction", "runner_up": int(w.runner_up[i])}
            listed[t] = r
    open_ids = np.array([t for t in ids if verdict[pos[int(t)]] == 0 and int(t) not in listed], dtype=np.int64)
    _log(progress, f"witness screen settled {int((verdict == 1).sum())}; {open_ids.size} open")

    # ---- resume
    ckpt = _Checkpoint(checkpoint, _fingerprint(problem), resume)
    for t in list(open_ids):
        rec = ckpt.done.get(int(t))
        if rec is not None:
            r = TokenReport(**rec)
            listed[int(t)] = r
            i = pos[int(t)]
            verdict[i] = {"speakable": 1, "unspeakable": -1}.get(r.verdict, 0)
            mlo[i] = np.nan if r.margin_lower is None else r.margin_lower
            mhi[i] = np.nan if r.margin_upper is None else r.margin_upper
    todo = np.array([t for t in open_ids if int(t) not in ckpt.done], dtype=np.int64)

    # ---- search, then LP for what it leaves; verify everything
    still_open: list[Candidate] = []
    keys32 = torch.from_numpy(problem.keys).to(torch.float32)
    for b0 in range(0, todo.size, 256):
        chunk = todo[b0 : b0 + 256]
        t0 = time.perf_counter()
        cands = search(problem, chunk, keys32=keys32)
        timings["search"] += time.perf_counter() - t0
        done_reports = []
        t1 = time.perf_counter()
        checked = _verdicts(verifier, cands)
        tv = (time.perf_counter() - t1) / max(1, len(cands))
        timings["verify"] += tv * len(cands)
        for cand, (v, reason, lo, hi, cj) in zip(cands, checked):
            if v == "undecided":
                cand.time_s += tv
                still_open.append(cand)
                continue
            r = base(cand.token)
            r.verdict, r.reason, r.margin_lower, r.margin_upper, r.certificate = v, reason, lo, hi, cj
            r.time_s = cand.time_s + tv
            done_reports.append(r)
        _record(done_reports, listed, verdict, mlo, mhi, pos, ckpt)
        _log(progress, f"search: {b0 + chunk.size}/{todo.size} tokens, {len(still_open)} left for the LP")

    if still_open:
        _decide_open(problem, verifier, still_open, workers, decide_time_limit, timings, base, listed, verdict,
                     mlo, mhi, pos, ckpt, progress)

    timings["total"] = time.perf_counter() - t_start + load_time
    counts = {
        "tokens": int(ids.size),
        "hard_to_speak": int(g.hard_to_speak.sum()),
        "speakable": int((verdict == 1).sum()),
        "unspeakable": int((verdict == -1).sum()),
        "undecided": int((verdict == 0).sum()),
    }
    rep = ScanReport(
        source=problem.source or head.source, V=V, d=problem.d, domain=problem.domain,
        radius=problem.radius, bias=bool(problem.bias_used), backend=backend, device=str(dev),
        counts=counts, timings_s=timings, tokens=[listed[t] for t in sorted(listed)],
        planted=problem.planted, warnings=list(problem.warnings),
    )
    full = np.zeros(V, dtype=np.int8)
    lo_all = np.full(V, np.nan)
    hi_all = np.full(V, np.nan)
    full[ids], lo_all[ids], hi_all[ids] = verdict, mlo, mhi
    rep.verdicts_all, rep.margin_lower_all, rep.margin_upper_all = full, lo_all, hi_all
    ga = np.full(V, -1, dtype=np.int64)
    ga[ids] = g.argmax
    rep.gram_argmax_all = ga
    if not keep_checkpoint:  # the CLI removes it only once the report is safely written
        ckpt.remove()
    return rep


def _decide_open(problem, verifier, still_open, workers, time_limit, timings, base, listed, verdict, mlo, mhi, pos,
                 ckpt, progress):
    """LP stage for what the search left: first stop at the first proven sign (the verdict needs no more);
    where verification cannot confirm it (a margin inside the rounding allowance), solve to the exact
    optimum once more. Only verified bounds are reported; undecided tokens keep the best of either stage."""
    from engine.decide import decide_many

    comps = {sc.token: (None if sc.certificate is None else np.asarray(sc.certificate.competitors, dtype=np.int64))
             for sc in still_open}
    spent = {sc.token: sc.time_s for sc in still_open}
    pending = [sc.token for sc in still_open]
    results: dict[int, tuple] = {}
    for stop_at_sign in (True, False):
        if not pending:
            break
        for b0 in range(0, len(pending), 64):
            chunk = pending[b0 : b0 + 64]
            t0 = time.perf_counter()
            cands = decide_many(problem, chunk, comps, time_limit=time_limit, workers=workers,
                                stop_at_sign=stop_at_sign, n_start=192, add_per_round=96)
            timings["decide"] += time.perf_counter() - t0
            t1 = time.perf_counter()
            checked = _verdicts(verifier, cands)
            tv = time.perf_counter() - t1
            timings["verify"] += tv
            for cand, res in zip(cands, checked):
                spent[cand.token] += cand.time_s + tv / len(cands)
                results[cand.token] = res
            _log(progress, f"decide ({'sign' if stop_at_sign else 'exact'}): {b0 + len(chunk)}/{len(pending)}")
            done = []
            for t in chunk:
                if results[t][0] != "undecided" or not stop_at_sign:
                    done.append(t)
            _record([_token_report(base, t, results[t], spent[t], verifier, still_open) for t in done],
                    listed, verdict, mlo, mhi, pos, ckpt)
        pending = [t for t in pending if results[t][0] == "undecided"]


def _token_report(base, t, res, spent, verifier, still_open):
    v, reason, lo, hi, cj = res
    if v == "undecided":
        sc = next(c for c in still_open if c.token == t)
        _, _, lo2, hi2, _ = _verdict_from(verifier, sc)
        lo = max([b for b in (lo, lo2) if b is not None], default=None)
        hi = min([b for b in (hi, hi2) if b is not None], default=None)
    r = base(t)
    r.verdict, r.reason, r.margin_lower, r.margin_upper, r.certificate = v, reason, lo, hi, cj
    r.time_s = spent
    return r


def _record(reports, listed, verdict, mlo, mhi, pos, ckpt):
    for r in reports:
        listed[r.id] = r
        i = pos[r.id]
        verdict[i] = {"speakable": 1, "unspeakable": -1}.get(r.verdict, 0)
        mlo[i] = np.nan if r.margin_lower is None else r.margin_lower
        mhi[i] = np.nan if r.margin_upper is None else r.margin_upper
    if reports:
        ckpt.add(reports)


def scan(W_U, b_U=None, *, ln_w=None, ln_b=None, norm=None, domain=None, source: str = "<arrays>", **kw) -> ScanReport:
    """Scan arrays (numpy or torch on any device); see :func:`scan_head` for the options."""
    from engine.load import head_from_arrays

    head = head_from_arrays(_as_numpy(W_U), _as_numpy(b_U), _as_numpy(ln_w), _as_numpy(ln_b), norm, source)
    return scan_head(head, domain=domain, **kw)


def gram_head(head: Head, *, center: bool | None = None, device: str = "auto", backend: str = "auto",
              load_time: float = 0.0) -> ScanReport:
    t_start = time.perf_counter()
    backend, dev = resolve_backend(backend, device)
    rows = gram_rows(head, center)
    t0 = time.perf_counter()
    g = gram_screen(rows, backend=backend, device=dev)
    ts = time.perf_counter() - t0
    V = rows.shape[0]
    toks = [TokenReport(id=int(t), text=None if head.texts is None else head.texts[t], gram_argmax=int(g.argmax[t]),
                        hard_to_speak=True) for t in np.nonzero(g.hard_to_speak)[0]]
    return ScanReport(source=head.source, V=V, d=rows.shape[1], domain=None, radius=None, bias=head.b_U is not None,
                      backend=backend, device=str(dev),
                      counts={"tokens": V, "hard_to_speak": int(g.hard_to_speak.sum())},
                      timings_s={"load": load_time, "screen": ts, "total": time.perf_counter() - t_start + load_time},
                      tokens=toks, kind="gram", planted=head.planted)


def check(source_or_head, tokens, *, domain=None, radius=None, bias=True, decide_time_limit: float = 60.0) -> list[TokenReport]:
    """Decide the given tokens with the full machinery (screen point, search, LP) and return their reports."""
    head = load(source_or_head) if isinstance(source_or_head, str) else source_or_head
    rep = scan_head(head, domain=domain, radius=radius, bias=bias, tokens=tokens, device="cpu", backend="torch",
                    decide_time_limit=decide_time_limit)
    by_id = {r.id: r for r in rep.tokens}
    out = []
    for t in sorted(set(int(t) for t in tokens)):
        r = by_id.get(t)
        if r is None:  # settled by the witness screen and not hard-to-speak: report it anyway
            r = TokenReport(id=t, text=None if head.texts is None else head.texts[t],
                            gram_argmax=int(rep.gram_argmax_all[t]),
                            hard_to_speak=False, verdict="speakable", reason="witness (screen)",
                            margin_lower=_finite(rep.margin_lower_all[t]),
                            certificate={"kind": "witness", "x": "self-direction"})
        out.append(r)
    return out


def bench_head(head: Head, *, tokens=None, device: str = "auto", backend: str = "auto", domain=None) -> dict:
    """Per-stage wall time and throughput of one scan on this head."""
    rep = scan_head(head, tokens=tokens, device=device, backend=backend, domain=domain)
    ts = rep.timings_s
    n = rep.counts["tokens"]
    decided = [r for r in rep.tokens if r.reason not in ("tie", "witness (screen)")]
    times = sorted(r.time_s for r in decided)
    out = {
        "source": rep.source, "V": rep.V, "d": rep.d, "domain": rep.domain, "backend": rep.backend,
        "device": rep.device, "counts": rep.counts, "timings_s": ts,
        "screen_tokens_per_s": n / ts["screen"] if ts["screen"] > 0 else None,
        "screen_pairs_per_s": n * rep.V / ts["screen"] if ts["screen"] > 0 else None,
        "open_tokens": len(decided),
        "open_token_time_s": {
            "median": float(np.median(times)) if times else None,
            "p95": float(np.percentile(times, 95)) if times else None,
            "max": float(times[-1]) if times else None,
        },
    }
    return out
