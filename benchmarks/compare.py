"""One run, every ratio of DESIGN §7: the yardstick, our screens, the whole ``scan`` command as a user runs
it, and the peers (faiss, the seed's code, a Grivas-style pipeline), timed on the same head in the same
run, printed as one table and appended to ``benchmarks/RESULTS.md`` with machine, commit and command.

    python benchmarks/compare.py --shape gpt2-small                 # synthetic:V=50257,d=768,seed=0 (minutes)
    python benchmarks/compare.py --shape smollm2-135m               # or gemma3-270m (262144 × 640)
    python benchmarks/compare.py --source SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/compare.py --V 4096 --d 256 --quick --no-append   # smoke run, seconds

The head is the one the CLI scans: ``engine.loader.load(SOURCE)`` (a shape is the source
``synthetic:V=..,d=..,seed=S``, whose final norm is a LayerNorm, so the layernorm domain), folded as the
scan folds it; its gram rows (``engine.loader.gram_rows``) and folded problem are written once as ``.npy``
and every provider but the scan reads them in its own subprocess (``bench_sym_screen``'s worker: peak RSS
= the child's VmHWM after a reset past loading). Providers (``--providers`` picks a subset):

* ``yardstick`` — ``bench_sym_screen.yardstick``: chunked torch float32 GEMM of the gram rows against
  themselves, top-3 per row, ``--threads`` threads (DESIGN §7's ceiling).
* ``screens`` — both screens in one symmetric pass, ``bench_sym_screen``'s ``sym`` provider (``sym-centred``
  for heads whose gram rows are centred, as the scan does).
* ``scan`` — ``python -m unspeakable scan SOURCE --out X.json`` in a subprocess: wall time of the WHOLE command
  (start-up, load, stages, report writing), peak RSS from ``wait4``; the report's ``timings_s`` per stage,
  how many tokens each stage settled, the per-token time of the tokens that reached the LP.
* ``faiss`` — ``compare_screen.faiss_top2``: ``IndexFlatIP``, k = 3, gram + witness searches.
* ``seed-gram`` — the seed's ``(W_U.T @ W_U).argmax(-1)`` on the first ``--seed-V`` rows (V × V float32),
  next to the yardstick at the same V (``yardstick@seed-V``).
* ``seed-lp`` — the seed's ``is_token_feasible``: ``scipy.optimize.linprog`` on all V constraints, box
  [−1, 1], per token, killed after ``--seed-lp-cap`` s ("did not finish in N s").
* ``grivas`` — Grivas et al. 2022 (arXiv 2203.06462, code: andreasgrv/unargmaxable), box ρ = 100 on the
  folded rows and bias: the rank check (two SVDs, once), Braid Reflect (patience 100) per token, and for the
  tokens it does not settle the Chebyshev LP over all V − 1 constraints (HiGHS interior point via
  ``scipy.optimize.linprog(method="highs-ipm")`` in place of Gurobi's barrier). On a random sample of
  ``--grivas-sample`` tokens, plus the LP alone on the tokens our scan sent to the LP; total extrapolated to V.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_sym_screen as bss
from compare_screen import _cpu, _versions, faiss_top2
from shapes import BenchProblem, load_problem, save_problem, shape_of

ALL_PROVIDERS = ("yardstick", "screens", "scan", "faiss", "seed-gram", "seed-lp", "grivas")
RESULTS = os.path.join(HERE, "RESULTS.md")
GRIVAS_RHO = 100.0  # the paper's default box: --logit-lower-bound / --logit-upper-bound ±100
GRIVAS_PATIENCE = 100  # reflections before Braid Reflect gives up (the paper's default)
SEED_MARGIN = 1.00e-7  # the seed's margin in is_token_feasible
_WARGS = None  # the worker's arguments, for the providers that need more than the head


# ------------------------------------------------------------------------ providers run in bss.worker
def _faiss(bp, memory_only=False) -> dict:
    run = faiss_top2(bp)
    return {**run.best, "stats": {"gram_s": run.times["gram"], "witness_s": run.times["witness"]}}


def _seed_gram(bp, memory_only=False) -> dict:
    """The seed's hard-to-speak screen, as written: a V × V float32 Gram, then argmax (self included)."""
    import torch

    W_U = torch.from_numpy(np.asarray(bp.rows, dtype=np.float32)).T  # [d, V], TransformerLens orientation
    am = (W_U.T @ W_U).argmax(-1)
    return {"stats": {"hard_to_speak": int((am.numpy() != np.arange(bp.V)).sum())}}


