"""The pipeline, top-down: load → screen → search → decide → verify → report (DESIGN §3).

Public entry points (also re-exported from ``engine``):

* ``scan(W_U, b_U=None, *, ln_w=None, ln_b=None, norm=None, domain=None, ...) -> ScanReport`` — arrays.
* ``scan_head(head, **options) -> ScanReport`` — a loaded :class:`Head`; options in :class:`ScanOptions`.
* ``gram_head(head, *, center=None, device="auto", backend="auto") -> ScanReport`` (kind "gram").
* ``check(source_or_head, tokens, *, domain=None, radius=None, bias=True) -> list[TokenReport]``.
* ``bench_head(head, *, tokens=None, ...) -> dict`` — per-stage throughput.

Each stage is a short function that reads the scan's :class:`~engine.ledger.Ledger` and writes to it
through ``record``. Every verdict goes through ``engine.verify``: a witness re-checked over all V logits
in float64, a certificate re-derived from the folded rows, or an identical row (tie). Anything else is
``undecided``. With a constant bias in a bounded domain (the seed's setting) every logit is equal at
x = 0, so each token's margin is >= 0 and exactly 0 unless its row is a vertex of the rows' hull: the open
tokens are decided on the cone of the same rows, whose witnesses scale into the domain and whose Gordan
certificates prove "margin exactly 0".
"""
from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from unspeakable.engine.decide import Pricer, decide_many
from unspeakable.engine.domain import Cone
from unspeakable.engine.evidence import Candidate, Certificate
from unspeakable.engine.head import FoldedRows, Head, InputError, Problem, head_from_arrays, row_chunks, token_ids
from unspeakable.engine.ledger import Checkpoint, Ledger, fingerprint
from unspeakable.engine.loader import fold, gram_rows, load, problem_from_rows, scale_exponents
from unspeakable.engine.report import ScanReport, TokenReport, peak_rss_bytes
from unspeakable.engine.screen import gram_screen, screens, witness_points
from unspeakable.engine.memory import GB, Budget, abs_max, current_rss, hold_keys, parse_gb
from unspeakable.engine.search import SearchOptions, search
from unspeakable.engine.verify import Verifier
from unspeakable.engine.volume import VolumeOptions, entry_json, for_scan, scan_summary
from unspeakable.kernels import resolve_backend, resolve_precision


# The open tokens' stages, in this order (the Ray driver, engine.cluster, runs the same ones): the search
# over chunks of SEARCH_CHUNK tokens, then one LP pass per entry of LP_PASSES (its stop_at_sign) over chunks
# of DECIDE_CHUNK tokens, each pass taking what the one before left undecided. A chunk is also a
# verification batch, whose last bits the results depend on: the cluster's tasks keep the same chunks.
SEARCH_CHUNK = 256
DECIDE_CHUNK = 64
LP_PASSES = (True, False)


class Verified(NamedTuple):
    """One token's verified result, in internal units: only verified numbers (a checked point's margin is
    a lower bound even when <= 0, a checked certificate's deficit an upper bound even when speakable)."""

    verdict: str  # speakable | unspeakable | undecided
    reason: str
    lower: float | None  # margin lower bound
    upper: float | None  # margin upper bound
    certificate: dict | None  # the proof, as reported (internal units until _token_report)


@dataclass
class ScanOptions:
    domain: str | None = None
    radius: float | None = None
    bias: bool = True
    tokens: object = None  # ids to scan (default: all V)
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"  # the screens' fast pass: auto | ieee | tf32 | bf16 (kernels.resolve_precision)
    workers: int = 1  # LP worker processes
    verify: str = "bounded"  # "full": every competitor of every witness re-scored in float64 (audits)
    checkpoint: str | None = None  # JSON-lines file of settled tokens (``--out`` + ``.partial`` in the CLI)
    resume: bool = False
    progress: bool = False
    gram_center: bool | None = None
    decide_time_limit: float = 30.0
    load_time: float = 0.0
    keep_checkpoint: bool = False  # the CLI removes it only once the report is safely written
    cluster: object = None  # an engine.cluster.Cluster: screens and open tokens as Ray tasks, verified here
    memory: float | None = None  # the budget in GB (engine.memory); None: held part + what is free, at most 0.75 GB
    # After the verdicts, each listed token's share of the norm's output set (engine.volume.VolumeOptions):
    # None/False: none; True: the defaults; a dict of VolumeOptions' fields, or a VolumeOptions.
    volume: object = None


@dataclass
class _Scan:
    """What the stages share: the head, the problem, the screens, the ledger and the stage timers."""

    head: Head
    problem: object
    opt: ScanOptions
    backend: str
    device: torch.device
    precision: str
    ledger: Ledger
    budget: Budget
    verifier: Verifier
    timings: dict = field(default_factory=dict)
    gram: object = None
    witness: object = None
    screen_stats: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    volume: tuple | None = None  # (VolumeReport, split ids, options) once the volume stage has run

    def base(self, t: int) -> TokenReport:
        i = self.ledger.pos[int(t)]
        texts = self.problem.texts
        return TokenReport(id=int(t), text=None if texts is None else texts[t], gram_argmax=int(self.gram.argmax[i]),
                           hard_to_speak=bool(self.gram.hard_to_speak[i]))

    def timed(self, stage: str):
        return _Timer(self.timings, stage)


class _Timer:
    def __init__(self, timings: dict, stage: str):
        self.timings, self.stage = timings, stage

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.perf_counter() - self.t0


class _Bar:
    """A rich progress bar on stderr for a stage over many tokens (only when ``progress``; else nothing)."""

    def __init__(self, sc: _Scan, label: str, total: int):
        self.bar = None
        if sc.opt.progress and total:
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _log(sc: _Scan, msg: str) -> None:
    if sc.opt.progress:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- scan
