"""benchmarks/compare.py: the Grivas-style peer on a planted head, the scan-report summary, and one tiny
smoke run of every provider (never appending to benchmarks/RESULTS.md)."""
import hashlib
import math
import os
import re
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import compare
import grivas


def _planted(V=40, d=3, seed=0):
    """Random rows plus token V: the mean of rows 0..2 (strictly inside their hull, lower bias): bounded."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, d))
    b = rng.normal(0, 0.1, V)
    W = np.vstack([W, W[:3].mean(axis=0)])
    b = np.r_[b, b[:3].mean() - 0.5]
    return W, b


def test_grivas_peer_on_a_planted_head():
    W, b = _planted()
    t = W.shape[0] - 1
    assert grivas.rank_check(W) == W.shape[1]
    settled, _ = grivas.braid_reflect(W, b, t, rho=100.0)
    assert not settled
    assert grivas.chebyshev_lp(W, b, t, 100.0, time_limit=10.0) == "bounded"
    top = int(np.argmax(np.linalg.norm(W, axis=1)))  # the longest row wins far along its own direction
    rec = grivas.class_is_bounded(W, b, W, b, top, 100.0, 10.0)
    assert rec["status"].startswith("argmaxable")
    assert grivas.chebyshev_lp(W, b, top, 100.0, time_limit=10.0) == "argmaxable"


def test_scan_summary_counts_every_token_once():
    rep = {"counts": {"tokens": 10, "undecided": 1}, "timings_s": {"screen": 1.0, "total": 2.0},
           "tokens": [{"id": 1, "verdict": "speakable", "reason": "witness (screen)", "time_s": 0.0},
                      {"id": 2, "verdict": "unspeakable", "reason": "tie", "time_s": 0.0},
                      {"id": 3, "verdict": "speakable", "reason": "witness (search)", "time_s": 0.01},
                      {"id": 4, "verdict": "unspeakable", "reason": "certificate (lp)", "time_s": 0.2},
                      {"id": 5, "verdict": "undecided", "reason": "time limit", "time_s": 0.4}]}
    s = compare.scan_summary(rep)
    assert s["settled"] == {"screens": 6, "ties": 1, "search": 1, "LP": 1, "undecided": 1}
    assert sum(s["settled"].values()) == 10
    assert s["lp_tokens"] == [4, 5] and s["search_tokens"] == [3]
    assert s["lp_time_s"]["n"] == 2 and s["past_screens_time_s"]["n"] == 3


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_quick_run_has_every_provider_and_finite_ratios(tmp_path, capsys):
    results = os.path.join(BENCH, "RESULTS.md")
    before = _digest(results)
    side = tmp_path / "R.md"
    rc = compare.main(["--V", "200", "--d", "16", "--quick", "--no-append", "--results", str(side),
                       "--seed-V", "200", "--grivas-sample", "4", "--grivas-lp-tokens", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert _digest(results) == before and not side.exists()
    rows = {ln.split("|")[1].strip(" *"): ln for ln in out.splitlines() if ln.startswith("| ") and "---" not in ln}
    for p in ("yardstick", "screens (ours)", "whole scan (ours)", "faiss", "yardstick@seed-V", "seed gram",
              "seed linprog", "Grivas-style"):
        assert p in rows, (p, out)
    for p in ("screens (ours)", "whole scan (ours)", "faiss", "seed gram", "Grivas-style"):
        ratio = re.search(r"\| ([0-9.]+)× ", rows[p])
        assert ratio and math.isfinite(float(ratio.group(1))) and float(ratio.group(1)) > 0, rows[p]
    for stage in ("load", "screen", "search", "decide", "verify", "engine total",
                  "enrichment: raw tokens, other gram count, model check", "console table and report files"):
        assert f"| {stage} |" in out
    rest = re.search(r"\| start-up \(imports\) and exit: whole − everything timed \| (-?[0-9.]+) \|", out)
    assert rest and float(rest.group(1)) >= 0  # the command's timers never claim more than its wall time
    assert "Extrapolation: T(V)" in out


def test_unknown_provider_is_refused():
    with pytest.raises(SystemExit):
        compare.parse_args(["--providers", "yardstick,nope"])


def test_sources_of_shapes_and_sizes():
    # an RMSNorm model's shape is scanned as an RMSNorm head (gain, no biases), not a LayerNorm one forced
    assert compare.source_of(compare.parse_args(["--shape", "gemma3-270m"]))[0] == \
        "synthetic:V=262144,d=640,seed=0,norm=rmsnorm"
    assert compare.source_of(compare.parse_args(["--shape", "smollm2-135m"])) == ("synthetic:V=49152,d=576,seed=0,norm=rmsnorm",
                                                                                  "smollm2-135m")
    assert compare.source_of(compare.parse_args(["--quick"]))[0] == "synthetic:V=4096,d=256,seed=0"
    assert compare.source_of(compare.parse_args([]))[0] == "synthetic:V=50257,d=768,seed=0"
    assert compare.source_of(compare.parse_args(["--source", "/x/My Model.gguf"])) == ("/x/My Model.gguf", "My_Model.gguf")