def _seed_lp(bp, memory_only=False) -> dict:
    """The seed's ``is_token_feasible`` on one token (``--lp-token``), printing left out."""
    from scipy.optimize import linprog

    token = _WARGS.lp_token
    W_U = np.asarray(bp.rows, dtype=np.float32).T  # model.W_U.detach().numpy(): float32 [d, V]
    c = -W_U[:, token]
    A_ub = (W_U - W_U[:, token:token + 1]).T
    b_ub = np.zeros(A_ub.shape[0]) - SEED_MARGIN
    soln = linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=(-1, 1))
    claim = {0: "optimal: claims speakable", 2: "infeasible: claims unspeakable"}.get(soln.status, soln.message)
    return {"stats": {"token": token, "status": int(soln.status), "message": str(claim)}}


def _grivas(bp, memory_only=False) -> dict:
    """Grivas-style pipeline on the sample tokens (``--grivas-tokens``); one JSON line per token in
    ``OUT/grivas.jsonl`` as it finishes, so a run killed at its cap still reports what it did."""
    import grivas

    W = np.ascontiguousarray(bp.problem.rows, dtype=np.float32)  # as the paper reads float32 weights
    b = np.ascontiguousarray(bp.problem.bias, dtype=np.float32)
    t0 = time.perf_counter()
    grivas.rank_check(W)
    setup_s = time.perf_counter() - t0
    W64, b64 = np.asarray(bp.problem.rows, dtype=np.float64), np.asarray(bp.problem.bias, dtype=np.float64)
    with open(os.path.join(_WARGS.out, "grivas.jsonl"), "w") as f:
        f.write(json.dumps({"setup_s": setup_s}) + "\n")
        for group, tokens in json.loads(_WARGS.grivas_tokens).items():
            for t in tokens:
                lp_only = group == "lp"
                rec = grivas.class_is_bounded(W, b, W64, b64, int(t), GRIVAS_RHO, _WARGS.lp_cap, lp_only,
                                              _WARGS.grivas_lp_method)
                f.write(json.dumps({"group": group, **rec}) + "\n")
                f.flush()
    return {"stats": {"setup_s": setup_s}}


bss.PROVIDERS.update({"faiss": _faiss, "seed-gram": _seed_gram, "seed-lp": _seed_lp, "grivas": _grivas})


# ------------------------------------------------------------------------------------- subprocesses
def run_capped(cmd, timeout: float | None, out_path: str, env=None, watch: tuple = ()) -> dict:
    """Run ``cmd`` (stdout and stderr to ``out_path``), killed after ``timeout`` s. Wall time of the whole
    command and its peak RSS (``wait4``'s ``ru_maxrss``: the child and the descendants it waited for); with
    ``watch``, the largest total size the files at those paths reached while it ran (polled twice a second)."""
    with open(out_path, "w") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        killed = threading.Event()
        watched = {"max_bytes": 0}

        def poll():
            while p.poll() is None:
                size = sum(os.path.getsize(f) for f in watch if os.path.exists(f))
                watched["max_bytes"] = max(watched["max_bytes"], size)
                time.sleep(0.5)

        poller = threading.Thread(target=poll, daemon=True) if watch else None
        if poller:
            poller.start()

        def kill():
            killed.set()
            p.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if timer:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    out = {"rc": p.returncode, "wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024, "timed_out": killed.is_set(),
           "log": out_path}
    if watch:
        out["watched_max_mb"] = watched["max_bytes"] / 2**20
    return out


def _log_tail(res: dict, n: int = 15) -> str:
    with open(res["log"]) as f:
        return "".join(f.readlines()[-n:])


def _env(threads: int, blas_threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS=str(threads))
    for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(blas_threads)
    return env


SINGLE_THREADED = ("seed-lp", "grivas")  # per-token LP peers: one BLAS thread (see grivas.py)