def scan_head(head: Head, **options) -> ScanReport:
    """Decide every token of ``head`` (or ``tokens``); see :class:`ScanOptions` for the options."""
    t_start = time.perf_counter()
    sc = _prepare(head, ScanOptions(**options))
    _screens(sc)
    _settle_ties(sc)
    _settle_screen_witnesses(sc)
    _restore(sc)
    todo = sc.ledger.open_ids()
    with sc.timed("search"):  # the cone of a constant-bias head is built here
        work, lift = working_problem(sc.problem)
    if sc.opt.cluster is not None:  # what comes back is verified and recorded here; failed tasks' tokens stay
        todo = sc.opt.cluster.open_tokens(sc, work, lift, todo)
    still_open = _search_stage(sc, work, lift, todo)
    if still_open:
        _decide_stage(sc, work, lift, still_open)
    _settle_twins(sc)
    if sc.opt.volume is not None:
        _volume_stage(sc)
    return _assemble(sc, t_start)


def _prepare(head: Head, opt: ScanOptions) -> _Scan:
    t0 = time.perf_counter()
    memory = _memory_bytes(opt.memory)  # bad options are refused before any work or file
    problem = fold(head, domain=opt.domain, radius=opt.radius, bias=opt.bias,
                   derive_keys=not hold_keys(memory, head.d_vocab, head.d_model, current_rss()))
    backend, dev = resolve_backend(opt.backend, opt.device)
    precision = resolve_precision(opt.precision, backend, dev)
    V = problem.V
    ids = np.arange(V, dtype=np.int64) if opt.tokens is None else token_ids(opt.tokens, V)
    opt.volume = VolumeOptions.resolve(opt.volume, V)  # bad volume options are refused before any work or file
    ckpt = Checkpoint(opt.checkpoint, fingerprint(problem), opt.resume, problem.d) if opt.checkpoint else None
    if opt.verify not in ("bounded", "full"):
        raise InputError(f"unknown verify mode {opt.verify!r}; expected bounded or full")
    budget = scan_budget(head, problem, memory)
    sc = _Scan(head, problem, opt, backend, dev, precision, Ledger(ids, ckpt), budget,
               Verifier(problem, full=opt.verify == "full"), {"load": opt.load_time + time.perf_counter() - t0})
    sc.verifier.batch = budget.witness_batch
    sc.warnings = list(problem.warnings)
    if not budget.met:
        sc.warnings.append(f"memory budget {budget.total / GB:.2f} GB is below what a {problem.V} x {problem.d} "
                           f"scan holds throughout (about {budget.resident / GB:.2f} GB, engine.memory): running "
                           f"with the smallest working set")
    return sc


def _memory_bytes(memory_gb) -> int | None:
    try:
        return parse_gb(memory_gb)
    except ValueError as e:
        raise InputError(str(e)) from None


def scan_budget(head: Head, problem, total: int | None = None) -> Budget:
    """The scan's :class:`~unspeakable.engine.memory.Budget` (``total`` bytes; None: the default)."""
    head_bytes = sum(int(np.asarray(a).nbytes) for a in (head.W_U, head.b_U, head.ln_w, head.ln_b) if a is not None)
    return Budget.for_problem(problem, head_bytes, total, rss=current_rss())


def _screens(sc: _Scan) -> None:
    with sc.timed("screen"):
        centred = sc.head.gram_center if sc.opt.gram_center is None else sc.opt.gram_center
        grows = shared_gram_rows(sc.head, centred, sc.problem)
        run, extra = screens, {"other_rows": lambda: shared_gram_rows(sc.head, not centred, sc.problem)}
        if sc.opt.cluster is not None:  # the Ray screens count no other convention (enrich does, after)
            run, extra = sc.opt.cluster.screens, {}
        sc.gram, sc.witness, sc.screen_stats = run(grows, centred, sc.head.norm, sc.problem, sc.ledger.ids,
                                                   backend=sc.backend, device=sc.device, precision=sc.precision,
                                                   **extra)
        del grows
    _log(sc, f"screens: {sc.timings['screen']:.1f}s, {int(sc.gram.hard_to_speak.sum())} hard-to-speak")


def shared_gram_rows(head: Head, centred: bool, problem) -> np.ndarray:
    """``gram_rows(head, centred)``, or the problem's own array where the two are equal entry for entry. The
    uncentred gram rows are ``W_U.T ⊙ γ`` as the fold computes its rows; when they equal ``problem.rows``
    (checked row chunk by row chunk, so no ``V × d`` copy is built to find out), the centred ones of a head
    without a LayerNorm are ``rows − rows.mean(axis=0)``: the keys of a domain that does not project. Otherwise
    the gram rows are built and compared (:func:`_shared_rows`)."""
    if not (problem.margin_exp or problem.x_exp) and _uncentred_are_rows(head, problem.rows):
        if not centred:
            return problem.rows
        if head.norm != "layernorm" and problem.keys_are_shifted_rows:
            return problem.keys
    return _shared_rows(gram_rows(head, centred), problem)


def _uncentred_are_rows(head: Head, rows, chunk: int = 4096) -> bool:
    if isinstance(rows, FoldedRows):
        return rows.same_as(head.W_U, head.ln_w)  # the same formula on the same arrays
    W = np.asarray(head.W_U)
    g = None if head.ln_w is None else np.asarray(head.ln_w, dtype=np.float64)
    if rows.shape != (W.shape[1], W.shape[0]):
        return False
    for r0 in range(0, rows.shape[0], chunk):
        blk = np.array(W[:, r0: r0 + chunk].T, dtype=np.float64, order="C")
        if g is not None:
            blk *= g  # as gram_rows and the fold compute it
        if not np.array_equal(blk, rows[r0: r0 + chunk]):
            return False
    return True


