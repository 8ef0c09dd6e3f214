"""Screens (gram + witness, DESIGN §3 steps 2–3) against their peers, timed in one run, ratios printed.

    python benchmarks/compare_screen.py --V 50257 --d 768          # GPT-2 small shape (minutes per provider)
    python benchmarks/compare_screen.py --shape gpt2-small --profile-V 16384 --seed-V 16384

Providers (all read the same head from ``shapes.setup_problem``, float64, and pay for their own float32
copies inside the timed region):

* ``ours`` — ``engine.screen.gram_screen(rows)`` then ``engine.screen.witness_screen(problem)``: the float32
  tiled top-2 pass plus float64 recovery of near ties and float64 rescoring (exact indices, DESIGN §4).
* ``faiss`` — exact inner-product search, ``faiss.IndexFlatIP``, k = 3 so the self match can be dropped.
  Gram: rows against rows. Witness: the logits ``x_t·k_j + b_j`` as one inner product in d + 1 dimensions
  (queries ``[x_t, 1]``, keys ``[k_j, b_j]``). Two searches, like for like; the gram search alone is also
  reported ("1 search"). Float32 only: no exactness guarantee.
* ``torch-gemm`` — the GEMM ceiling: 1024-row chunks of ``q @ K.T`` (+ bias) and ``torch.topk(·, 3)``.
* ``seed`` — the seed's ``(W_U.T @ W_U).argmax(-1)``: materialises V × V float32 (10 GB at V = 50257), so it
  runs only at ``--seed-V`` (default 16384), next to ours at the same size.

Each provider runs in its own subprocess (``--worker``): the head is loaded from ``.npy`` files written
once by the parent, the kernel's peak-RSS counter is reset after loading (``/proc/self/clear_refs``), and
the worker reports its wall time per screen, its whole-process peak RSS (``VmHWM``, data included) and the
increment over the RSS after loading. ``--profile-V N`` adds one profiled run of ours (cProfile phases +
torch.profiler operator table) at V = N.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from shapes import BenchProblem, load_problem, save_problem, setup_problem, shape_of  # noqa: E402

BLOCK_ROWS = 1024  # the chunked peers use the same query block as ours (kernels.top2.top2_torch)


# ----------------------------------------------------------------------------------------------- providers
@dataclass
class ScreenRun:
    """One provider's run: wall seconds per screen and the best competitor (j != t) per token."""

    provider: str
    times: dict = field(default_factory=dict)  # {"gram": s, "witness": s}
    best: dict = field(default_factory=dict)  # {"gram": [V] int64, "witness": [V] int64}

    @property
    def total(self) -> float:
        return float(sum(self.times.values()))


def _drop_self(I: np.ndarray, first_id: int = 0) -> np.ndarray:
    """The first two ids of each row of a k = 3 result that are not the row's own token."""
    own = np.arange(first_id, first_id + I.shape[0], dtype=I.dtype)[:, None]
    order = np.argsort(I == own, axis=1, kind="stable")  # non-self first, ranks kept
    return np.take_along_axis(I, order[:, :2], axis=1)


def ours(bp: BenchProblem) -> ScreenRun:
    from unspeakable.engine.screen import gram_screen, witness_screen

    run = ScreenRun("ours")
    t0 = time.perf_counter()
    g = gram_screen(bp.rows)
    t1 = time.perf_counter()
    w = witness_screen(bp.problem)
    t2 = time.perf_counter()
    run.times = {"gram": t1 - t0, "witness": t2 - t1}
    run.best = {"gram": g.best_idx, "witness": w.runner_up}
    run.recomputed = {"gram": g.recomputed, "witness": w.recomputed}
    run.argmax = g.argmax
    return run


def _witness_augmented(bp: BenchProblem) -> tuple[np.ndarray, np.ndarray]:
    """float32 queries ``[x_t, 1]`` and keys ``[k_j, b_j]``: one inner product gives ``x_t·k_j + b_j``."""
    q, s = bp.witness_queries()
    V, d = q.shape
    qa = np.empty((V, d + 1), dtype=np.float32)
    qa[:, :d] = q * s[:, None]
    qa[:, d] = 1.0
    ka = np.empty((V, d + 1), dtype=np.float32)
    ka[:, :d] = bp.problem.keys
    ka[:, d] = bp.problem.bias
    return qa, ka