def spawn_worker(provider: str, data: str, tmp: str, args, extra=(), timeout=None, tag=None) -> dict:
    """One provider in ``bench_sym_screen``'s worker (via this file, so the peers above are registered)."""
    tag = tag or provider
    out = os.path.join(tmp, "out-" + tag)
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--data", data, "--out", out,
           "--threads", str(args.threads), *extra]
    blas = 1 if provider in SINGLE_THREADED else args.threads
    run = run_capped(cmd, timeout, os.path.join(out, "log.txt"), env=_env(args.threads, blas))
    res = {"provider": tag, "outdir": out, **run}
    path = os.path.join(out, f"{provider}.json")
    if os.path.exists(path):
        with open(path) as f:
            res.update(json.load(f))  # wall_s = the provider call alone; peak_rss_mb = VmHWM past loading
        res["process_wall_s"] = run["wall_s"]
        res["timed_out"] = False  # the provider finished; a kill during the interpreter's exit does not count
    elif not run["timed_out"]:
        raise RuntimeError(f"{tag} failed (rc {run['rc']}):\n{_log_tail(run)}")
    print(f"  {tag:18s} " + (f"did not finish in {timeout:.0f} s" if run["timed_out"] and "cpu_s" not in res
                             else f"{res['wall_s']:9.2f} s  peak RSS {res['peak_rss_mb']:.0f} MB"), flush=True)
    return res


# ------------------------------------------------------------------------------------------- the head
# Shapes of RMSNorm models: their synthetic stand-in is an RMSNorm head with a gain and no biases, as the real
# heads are (source_of: synthetic:...,norm=rmsnorm).
SHAPE_DOMAINS = {"smollm2-135m": "rmsnorm", "gemma3-270m": "rmsnorm", "llama3-8b": "rmsnorm"}


def load_head(source: str, name: str, seed: int, domain: str | None = None) -> tuple[BenchProblem, bool]:
    """The head the CLI scans, as a :class:`BenchProblem` (gram rows as the scan takes them, the problem
    folded on ``domain``, default the source's own), and whether its gram rows are centred."""
    from unspeakable.engine.loader import fold, gram_rows, load

    head = load(source)
    problem = fold(head, domain=domain)
    rows = gram_rows(head)
    centred = bool(head.gram_center) or bool(problem.margin_exp or problem.x_exp)
    return BenchProblem(name=name, V=problem.V, d=problem.d, seed=seed, rows=rows, problem=problem), centred


def reduced(bp: BenchProblem, V: int) -> BenchProblem:
    """The first ``V`` tokens of ``bp`` (for the seed's V × V Gram)."""
    from unspeakable.engine.loader import problem_from_rows

    p = problem_from_rows(bp.rows[:V], bp.problem.bias[:V], bp.problem.domain, source=bp.problem.source)
    return BenchProblem(name=f"{bp.name}[:{V}]", V=V, d=bp.d, seed=bp.seed, rows=p.rows, problem=p)


# ----------------------------------------------------------------------------------------- the scan
def stage_of(tok: dict) -> str:
    """Which stage settled a listed token of a scan report."""
    reason = tok.get("reason") or ""
    if tok.get("verdict") == "undecided":
        return "undecided"
    if reason == "witness (screen)":
        return "screens"
    if reason == "tie":
        return "ties"
    return "search" if reason.endswith("(search)") else "LP"


def _pct(ts, q):
    return float(np.percentile(ts, q)) if len(ts) else None


def scan_summary(report: dict) -> dict:
    """Stage times, tokens settled per stage and per-token times from a report JSON. Unlisted tokens are
    screen-settled (the scan lists every token that is hard-to-speak or not settled by the screens)."""
    toks = report["tokens"]
    settled = {k: 0 for k in ("screens", "ties", "search", "LP", "undecided")}
    for t in toks:
        settled[stage_of(t)] += 1
    settled["screens"] += report["counts"]["tokens"] - len(toks)
    lp = [t["time_s"] for t in toks if stage_of(t) in ("LP", "undecided") and t.get("time_s") is not None]
    past = [t["time_s"] for t in toks if t.get("reason") not in ("tie", "witness (screen)") and t.get("time_s") is not None]
    return {"timings_s": report["timings_s"], "counts": report["counts"], "settled": settled,
            "lp_tokens": [t["id"] for t in toks if stage_of(t) in ("LP", "undecided")],
            "search_tokens": [t["id"] for t in toks if stage_of(t) == "search"],
            "lp_time_s": {"n": len(lp), "median": _pct(lp, 50), "p95": _pct(lp, 95)},
            "past_screens_time_s": {"n": len(past), "median": _pct(past, 50), "p95": _pct(past, 95)}}