def _shared_rows(rows: np.ndarray, problem) -> np.ndarray:
    """The problem's own array (never written by anyone) in place of ``rows`` when the two are equal
    entry for entry: the uncentred gram rows are the folded rows, and the centred ones often the keys, so
    the screens hold one float64 ``V × d`` copy less. Compared by row chunks, stopping at the first that
    differs."""
    for a in (problem.rows, problem.keys):
        if tuple(a.shape) == rows.shape and all(np.array_equal(a[r0:r0 + 4096], rows[r0:r0 + 4096])
                                                for r0 in range(0, rows.shape[0], 4096)):
            return a
    return rows


def _row_groups(rows, chunk: int = 4096) -> np.ndarray:
    """Per row a group id, equal exactly for identical rows (``np.unique(rows, axis=0, return_inverse=True)``
    up to relabelling; -0.0 equals 0.0): a fingerprint per row, read in chunks (O(V) memory, rows derived on
    demand never built whole), then every group with several members split by its rows' exact values, so a
    fingerprint collision never joins two different rows."""
    fps = _fingerprints(((r0, a + 0.0) for r0, a in row_chunks(rows, chunk)), *rows.shape)
    _, group, count = np.unique(fps, axis=0, return_inverse=True, return_counts=True)
    group = group.ravel().astype(np.int64)
    nxt = int(group.max(initial=-1)) + 1
    for g in np.nonzero(count > 1)[0]:
        members = np.nonzero(group == g)[0]
        _, sub = np.unique(rows[members] + 0.0, axis=0, return_inverse=True)
        sub = sub.ravel()
        group[members[sub > 0]] = nxt + sub[sub > 0] - 1  # the first value keeps g
        nxt += int(sub.max())
    return group


def find_ties(problem) -> dict[int, list[int]]:
    """token -> candidate partners with an identical folded row and bias, by value (``+ 0.0`` turns -0.0
    into 0.0 before the bits are fingerprinted). Where the domain has null directions (layernorm), rows are
    also compared after the projection on a coarse grid (two offsets, so no pair straddles a cell edge).
    Every candidate is proven or rejected exactly by ``Verifier.tie`` (a fingerprint collision costs one
    rejected check, never a verdict). Rows are fingerprinted in chunks: O(V) memory."""
    keys = [lambda r0, r1: np.hstack([problem.rows[r0:r1], problem.bias[r0:r1, None]]) + 0.0]
    if problem.domain.null_directions(problem.d).shape[1]:
        g = 1e-9 * (abs_max(problem.keys) + 1e-300)
        for off in (0.0, 0.5):
            keys.append(lambda r0, r1, off=off: np.floor(np.hstack([problem.keys[r0:r1], problem.bias[r0:r1, None]])
                                                         / g + off) + 0.0)
    ties: dict[int, list[int]] = {}
    for key in keys:
        with np.errstate(over="ignore", invalid="ignore"):
            fps = _fingerprints(((r0, key(r0, min(problem.V, r0 + 4096))) for r0 in range(0, problem.V, 4096)),
                                problem.V, problem.d + 1)
        _, group, count = np.unique(fps, axis=0, return_inverse=True, return_counts=True)
        group = group.ravel()
        shared = np.nonzero(count[group] > 1)[0]  # rows whose fingerprint another row shares
        shared = shared[np.argsort(group[shared], kind="stable")]  # by group, ids ascending within
        for members in np.split(shared, np.nonzero(np.diff(group[shared]))[0] + 1) if shared.size else ():
            members = members.tolist()
            for t in members:  # a few partners each: one verified partner suffices
                ties.setdefault(t, []).extend(m for m in members[:9] if m != t)
    return ties


def _fingerprints(blocks, V: int, n: int) -> np.ndarray:
    """``[V, 2]`` uint64 fingerprints of the rows of ``(r0, block)`` row blocks of width n (O(V) memory)."""
    mult = _fingerprint_multipliers(n)
    fps = np.empty((V, 2), dtype=np.uint64)
    for r0, block in blocks:
        block = np.ascontiguousarray(block, dtype=np.float64)
        fps[r0: r0 + block.shape[0]] = _fingerprint(block, mult)
    return fps


def _fingerprint_multipliers(n: int) -> np.ndarray:
    """Two rows of ``n`` fixed random odd 64-bit multipliers (a 128-bit fingerprint of a row's bits)."""
    return np.random.default_rng(0x5EED7135).integers(0, 2**64, size=(2, n), dtype=np.uint64) | np.uint64(1)


