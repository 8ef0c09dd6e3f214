"""Benchmarks of ``unspeakable volume`` (issue 19): speed and accuracy of the share estimates.

    python benchmarks/bench_volume.py gpt2-orthant [--seeds 3]     # 50257 x 768, one token of share 2^-40 (known)
    python benchmarks/bench_volume.py gpt2-synthetic [--tokens 1]   # synthetic:V=50257,d=768: a rare real-ish token
    python benchmarks/bench_volume.py tokens SOURCE --n 32 [--reference]  # n random tokens: seconds per token
    python benchmarks/bench_volume.py hardest SCAN.json SOURCE --n 10   # the smallest-margin speakable tokens

``gpt2-orthant`` plants a token whose region is exactly an orthant of 40 rotated coordinates (share 2^-40 =
9.09e-13 by sign symmetry, on the sphere of radius sqrt(768) in R^768) among 50216 further rows drawn like a
GPT-2-shaped cloud (benchmarks.shapes) whose bias keeps them below the planted token inside the orthant; the estimate
must be within a factor 2 of the truth (DESIGN §7: in <= 60 s on 2 cores).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

vol = importlib.import_module("unspeakable.engine.volume")


def _row(tv) -> str:
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"{tv.id:>6} {tv.text!r:<16} log10 share {f(tv.log10_share):>8} CI [{f(tv.log10_share_ci[0])}, "
            f"{f(tv.log10_share_ci[1])}] rigorous >= {f(tv.log10_share_lower_bound)} cap {f(tv.cap_angle_deg)}° "
            f"{tv.method} levels {tv.levels} {tv.seconds:.1f} s")


def gpt2_orthant(args) -> dict:
    from unspeakable.engine.head import head_from_arrays

    V, d, k = 50257, 768, 40
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    cloud = rng.standard_normal((V - k - 1, d)) * (3.0 / math.sqrt(d)) * rng.lognormal(0, 0.2, (V - k - 1, 1))
    rows = np.zeros((V, d))
    rows[1:k + 1, :k] = -3.0 * np.eye(k)
    rows[:k + 1] = rows[:k + 1] @ Q.T
    rows[k + 1:] = cloud
    R = math.sqrt(d)
    bias = np.zeros(V)
    # inside the orthant token 0's logit is 0: a cloud row j must stay below it, b_j < -R ||u_j||
    bias[k + 1:] = -R * np.linalg.norm(cloud, axis=1) * 1.01
    head = head_from_arrays(rows.T.astype(np.float32), bias.astype(np.float32), norm="rmsnorm")
    truth = -k * math.log10(2)
    out = []
    for s in range(args.seeds):
        t0 = time.perf_counter()
        rep = vol.volume(head, tokens=[0], samples=0, seed=s)
        dt = time.perf_counter() - t0
        tv = rep.tokens[0]
        err = tv.log10_share - truth
        print(f"seed {s}: {dt:.1f} s  truth {truth:.3f}  " + _row(tv) + f"  error x{10 ** abs(err):.2f}")
        out.append({"seed": s, "seconds": dt, "log10_share": tv.log10_share, "ci": tv.log10_share_ci,
                    "lower_bound": tv.log10_share_lower_bound, "factor": 10 ** abs(err),
                    "covered": tv.log10_share_ci[0] <= truth <= tv.log10_share_ci[1]})
    return {"truth": truth, "runs": out}


def gpt2_synthetic(args) -> dict:
    import unspeakable

    head = unspeakable.load("synthetic:V=50257,d=768,seed=0")
    ids = [int(t) for t in args.tokens.split(",")]
    res = {}
    for name, opt in (("default", vol.SplitOptions()),
                      ("reference (4x particles)", vol.SplitOptions(particles=128, replicates=32))):
        t0 = time.perf_counter()
        rep = vol.volume(head, tokens=ids, samples=0, seed=7 if name == "default" else 8, split=opt)
        dt = time.perf_counter() - t0
        print(f"{name}: {dt:.1f} s for {len(ids)} tokens")
        for tv in rep.tokens:
            print("  " + _row(tv))
        res[name] = {"seconds": dt, "tokens": [tv.to_json() for tv in rep.tokens]}
    return res


# the options before the pilot (issue 19): 16 x 64 particles, 30 pCN moves per level, J from t's own direction
# grown over up to 3 rounds; `tokens --reference` runs them on the same tokens to compare estimates
REFERENCE = dict(particles=64, replicates=16, moves=30, pilot_particles=0, rounds=3, rerun_below=0.7)


def _agree(a, b) -> bool:
    """Each estimate inside the other's interval (open ends count as open)."""
    def inside(tv, v):
        lo, hi = tv.log10_share_ci
        return v is not None and (lo is None or lo <= v) and (hi is None or v <= hi)
    return inside(a, b.log10_share) and inside(b, a.log10_share)