def run_scan(source: str, tmp: str, scan_args: list[str]) -> dict:
    out = os.path.join(tmp, "scan.json")
    cmd = [sys.executable, "-m", "unspeakable", "scan", source, "--out", out, *scan_args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = run_capped(cmd, None, os.path.join(tmp, "scan.log"), env=env, watch=(out + ".partial", out + ".partial.x"))
    if res["rc"] != 0:
        raise RuntimeError(f"scan failed (rc {res['rc']}):\n{_log_tail(res)}")
    res["checkpoint_max_mb"] = res.pop("watched_max_mb")  # OUT.partial and its witness rows, at their largest
    res["report_mb"] = sum(os.path.getsize(f) for f in (out, out + ".witnesses.npz") if os.path.exists(f)) / 2**20
    with open(out) as f:
        res.update(scan_summary(json.load(f)))
    res["after_s"] = after_engine(res["log"])
    res["command"] = "unspeakable scan " + " ".join([shown(source), "--out", "X.json", *map(shown, scan_args)])
    print(f"  {'scan':18s} {res['wall_s']:9.2f} s  peak RSS {res['peak_rss_mb']:.0f} MB  checkpoint at most "
          f"{res['checkpoint_max_mb']:.1f} MB  report {res['report_mb']:.1f} MB", flush=True)
    return res


def after_engine(log_path: str) -> dict:
    """The scan command's own account of its time after the engine (``engine.cli.time_line``, its last
    stderr line): ``{"enrich": s, "files": s}``, empty when the line is missing."""
    import re

    with open(log_path, errors="replace") as f:
        lines = [x for x in f.read().splitlines() if x.startswith("unspeakable: time:")]
    m = re.search(r"enrich ([0-9.]+) s; table and files ([0-9.]+) s", lines[-1]) if lines else None
    return {"enrich": float(m.group(1)), "files": float(m.group(2))} if m else {}


# -------------------------------------------------------------------------------------------- peers
def lp_candidates(bp: BenchProblem, scan: dict | None, n: int) -> list[int]:
    """Tokens for the per-token LPs: those our scan sent to the LP, then those its search settled; without
    a scan, tokens whose self-direction margin is ≤ 0 (``bench_decide.open_tokens``); else token 0."""
    ids = list(scan["lp_tokens"]) + list(scan["search_tokens"]) if scan else []
    if len(ids) < n:
        import warnings

        from bench_decide import open_tokens

        warnings.filterwarnings("ignore", message=".*not writable.*")  # read-only memory maps; never written
        ids += [int(t) for t in open_tokens(bp, min(bp.V, 4096), n)[0] if int(t) not in ids]
    return [int(t) for t in ids[:n]] or [0]


def run_seed_lp(data: str, tmp: str, args, tokens: list[int]) -> list[dict]:
    out = []
    for t in tokens:
        r = spawn_worker("seed-lp", data, tmp, args, ["--lp-token", str(t)], timeout=args.seed_lp_cap,
                         tag=f"seed-lp:{t}")
        out.append({"token": t, **{k: r.get(k) for k in ("wall_s", "peak_rss_mb", "timed_out", "stats")}})
    return out


def run_grivas(bp: BenchProblem, data: str, tmp: str, args, lp_tokens: list[int]) -> dict:
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(bp.V, size=min(args.grivas_sample, bp.V), replace=False)).tolist()
    tokens = json.dumps({"sample": sample, "lp": lp_tokens})
    r = spawn_worker("grivas", data, tmp, args, ["--grivas-tokens", tokens, "--lp-cap", str(args.lp_cap),
                                                 "--grivas-lp-method", args.grivas_lp_method], timeout=args.peer_cap)
    with open(os.path.join(r["outdir"], "grivas.jsonl")) as f:
        lines = [json.loads(ln) for ln in f if ln.strip()]
    recs = [x for x in lines if "group" in x]
    setup_s = lines[0]["setup_s"] if lines and "setup_s" in lines[0] else None
    samp = [x for x in recs if x["group"] == "sample"]
    mean = float(np.mean([x["time_s"] for x in samp])) if samp else None
    total = None if mean is None or setup_s is None else setup_s + bp.V * mean / args.threads
    return {"setup_s": setup_s, "sample": samp, "lp": [x for x in recs if x["group"] == "lp"],
            "planned": {"sample": len(sample), "lp": len(lp_tokens)}, "extrapolated_s": total,
            "peak_rss_mb": r["peak_rss_mb"], "timed_out": r["timed_out"], "cap_s": args.peer_cap,
            "processes": args.threads, "method": args.grivas_lp_method, "lp_cap": args.lp_cap}