def _fingerprint(block: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """Per row, ``[sum_i m_i * y_i for m in mult]`` modulo 2**64, ``y = bits ^ (bits >> 32)`` of each
    float64: equal rows (bit for bit) give equal values. The fold matters: small integers and other short
    mantissas have their low 48 bits all zero, and a product by an odd multiplier only carries bits
    upwards, so without it such rows would be told apart by 16 bits. Two different rows collide with
    probability ``2**(v - 64)`` per multiplier row, ``v`` the lowest bit in which their folded words
    differ (below 32 unless both halves of the two floats differ in the same bits); a collision only costs
    one rejected ``Verifier.tie`` check."""
    w = block.view(np.uint64)
    y = w ^ (w >> np.uint64(32))
    return np.stack([(y * m).sum(axis=1, dtype=np.uint64) for m in mult], axis=1)


def _settle_ties(sc: _Scan) -> None:
    with sc.timed("screen"):  # finding candidate pairs is a screen; proving them, verification
        ties = find_ties(sc.problem)
    with sc.timed("verify"):
        reports = []
        for t in sc.ledger.ids:
            j = next((j for j in ties.get(int(t), ()) if sc.verifier.tie(int(t), j)), None)
            if j is not None:
                r = sc.base(int(t))
                r.verdict, r.reason, r.margin_upper = "unspeakable", "tie", 0.0
                r.certificate = {"kind": "tie", "tie_with": j}
                reports.append(r)
        sc.ledger.record(reports, persist=False)


def _settle_screen_witnesses(sc: _Scan) -> None:
    """Verify the witness screen's winners; list those that are hard-to-speak."""
    led, w = sc.ledger, sc.witness
    with sc.timed("verify"):
        win = np.array([t for t in led.ids if not led.settled(t) and w.margin[led.pos[int(t)]] > 0], dtype=np.int64)
        # the points come in chunks: all V of them at once would be another V × d float64 array or three
        checks = sc.verifier.self_witnesses(win, lambda ids: witness_points(sc.problem, ids))
        for t, c in zip(win, checks):
            if not c.ok:
                continue
            i = led.pos[int(t)]
            r = sc.base(int(t))
            r.verdict, r.reason, r.margin_lower = "speakable", "witness (screen)", sc.problem.report_margin(c.margin)
            r.certificate = {"kind": "witness", "x": "self-direction", "runner_up": int(w.runner_up[i])}
            led.record([r], persist=False, listed=bool(sc.gram.hard_to_speak[i]))
    _log(sc, f"witness screen settled {int((led.verdict == 1).sum())}; {led.open_ids().size} open")


# --------------------------------------------------------------------------------------------- resume
def _restore(sc: _Scan) -> None:
    """Tokens settled by an interrupted run, re-derived from their stored evidence (nothing is trusted): the
    verdict from its proof, every number from the check that backs it, the text and gram fields from this
    run. A record that does not re-derive (a proof that fails, a malformed or unknown field) leaves its
    token open, to be decided again."""
    ckpt = sc.ledger.checkpoint
    if ckpt is None or not ckpt.stored:
        return
    with sc.timed("verify"):
        good, bad = [], 0
        for t in sc.ledger.open_ids():
            rec = ckpt.stored.get(int(t))
            if rec is None:
                continue
            try:
                r = _rederive(sc, int(t), rec)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, ZeroDivisionError):
                r = None
            if r is None:
                bad += 1
            else:
                good.append(r)
        sc.ledger.record(good, persist=False)
    if bad:
        sc.warnings.append(f"{bad} tokens restored from {ckpt.path} did not re-verify and were decided again")


# (a record is the TokenReport's fields; "volume" is always null there: the volume stage runs after the verdicts
# and is computed again on resume)
_RESTORED_KEYS = {"id", "text", "gram_argmax", "hard_to_speak", "verdict", "reason", "margin_lower", "margin_upper",
                  "time_s", "certificate", "token", "model_check", "model_margin", "volume"}
_REASON = re.compile(r"(witness|certificate) \([a-z][a-z0-9 :_.,'-]{0,80}\)(, exact)?|margin exactly 0(, exact)?|"
                     r"never wins: exact certificate with deficit 0 \(at best a tie\)")


def _rederive(sc: _Scan, t: int, rec: dict) -> TokenReport | None:
    """The token's report re-derived from a checkpoint record's evidence, or None (decide it again)."""
    if not isinstance(rec, dict) or set(rec) - _RESTORED_KEYS or rec.get("id") != t:
        return None
    cert, v, p = rec.get("certificate"), sc.verifier, sc.problem
    verdict, reason = rec.get("verdict"), rec.get("reason")
    if not isinstance(cert, dict) or not isinstance(reason, str) or not _REASON.fullmatch(reason):
        return None
    kind = cert.get("kind")
    r = sc.base(t)
    r.verdict, r.reason, r.time_s = verdict, reason, _time(rec.get("time_s"))
    if verdict == "speakable" and kind == "witness" and isinstance(cert.get("x"), list):
        x = _point(cert["x"], p)
        wc = v.witness(t, p.internal_x(x))
        if not wc.ok:
            return None
        cj = {"kind": "witness", "x": p.internal_x(x), "runner_up": wc.runner_up, "allowance": wc.allowance}
        lower, upper = wc.margin, None
        if "upper" in cert:
            c = _stored_certificate(cert["upper"], zero=False)
            cc = v.certificate(t, c)
            if cc.margin_upper is not None:
                upper, cj["upper"] = cc.margin_upper, c.to_json()
        res = Verified("speakable", reason, lower, upper, cj)
    elif verdict == "unspeakable" and kind == "tie":
        j = cert.get("tie_with")
        if not isinstance(j, int) or isinstance(j, bool) or not v.tie(t, j):
            return None
        r.margin_upper, r.certificate = 0.0, {"kind": "tie", "tie_with": j}
        return r
    elif verdict == "unspeakable" and kind in ("dual", "cone", "zero"):
        c = _stored_certificate(cert, zero=kind == "zero")
        cc = v.certificate(t, c) if "weights_exact" not in cert else v.exact_weights(t, c, _rationals(cert))
        if not cc.ok or (kind == "zero") != c.zero or (kind == "cone") == p.domain.bounded:
            return None
        cj = c.to_json()
        cj["kind"], cj["deficit"] = kind, float(cc.deficit)
        if cc.exact is not None:
            cj["weights_exact"] = [f"{w.numerator}/{w.denominator}" for w in cc.exact[1]]
        lower = 0.0 if kind == "zero" else None
        if "lower_x" in cert and kind != "zero":
            x = _point(cert["lower_x"], p)
            wc = v.witness(t, p.internal_x(x))
            if math.isfinite(wc.margin):
                lower, cj["lower_x"] = wc.margin, p.internal_x(x)
        res = Verified("unspeakable", reason, lower, cc.margin_upper, cj)
    else:
        return None  # undecided tokens carry no proof: decide them again
    out = _token_report(sc, t, res, r.time_s)
    # A stored bound is kept only where the re-derived one proves it (a lower bound at most the re-checked
    # one, an upper bound at least it): then a resumed report equals the uninterrupted one, whose batched
    # checks may round a last digit differently, and an edited number never survives.
    lo_s, hi_s = rec.get("margin_lower"), rec.get("margin_upper")
    if _num(lo_s) and out.margin_lower is not None and lo_s <= out.margin_lower:
        out.margin_lower = float(lo_s)
    if _num(hi_s) and out.margin_upper is not None and hi_s >= out.margin_upper:
        out.margin_upper = float(hi_s)
    if out.certificate.get("kind") == "witness":  # informative fields of the witness (not claims)
        if _num(cert.get("allowance")) and cert["allowance"] >= 0:
            out.certificate["allowance"] = float(cert["allowance"])
        if isinstance(cert.get("runner_up"), int) and 0 <= cert["runner_up"] < p.V:
            out.certificate["runner_up"] = cert["runner_up"]
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _time(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 else 0.0


def _point(x, p) -> np.ndarray:
    """A stored point (caller's units) as a float64 vector of the problem's dimension, or ValueError."""
    if not isinstance(x, list) or len(x) != p.d or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in x):
        raise ValueError("not a point")
    return np.asarray(x, dtype=np.float64)


