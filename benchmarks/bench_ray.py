"""The scan on a local Ray cluster with 1 and with 2 workers (engine.cluster), the speed-up ratio, the
per-task throughput of each stage, and a sizing table for K nodes on a 262144 × 4096 head.

    python benchmarks/bench_ray.py [--source synthetic:V=16384,d=768,seed=0] [--domain layernorm] [--json]

Each Ray is started fresh (``num_cpus`` = 1, then 2), warmed up on a small head (worker start-up and
imports are not the scan's), then scans the head once. The two reports must be equal (verdicts, bounds,
certificates). Throughputs: screen ``2·V·V·d`` multiply-adds per worker CPU (the gram and the witness pass
over each row block); search ``n_open·V·d`` per worker CPU (its pricing rounds folded into the rate); the
driver's verification ``(V + n_open)·V·d`` (every screen winner and every open token is verified there,
serially: the driver trusts no task).

Sizing (a prediction, stated): with K nodes of c CPUs each,

    T(K) = T_put + (2·V²·d / r_screen + N_open·V·d / r_search) / (K·c) + (V + N_open)·V·d / r_verify

with r_* the rates measured here on one worker, N_open the tokens the witness screen leaves open (17.5 %
of V, SmolLM2's share) and T_put the object-store broadcast (2·V·d·8 bytes to each node at ``net_gbps``).
The last term does not shrink with K: the driver's verification bounds the speed-up (Amdahl).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import unspeakable.engine.pipeline as es
from unspeakable.engine.cluster import SEARCH_BATCH, Cluster, task_memory
from unspeakable.engine.loader import load

BIG_V, BIG_D = 262144, 4096


def _run(head, domain: str, workers: int, screen_rows: int, tokens=None) -> tuple[object, float, dict]:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cl = Cluster(screen_rows=screen_rows)
        es.scan_head(load("synthetic:V=600,d=16,seed=1"), domain=domain, cluster=cl, device="cpu", backend="torch")
        t0 = time.perf_counter()
        rep = es.scan_head(head, domain=domain, cluster=cl, device="cpu", backend="torch", tokens=tokens)
        return rep, time.perf_counter() - t0, dict(cl.stats)
    finally:
        ray.shutdown()


def _same(a, b) -> bool:
    ja, jb = a.to_json(), b.to_json()
    for j in (ja, jb):
        j.pop("timings_s")
        for t in j["tokens"]:
            t.pop("time_s")
    return ja == jb and np.array_equal(a.verdicts_all, b.verdicts_all)


def _rates(rep, V: int, d: int, workers: int, n: int) -> dict:
    """Rates of a scan of ``n`` tokens (rows) against all V."""
    ts = rep.timings_s
    n_open = sum(1 for t in rep.tokens if t.reason not in ("tie", "witness (screen)"))
    return {"n_open": n_open,
            "screen_madds_per_cpu_s": 2.0 * n * V * d / (ts["screen"] * workers),
            "search_madds_per_cpu_s": max(1, n_open) * V * d / max(1e-9, (ts["search"] + ts["decide"]) * workers),
            "verify_madds_per_s": (n + n_open) * V * d / max(1e-9, ts["verify"])}


def sizing(rates: dict, V: int = BIG_V, d: int = BIG_D, cpus: int = 16, open_frac: float = 0.175,
           net_gbps: float = 10.0, screen_rows: int = 4096) -> list[dict]:
    """The table of benchmarks/RESULTS.md: per K, bytes per shard, tasks and the predicted time (formula in
    the module docstring)."""
    n_open = int(open_frac * V)
    t_screen, t_search = (2.0 * V * V * d / rates["screen_madds_per_cpu_s"],
                          n_open * V * d / rates["search_madds_per_cpu_s"])
    t_verify = (V + n_open) * V * d / rates["verify_madds_per_s"]
    rows = []
    for K in (1, 2, 4, 8, 16):
        t_put = 2 * V * d * 8 * 8 / (net_gbps * 1e9)  # each node pulls the gram rows and the keys once
        rows.append({
            "K": K, "cpus": K * cpus, "screen_tasks": math.ceil(V / screen_rows),
            "search_tasks": math.ceil(n_open / SEARCH_BATCH),
            "screen_shard_bytes": screen_rows * 8 + screen_rows * 8 * 8,  # ids in; 8 float64/int64 per row out
            "search_shard_bytes": SEARCH_BATCH * (8 + d * 8 + 64 * 16),  # ids in; witness + certificate out
            "node_broadcast_bytes": 2 * V * d * 8,
            "predicted_s": t_put + (t_screen + t_search) / (K * cpus) + t_verify,
            "screen_task_GiB": task_memory("screen", V, d, screen_rows) / 2**30,
            "search_task_GiB": task_memory("search", V, d) / 2**30,
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="synthetic:V=16384,d=768,seed=0")
    ap.add_argument("--domain", help="default: the source's")
    ap.add_argument("--screen-rows", type=int, default=2048)
    ap.add_argument("--tokens", type=int, help="scan only ids 0..N-1 (their rows against all V)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    head = load(a.source)
    V, d = head.d_vocab, head.d_model
    load_avg = os.getloadavg()
    ids = None if a.tokens is None else np.arange(min(a.tokens, V))
    one, t1, s1 = _run(head, a.domain, 1, a.screen_rows, ids)
    two, t2, s2 = _run(head, a.domain, 2, a.screen_rows, ids)
    rates = _rates(one, V, d, 1, V if ids is None else ids.size)
    out = {"source": a.source, "domain": a.domain, "V": V, "d": d, "tokens": a.tokens, "load_avg_before": load_avg,
           "load_avg_after": os.getloadavg(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
           "wall_s": {"1": t1, "2": t2}, "speedup_2_over_1": t1 / t2, "reports_equal": _same(one, two),
           "screen_speedup_2_over_1": one.timings_s["screen"] / two.timings_s["screen"],
           "timings_1": one.timings_s, "timings_2": two.timings_s, "stats_1": s1, "stats_2": s2,
           "counts": one.counts, "rates_1_worker": rates, "sizing_262144x4096": sizing(rates)}
    if a.json:
        print(json.dumps(out, indent=1, default=float))
        return 0
    print(f"{a.source} ({a.domain}): 1 worker {t1:.1f} s, 2 workers {t2:.1f} s, speed-up {t1 / t2:.2f}x, "
          f"(screens {out['screen_speedup_2_over_1']:.2f}x), reports equal: {out['reports_equal']}; "
          f"load {load_avg} -> {out['load_avg_after']}")
    for k in ("timings_1", "timings_2"):
        print(f"  {k}: " + "  ".join(f"{s}={v:.1f}" for s, v in out[k].items()))
    print("  rates (1 worker): " + "  ".join(f"{k}={v:.3g}" for k, v in rates.items()))
    print(f"{'K':>3} {'CPUs':>5} {'screen tasks':>12} {'search tasks':>12} {'bytes/screen shard':>18} "
          f"{'bytes/search shard':>18} {'predicted s':>11}")
    for r in out["sizing_262144x4096"]:
        print(f"{r['K']:>3} {r['cpus']:>5} {r['screen_tasks']:>12} {r['search_tasks']:>12} "
              f"{r['screen_shard_bytes']:>18} {r['search_shard_bytes']:>18} {r['predicted_s']:>11.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