def run_all(bp: BenchProblem, centred: bool, source: str, args, tmp: str, data: str) -> dict:
    """Every selected provider, one after the other, each in its own subprocess (the head saved in ``data``)."""
    res: dict = {}
    want = set(args.providers)
    if "yardstick" in want:
        res["yardstick"] = spawn_worker("yardstick", data, tmp, args)
    if "screens" in want:
        res["screens"] = spawn_worker("sym-centred" if centred else "sym", data, tmp, args, tag="screens")
    if "scan" in want:
        res["scan"] = run_scan(source, tmp, args.scan_args.split())
    if "faiss" in want:
        try:
            import faiss  # noqa: F401

            res["faiss"] = spawn_worker("faiss", data, tmp, args)
        except ImportError:
            res["faiss"] = {"missing": "faiss not importable"}
    if "seed-gram" in want and args.seed_V:
        sdata = data
        if args.seed_V < bp.V or "yardstick" not in res:  # at the full V the yardstick above is the reference
            sdata = os.path.join(tmp, "data-seed")
            save_problem(reduced(bp, min(args.seed_V, bp.V)), sdata)
            res["yardstick@seed-V"] = spawn_worker("yardstick", sdata, tmp, args, tag="yardstick@seed-V")
        else:
            res["yardstick@seed-V"] = res["yardstick"]
        res["seed-gram"] = spawn_worker("seed-gram", sdata, tmp, args, timeout=args.peer_cap)
        res["seed-gram"]["V"] = min(args.seed_V, bp.V)
    hard = lp_candidates(bp, res.get("scan"), max(args.seed_lp_tokens, args.grivas_lp_tokens))
    if "seed-lp" in want:
        res["seed-lp"] = run_seed_lp(data, tmp, args, hard[:args.seed_lp_tokens])
    if "grivas" in want:
        res["grivas"] = run_grivas(bp, data, tmp, args, hard[:args.grivas_lp_tokens])
    return res


# ------------------------------------------------------------------------------------------- report
def _s(x, fmt=".2f") -> str:
    return "—" if x is None else format(x, fmt)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "—"


def _wall(r):
    return None if not r or r.get("timed_out") or "wall_s" not in r else r["wall_s"]


def provider_rows(res: dict, bp: BenchProblem) -> list[str]:
    y = _wall(res.get("yardstick"))
    L = ["| provider | what | V | time (s) | / yardstick | peak RSS (MB) |", "|---|---|---:|---:|---:|---:|"]
    row = lambda p, what, V, t, ref, rss: L.append(
        f"| {p} | {what} | {V} | {_s(t)} | {_ratio(t, ref)} | {_s(rss, '.0f')} |")
    if "yardstick" in res:
        row("yardstick", "torch float32 GEMM of the rows + top-k, chunked", bp.V, y, y, res["yardstick"]["peak_rss_mb"])
    if "screens" in res:
        row("**screens (ours)**", "both screens, one symmetric pass (`kernels.sym_screen`)", bp.V,
            _wall(res["screens"]), y, res["screens"]["peak_rss_mb"])
    if "scan" in res:
        sc = res["scan"]
        row("**whole scan (ours)**", f"`{sc['command']}`, whole command; checkpoint at most "
            f"{sc.get('checkpoint_max_mb', float('nan')):.1f} MB, report {sc.get('report_mb', float('nan')):.1f} MB",
            bp.V, sc["wall_s"], y, sc["peak_rss_mb"])
    f = res.get("faiss")
    if f and "missing" in f:
        L.append("| faiss | not importable | | | | |")
    elif f:
        st = f.get("stats") or {}
        row("faiss", f"`IndexFlatIP` k = 3: gram {_s(st.get('gram_s'))} s + witness {_s(st.get('witness_s'))} s",
            bp.V, _wall(f), y, f["peak_rss_mb"])
    L += _seed_rows(res, bp, y)
    g = res.get("grivas")
    if g:
        row("Grivas-style", f"rank check + Braid Reflect + Chebyshev LP, box ρ = {GRIVAS_RHO:g}: extrapolated "
            f"(formula below)", bp.V, g["extrapolated_s"], y, g["peak_rss_mb"])
    return L