def _stored_certificate(cert: dict, zero: bool) -> Certificate:
    comp, lam, mu = cert["competitors"], cert["weights"], cert.get("mu")
    if not (isinstance(comp, list) and isinstance(lam, list)) or not all(
            isinstance(j, int) and not isinstance(j, bool) for j in comp) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in lam):
        raise ValueError("not a certificate")
    if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float))):
        raise ValueError("not a multiplier")
    return Certificate(np.asarray(comp, dtype=np.int64), np.asarray(lam, dtype=np.float64), mu, zero=zero)


def _rationals(cert: dict) -> list:
    from fractions import Fraction

    w = cert["weights_exact"]
    if not isinstance(w, list) or not all(isinstance(v, str) for v in w):
        raise ValueError("weights_exact must be rationals")
    return [Fraction(v) for v in w]


# --------------------------------------------------------------------------------------------- search, decide
def working_problem(p):
    """The problem the search and decide stages solve for problem ``p``, and how their claims map back
    (``lift``; also the benchmarks', which draw the LP's tokens as a scan does).

    Normally the problem itself. With a constant bias in a bounded domain: the cone of the domain's rows
    (its keys); a cone witness is scaled onto the domain, a Gordan certificate proves margin exactly 0."""
    if not (p.domain.bounded and p.constant_bias):
        return p, lambda c: c
    cone = _cone_of_keys(p)

    def lift(c: Candidate) -> Candidate:
        if c.witness is not None:
            c.witness = p.domain.onto(c.witness)
        if c.certificate is not None:
            c.certificate.zero = True
        return c

    return cone, lift


def _cone_of_keys(p) -> Problem:
    """The cone of ``p``'s keys, sharing ``p``'s arrays: its rows and keys are ``p.keys`` itself (centred on
    the zero vector: a common shift of every row changes no verdict in the cone, and the keys are centred
    already) and its float32 copy is ``p``'s. Copying them would cost two more ``V × d`` float64 arrays. Keys
    too large or too small for float64's comfortable range take the copying path, which rescales them."""
    z, dom = np.zeros(p.V), Cone()
    if scale_exponents(p.keys, z, dom) != (0, 0):
        return problem_from_rows(p.keys, z, dom, source=p.source, bias_used=False)
    margin_exp, x_exp = dom.units(0, 0)
    return Problem(rows=p.keys, bias=z, domain=dom, center=np.zeros(p.d), keys=p.keys, bias_used=False,
                   source=p.source, margin_exp=margin_exp, x_exp=x_exp,
                   derived=p.derived if p.work_keys is None else {})


def _search_stage(sc: _Scan, work, lift, todo: np.ndarray) -> list[tuple[Candidate, Verified]]:
    """Batched search over the open tokens; settled ones are recorded, the rest returned for the LP with
    their verified (undecided) result."""
    still_open: list[tuple] = []
    with sc.timed("search"):
        keys32 = torch.from_numpy(work.search_keys32())
    with _Bar(sc, "search", todo.size) as bar:
        for b0 in range(0, todo.size, SEARCH_CHUNK):
            _search_chunk(sc, work, lift, todo[b0: b0 + SEARCH_CHUNK], keys32, still_open)
            bar.advance(min(SEARCH_CHUNK, todo.size - b0))
        _log(sc, f"search: {todo.size} tokens, {len(still_open)} left for the LP")
    return still_open


def runner_ups(sc: _Scan, tokens) -> np.ndarray:
    """The witness screen's runner-up of each token: where the search starts from (also the Ray driver's)."""
    return sc.witness.runner_up[np.array([sc.ledger.pos[int(t)] for t in tokens], dtype=np.int64)]


def _search_chunk(sc: _Scan, work, lift, chunk: np.ndarray, keys32, still_open: list) -> None:
    with sc.timed("search"):
        cands = [lift(c) for c in search(work, chunk, keys32=keys32, runner_up=runner_ups(sc, chunk),
                                         options=SearchOptions(batch=sc.budget.search_batch))]
    results = verify_candidates(sc, cands)  # timed as verification
    with sc.timed("search"):  # recording, the checkpoint's append included
        still_open.extend(record_search(sc, cands, results))