def tokens(args) -> dict:
    import unspeakable

    head = unspeakable.load(args.source)
    ids = np.sort(np.random.default_rng(args.seed).choice(head.d_vocab, args.n, replace=False))
    runs = [("default", vol.SplitOptions(**json.loads(args.options)))]
    if args.fast:
        runs = [("fast", vol.SplitOptions(particles=32, replicates=8, moves=15, max_competitors=512))]
    if args.reference:
        runs.append(("reference", vol.SplitOptions(**REFERENCE)))
    out, reps = {}, {}
    for name, opt in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        rep = vol.volume(head, tokens=ids, samples=args.samples, seed=args.seed, split=opt,
                         lower_bound=not args.no_bound)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        reps[name] = rep
        shares = [tv.log10_share for tv in rep.tokens if tv.log10_share is not None]
        widths = [tv.log10_share_ci[1] - tv.log10_share_ci[0] for tv in rep.tokens
                  if all(v is not None and math.isfinite(v) for v in tv.log10_share_ci)]
        open_below = sum(tv.log10_share is not None and tv.log10_share_ci[0] is None for tv in rep.tokens)
        print(f"{name} {opt}:\n  {args.n} random tokens of {args.source}: {dt:.1f} s ({dt / args.n:.2f} s per token; "
              f"CPU {cpu:.1f} s, all threads: less sensitive than wall time to other load); "
              f"timings { {k: round(v, 1) for k, v in rep.timings_s.items()} }")
        print(f"  log10 share: median {np.median(shares):.2f}, range [{min(shares):.2f}, {max(shares):.2f}]; "
              f"CI width median {np.median(widths):.2f}, max {max(widths):.2f}; "
              f"{args.n - len(widths)} intervals open or absent ({open_below} with an estimate but open below)")
        print(f"  1000 tokens at this rate: {1000 * dt / args.n / 60:.1f} min; uptime {os.popen('uptime').read().strip()}")
        out[name] = {"seconds": dt, "cpu_seconds": cpu, "open_below": open_below, "n": args.n, "options": opt.__dict__, "timings": rep.timings_s,
                     "tokens": [tv.to_json() for tv in rep.tokens]}
    if len(reps) == 2:
        a, b = (reps[k].tokens for k in reps)
        ok = [_agree(x, y) for x, y in zip(a, b)]
        print(f"agreement: {sum(ok)} of {len(ok)} tokens have each estimate inside the other's interval; "
              f"differences (log10) {[round(x.log10_share - y.log10_share, 2) if x.log10_share is not None and y.log10_share is not None else None for x, y in zip(a, b)]}")
        out["agreement"] = sum(ok)
    return out


def hardest(args) -> dict:
    import unspeakable

    with open(args.scan) as f:
        rep = json.load(f)
    speak = [t for t in rep["tokens"] if t["verdict"] == "speakable" and t["margin_lower"] is not None]
    speak.sort(key=lambda t: t["margin_lower"])
    ids = [t["id"] for t in speak[:args.n]]
    margins = {t["id"]: t["margin_lower"] for t in speak[:args.n]}
    head = unspeakable.load(args.source)
    t0 = time.perf_counter()
    out = vol.volume(head, tokens=ids, samples=args.samples, seed=args.seed)
    dt = time.perf_counter() - t0
    print(f"the {args.n} smallest-margin speakable tokens of {args.source}: {dt:.1f} s")
    for tv in sorted(out.tokens, key=lambda t: margins[t.id]):
        print(f"  margin {margins[tv.id]:.3g}  " + _row(tv))
    return {"seconds": dt, "tokens": [dict(tv.to_json(), margin_lower=margins[tv.id]) for tv in out.tokens]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("gpt2-orthant")
    a.add_argument("--seeds", type=int, default=3)
    b = sub.add_parser("gpt2-synthetic")
    b.add_argument("--tokens", default="1")
    c = sub.add_parser("tokens")
    c.add_argument("source")
    c.add_argument("--n", type=int, default=32)
    c.add_argument("--samples", type=int, default=0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--fast", action="store_true", help="8 replicates x 32 particles, 15 moves, J <= 512")
    c.add_argument("--options", default="{}", help="SplitOptions overrides as JSON, e.g. '{\"moves\": 10}'")
    c.add_argument("--reference", action="store_true", help="also run the pre-pilot options on the same tokens")
    c.add_argument("--no-bound", action="store_true", help="skip the rigorous cap bound (time the estimate alone)")
    h = sub.add_parser("hardest")
    h.add_argument("scan")
    h.add_argument("source")
    h.add_argument("--n", type=int, default=10)
    h.add_argument("--samples", type=int, default=65536)
    h.add_argument("--seed", type=int, default=0)
    for q in (a, b, c, h):
        q.add_argument("--json", help="write the measurements here")
        q.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"uptime: {os.popen('uptime').read().strip()}; torch threads {torch.get_num_threads()}; commit "
          f"{os.popen('git rev-parse --short HEAD 2>/dev/null').read().strip()}")
    res = {"gpt2-orthant": gpt2_orthant, "gpt2-synthetic": gpt2_synthetic, "tokens": tokens,
           "hardest": hardest}[args.cmd](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