def _seed_rows(res: dict, bp: BenchProblem, y) -> list[str]:
    L = []
    sg, ys = res.get("seed-gram"), res.get("yardstick@seed-V")
    if sg:
        Vs = sg["V"]
        t, tys = _wall(sg), _wall(ys)
        L.append(f"| yardstick@seed-V | the yardstick on the first {Vs} rows | {Vs} | {_s(tys)} | 1.00× (at V = {Vs}) | "
                 f"{_s(ys['peak_rss_mb'], '.0f')} |")
        L.append(f"| seed gram | `(W_U.T @ W_U).argmax(-1)`, V × V float32 = {Vs**2 * 4 / 2**30:.2f} GiB "
                 f"| {Vs} | {_s(t) if t else 'did not finish'} | {_ratio(t, tys)} (at V = {Vs}) | {_s(sg['peak_rss_mb'], '.0f')} |")
        if t and Vs < bp.V:
            est = t * (bp.V / Vs) ** 2
            L.append(f"| seed gram, extrapolated | t × (V / {Vs})²; needs {bp.V**2 * 4 / 2**30:.1f} GiB, not run "
                     f"| {bp.V} | {est:.1f} | {_ratio(est, y)} | — |")
    for r in res.get("seed-lp", []):
        if r["timed_out"]:
            L.append(f"| seed linprog | `is_token_feasible`, token {r['token']}: **did not finish in "
                     f"{_s(r.get('wall_s'), '.0f')} s** (killed; start-up and loading included) | {bp.V} | "
                     f"> {_s(r.get('wall_s'), '.0f')} | > {_ratio(r.get('wall_s'), y)} | {_s(r['peak_rss_mb'], '.0f')} |")
        else:
            msg = (r.get("stats") or {}).get("message", "")[:80]
            L.append(f"| seed linprog | `is_token_feasible`, token {r['token']} ({msg}) | {bp.V} | {_s(r['wall_s'])} "
                     f"| {_ratio(r['wall_s'], y)} | {_s(r['peak_rss_mb'], '.0f')} |")
    return L


def stage_rows(sc: dict) -> list[str]:
    ts, st = sc["timings_s"], sc["settled"]
    L = ["| scan stage | time (s) | share of the whole command | tokens settled |", "|---|---:|---:|---|"]
    settles = {"screen": f"screens {st['screens']}, ties {st['ties']}", "search": str(st["search"]),
               "decide": f"{st['LP']} (undecided {st['undecided']})"}
    for k, v in ts.items():
        if k != "total":
            L.append(f"| {k} | {_s(v)} | {v / sc['wall_s']:.0%} | {settles.get(k, '')} |")
    rest = sc["wall_s"] - ts.get("total", 0.0)
    L.append(f"| engine total | {_s(ts.get('total'))} | {ts.get('total', 0) / sc['wall_s']:.0%} | "
             f"{sc['counts']['tokens']} tokens |")
    after = sc.get("after_s") or {}
    if after:  # the command's own timers: enrichment (other gram count, model check), table and files
        for k, label in (("enrich", "enrichment: raw tokens, other gram count, model check"),
                         ("files", "console table and report files")):
            L.append(f"| {label} | {after[k]:.2f} | {after[k] / sc['wall_s']:.0%} | |")
        rest -= after["enrich"] + after["files"]
        L.append(f"| start-up (imports) and exit: whole − everything timed | {rest:.2f} | {rest / sc['wall_s']:.0%} | |")
    else:
        L.append(f"| start-up, report enrichment and writing (whole − engine) | {rest:.2f} | {rest / sc['wall_s']:.0%} | |")
    lp, past = sc["lp_time_s"], sc["past_screens_time_s"]
    L += ["", (f"Per token that reached the LP: median {_s(lp['median'], '.3f')} s, p95 {_s(lp['p95'], '.3f')} s "
          f"over {lp['n']} tokens (DESIGN §7: ≤ 0.05 s, ≤ 0.5 s); per token past the screens (search or LP, "
          f"`engine.pipeline.bench_head`'s definition): median {_s(past['median'], '.3f')} s, p95 "
          f"{_s(past['p95'], '.3f')} s over {past['n']}. Undecided: {sc['counts'].get('undecided', 0)}.")]
    return L