def record_search(sc: _Scan, cands: list, results: list) -> list[tuple[Candidate, Verified]]:
    """Record the searched tokens that have a verdict; return ``(candidate, result)`` of the others (also the
    Ray driver's, engine.cluster)."""
    done, still_open = [], []
    for cand, res in zip(cands, results):
        if res.verdict == "undecided":
            still_open.append((cand, res))
        else:
            done.append(_token_report(sc, cand.token, res, cand.time_s))
    sc.ledger.record(done)
    return still_open


def _decide_stage(sc: _Scan, work, lift, still_open: list[tuple[Candidate, Verified]]) -> None:
    """LP stage for what the search left: first stop at the first proven sign (the verdict needs no more);
    where verification cannot confirm it (a margin inside the rounding allowance), solve to the exact
    optimum once more. Only verified bounds are reported; undecided tokens keep the best of every stage."""
    with sc.timed("decide"):
        st = DecideState(Pricer(work))
    for cand, res in still_open:
        st.enter(cand, res)
    pending = [c.token for c, _ in still_open]
    for stop_at_sign in LP_PASSES:
        with _Bar(sc, "decide (sign)" if stop_at_sign else "decide (exact)", len(pending)) as bar:
            for b0 in range(0, len(pending), DECIDE_CHUNK):
                _decide_chunk(sc, work, lift, pending[b0: b0 + DECIDE_CHUNK], stop_at_sign, st)
                bar.advance(len(pending[b0: b0 + DECIDE_CHUNK]))
        pending = [t for t in pending if st.best[t].verdict == "undecided"]
        if not pending:
            break


@dataclass
class DecideState:
    pricer: Pricer | None  # None on the Ray driver: the tasks price
    comps: dict = field(default_factory=dict)  # token -> starting competitors (the search's certificate support)
    best: dict = field(default_factory=dict)  # token -> best Verified result so far
    spent: dict = field(default_factory=dict)  # token -> seconds spent after the screens

    def enter(self, cand: Candidate, res: Verified) -> None:
        """A token the search left open, with its verified result."""
        cert = cand.certificate
        self.comps[cand.token] = None if cert is None else np.asarray(cert.competitors, dtype=np.int64)
        self.best[cand.token], self.spent[cand.token] = res, cand.time_s


def _decide_chunk(sc: _Scan, work, lift, chunk: list, stop_at_sign: bool, st: DecideState) -> None:
    with sc.timed("decide"):
        cands = [lift(c) for c in decide_many(work, chunk, st.comps, pricer=st.pricer, workers=sc.opt.workers,
                                              **decide_pass_options(stop_at_sign, sc.opt.decide_time_limit,
                                                                    sc.budget.lp_warm_rows))]
    results = verify_candidates(sc, cands)  # timed as verification
    with sc.timed("decide"):  # recording, the checkpoint's append included
        record_decide(sc, chunk, cands, results, stop_at_sign, st)


def record_decide(sc: _Scan, chunk: list, cands: list, results: list, stop_at_sign: bool, st: DecideState) -> list:
    """Merge an LP pass's verified results into ``st``; record the tokens that are final (a verdict, or the
    last pass); return the others (also the Ray driver's, engine.cluster)."""
    for cand, res in zip(cands, results):
        st.spent[cand.token] += cand.time_s
        st.best[cand.token] = _merge(st.best[cand.token], res)
    final = [t for t in chunk if st.best[t].verdict != "undecided" or not stop_at_sign]
    sc.ledger.record([_token_report(sc, t, st.best[t], st.spent[t]) for t in final])
    final_set = set(final)
    return [t for t in chunk if t not in final_set]


def decide_pass_options(stop_at_sign: bool, time_limit: float, warm_max_rows: int = 4096) -> dict:
    """One LP pass's settings (also the Ray tasks': engine.cluster). The second pass solves to the optimum,
    to a tolerance near float64's own: a margin of 1e-9 relative is far above rounding and must not be left
    undecided. ``warm_max_rows``: the LP's Gram cap (the budget's ``lp_warm_rows``)."""
    return {"time_limit": time_limit, "stop_at_sign": stop_at_sign, "tol": 1e-9 if stop_at_sign else 1e-14,
            "n_start": 192, "add_per_round": 96, "warm_max_rows": warm_max_rows}


def _merge(old: Verified, new: Verified) -> Verified:
    """A verdict wins; between two undecided results keep the tighter verified bounds of both."""
    if new.verdict != "undecided" or old.verdict != "undecided":
        return new if new.verdict != "undecided" else old
    lo = max([b for b in (old.lower, new.lower) if b is not None], default=None)
    hi = min([b for b in (old.upper, new.upper) if b is not None], default=None)
    return Verified("undecided", new.reason, lo, hi, None)


