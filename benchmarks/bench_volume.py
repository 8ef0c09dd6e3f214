"""Benchmarks of ``unspeakable volume`` (issue 19): speed and accuracy of the share estimates.

    python benchmarks/bench_volume.py gpt2-orthant [--seeds 3]     # 50257 x 768, one token of share 2^-40 (known)
    python benchmarks/bench_volume.py gpt2-synthetic [--tokens 1]   # synthetic:V=50257,d=768: a rare real-ish token
    python benchmarks/bench_volume.py tokens SOURCE --n 32 [--reference]  # n random tokens: seconds per token
    python benchmarks/bench_volume.py hardest SCAN.json SOURCE --n 10   # the smallest-margin speakable tokens
    python benchmarks/bench_volume.py agreement SOURCE --n 32 --options '{}' '{"particles": 64}'  # precision
    python benchmarks/bench_volume.py coverage [--seeds 40]         # each end of the interval, known shares

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


def agreement(args) -> dict:
    """Precision of option sets against a reference run (many replicates) on the same random tokens: each set's
    estimates over several seeds, their sd from the reference, how often its interval misses the reference on
    each side, median width and time (the reference's own sd is in every difference: compare sets, not 0)."""
    import unspeakable

    head = unspeakable.load(args.source)
    ids = np.sort(np.random.default_rng(args.token_seed).choice(head.d_vocab, args.n, replace=False))

    def run(opt, seed):
        t0 = time.perf_counter()
        rep = vol.volume(head, tokens=ids, samples=0, seed=seed, split=opt, lower_bound=False)
        return [(tv.log10_share, *tv.log10_share_ci) for tv in rep.tokens], time.perf_counter() - t0

    ref, dt = run(vol.SplitOptions(replicates=args.reference_replicates), 1000)
    ref = np.array(ref, dtype=float)[:, 0]
    print(f"reference ({args.reference_replicates} replicates): {dt:.1f} s")
    out = {"ids": ids.tolist(), "reference": ref.tolist(), "sets": {}}
    for spec in args.options:
        opt = vol.SplitOptions(**json.loads(spec))
        est, secs = [], []
        for seed in range(1, args.seeds + 1):
            e, dt = run(opt, seed)
            est.append(e)
            secs.append(dt)
        e = np.array(est, dtype=float)  # [seeds, n, 3]; None (no estimate) -> nan
        d = e[:, :, 0] - ref[None, :]
        lo_miss = int(np.sum(e[:, :, 1] > ref[None, :]))
        hi_miss = int(np.sum(e[:, :, 2] < ref[None, :]))
        w = e[:, :, 2] - e[:, :, 1]
        print(f"{spec}: {np.mean(secs):.1f} s per run; sd from the reference {np.nanstd(d):.3f} decades (mean "
              f"{np.nanmean(d):+.3f}); interval below it {lo_miss}, above it {hi_miss} of {d.size}; width median "
              f"{np.nanmedian(w):.3f}; no estimate {int(np.isnan(e[:, :, 0]).sum())}")
        out["sets"][spec] = {"seconds": secs, "estimates": e.tolist()}
    return out


def coverage(args) -> dict:
    """Coverage of each end of the 95% interval on the rotated orthant head (d = 64, k = 20; token 0 at 2^-20,
    tokens 1..20 at (1 - 2^-20)/20, known by sign symmetry), default options, ``--seeds`` seeds."""
    from unspeakable.engine.head import head_from_arrays

    d, k = 64, 20
    miss = {"rare": [0, 0], "common": [0, 0]}
    n = {"rare": 0, "common": 0}
    widths = []
    t0 = time.perf_counter()
    for s in range(args.seeds):
        rows = np.zeros((k + 1, d))
        rows[1:, :k] = -3.0 * np.eye(k)
        Q, _ = np.linalg.qr(np.random.default_rng(s).standard_normal((d, d)))
        head = head_from_arrays((rows @ Q.T).T, norm="rmsnorm")
        rep = vol.volume(head, tokens=list(range(k + 1)), samples=args.samples, seed=s,
                         split=vol.SplitOptions(**json.loads(args.options)), lower_bound=False)
        for tv in rep.tokens:
            kind = "rare" if tv.id == 0 else "common"
            truth = -k * math.log10(2) if tv.id == 0 else math.log10((1 - 2.0**-k) / k)
            lo, hi = tv.log10_share_ci
            lo, hi = -math.inf if lo is None else lo, math.inf if hi is None else hi
            miss[kind][0] += truth < lo
            miss[kind][1] += truth > hi
            n[kind] += 1
            if kind == "rare":
                widths.append(hi - lo)
    dt = time.perf_counter() - t0
    for kind in miss:
        print(f"{kind}: interval above the truth {miss[kind][0]}, below it {miss[kind][1]} of {n[kind]} "
              f"(each end nominal 2.5%)")
    print(f"rare token's interval width median {np.median(widths):.3f} decades; {dt:.1f} s")
    return {"miss": miss, "n": n, "seconds": dt}


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
    g = sub.add_parser("agreement")
    g.add_argument("source")
    g.add_argument("--n", type=int, default=32)
    g.add_argument("--token-seed", type=int, default=123)
    g.add_argument("--seeds", type=int, default=3)
    g.add_argument("--reference-replicates", type=int, default=32)
    g.add_argument("--options", nargs="+", default=["{}"], help="SplitOptions overrides as JSON, one per set")
    v = sub.add_parser("coverage")
    v.add_argument("--seeds", type=int, default=40)
    v.add_argument("--samples", type=int, default=65536)
    v.add_argument("--options", default="{}")
    h = sub.add_parser("hardest")
    h.add_argument("scan")
    h.add_argument("source")
    h.add_argument("--n", type=int, default=10)
    h.add_argument("--samples", type=int, default=65536)
    h.add_argument("--seed", type=int, default=0)
    for q in (a, b, c, g, v, h):
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
           "agreement": agreement, "coverage": coverage, "hardest": hardest}[args.cmd](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
