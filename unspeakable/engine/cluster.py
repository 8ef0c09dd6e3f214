"""The scan on a Ray cluster (issue 10): the screens and the open tokens as Ray tasks, verified on the driver.

``Cluster`` is passed as ``scan_head(head, cluster=Cluster(...))`` (CLI: ``scan SOURCE... --ray [ADDRESS]``).
The pipeline runs as it does in one process (``engine.pipeline``); two stages hand their work to the
cluster through two methods with the shapes of the local stages:

* :meth:`Cluster.screens` — the gram rows and the witness keys go into the object store once (``ray.put``);
  each task screens a block of rows against all V (``engine.screen.gram_screen`` / ``witness_screen`` on
  those ids: the same exact top-2 with float64 recovery, so the blocks concatenate to the single-process
  screens). The driver checks every block (shapes, index ranges) and recomputes in float64 the self and
  best scores at the returned indices; a block that fails is screened again locally.
* :meth:`Cluster.open_tokens` — the open tokens in the pipeline's own search chunks (``pipeline.SEARCH_CHUNK``, so every
  search batch is the single-process batch), then the LP passes (stop at the sign, then exact) for what
  the search left, each as a task. Tasks return *claims* (``Candidate``, unlifted); the driver rebuilds
  them from plain arrays, lifts them and verifies them with its own ``Verifier`` (``pipeline.verify_candidates``),
  exactly as the single-process stages do, and records each finished token in the ledger (and its
  checkpoint) as results arrive. Nothing a task returns becomes a verdict without that check; a task that
  fails after Ray's retries, or returns something malformed, hands its tokens back to the local pipeline.

Backpressure: at most ``max_in_flight`` tasks are submitted at a time (default: twice the cluster's CPUs);
``object_store_memory`` bounds the object store of a local cluster per node. Each task asks Ray for
``memory=`` its peak estimate (:func:`task_memory`), and a task no node can hold is refused before any work.

Peak memory per task (bytes; V × d head, B rows per screen task, n = 256 tokens per search batch, a base of
``BASE_BYTES`` for the interpreter, torch and HiGHS):

* screen: ``12·V·d`` (a float32 copy of the keys, and the box's sign queries in float64) ``+ 24·B·d`` (the
  block's queries in float64 and float32, gathered rows) ``+ 4 · 4·1024·8192`` (score tiles) ``+ BASE``;
* search: ``4·V·d`` (float32 keys) ``+ 32·n·V`` (the batch's logits in float32 and float64, twice) ``+ BASE``;
* decide: ``4·V·d`` (the pricer's float32 keys) ``+ 48·V`` (logits, bounds) ``+ 8·2048·d`` (restricted rows)
  ``+ BASE``.

The object store holds the gram rows and the keys in float64 (``8·V·d`` each; the working cone's keys once
more when the bias is constant) — read zero-copy by the tasks of a node.
"""
from __future__ import annotations

import math
import socket
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from unspeakable.engine.evidence import Candidate, Certificate
from unspeakable.engine.head import InputError, rows_array
from unspeakable.engine.pipeline import (
    DECIDE_CHUNK,
    LP_PASSES,
    SEARCH_CHUNK,
    DecideState,
    decide_pass_options,
    record_decide,
    record_search,
    runner_ups,
    verify_candidates,
)
from unspeakable.engine.screen import GramScreen, WitnessScreen, gram_argmax, gram_screen, hard_to_speak, witness_screen

BASE_BYTES = 600 * 2**20
SEARCH_BATCH = SEARCH_CHUNK  # a search task searches whole chunks of the pipeline's, bit for bit the same
DECIDE_BATCH = DECIDE_CHUNK  # tokens per LP task (each token is solved on its own: the batch does not change results)
TILE_BYTES = 4 * 1024 * 8192


def task_memory(kind: str, V: int, d: int, rows: int = SEARCH_BATCH) -> int:
    """Peak bytes of one task (see the module docstring for the terms): ``kind`` screen | search | decide."""
    if kind == "screen":
        return 12 * V * d + 24 * rows * d + 4 * TILE_BYTES + BASE_BYTES
    if kind == "search":
        return 4 * V * d + 32 * rows * V + BASE_BYTES
    if kind == "decide":
        return 4 * V * d + 48 * V + 8 * 2048 * d + BASE_BYTES
    raise ValueError(f"unknown task kind {kind!r}")