def _settle_twins(sc: _Scan) -> None:
    """Undecided tokens whose row has exact twins (identical rows) with a strictly lower bias: a twin loses to
    the token everywhere by the bias gap, which may be one ulp, so the search and the LP (tolerances far above
    an ulp) cannot find a point where the token beats it and everyone else. Search again on the rows without
    the dominated twins (they can never be the argmax), and verify what is found on the full head: there the
    margin is the smaller of the bias gap and the margin against the rest."""
    led, p = sc.ledger, sc.problem
    und = [int(t) for t in led.ids if led.verdict[led.pos[int(t)]] == 0]
    if not und or not p.domain.bounded or not p.fold_exact:
        return
    with sc.timed("decide"):
        group = _row_groups(p.rows)
        top = {}
        for j in range(p.V):  # per group the highest bias; several at it: none dominates the others
            g = int(group[j])
            if g not in top or p.bias[j] > p.bias[top[g][0]]:
                top[g] = [j]
            elif p.bias[j] == p.bias[top[g][0]]:
                top[g].append(j)
        dominated = np.array([p.bias[j] < p.bias[top[int(group[j])][0]] for j in range(p.V)])
        todo = [t for t in und if not dominated[t] and np.any(dominated & (group == group[t]))]
        if not todo or dominated.all():
            return
        keep = np.nonzero(~dominated)[0]
        R = problem_from_rows(p.rows[keep], p.bias[keep], p.domain, source=p.source, bias_used=p.bias_used)
        pos = {int(j): i for i, j in enumerate(keep)}
        ids = np.array([pos[t] for t in todo], dtype=np.int64)
        cands = search(R, ids)
        lp = decide_many(R, [int(i) for i in ids], **decide_pass_options(False, sc.opt.decide_time_limit,
                                                                          sc.budget.lp_warm_rows))
    found = []
    for c_s, c_l, t in zip(cands, lp, todo):
        for c in (c_s, c_l):
            if c.witness is not None:
                found.append((t, R.report_x(c.witness), c.reason))
    if not found:
        return
    with sc.timed("verify"):
        checks = sc.verifier.witnesses(np.array([f[0] for f in found]), np.stack([f[1] for f in found]))
    done = {}
    for (t, x, why), wc in zip(found, checks):
        if wc.ok and t not in done:
            cj = {"kind": "witness", "x": x, "runner_up": wc.runner_up, "allowance": wc.allowance}
            done[t] = _token_report(sc, t, Verified("speakable", f"witness ({why}, dominated twins set aside)",
                                                    wc.margin, None, cj), 0.0)
    sc.ledger.record(list(done.values()))


# --------------------------------------------------------------------------------------------- volume
def _volume_stage(sc: _Scan) -> None:
    """Each listed token's share of the norm's output set, once every verdict is final (engine.volume:
    share 0 for the proven unspeakable, the plain pass for all, splitting and the cap for the hardest). It
    runs before the checkpoint is dropped, so an interrupted volume pass resumes from the verdicts."""
    led, opt = sc.ledger, sc.opt
    listed = [led.listed[t] for t in sorted(led.listed)]
    with sc.timed("volume"):
        rep, split_ids, warnings = for_scan(sc.head, listed, opt.volume, domain=opt.domain, radius=opt.radius,
                                                bias=opt.bias, progress=(lambda m: _log(sc, f"volume: {m}")),
                                                problem=sc.problem)  # the scan's own fold, not a second one
        for r, tv in zip(listed, rep.tokens):
            r.volume = entry_json(tv)
    sc.warnings.extend(warnings)
    sc.volume = (rep, split_ids, opt.volume)
    _log(sc, f"volume: {sc.timings['volume']:.1f}s, {len(split_ids)} tokens split")


# --------------------------------------------------------------------------------------------- verdicts
def verify_candidates(sc: _Scan, cands: list[Candidate]) -> list[Verified]:
    """Verify candidates (witnesses in one batched pass); each one's :class:`Verified` result (also the Ray
    driver's, engine.cluster)."""
    with sc.timed("verify"):
        with_w = [i for i, c in enumerate(cands) if c.witness is not None]
        wchecks = {}
        if with_w:
            X = np.stack([np.asarray(cands[i].witness, dtype=np.float64) for i in with_w])
            wchecks = dict(zip(with_w, sc.verifier.witnesses(np.array([cands[i].token for i in with_w]), X)))
        return [_verdict(sc, c, wchecks.get(i)) for i, c in enumerate(cands)]


def _verdict(sc: _Scan, cand: Candidate, wc) -> Verified:
    cc = sc.verifier.certificate(cand.token, cand.certificate) if cand.certificate is not None else None
    zero = cc is not None and cand.certificate.zero
    lower = wc.margin if wc is not None and np.isfinite(wc.margin) else None
    upper = cc.margin_upper if cc is not None and cc.margin_upper is not None else None
    if zero and cc.ok:
        lower = 0.0  # x = 0 is in the domain and ties every logit: the margin is exactly 0
    if wc is not None and wc.ok and cc is not None and cc.ok:
        msg = f"internal error: token {cand.token} has both a verified witness and a verified certificate"
        print(f"unspeakable: {msg}", file=sys.stderr)
        sc.warnings.append(msg)
        return Verified("undecided", msg, lower, upper, None)
    if wc is not None and wc.ok:
        cj = {"kind": "witness", "x": np.asarray(cand.witness, dtype=np.float64), "runner_up": wc.runner_up,
              "allowance": wc.allowance}
        if upper is not None:  # the evidence of margin_upper, so that a resumed scan re-derives it
            cj["upper"] = cand.certificate.to_json()
        return Verified("speakable", f"witness ({cand.reason})", lower, upper, cj)
    if cc is not None and cc.ok:
        cj = cand.certificate.to_json()
        cj["kind"] = "zero" if zero else "dual" if sc.problem.domain.bounded else "cone"
        cj["deficit"] = float(cc.deficit)
        if "mu" in cj:
            cj["mu"] = min(cj["mu"], 0.0)  # as the verifier read it: mu only guides the weights
        reason = "margin exactly 0" if zero else f"certificate ({cand.reason})"
        if cc.exact is not None:  # an exact proof's own weights (engine.exact): what the audit re-checks
            comp, w = cc.exact
            cj.update(competitors=[int(j) for j in comp], weights=[float(v) for v in w],
                      weights_exact=[f"{v.numerator}/{v.denominator}" for v in w])
            if cj["kind"] == "cone":
                cj["mu"] = 0.0
            if cj["kind"] == "dual" and cc.deficit == 0:
                reason = "never wins: exact certificate with deficit 0 (at best a tie)"
            else:
                reason += ", exact"
        if lower is not None and not zero:  # the evidence of margin_lower (a checked point), for --resume
            cj["lower_x"] = np.asarray(cand.witness, dtype=np.float64)
        return Verified("unspeakable", reason, lower, upper, cj)
    return Verified("undecided", cand.reason or "no proof", lower, upper, None)