def faiss_top2(bp: BenchProblem) -> ScreenRun:
    import faiss

    run = ScreenRun("faiss")
    t0 = time.perf_counter()
    r32 = bp.rows.astype(np.float32)
    index = faiss.IndexFlatIP(bp.d)
    index.add(r32)
    _, I = index.search(r32, 3)
    run.best["gram"] = _drop_self(I)[:, 0]
    del index, r32
    t1 = time.perf_counter()
    qa, ka = _witness_augmented(bp)
    index = faiss.IndexFlatIP(bp.d + 1)
    index.add(ka)
    _, I = index.search(qa, 3)
    run.best["witness"] = _drop_self(I)[:, 0]
    t2 = time.perf_counter()
    run.times = {"gram": t1 - t0, "witness": t2 - t1}
    return run


def _chunked_top3(q, k, bias=None) -> np.ndarray:
    import torch

    out = torch.empty((q.shape[0], 3), dtype=torch.int64)
    kt = k.T
    for r0 in range(0, q.shape[0], BLOCK_ROWS):
        s = q[r0:r0 + BLOCK_ROWS] @ kt
        if bias is not None:
            s += bias
        out[r0:r0 + BLOCK_ROWS] = torch.topk(s, 3, dim=1).indices
    return out.numpy()


def torch_gemm_top2(bp: BenchProblem) -> ScreenRun:
    import torch

    run = ScreenRun("torch-gemm")
    t0 = time.perf_counter()
    r32 = torch.from_numpy(bp.rows.astype(np.float32))
    run.best["gram"] = _drop_self(_chunked_top3(r32, r32))[:, 0]
    del r32
    t1 = time.perf_counter()
    q, s = bp.witness_queries()
    x32 = torch.from_numpy((q * s[:, None]).astype(np.float32))
    k32 = torch.from_numpy(bp.problem.keys.astype(np.float32))
    b32 = torch.from_numpy(bp.problem.bias.astype(np.float32))
    run.best["witness"] = _drop_self(_chunked_top3(x32, k32, b32))[:, 0]
    t2 = time.perf_counter()
    run.times = {"gram": t1 - t0, "witness": t2 - t1}
    return run


def seed_gram(bp: BenchProblem) -> ScreenRun:
    """The seed's hard-to-speak screen: the full V × V Gram in float32, then argmax (self included)."""
    import torch

    run = ScreenRun("seed")
    t0 = time.perf_counter()
    W_U = torch.from_numpy(bp.rows.astype(np.float32)).T  # [d, V], TransformerLens orientation
    G = W_U.T @ W_U
    am = G.argmax(-1)
    G.fill_diagonal_(float("-inf"))  # best competitor, for the agreement check only (not timed below)
    t1 = time.perf_counter()
    run.best["gram"] = G.argmax(-1).numpy()
    run.times = {"gram": t1 - t0}
    run.argmax = am.numpy()
    return run


PROVIDERS = {"ours": ours, "faiss": faiss_top2, "torch-gemm": torch_gemm_top2, "seed": seed_gram}


# -------------------------------------------------------------------------------------------------- worker
def _proc_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    bp = load_problem(args.data)
    reset = _reset_peak()
    base_kb = _proc_kb("VmRSS")
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    fn = PROVIDERS[args.worker]
    prof = None
    if args.profile:
        import cProfile

        from torch.profiler import ProfilerActivity, profile

        cp = cProfile.Profile()
        with profile(activities=[ProfilerActivity.CPU]) as tp:
            cp.enable()
            run = fn(bp)
            cp.disable()
        prof = _profile_summary(cp, tp, run)
    else:
        run = fn(bp)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds (user + system, all threads): less sensitive than wall time to other jobs on a shared
    # machine, but counts OpenMP spin-waiting, so read it next to the wall time, not instead of it.
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    peak_kb = _proc_kb("VmHWM") if reset else ru1.ru_maxrss
    out = {"provider": run.provider, "V": bp.V, "d": bp.d, "times": run.times, "total": run.total, "cpu_s": cpu_s,
           "peak_rss_mb": peak_kb / 1024, "base_rss_mb": base_kb / 1024, "peak_reset": reset,
           "data_mb": (bp.rows.nbytes + bp.problem.keys.nbytes) / 2**20,
           "loadavg": [load0, os.getloadavg()[0]], "threads": torch.get_num_threads(),
           "recomputed": getattr(run, "recomputed", None), "profile": prof}
    for k, v in run.best.items():
        np.save(os.path.join(args.out, f"{args.worker}-{k}.npy"), np.asarray(v, dtype=np.int64))
    if hasattr(run, "argmax"):
        np.save(os.path.join(args.out, f"{args.worker}-argmax.npy"), run.argmax)
    with open(os.path.join(args.out, f"{args.worker}.json"), "w") as f:
        json.dump(out, f)