def _med_p95(xs) -> str:
    return f"median {_s(_pct(xs, 50), '.3g')} s, p95 {_s(_pct(xs, 95), '.3g')} s" if xs else "—"


def grivas_lines(g: dict, V: int) -> list[str]:
    samp, lp = g["sample"], g["lp"]
    by_search = [x for x in samp if x["settled_by_search"]]
    lp_in_sample = [x for x in samp if not x["settled_by_search"]]
    statuses = lambda xs: ", ".join(f"{s} {sum(x['status'] == s for x in xs)}" for s in sorted({x['status'] for x in xs}))
    L = [(f"Grivas-style peer (box ρ = {GRIVAS_RHO:g}, patience {GRIVAS_PATIENCE}, LP: scipy `{g['method']}`, "
         f"time limit {g['lp_cap']:g} s per token; one process, one BLAS thread): rank check (two SVDs) {_s(g['setup_s'])} s once; random sample of {len(samp)}/{g['planned']['sample']} "
         f"tokens: Braid Reflect settled {len(by_search)} ({_med_p95([x['search_s'] for x in samp])} per token), the "
         f"LP the other {len(lp_in_sample)} ({_med_p95([x['lp_s'] for x in lp_in_sample])}; {statuses(lp_in_sample) or '—'}); "
         f"whole pipeline per token {_med_p95([x['time_s'] for x in samp])}. "
         f"The LP alone on {len(lp)}/{g['planned']['lp']} tokens the screens leave open (our scan's LP tokens, "
         f"then its search tokens): "
         f"{_med_p95([x['lp_s'] for x in lp])} ({statuses(lp) or '—'})."),
         f"Extrapolation: T(V) = t_rank_check + V × mean per-token time over the random sample / P processes "
         f"(the paper's pool over classes, one per core) = {_s(g['setup_s'])} + {V} × "
         f"{_s(np.mean([x['time_s'] for x in samp]) if samp else None, '.3g')} / {g['processes']} = "
         f"**{_s(g['extrapolated_s'], '.3g')} s**" + (f" (run killed at its {g['cap_s']:.0f} s cap)" if g["timed_out"] else "")
         + "."]
    return L


def shown(arg: str) -> str:
    """An argument as RESULTS.md records it: an absolute path by its file name (no machine paths in the
    repository; the README says where the real heads' files come from)."""
    return os.path.basename(arg) if os.path.isabs(arg) else arg


def machine_lines(args, argv) -> list[str]:
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        up = "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    return [f"- machine: {_cpu()}; `uptime`: {up}",
            f"- commit: {git_commit()}; {_versions()}; threads: {args.threads}",
            f"- command: `python benchmarks/compare.py {' '.join(shown(a) for a in argv)}`"]


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        rev = git("rev-parse", "--short", "HEAD")
        return rev + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def report(res: dict, bp: BenchProblem, source: str, args, argv) -> list[str]:
    when = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    L = [f"### compare: {bp.name} (V = {bp.V}, d = {bp.d}, {bp.problem.domain.name}) — {when}", ""]
    L += machine_lines(args, argv) + [f"- source: `{shown(source)}`", ""]
    L += provider_rows(res, bp) + [""]
    L.append("Ratios are to the yardstick measured in this run. Times: the provider call in its subprocess "
             "(data loaded before the clock), except the whole scan (the command, start-up to exit). Peak RSS: "
             "the subprocess's VmHWM past loading the head (the scan and the killed runs: `wait4`'s maxrss).")
    L.append("")
    if "scan" in res:
        L += stage_rows(res["scan"]) + [""]
    if "grivas" in res:
        L += grivas_lines(res["grivas"], bp.V) + [""]
    return L