@dataclass
class Slim:
    """What the tasks read of a problem: keys, bias, domain (the rows stay on the driver)."""

    keys: np.ndarray
    bias: np.ndarray
    domain: object

    # The tasks get the search's keys and bias already (Problem.search_keys / search_bias).
    search_keys = property(lambda self: self.keys)
    search_bias = property(lambda self: self.bias)

    @property
    def V(self) -> int:
        return int(self.keys.shape[0])

    @property
    def d(self) -> int:
        return int(self.keys.shape[1])


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs the ray package: pip install -e \".[ray]\"") from None
    return ray


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """A host:port (or ray://host:port) must answer a TCP connect before Ray is asked (its own attempt
    retries for 20 s); ``None`` and ``auto`` are left to Ray. Raises :class:`InputError`."""
    if address is None or address == "auto":
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray {address}: expected HOST:PORT (e.g. 10.0.0.1:6379), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"--ray {address}: cannot reach the Ray cluster ({e})") from None


@dataclass
class Cluster:
    """Where and how wide the scan runs; see the module docstring.

    ``address`` None starts a local Ray (``num_cpus``, ``object_store_memory`` bytes) unless one is running
    in this process already; otherwise it is joined. :meth:`close` shuts Ray down only if it started it."""

    address: str | None = None
    num_cpus: int | None = None
    max_in_flight: int | None = None
    object_store_memory: int | None = None
    max_retries: int = 3
    screen_rows: int = 4096  # rows per screen task
    started: bool = field(default=False, init=False)
    stats: dict = field(default_factory=dict, init=False)

    def start(self) -> Cluster:
        ray = _ray()
        check_address(self.address)
        if ray.is_initialized():  # a Ray this process already runs (a caller's, or ours from an earlier scan)
            return self
        kw = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if self.address is None:
            kw.update(num_cpus=self.num_cpus, object_store_memory=self.object_store_memory)
        try:
            ray.init(address=self.address, **kw)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InputError(f"--ray {self.address or '(local)'}: cannot start or join Ray: {e}") from None
        self.started = True
        return self

    def close(self) -> None:
        if self.started:
            _ray().shutdown()
            self.started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def cpus(self) -> int:
        return max(1, int(_ray().cluster_resources().get("CPU", 1)))

    def in_flight(self) -> int:
        return self.max_in_flight or 2 * self.cpus()

    def _remote(self, fn, kind: str, V: int, d: int, rows: int = SEARCH_BATCH):
        need = task_memory(kind, V, d, rows)
        ray = _ray()
        largest = max((n.get("Resources", {}).get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=0)
        if need > largest:
            raise InputError(f"a {kind} task on a {V} x {d} head needs about {need / 2**30:.1f} GiB "
                             f"(unspeakable.engine.cluster.task_memory); the largest Ray node offers {largest / 2**30:.1f} GiB")
        return ray.remote(fn).options(num_cpus=1, memory=need, max_retries=self.max_retries, retry_exceptions=False)

    # ------------------------------------------------------------------------------------------- screens
    def screens(self, grows, centred_rows, norm, problem, ids, *, backend="torch", device="cpu",
                precision="ieee") -> tuple[GramScreen, WitnessScreen, dict]:
        """``engine.screen.screens`` over row blocks on the cluster (same signature and results)."""
        self.start()
        t0 = time.perf_counter()
        ray, V, d = _ray(), problem.V, problem.d
        grows_ref = ray.put(np.ascontiguousarray(grows, dtype=np.float64))
        slim_ref = ray.put(Slim(rows_array(problem.search_keys), problem.search_bias, problem.domain))
        fn = self._remote(_screen_task, "screen", V, d, min(self.screen_rows, ids.size))
        blocks = [ids[b0: b0 + self.screen_rows] for b0 in range(0, ids.size, self.screen_rows)]
        # Tasks ask Ray for CPUs only: they screen with the torch backend in IEEE float32 (exact either way)
        results = _run_bounded(fn, [(grows_ref, slim_ref, b, "torch", "ieee") for b in blocks], self.in_flight())
        del grows_ref, slim_ref
        gs, ws, redone = [], [], 0
        for b, res in zip(blocks, results):
            g, w = res if _screen_ok(res, b, grows, problem) else (None, None)
            if g is None:  # a failed or malformed block: screened again here
                redone += 1
                g, w = gram_screen(grows, b, backend=backend, device=device, precision=precision), \
                    witness_screen(problem, b, backend=backend, device=device, precision=precision)
            gs.append(g)
            ws.append(w)
        self.stats["screen_tasks"], self.stats["screen_blocks_redone"] = len(blocks), redone
        g, w = _concat(gs, ws, time.perf_counter() - t0)
        return g, w, {"passes": 2, "tasks": len(blocks), "blocks_redone": redone}

    # ------------------------------------------------------------------------------------------- open tokens
    def open_tokens(self, sc, work, lift, todo: np.ndarray) -> np.ndarray:
        """Search and decide ``todo`` on the cluster, verify and record every result on the driver; return
        the tokens the local pipeline must still decide (their task failed or returned something malformed)."""
        if todo.size == 0:
            return todo
        self.start()
        return _OpenTokens(self, sc, work, lift).run(todo)


def _concat(gs: list, ws: list, elapsed: float):
    cat = np.concatenate
    g = GramScreen(cat([x.argmax for x in gs]), cat([x.best for x in gs]), cat([x.best_idx for x in gs]),
                   cat([x.second for x in gs]), cat([x.self_val for x in gs]), cat([x.hard_to_speak for x in gs]),
                   sum(x.recomputed for x in gs), elapsed)
    w = WitnessScreen(cat([x.margin for x in ws]), cat([x.runner_up for x in ws]), sum(x.recomputed for x in ws),
                      elapsed)
    return g, w


def _screen_task(grows, slim: Slim, ids: np.ndarray, backend: str, precision: str):
    """One row block of both screens (runs on a worker; the arrays are the object store's, read-only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.from_numpy on the store's read-only buffers
        g = gram_screen(grows, ids, backend=backend, device="cpu", precision=precision)
        w = witness_screen(slim, ids, backend=backend, device="cpu", precision=precision)
    return g, w


def _screen_ok(res, ids: np.ndarray, grows: np.ndarray, problem) -> bool:
    """A block's screens, checked: shapes, index ranges, and the self and best gram scores recomputed in
    float64 here at the returned indices (so a hard-to-speak claim rests on a real competitor)."""
    if isinstance(res, BaseException) or not (isinstance(res, tuple) and len(res) == 2):
        return False
    g, w = res
    if not isinstance(g, GramScreen) or not isinstance(w, WitnessScreen):
        return False
    n, V = ids.size, problem.V
    arrays = (g.argmax, g.best, g.best_idx, g.second, g.self_val, g.hard_to_speak, w.margin, w.runner_up)
    if any(not isinstance(a, np.ndarray) or a.shape != (n,) for a in arrays):
        return False
    for idx in (g.best_idx, w.runner_up):
        if np.any((idx < 0) | (idx >= V) | (idx == ids)):
            return False
    rows = grows[ids]
    own = np.einsum("ij,ij->i", rows, rows)
    best = np.einsum("ij,ij->i", rows, grows[g.best_idx])
    tol = 1e-12 * np.linalg.norm(rows, axis=1) * np.linalg.norm(grows[g.best_idx], axis=1) + 1e-300
    ok = np.all(np.abs(own - g.self_val) <= tol) and np.all(np.abs(best - g.best) <= tol)
    return bool(ok and np.array_equal(g.hard_to_speak, hard_to_speak(g.self_val, g.best))
                and np.array_equal(g.argmax, gram_argmax(ids, g.self_val, g.best, g.best_idx)))


def _run_bounded(fn, args: list[tuple], max_in_flight: int) -> list:
    """``fn.remote(*a)`` for each ``a``, at most ``max_in_flight`` at a time; results in order (a task that
    failed after Ray's retries gives its exception)."""
    ray = _ray()
    out: list = [None] * len(args)
    pending: dict = {}
    nxt = 0
    while nxt < len(args) or pending:
        while nxt < len(args) and len(pending) < max_in_flight:
            pending[fn.remote(*args[nxt])] = nxt
            nxt += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            out[pending.pop(ref)] = _get(ref)
    return out


def _get(ref):
    try:
        return _ray().get(ref)
    except Exception as e:  # noqa: BLE001 - a task that failed after its retries: the caller redoes its work
        return e


def clean_candidate(raw, token: int, d: int) -> Candidate | None:
    """A task's claim rebuilt from plain arrays (copies), or None when it is not a well-formed claim for
    ``token``. The ``zero`` flag is never taken from a task: the driver's lift sets it."""
    if not isinstance(raw, Candidate) or int(raw.token) != token:
        return None
    try:
        x = None if raw.witness is None else np.array(raw.witness, dtype=np.float64).reshape(-1)
        cert = None
        if raw.certificate is not None:
            c = raw.certificate
            comp = np.array(c.competitors, dtype=np.int64).reshape(-1)
            lam = np.array(c.weights, dtype=np.float64).reshape(-1)
            mu = None if c.mu is None else float(c.mu)
            if comp.shape != lam.shape:
                return None
            cert = Certificate(comp, lam, mu)
        t_s = float(raw.time_s)
    except (TypeError, ValueError, AttributeError):
        return None
    if x is not None and x.shape != (d,):
        return None
    return Candidate(token=token, witness=x, certificate=cert, lower=float(raw.lower), upper=float(raw.upper),
                     reason=str(raw.reason)[:200], time_s=t_s if math.isfinite(t_s) and t_s >= 0 else 0.0,
                     iterations=int(raw.iterations))


def search_task(slim: Slim, tokens: np.ndarray, runner_up: np.ndarray, batch: int = SEARCH_BATCH) -> list[Candidate]:
    """Search one or more whole chunks of open tokens (runs on a worker), each from the near point of its
    witness-screen runner-up, as the pipeline's search does (``batch``: the driver's budget's search batch)."""
    from unspeakable.engine.search import SearchOptions, search

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        keys32 = torch.from_numpy(slim.keys).to(torch.float32)
        return [c for b0 in range(0, tokens.size, SEARCH_BATCH)
                for c in search(slim, tokens[b0: b0 + SEARCH_BATCH], keys32=keys32,
                                runner_up=runner_up[b0: b0 + SEARCH_BATCH], options=SearchOptions(batch=batch))]


def decide_task(slim: Slim, tokens: list, comps: dict, options: dict) -> list[Candidate]:
    """One LP pass (``engine.pipeline.decide_pass_options``) on a batch (runs on a worker; one process)."""
    from unspeakable.engine.decide import decide_many

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return decide_many(slim, tokens, comps, workers=1, **options)


@dataclass
class _Pass:
    """One pass over the open tokens (search, LP to the sign, LP to the optimum) cut into the single-process
    chunks: tokens enter ``feed`` in the single-process order, results are taken in chunk order, so every
    chunk, every verification batch and the next pass's order are those of the pipeline's
    stages (``SEARCH_CHUNK``, ``DECIDE_CHUNK``, ``LP_PASSES``; the verifier's last bits depend on its batch)."""

    kind: str  # "search" | "decide"
    size: int
    stop_at_sign: bool = True
    feed: list = field(default_factory=list)
    closed: bool = False  # no more tokens will enter feed
    emitted: int = 0
    taken: int = 0
    arrived: dict = field(default_factory=dict)

    def chunks(self) -> list:
        out = []
        while len(self.feed) >= self.size or (self.closed and self.feed):
            out.append((self, self.emitted, self.feed[: self.size]))
            self.feed, self.emitted = self.feed[self.size:], self.emitted + 1
        return out

    def finished(self) -> bool:
        return self.closed and not self.feed and self.taken == self.emitted


class _OpenTokens:
    """The driver's side of :meth:`Cluster.open_tokens`: three passes of tasks, at most ``in_flight`` at a
    time (later passes first, so that tokens finish early), per-token state in the pipeline's ``DecideState``."""

    def __init__(self, cluster: Cluster, sc, work, lift):
        self.cl, self.sc, self.lift, self.d = cluster, sc, lift, work.d
        self.ref = _ray().put(Slim(rows_array(work.search_keys), work.search_bias, work.domain))
        # a search task holds its own float32 keys and one search batch's [n, V] working set (the budget's)
        self.batch = sc.budget.search_batch
        self.fns = {"search": cluster._remote(search_task, "search", work.V, work.d, self.batch),
                    "decide": cluster._remote(decide_task, "decide", work.V, work.d)}
        self.passes = [_Pass("search", SEARCH_BATCH)] + [_Pass("decide", DECIDE_BATCH, s) for s in LP_PASSES]
        self.st = DecideState(None)
        self.local: list[int] = []
        self.queue: deque = deque()
        self.compute = {"search": 0.0, "decide": 0.0}
        self.failed = 0

    def run(self, todo: np.ndarray) -> np.ndarray:
        sc, ray = self.sc, _ray()
        t0, v0 = time.perf_counter(), sc.timings.get("verify", 0.0)
        self.passes[0].feed, self.passes[0].closed = [int(t) for t in todo], True
        self.queue.extend(self.passes[0].chunks())
        pending: dict = {}
        limit = self.cl.in_flight()
        while self.queue or pending:
            while self.queue and len(pending) < limit:
                job = self.queue.popleft()
                pending[self._submit(job)] = job
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                job[0].arrived[job[1]] = (job[2], _get(ref))
                self._take()
        wall = time.perf_counter() - t0 - (sc.timings.get("verify", 0.0) - v0)
        total = sum(self.compute.values()) or 1.0
        for k, v in self.compute.items():  # the phase's wall time, split by the tasks' own compute seconds
            sc.timings[k] = sc.timings.get(k, 0.0) + wall * v / total
        self.cl.stats.update(open_tasks_failed=self.failed, tokens_handed_back=len(self.local))
        if self.failed:
            sc.warnings.append(f"{self.failed} Ray tasks failed or returned malformed results; their "
                               f"{len(self.local)} tokens were decided on the driver")
        return np.array(sorted(self.local), dtype=np.int64)

    def _submit(self, job):
        p, _, toks = job
        if p.kind == "search":
            return self.fns["search"].remote(self.ref, np.asarray(toks, dtype=np.int64), runner_ups(self.sc, toks),
                                             self.batch)
        comps = {t: self.st.comps.get(t) for t in toks}
        return self.fns["decide"].remote(self.ref, list(toks), comps,
                                         decide_pass_options(p.stop_at_sign, self.sc.opt.decide_time_limit,
                                                             self.sc.budget.lp_warm_rows))

    def _take(self) -> None:
        """Take arrived chunks in order, pass by pass; feed each pass's undecided tokens to the next."""
        for i, p in enumerate(self.passes):
            nxt = self.passes[i + 1] if i + 1 < len(self.passes) else None
            while p.taken in p.arrived:
                toks, result = p.arrived.pop(p.taken)
                p.taken += 1
                still_open = self._arrive(p, toks, result)
                if nxt is not None:
                    nxt.feed.extend(still_open)
            if nxt is not None:
                nxt.closed = p.finished()
                self.queue.extendleft(reversed(nxt.chunks()))

    def _arrive(self, p: _Pass, toks: list, result) -> list:
        """Verify one chunk's claims here and record what is final; returns the tokens still open."""
        cands = None
        if isinstance(result, list) and len(result) == len(toks):
            cands = [clean_candidate(r, t, self.d) for r, t in zip(result, toks)]
        if cands is None or any(c is None for c in cands):
            self.failed += 1
            self.local.extend(toks)  # decided again on the driver, from the search on
            return []
        cands = [self.lift(c) for c in cands]
        self.compute[p.kind] += sum(c.time_s for c in cands)
        results = verify_candidates(self.sc, cands)
        if p.kind == "search":
            return self._after_search(cands, results)
        return self._after_decide(toks, cands, results, p.stop_at_sign)

    def _after_search(self, cands: list, results: list) -> list:
        still_open = record_search(self.sc, cands, results)
        for cand, res in still_open:
            self.st.enter(cand, res)
        return [cand.token for cand, _ in still_open]

    def _after_decide(self, toks: list, cands: list, results: list, stop_at_sign: bool) -> list:
        return record_decide(self.sc, toks, cands, results, stop_at_sign, self.st)