def _token_report(sc: _Scan, t: int, res: Verified, time_s: float) -> TokenReport:
    """A verified result as the token's report, in the caller's units (DESIGN §5)."""
    p, cj = sc.problem, res.certificate
    r = sc.base(t)
    r.verdict, r.reason, r.time_s = res.verdict, res.reason, float(time_s)
    r.margin_lower, r.margin_upper = p.report_margin(res.lower), p.report_margin(res.upper)
    if cj is not None:
        cj = dict(cj)
        if cj.get("kind") == "witness":
            cj["x"] = [float(v) for v in p.report_x(cj["x"])]
            cj["allowance"] = p.report_margin(cj["allowance"])
        elif cj.get("kind") == "dual":
            cj["deficit"] = p.report_margin(cj["deficit"])
        if "lower_x" in cj:
            cj["lower_x"] = [float(v) for v in p.report_x(cj["lower_x"])]
    r.certificate = cj
    return r


def _assemble(sc: _Scan, t_start: float) -> ScanReport:
    p, led, V = sc.problem, sc.ledger, sc.problem.V
    sc.timings["total"] = time.perf_counter() - t_start + sc.opt.load_time
    for k in ("screen", "search", "decide", "verify"):
        sc.timings.setdefault(k, 0.0)
    counts = {"tokens": int(led.ids.size), "hard_to_speak": int(sc.gram.hard_to_speak.sum()), **led.counts()}
    rep = ScanReport(source=p.source or sc.head.source, V=V, d=p.d, domain=p.domain.name,
                     radius=p.radius_reported, bias=bool(p.bias_used), backend=sc.backend, device=str(sc.device),
                     counts=counts, timings_s=sc.timings, tokens=[led.listed[t] for t in sorted(led.listed)],
                     planted=p.planted, warnings=list(sc.warnings), screen_stats=sc.screen_stats,
                     gram_other=sc.screen_stats.get("other_gram"),
                     memory={**sc.budget.to_json(), "peak_rss_bytes": peak_rss_bytes()})
    if sc.volume is not None:
        rep.volume_report = sc.volume[0]
        rep.volume = scan_summary(*sc.volume)
    full, lo_all, hi_all = np.zeros(V, dtype=np.int8), np.full(V, np.nan), np.full(V, np.nan)
    full[led.ids], lo_all[led.ids], hi_all[led.ids] = led.verdict, led.lower, led.upper
    ga = np.full(V, -1, dtype=np.int64)
    ga[led.ids] = sc.gram.argmax
    rep.verdicts_all, rep.margin_lower_all, rep.margin_upper_all, rep.gram_argmax_all = full, lo_all, hi_all, ga
    if led.checkpoint is not None and not sc.opt.keep_checkpoint:
        led.checkpoint.remove()
    return rep


# --------------------------------------------------------------------------------------------- other entries
def scan(W_U, b_U=None, *, ln_w=None, ln_b=None, norm=None, domain=None, source: str = "<arrays>",
         **options) -> ScanReport:
    """Scan arrays (numpy, torch on any device and dtype, lists); see :class:`ScanOptions` for the options."""
    head = head_from_arrays(W_U, b_U, ln_w, ln_b, norm, source)
    return scan_head(head, domain=domain, **options)


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
                      backend=backend, device=str(dev), counts={"tokens": V, "hard_to_speak": int(g.hard_to_speak.sum())},
                      timings_s={"load": load_time, "screen": ts, "total": time.perf_counter() - t_start + load_time},
                      tokens=toks, kind="gram", planted=head.planted)


def check(source_or_head, tokens, *, domain=None, radius=None, bias=True,
          decide_time_limit: float = 60.0) -> list[TokenReport]:
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
                            gram_argmax=int(rep.gram_argmax_all[t]), hard_to_speak=False, verdict="speakable",
                            reason="witness (screen)", margin_lower=_finite(rep.margin_lower_all[t]),
                            certificate={"kind": "witness", "x": "self-direction"})
        out.append(r)
    return out


def _finite(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def bench_head(head: Head, *, tokens=None, device: str = "auto", backend: str = "auto", domain=None) -> dict:
    """Per-stage wall time and throughput of one scan on this head."""
    rep = scan_head(head, tokens=tokens, device=device, backend=backend, domain=domain)
    ts, n = rep.timings_s, rep.counts["tokens"]
    times = sorted(r.time_s for r in rep.tokens if r.reason not in ("tie", "witness (screen)"))
    return {
        "source": rep.source, "V": rep.V, "d": rep.d, "domain": rep.domain, "backend": rep.backend,
        "device": rep.device, "counts": rep.counts, "timings_s": ts,
        "screen_tokens_per_s": n / ts["screen"] if ts["screen"] > 0 else None,
        "screen_pairs_per_s": n * rep.V / ts["screen"] if ts["screen"] > 0 else None,
        "screen_pass": {k: v for k, v in rep.screen_stats.items() if not isinstance(v, dict)},
        "peak_rss_bytes": peak_rss_bytes(),
        "open_tokens": len(times),
        "open_token_time_s": {
            "median": float(np.median(times)) if times else None,
            "p95": float(np.percentile(times, 95)) if times else None,
            "max": float(times[-1]) if times else None,
        },
    }