def append_results(lines: list[str], path: str) -> None:
    with open(path, "a") as f:
        f.write("\n" + "\n".join(lines).rstrip() + "\n")


# --------------------------------------------------------------------------------------------- main
QUICK = {"seed_V": 1024, "seed_lp_cap": 10.0, "lp_cap": 5.0, "grivas_sample": 8, "grivas_lp_tokens": 2,
         "peer_cap": 120.0}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--shape", help="a registry name from benchmarks/shapes.py: the source synthetic:V=..,d=..,seed=..")
    src.add_argument("--source", help="any source `unspeakable scan` takes (a .gguf, .npz, model name, synthetic:...)")
    src.add_argument("--V", type=int)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0, help="the synthetic head's seed and the Grivas sample's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", default=",".join(ALL_PROVIDERS), help="comma-separated subset of " + ",".join(ALL_PROVIDERS))
    ap.add_argument("--quick", action="store_true", help="small smoke run: V = 4096, d = 256 unless given; small peers")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--results", default=RESULTS, help="the file appended to (default benchmarks/RESULTS.md)")
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument("--scan-args", default="", help="extra arguments for the scan command, e.g. '--html X.html'")
    ap.add_argument("--seed-V", type=int, default=16384, help="V of the seed's V × V Gram (0: skip)")
    ap.add_argument("--seed-lp-tokens", type=int, default=1, help="tokens for the seed's linprog (each its own run)")
    ap.add_argument("--seed-lp-cap", type=float, default=300.0, help="seconds before a seed linprog run is killed")
    ap.add_argument("--grivas-sample", type=int, default=64, help="random tokens through the Grivas pipeline")
    ap.add_argument("--grivas-lp-tokens", type=int, default=4, help="tokens past our screens given the LP alone")
    ap.add_argument("--lp-cap", type=float, default=120.0, help="HiGHS time limit per Grivas LP (s)")
    ap.add_argument("--grivas-lp-method", default="highs", choices=("highs", "highs-ds", "highs-ipm"),
                    help="scipy linprog method of the Grivas LP (highs-ipm: nearest to the paper's barrier)")
    ap.add_argument("--peer-cap", type=float, default=1800.0, help="seconds before the Grivas or seed-gram run is killed")
    for a in ("--worker", "--data", "--out", "--grivas-tokens"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    ap.add_argument("--lp-token", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    args.providers = [p for p in args.providers.split(",") if p]
    bad = set(args.providers) - set(ALL_PROVIDERS)
    if bad:
        ap.error(f"unknown providers {sorted(bad)}; choose from {','.join(ALL_PROVIDERS)}")
    return args


def source_of(args) -> tuple[str, str]:
    """``(source, name)`` of the head to compare on."""
    if args.source:
        return args.source, (os.path.basename(args.source.rstrip("/")) or args.source).replace(" ", "_")
    if args.shape:
        name, V, d = shape_of(args.shape)
    else:
        V = args.V if args.V else (4096 if args.quick else 50257)
        d = args.d if args.V or not args.quick else 256
        name, V, d = shape_of(V, d)
    # an RMSNorm model's shape is scanned as such a head: gain only, no biases (make_synthetic's norm=rmsnorm)
    norm = ",norm=rmsnorm" if SHAPE_DOMAINS.get(name) == "rmsnorm" else ""
    return f"synthetic:V={V},d={d},seed={args.seed}{norm}", name


def main(argv=None) -> int:
    global _WARGS
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        _WARGS = args
        bss.worker(args)
        return 0
    source, name = source_of(args)
    print(f"compare: {source} — providers {','.join(args.providers)}", flush=True)
    t0 = time.perf_counter()
    bp, centred = load_head(source, name, args.seed)
    print(f"  head loaded and folded in {time.perf_counter() - t0:.1f} s", flush=True)
    tmp = tempfile.mkdtemp(prefix="compare-")
    try:
        data = os.path.join(tmp, "data")
        save_problem(bp, data)
        bp = load_problem(data, mmap=True)  # the parent keeps memory maps only while the providers run
        res = run_all(bp, centred, source, args, tmp, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = report(res, bp, source, args, argv)
    print("\n" + "\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if not args.no_append:
        append_results(lines, args.results)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
