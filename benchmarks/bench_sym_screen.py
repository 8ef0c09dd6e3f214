"""Both screens in one symmetric pass (``kernels.sym_screen``) against today's two passes and the yardstick,
timed in ONE run, ratios printed (DESIGN §7).

    nice python benchmarks/bench_sym_screen.py --V 50257 --d 768        # GPT-2 small shape (minutes)
    python benchmarks/bench_sym_screen.py --shape smollm2-135m
    python benchmarks/bench_sym_screen.py --shape gemma3-270m --providers sym,sym-centred --memory-only

Providers, each in its own subprocess (peak RSS = the child's ``VmHWM`` after a reset past loading, the
float64 head included; ``resource.getrusage`` when the reset is unavailable), all reading the same head
from ``shapes.setup_problem`` and paying for their own float32 copies inside the timed region:

* ``yardstick`` — one chunked torch float32 GEMM of the gram rows against themselves with a top-k per row
  (``compare_screen._chunked_top3``, k = 3 so that the self match can be dropped): the GEMM ceiling.
* ``two-pass`` — today's screens: ``engine.screen.gram_screen`` then ``witness_screen`` (two V²·d passes).
* ``sym`` — ``sym_screen(rows, keys, R/‖k‖, bias, KeyMap(c, sum_zero=True))``: uncentred gram rows (the
  engine's convention for files) and the layernorm keys, one pass, exact.
* ``sym-centred`` — the same with the gram rows = the keys (TransformerLens-style centred rows).

``--memory-only`` stops the fast pass of the ``sym`` providers after the first block row of tiles (every
row then has its K candidates, and the recovery runs as usual): the peak memory is O(V·d + block²),
whatever the number of tiles visited, so this measures it at sizes whose full pass would take hours.
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
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from compare_screen import _chunked_top3, _cpu, _drop_self, _git_rev, _proc_kb, _reset_peak, _versions  # noqa: E402
from shapes import load_problem, save_problem, setup_problem, shape_of  # noqa: E402


# ----------------------------------------------------------------------------------------------- providers
def yardstick(bp, memory_only=False) -> dict:
    import torch

    r32 = torch.from_numpy(bp.rows.astype(np.float32))
    return {"gram": _drop_self(_chunked_top3(r32, r32))[:, 0]}


def two_pass(bp, memory_only=False) -> dict:
    from unspeakable.engine.screen import gram_screen, witness_screen

    g = gram_screen(bp.rows)
    w = witness_screen(bp.problem)
    return {"gram": g.best_idx, "witness": w.runner_up, "recomputed": {"gram": g.recomputed, "witness": w.recomputed}}


def _sym(bp, centred: bool, memory_only: bool) -> dict:
    import warnings

    import torch

    import unspeakable.kernels.sym_screen as ss

    p = bp.problem
    warnings.filterwarnings("ignore", message=".*not writable.*")  # read-only memory maps; never written
    keys = torch.from_numpy(p.keys)
    n = torch.linalg.vector_norm(keys, dim=1)
    scale = torch.where(n > 0, p.radius / n, 0.0)
    bias = torch.from_numpy(p.bias)
    if memory_only:
        _first_block_row_only(ss)
    if centred:
        res = ss.sym_screen(keys, keys, scale, bias)
    else:
        km = ss.KeyMap(torch.from_numpy(p.center), sum_zero=p.domain.centred)
        res = ss.sym_screen(torch.from_numpy(bp.rows), keys, scale, bias, km)
    return {"gram": res.gram.best_idx.numpy(), "witness": res.witness.best_idx.numpy(),
            "gram_second": res.gram.second_idx.numpy(), "stats": res.stats.to_json()}


def _first_block_row_only(ss) -> None:
    """Memory probe: the fast pass visits the tiles (0, J) only (see the module docstring)."""
    real = ss._tile_torch

    def tile(plan, bufs, states, r0, r1, c0, c1, *args):
        if r0 == 0:
            real(plan, bufs, states, r0, r1, c0, c1, *args)

    ss._tile_torch = tile


PROVIDERS = {"yardstick": yardstick, "two-pass": two_pass,
             "sym": lambda bp, mo=False: _sym(bp, False, mo), "sym-centred": lambda bp, mo=False: _sym(bp, True, mo)}
# "<provider>-1t": the same with 1 thread. On a shared 2-core machine two OpenMP threads per op mostly wait
# for each other at every barrier (a scheduler quantum each), and sym runs many more, smaller ops than
# the yardstick; the 1-thread run shows how much of its time that is.
THREADS_SUFFIX = "-1t"


# -------------------------------------------------------------------------------------------------- worker
def worker(args) -> None:
    import resource

    import torch

    name = args.worker.removesuffix(THREADS_SUFFIX)
    torch.set_num_threads(1 if name != args.worker else args.threads)
    # Memory maps: a provider's RSS counts the arrays it reads (sym-centred never reads the stored rows).
    bp = load_problem(args.data, mmap=True)
    reset = _reset_peak()
    base_kb = _proc_kb("VmRSS")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = PROVIDERS[name](bp, args.memory_only)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = _proc_kb("VmHWM") if reset else ru1.ru_maxrss
    res = {"provider": args.worker, "V": bp.V, "d": bp.d, "wall_s": wall,
           "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
           "peak_rss_mb": peak_kb / 1024, "base_rss_mb": base_kb / 1024, "peak_reset": reset,
           "loadavg": [load0, os.getloadavg()[0]], "stats": out.get("stats"), "recomputed": out.get("recomputed")}
    for k in ("gram", "witness", "gram_second"):
        if k in out:
            np.save(os.path.join(args.out, f"{args.worker}-{k}.npy"), np.asarray(out[k], dtype=np.int64))
    with open(os.path.join(args.out, f"{args.worker}.json"), "w") as f:
        json.dump(res, f)


def _spawn(provider, data, out, threads, memory_only) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--data", data, "--out", out,
           "--threads", str(threads)] + (["--memory-only"] if memory_only else [])
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(out, f"{provider}.json")) as f:
        res = json.load(f)
    res["best"] = {k: np.load(os.path.join(out, f"{provider}-{k}.npy")) for k in ("gram", "witness", "gram_second")
                   if os.path.exists(os.path.join(out, f"{provider}-{k}.npy"))}
    return res


# -------------------------------------------------------------------------------------------------- report
def report(res: dict, name: str, V: int, d: int, memory_only: bool) -> list[str]:
    y = res.get("yardstick")
    L = [f"**{name}: V = {V}, d = {d}**" + (" (memory probe: first block row of tiles only; times not "
                                            "comparable)" if memory_only else ""), "",
         "| provider | wall (s) | / yardstick | CPU s | peak RSS (MB) | Δ RSS (MB) | load avg | tiles skipped "
         "| float64 rows (gram, witness): full / rescored |", "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for p, r in res.items():
        st = r.get("stats") or {}
        rec = (f"{st['gram_recomputed']}, {st['witness_recomputed']} / {st['gram_rescored']}, {st['witness_rescored']}"
               if st else ("" if not r.get("recomputed") else f"{r['recomputed']['gram']}, {r['recomputed']['witness']} / —"))
        skipped = f"{st['tiles_skipped']}/{st['tiles']} ({st['skipped_fraction']:.1%})" if st else ""
        ratio = f"{r['wall_s'] / y['wall_s']:.2f}×" if y else "—"
        L.append(f"| {p} | {r['wall_s']:.2f} | {ratio} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                 f"{r['peak_rss_mb'] - r['base_rss_mb']:.0f} | {r['loadavg'][0]:.1f}→{r['loadavg'][1]:.1f} | {skipped} | {rec} |")
    L.append("")
    ref = res.get("two-pass")
    for p, r in res.items():
        if ref is None or p == "two-pass" or memory_only:
            continue
        # sym-centred's gram screen runs on other rows (the centred keys) than two-pass's (the rows as stored)
        screens = ("witness",) if p.startswith("sym-centred") else ("gram", "witness")
        agree = [f"{k} {np.mean(r['best'][k] == ref['best'][k]) * 100:.3f}%" for k in screens if k in r["best"]]
        L.append(f"- best competitor of `{p}` equal to two-pass (exact) on: {', '.join(agree)}")
    for p in [p for p in res if p.startswith("sym")]:
        L.append(f"- **{p} (both screens) / yardstick = {_ratio(res, p, 'yardstick')}** (DESIGN §7 target ≤ 0.6×); "
                 f"{p} / two-pass = {_ratio(res, p, 'two-pass')}")
    return L


def _ratio(res, a, b) -> str:
    return f"{res[a]['wall_s'] / res[b]['wall_s']:.2f}×" if a in res and b in res else "—"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", help="a registry name from benchmarks/shapes.py (overrides --V/--d)")
    ap.add_argument("--V", type=int, default=50257)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", default="yardstick,two-pass,sym,sym-1t,sym-centred-1t")
    ap.add_argument("--memory-only", action="store_true", help="sym providers: first block row of tiles only")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    name, V, d = shape_of(args.shape) if args.shape else shape_of(args.V, args.d)
    head = [f"`python benchmarks/bench_sym_screen.py {' '.join(sys.argv[1:] if argv is None else argv)}` — "
            f"{datetime.datetime.now().astimezone().isoformat(timespec='minutes')}, git {_git_rev()}",
            f"({_cpu()}; {_versions()}; threads: {args.threads}; load average at start {os.getloadavg()[0]:.2f})", ""]
    print("\n".join(head), flush=True)
    tmp = tempfile.mkdtemp(prefix="bench_sym-")
    try:
        bp = setup_problem(V, d, args.seed)
        data = os.path.join(tmp, "data")
        save_problem(bp, data)
        del bp
        res = {}
        for p in [p for p in args.providers.split(",") if p]:
            out = os.path.join(tmp, p)
            os.makedirs(out, exist_ok=True)
            res[p] = _spawn(p, data, out, args.threads, args.memory_only and p.startswith("sym"))
            print(f"  {p:12s} {res[p]['wall_s']:9.2f} s  peak RSS {res[p]['peak_rss_mb']:.0f} MB  "
                  f"load {res[p]['loadavg'][0]:.1f}->{res[p]['loadavg'][1]:.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = head + report(res, name, V, d, args.memory_only) + [f"(load average at end {os.getloadavg()[0]:.2f})"]
    print("\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({p: {k: v for k, v in r.items() if k != "best"} for p, r in res.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
