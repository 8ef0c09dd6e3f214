"""Decide stage (DESIGN §3 step 5): wall time per open token, median and p95 against DESIGN §7.

    python -m pytest benchmarks/bench_decide.py -o python_files='bench_*.py' --benchmark-only
    python benchmarks/bench_decide.py --V 50257 --d 768 --tokens 20      # GPT-2 small shape

Open tokens are those whose self-direction margin is ≤ 0 (the witness screen does not settle them). They
are found by running the witness screen on the first ``--scan`` token ids only (``witness_screen(problem,
ids)``: |ids|·V·d work, not V²·d), then ``engine.decide.decide_token`` runs on each, one at a time, on
the head from ``shapes.setup_problem`` (the same one the screen benchmarks use). The per-problem setup
of the decide stage (float32 copy of the keys, row norms) is timed separately, once, as the pipeline
pays it once per scan. Pytest size: GPT-2 small's d with V = 8192 (``BENCH_V`` / ``BENCH_D``); pricing is
one pass over V logits, so per-token times grow about linearly in V — the script form runs full size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import CI_D, CI_V, BenchProblem, setup_problem, shape_of  # noqa: E402

TARGET_MEDIAN_S = 0.05  # DESIGN §7
TARGET_P95_S = 0.5
TIME_LIMIT_S = 20.0  # decide_token's default


@dataclass
class TokenTiming:
    token: int
    time_s: float
    lower: float
    upper: float
    reason: str
    rounds: int
    pricings: int
    status: str

    @property
    def verdict(self) -> str:
        return "speakable" if self.lower > 0 else "unspeakable" if self.upper < 0 else "undecided"


def open_tokens(bp: BenchProblem, scan: int, limit: int) -> tuple[np.ndarray, float]:
    """Up to ``limit`` tokens among the first ``scan`` ids whose self-direction margin is ≤ 0."""
    from unspeakable.engine.screen import witness_screen

    ids = np.arange(min(scan, bp.V), dtype=np.int64)
    t0 = time.perf_counter()
    w = witness_screen(bp.problem, ids)
    return ids[w.margin <= 0][:limit], time.perf_counter() - t0


def decide_tokens(bp: BenchProblem, tokens) -> tuple[list[TokenTiming], float]:
    """Time ``decide_token`` on each token; returns the timings and the one-off per-problem setup time."""
    from unspeakable.engine.decide import Pricer, decide_token_stats

    t0 = time.perf_counter()
    pricer = Pricer(bp.problem)  # built once per problem; the pipeline pays it once per scan
    setup_s = time.perf_counter() - t0
    out = []
    for t in tokens:
        t0 = time.perf_counter()
        cand, st = decide_token_stats(bp.problem, int(t), pricer=pricer, time_limit=TIME_LIMIT_S)
        dt = time.perf_counter() - t0
        out.append(TokenTiming(int(t), dt, float(cand.lower), float(cand.upper), cand.reason, st.rounds,
                               st.pricings, st.status))
    return out, setup_s


def summary(timings: list[TokenTiming]) -> dict:
    ts = np.array([x.time_s for x in timings])
    verdicts = [x.verdict for x in timings]
    return {"n": len(ts), "median_s": float(np.median(ts)), "p95_s": float(np.percentile(ts, 95)),
            "max_s": float(ts.max()), "speakable": verdicts.count("speakable"),
            "unspeakable": verdicts.count("unspeakable"), "undecided": verdicts.count("undecided")}


def report(bp: BenchProblem, timings, setup_s, scan_s, scanned) -> list[str]:
    s = summary(timings)
    L = [f"decide on {s['n']} open tokens of {bp.name} (V = {bp.V}, d = {bp.d}, {bp.problem.domain.name}); open = "
         f"self-direction margin ≤ 0 among the first {scanned} ids (witness screen on them: {scan_s:.2f} s); "
         f"per-problem setup {setup_s:.2f} s, once",
         f"median {s['median_s']:.3f} s (target ≤ {TARGET_MEDIAN_S} s: {s['median_s'] / TARGET_MEDIAN_S:.2f}× the "
         f"target), p95 {s['p95_s']:.3f} s (target ≤ {TARGET_P95_S} s: {s['p95_s'] / TARGET_P95_S:.2f}×), "
         f"max {s['max_s']:.3f} s; verdicts: {s['speakable']} speakable, {s['unspeakable']} unspeakable, "
         f"{s['undecided']} undecided", "",
         "| token | time (s) | verdict | margin lower | margin upper | rounds | pricings | status |",
         "|---:|---:|---|---:|---:|---:|---:|---|"]
    for x in timings:
        L.append(f"| {x.token} | {x.time_s:.3f} | {x.verdict} | {x.lower:.4g} | {x.upper:.4g} | {x.rounds} | "
                 f"{x.pricings} | {x.status} |")
    return L


# ------------------------------------------------------------------------------------------------ pytest
try:
    import pytest
except ImportError:  # the script form does not need pytest
    pytest = None

if pytest is not None:
    V = int(os.environ.get("BENCH_V", CI_V))
    D = int(os.environ.get("BENCH_D", CI_D))
    N_TOKENS = int(os.environ.get("BENCH_TOKENS", 8))
    SCAN = int(os.environ.get("BENCH_SCAN", V))
    _LINES: list[str] = []

    class _Report:
        @pytest.hookimpl(trylast=True)
        def pytest_terminal_summary(self, terminalreporter):
            if _LINES:
                terminalreporter.section("decide: per open token")
                for line in _LINES:
                    terminalreporter.write_line(line)

    @pytest.fixture(scope="module")
    def bp(request):
        pytest.importorskip("unspeakable.engine.decide")
        request.config.pluginmanager.register(_Report(), "bench_decide_report")
        return setup_problem(V, D, seed=0)

    def test_decide_open_tokens(benchmark, bp):
        tokens, scan_s = open_tokens(bp, SCAN, N_TOKENS)
        if not tokens.size:
            pytest.skip("no open token in this head")
        benchmark.group = f"decide {shape_of(V, D)[0]}"
        res = {}

        def run():
            res["timings"], res["setup_s"] = decide_tokens(bp, tokens)

        # One round: each token is a separate measurement inside it (median / p95 over tokens, not rounds).
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        s = summary(res["timings"])
        benchmark.extra_info.update(V=V, d=D, **s, setup_s=res["setup_s"])
        _LINES[:] = report(bp, res["timings"], res["setup_s"], scan_s, min(SCAN, V))
        # "undecided" is a legitimate outcome (reported, not failed); a claim with lower > upper is not.
        assert all(x.lower <= x.upper + 1e-6 * max(1.0, abs(x.upper)) for x in res["timings"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", help="a registry name from benchmarks/shapes.py (overrides --V/--d)")
    ap.add_argument("--V", type=int, default=CI_V)
    ap.add_argument("--d", type=int, default=CI_D)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domain", default="layernorm", choices=("layernorm", "rmsnorm", "box"))
    ap.add_argument("--tokens", type=int, default=20, help="open tokens to decide")
    ap.add_argument("--scan", type=int, default=8192, help="token ids screened to find open ones")
    args = ap.parse_args(argv)
    name, V, d = shape_of(args.shape) if args.shape else shape_of(args.V, args.d)
    t0 = time.perf_counter()
    bp = setup_problem(V, d, args.seed, domain=args.domain)
    print(f"setup_problem({V}, {d}, {args.seed}, {args.domain}): {time.perf_counter() - t0:.1f} s", flush=True)
    tokens, scan_s = open_tokens(bp, args.scan, args.tokens)
    if not tokens.size:
        print("no open token among the scanned ids")
        return 0
    timings, setup_s = decide_tokens(bp, tokens)
    print("\n".join(report(bp, timings, setup_s, scan_s, min(args.scan, V))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