def _profile_summary(cp, tp, run) -> dict:
    """Where ours spends its time: cProfile phases (the fast pass and the float64 recovery are the same
    function, ``top2_torch``, told apart by caller) and the torch operator table (self CPU time)."""
    import pstats

    st = pstats.Stats(cp).stats  # {(file, line, fn): (cc, nc, tt, ct, callers)}

    def find(fn_name, file_part):
        return [k for k in st if k[2] == fn_name and file_part in k[0]]

    phases = {}
    for key in find("top2_torch", "kernels/top2.py"):
        for caller, (_, nc, _, ct) in st[key][4].items():
            name = {"_fast_top2": "fast pass (float32 tiles: GEMM + top-2 epilogue)",
                    "top2_exact": "float64 recovery of near-tie rows"}.get(caller[2], f"top2_torch via {caller[2]}")
            phases[name] = phases.get(name, 0.0) + ct
    for fn_name, file_part, label in (("_gather_scores64", "kernels/screen.py", "float64 rescoring (best, second, self)"),
                                      ("row_error_bounds", "kernels/screen.py", "error bounds")):
        for key in find(fn_name, file_part):
            phases[label] = phases.get(label, 0.0) + st[key][3]
    total = run.total
    phases["input prep, casts, rest"] = total - sum(phases.values())
    ops = []
    for e in sorted(tp.key_averages(), key=lambda e: -e.self_cpu_time_total)[:14]:
        ops.append({"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6})
    return {"total_s": total, "times": run.times, "phases": phases, "ops": ops}


# -------------------------------------------------------------------------------------------------- parent
def _spawn(provider: str, data: str, out: str, threads: int, profile: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--data", data, "--out", out,
           "--threads", str(threads)] + (["--profile"] if profile else [])
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(out, f"{provider}.json")) as f:
        res = json.load(f)
    res["best"] = {k: np.load(os.path.join(out, f"{provider}-{k}.npy")) for k in ("gram", "witness")
                   if os.path.exists(os.path.join(out, f"{provider}-{k}.npy"))}
    am = os.path.join(out, f"{provider}-argmax.npy")
    if os.path.exists(am):
        res["argmax"] = np.load(am)
    return res


def _agree(a: np.ndarray, b: np.ndarray) -> str:
    return f"{np.mean(a == b) * 100:.3f}%"


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _versions() -> str:
    out = [f"python {platform.python_version()}"]
    for mod in ("torch", "numpy", "faiss"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            out.append(f"{mod} missing")
    return ", ".join(out)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        model = "?"
    return f"{model}, {os.cpu_count()} cores"


def run_providers(bp: BenchProblem, providers, repeat: int, threads: int, tmp: str) -> dict:
    data = os.path.join(tmp, f"data-{bp.V}-{bp.d}")
    save_problem(bp, data)
    best: dict = {}
    for r in range(repeat):
        for p in providers:  # interleaved, so a slow spell on the machine hits every provider alike
            out = os.path.join(tmp, f"out-{bp.V}-{p}-{r}")
            os.makedirs(out, exist_ok=True)
            res = _spawn(p, data, out, threads)
            print(f"  [{bp.name} rep {r}] {p:11s} {res['total']:9.2f} s  "
                  + "  ".join(f"{k} {v:.2f} s" for k, v in res["times"].items())
                  + f"  cpu {res['cpu_s']:.1f} s  peak RSS {res['peak_rss_mb']:.0f} MB  load {res['loadavg'][0]:.2f}->{res['loadavg'][1]:.2f}",
                  flush=True)
            if p not in best or res["total"] < best[p]["total"]:
                best[p] = res
    shutil.rmtree(data, ignore_errors=True)
    return best


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "—"


def report_main(res: dict, bp: BenchProblem) -> list[str]:
    L = []
    L.append(f"**{bp.name}: V = {bp.V}, d = {bp.d}** (min over repeats; peak RSS = whole process, the float64 "
             f"head of {res[next(iter(res))]['data_mb']:.0f} MB included; Δ = above the RSS after loading)")
    L.append("")
    L.append("| provider | gram (s) | witness (s) | both screens (s) | CPU s (all threads) | peak RSS (MB) | Δ RSS (MB) "
             "| load avg (start→end) | rows recomputed in float64 |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for p, r in res.items():
        t = r["times"]
        rec = r.get("recomputed")
        L.append(f"| {p} | {t.get('gram', float('nan')):.2f} | {t.get('witness', float('nan')):.2f} | "
                 f"{r['total']:.2f} | {r.get('cpu_s', float('nan')):.1f} | {r['peak_rss_mb']:.0f} | "
                 f"{r['peak_rss_mb'] - r['base_rss_mb']:.0f} | {r['loadavg'][0]:.1f}→{r['loadavg'][1]:.1f} | "
                 f"{'' if not rec else ', '.join(f'{k} {v}' for k, v in rec.items())} |")
    L.append("")
    o, f, g = (res.get(k) for k in ("ours", "faiss", "torch-gemm"))
    tot = lambda r: None if r is None else r["total"]  # noqa: E731
    one = lambda r, k: None if r is None else r["times"].get(k)  # noqa: E731
    L.append("| ratio | value | DESIGN §7 target |")
    L.append("|---|---:|---|")
    L.append(f"| ours / faiss (both screens vs 2 searches) | **{_ratio(tot(o), tot(f))}** | ≤ 1.1× unpruned, ≤ 0.5× pruned |")
    L.append(f"| ours (both screens) / faiss (1 search, gram) | {_ratio(tot(o), one(f, 'gram'))} | |")
    L.append(f"| ours gram / faiss gram | {_ratio(one(o, 'gram'), one(f, 'gram'))} | |")
    L.append(f"| ours witness / faiss witness | {_ratio(one(o, 'witness'), one(f, 'witness'))} | |")
    L.append(f"| ours / torch GEMM (both screens) | {_ratio(tot(o), tot(g))} | |")
    L.append(f"| faiss / torch GEMM (both screens) | {_ratio(tot(f), tot(g))} | 0.72× (DESIGN §7's claim) |")
    cpu = lambda r: None if r is None else r.get("cpu_s")  # noqa: E731
    L.append(f"| ours / faiss, CPU seconds | {_ratio(cpu(o), cpu(f))} | |")
    L.append(f"| ours / torch GEMM, CPU seconds | {_ratio(cpu(o), cpu(g))} | |")
    if o is not None:
        L.append(f"| ours peak RSS | {o['peak_rss_mb'] / 1024:.2f} GB | ≤ 2 GB |")
    L.append("")
    if o is not None:
        agree = []
        for p in ("faiss", "torch-gemm"):
            if p in res:
                agree.append(f"{p}: gram {_agree(res[p]['best']['gram'], o['best']['gram'])}, "
                             f"witness {_agree(res[p]['best']['witness'], o['best']['witness'])}")
        if agree:
            L.append("Best competitor equal to ours (ours is exact, the peers are float32): " + "; ".join(agree) + ".")
            L.append("")
    return L


def report_seed(res: dict, bp: BenchProblem, full_V: int) -> list[str]:
    L = [f"**The seed's `(W_U.T @ W_U).argmax(-1)` at reduced V = {bp.V}, d = {bp.d}** (V × V float32 = "
         f"{bp.V**2 * 4 / 2**30:.2f} GiB; at V = {full_V}: {full_V**2 * 4 / 2**30:.1f} GiB, not run)", "",
         "| provider | screens | time (s) | peak RSS (MB) | Δ RSS (MB) |", "|---|---|---:|---:|---:|"]
    for p, r in res.items():
        L.append(f"| {p} | {' + '.join(r['times'])} | {r['total']:.2f} | {r['peak_rss_mb']:.0f} | "
                 f"{r['peak_rss_mb'] - r['base_rss_mb']:.0f} |")
    L.append("")
    s, o = res.get("seed"), res.get("ours")
    if s and o:
        L.append(f"ours (gram screen only) / seed: {_ratio(o['times']['gram'], s['total'])} time, "
                 f"{_ratio(o['peak_rss_mb'] - o['base_rss_mb'], s['peak_rss_mb'] - s['base_rss_mb'])} Δ memory; "
                 f"seed's argmax equal to ours on {_agree(s['argmax'], o['argmax'])} of tokens.")
        L.append("")
    return L


def report_profile(prof: dict, V: int, d: int) -> list[str]:
    L = [f"**Where ours spends its time** (one profiled run at V = {V}, d = {d}: cProfile phases, then torch "
         f"operators by self CPU time; total {prof['total_s']:.2f} s = gram {prof['times']['gram']:.2f} s + "
         f"witness {prof['times']['witness']:.2f} s)", "", "| phase | s | share |", "|---|---:|---:|"]
    for k, v in sorted(prof["phases"].items(), key=lambda kv: -kv[1]):
        L.append(f"| {k} | {v:.2f} | {v / prof['total_s'] * 100:.0f}% |")
    L += ["", "| torch operator | calls | self s | share |", "|---|---:|---:|---:|"]
    for e in prof["ops"]:
        L.append(f"| `{e['op']}` | {e['calls']} | {e['self_s']:.2f} | {e['self_s'] / prof['total_s'] * 100:.0f}% |")
    L.append("")
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", help="a registry name from benchmarks/shapes.py (overrides --V/--d)")
    ap.add_argument("--V", type=int, default=50257)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--providers", default="ours,faiss,torch-gemm")
    ap.add_argument("--seed-V", type=int, default=16384, help="V for the seed's V×V Gram (0: skip)")
    ap.add_argument("--profile-V", type=int, default=0, help="V of one profiled run of ours (0: skip)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    name, V, d = shape_of(args.shape) if args.shape else shape_of(args.V, args.d)
    cmd = "python benchmarks/compare_screen.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = [f"`{cmd}` — {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}, git {_git_rev()}",
            f"({_cpu()}; {_versions()}; threads: {args.threads}; load average at start "
            f"{os.getloadavg()[0]:.2f})", ""]
    print("\n".join(head), flush=True)
    tmp = tempfile.mkdtemp(prefix="compare_screen-")
    out_lines = list(head)
    dump = {}
    try:
        t = time.perf_counter()
        bp = setup_problem(V, d, args.seed)
        print(f"setup_problem({V}, {d}, {args.seed}): {time.perf_counter() - t:.1f} s", flush=True)
        res = run_providers(bp, [p for p in args.providers.split(",") if p], args.repeat, args.threads, tmp)
        out_lines += report_main(res, bp)
        dump["main"] = res
        del bp
        if args.seed_V:
            sbp = setup_problem(args.seed_V, d, args.seed)
            sres = run_providers(sbp, ["seed", "ours"], 1, args.threads, tmp)
            out_lines += report_seed(sres, sbp, V)
            dump["seed"] = sres
            del sbp
        if args.profile_V:
            pbp = setup_problem(args.profile_V, d, args.seed)
            data = os.path.join(tmp, "data-profile")
            save_problem(pbp, data)
            out = os.path.join(tmp, "out-profile")
            os.makedirs(out, exist_ok=True)
            prof = _spawn("ours", data, out, args.threads, profile=True)["profile"]
            out_lines += report_profile(prof, pbp.V, d)
            dump["profile"] = prof
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out_lines.append(f"(load average at end {os.getloadavg()[0]:.2f})")
    print("\n" + "\n".join(out_lines))
    if args.json:
        def clean(o):
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items() if k not in ("best", "argmax")}
            return o
        with open(args.json, "w") as f:
            json.dump(clean(dump), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
