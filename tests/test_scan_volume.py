"""scan --volume: each listed token's share of the norm's output set, added to the scan's report and page.

Truth on the circle (d = 2, RMSNorm: the circle of radius sqrt(2)) comes from exact arc lengths: every pair of
tokens swaps order at most twice on the circle, at angles in closed form; between consecutive swap angles one
token wins throughout, found by float64 logits at the arc's midpoint. Nothing of engine.volume is used for it.
"""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from unspeakable.engine.auditor import audit
from unspeakable.engine.cli import main
from unspeakable.engine.head import InputError, head_from_arrays
from unspeakable.engine.ledger import Ledger
from unspeakable.engine.pipeline import scan, scan_head
from unspeakable.engine.volume import SplitOptions, VolumeOptions

from interrupt import crash_after

R2 = math.sqrt(2.0)
FAST = SplitOptions(particles=48, replicates=8, moves=20)


def circle_head():
    """12 tokens on the circle (rows W [V, 2], bias b): 9 at random angles (some lose everywhere, one wins only
    inside the disc: speakable with share 0), a duplicate pair (tokens 9 and 10: identical long rows and bias,
    a tie that owns an arc), and token 11 deep inside the hull with a low bias (unspeakable)."""
    rng = np.random.default_rng(7)
    phi = np.sort(rng.uniform(0, 2 * np.pi, 9))
    norms = rng.uniform(0.6, 1.4, 9)
    rows = norms[:, None] * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    bias = rng.normal(0, 0.15, 9)
    mid = (phi[2] + phi[3]) / 2
    pair = 1.5 * np.array([math.cos(mid), math.sin(mid)])
    rows = np.vstack([rows, pair, pair, [[0.05, -0.02]]])
    bias = np.concatenate([bias, [0.1, 0.1, -3.0]])
    return rows, bias


def arc_shares(rows: np.ndarray, bias: np.ndarray, R: float) -> np.ndarray:
    """Exact share of the circle of radius R on which each token is the argmax (identical rows: the group's arc,
    split equally), from the pairwise swap angles."""
    V = len(rows)
    cuts = [0.0, 2 * np.pi]
    for i in range(V):
        for j in range(i + 1, V):
            a, beta = rows[i] - rows[j], bias[i] - bias[j]
            na = float(np.hypot(*a))
            if na == 0 or abs(beta) > R * na:
                continue
            psi, delta = math.atan2(a[1], a[0]), math.acos(-beta / (R * na))
            cuts += [(psi + delta) % (2 * np.pi), (psi - delta) % (2 * np.pi)]
    cuts = np.unique(cuts)
    mid = (cuts[:-1] + cuts[1:]) / 2
    X = R * np.stack([np.cos(mid), np.sin(mid)], axis=1)
    win = np.argmax(X @ rows.T + bias, axis=1)
    share = np.bincount(win, weights=np.diff(cuts), minlength=V) / (2 * np.pi)
    _, group = np.unique(np.hstack([rows, bias[:, None]]), axis=0, return_inverse=True)
    group = group.ravel()
    return np.array([share[group == group[t]].sum() / (group == group[t]).sum() for t in range(V)])


def contains(v: dict, truth: float) -> bool:
    lo, hi = v["log10_share_ci"]
    if truth == 0:  # only an interval open below holds it
        return lo is None
    return (-math.inf if lo is None else lo) <= math.log10(truth) <= (math.inf if hi is None else hi)


@pytest.fixture(scope="module")
def circle():
    rows, bias = circle_head()
    truth = arc_shares(rows, bias, R2)
    opts = VolumeOptions(hardest=3, samples=40_000, seed=2, confidence=0.999, split=FAST)
    W, b = rows.T.copy(), bias.copy()
    rep = scan(W, b, norm="rmsnorm", device="cpu", backend="torch", volume=opts)
    assert np.array_equal(W, rows.T) and np.array_equal(b, bias)  # the caller's arrays are left alone
    return rows, bias, truth, rep


def test_oracle_is_exact_on_a_symmetric_head():
    """Four unit rows at right angles, no bias: a quarter each; a duplicate splits its quarter."""
    rows = np.array([[1.0, 0], [0, 1], [-1, 0], [0, -1], [0, -1]])
    got = arc_shares(rows, np.zeros(5), R2)
    assert np.allclose(got, [0.25, 0.25, 0.25, 0.125, 0.125], atol=1e-12)


def test_scan_volume_against_arc_lengths(circle):
    rows, bias, truth, rep = circle
    by_id = {t.id: t for t in rep.tokens}
    assert 11 in by_id and by_id[11].verdict == "unspeakable" and truth[11] == 0
    for t in rep.tokens:
        v = t.volume
        assert v is not None and set(v) >= {"log10_share", "log10_share_ci", "log10_share_lower_bound",
                                            "cap_angle_deg", "method", "samples", "seconds"}
        if t.verdict == "unspeakable" and t.certificate["kind"] != "tie":
            # share 0 by the scan's proof: no estimate, no interval, no bound
            assert v["method"] == "unspeakable" and v["log10_share"] is None
            assert v["log10_share_ci"] == [None, None] and v["log10_share_lower_bound"] is None
            assert v["samples"] == 0
            continue
        if v["method"] in ("sampling", "tie") and v["log10_share"] is None:
            assert truth[t.id] < 10 ** v["log10_share_ci"][1]
            continue
        assert contains(v, truth[t.id]), (t.id, truth[t.id], v)
        if v["log10_share_lower_bound"] is not None:
            assert v["log10_share_lower_bound"] <= math.log10(truth[t.id]) + 1e-9
    # the duplicate pair: unspeakable (tie), each half of the pair's arc
    assert by_id[9].verdict == by_id[10].verdict == "unspeakable"
    assert by_id[9].volume["method"] == "tie" and by_id[9].volume["tie_with"] == [10]
    assert truth[9] == truth[10] > 0 and contains(by_id[9].volume, truth[9])


def test_the_hardest_speakable_tokens_are_split_and_bounded(circle):
    _, _, truth, rep = circle
    speak = sorted((t for t in rep.tokens if t.verdict == "speakable"), key=lambda t: (t.margin_lower, t.id))
    split = [t.id for t in speak[:3]]
    assert rep.volume["split"] == sorted(split) or sorted(rep.volume["split"]) == sorted(split)
    assert any(truth[t.id] == 0 for t in speak[:3])  # speakable inside the disc, share 0 on its circle
    for t in speak[:3]:
        assert t.volume["method"] == "splitting" or (t.volume["hits"] or 0) >= 100
        if truth[t.id] == 0:  # no cap can be proven, and no replicate may claim a share
            assert t.volume["log10_share_lower_bound"] is None and t.volume["log10_share"] is None
        else:
            assert t.volume["log10_share_lower_bound"] is not None  # a proven cap (the sphere domains)
            assert 0 < t.volume["cap_angle_deg"] < 180
    for t in speak[3:]:
        assert t.volume["method"] == "sampling" and t.volume["log10_share_lower_bound"] is None


def test_plain_pass_over_all_V_sums_to_at_most_one(circle):
    rows, _, truth, rep = circle
    allv = np.asarray(rep.volume_report.log10_share_sampled_all)
    assert allv.shape == (len(rows),)
    assert float(np.sum(10.0 ** allv)) <= 1 + 1e-12
    assert not np.isfinite(allv[11])  # the unspeakable token never won a sample
    hist = rep.volume["histogram"]
    assert sum(hist["tokens"]) + hist["no_hit"] == len(rows)
    assert len(hist["log10_share_edges"]) == len(hist["tokens"]) + 1


def small_npz(tmp_path):
    rows, bias = circle_head()
    path = tmp_path / "circle.npz"
    np.savez(path, W_U=rows.T, b_U=bias, norm="rmsnorm")
    return str(path)


def test_cli_scan_volume_writes_json_csv_html(tmp_path, capsys):
    src = small_npz(tmp_path)
    out, tab, page = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.html"
    rc = main(["scan", src, "--volume", "--volume-hardest", "2", "--volume-samples", "20000", "--device", "cpu",
               "--backend", "torch", "--out", str(out), "--csv", str(tab), "--html", str(page)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "log10_share" in cap.out and "share 0" in cap.out and "volume" in cap.err
    data = json.loads(out.read_text())
    assert data["schema"] == "unspeakable.report/1" and data["volume"]["samples"] == 20000
    assert len(data["volume"]["split"]) == 2 and "volume" in data["timings_s"]
    truth = arc_shares(*circle_head(), R2)
    for t in data["tokens"]:
        assert "volume" in t
        if t["verdict"] == "unspeakable" and t["certificate"]["kind"] != "tie":
            assert t["volume"]["method"] == "unspeakable" and t["volume"]["log10_share"] is None
        elif t["volume"]["log10_share"] is not None:
            assert contains(t["volume"], truth[t["id"]]) or t["volume"]["method"] != "splitting"
    rows = list(csv.DictReader(tab.open()))
    assert rows and {"log10_share", "log10_share_ci_lo", "log10_share_ci_hi", "volume_method"} <= set(rows[0])
    assert {r["volume_method"] for r in rows} >= {"unspeakable"}
    html = page.read_text()
    assert 'alt="histogram of log10 share"' in html and '"log10_share"' in html
    # the audit re-checks the proofs and is not thrown by the volume fields
    res = audit(str(out), src)
    assert res.ok, res.failures
    assert any("volume" in n for n in res.notes)


def test_audit_flags_a_share_claimed_for_a_proven_unspeakable_token(tmp_path, capsys):
    src = small_npz(tmp_path)
    out = tmp_path / "r.json"
    assert main(["scan", src, "--volume", "--volume-hardest", "0", "--volume-samples", "5000", "--out", str(out),
                 "--device", "cpu", "--backend", "torch"]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    bad = next(t for t in data["tokens"] if t["verdict"] == "unspeakable" and t["certificate"]["kind"] != "tie")
    bad["volume"]["log10_share"] = -3.0
    res = audit(data, src)
    assert not res.ok and any("volume" in f for f in res.failures)


@pytest.mark.parametrize("args,msg", [
    (["--volume", "--volume-samples", "-3"], "--volume-samples: expected a positive integer, got -3"),
    (["--volume", "--volume-samples", "0"], "--volume-samples: expected a positive integer, got 0"),
    (["--volume", "--volume-tokens", "3,99"], "token ids 99 are out of range for V = 12"),
    (["--volume", "--volume-hardest", "x"], "--volume-hardest: expected a non-negative integer"),
    (["--volume-tokens", "3"], "--volume-tokens needs --volume"),
    (["--volume-samples", "10", "--volume-seed", "1"], "--volume-samples, --volume-seed need --volume"),
])
def test_bad_volume_options_exit_2_nothing_written(tmp_path, capsys, args, msg):
    src = small_npz(tmp_path)
    before = sorted(os.listdir(tmp_path))
    rc = main(["scan", src, "--out", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("value,msg", [
    ({"samples": 0}, "volume samples must be an integer >= 1"),
    ({"hardest": -1}, "volume hardest must be an integer >= 0"),
    ({"confidence": 1.0}, "volume confidence"),
    ({"tokens": [1, 40]}, "out of range"),
    ({"tokens": [1.5]}, "must be integers"),
    ({"bogus": 1}, "unknown options bogus"),
    ("yes", "expected True, a dict or VolumeOptions"),
])
def test_bad_volume_options_in_python_are_refused_before_any_work(value, msg, monkeypatch, tmp_path):
    rows, bias = circle_head()
    ckpt = tmp_path / "r.json.partial"

    def no_work(*a, **k):  # the screens must not start
        raise AssertionError("the scan started before its options were checked")

    monkeypatch.setattr("unspeakable.engine.pipeline._screens", no_work)
    with pytest.raises(InputError, match=msg):
        scan(rows.T, bias, norm="rmsnorm", device="cpu", backend="torch", volume=value, checkpoint=str(ckpt))
    assert not os.listdir(tmp_path)  # no checkpoint either


def test_volume_tokens_pick_what_is_split_and_unlisted_ones_are_named(circle):
    rows, bias, truth, rep = circle
    speak = [t.id for t in rep.tokens if t.verdict == "speakable"]
    unlisted = sorted(set(range(12)) - {t.id for t in rep.tokens})
    one = [t for t in speak if truth[t] > 0][-1]
    pick = [one, 11] + unlisted[:1]
    got = scan(rows.T, bias, norm="rmsnorm", device="cpu", backend="torch",
               volume={"tokens": pick, "samples": 5000, "split": FAST, "confidence": 0.999})
    assert got.volume["split"] == [one] and got.volume["selection"] == "--volume-tokens"
    by_id = {t.id: t for t in got.tokens}
    assert by_id[11].volume["method"] == "unspeakable"  # named, yet share 0 by proof: never estimated
    assert by_id[one].volume["log10_share_lower_bound"] is not None and contains(by_id[one].volume, truth[one])
    if unlisted:
        assert any(f"tokens {unlisted[0]}" in w for w in got.warnings)


SYN = "synthetic:V=300,d=8,seed=1"


def _entries(rep):
    return {t.id: (t.verdict, t.volume["method"], t.volume["log10_share"], tuple(t.volume["log10_share_ci"]),
                   t.volume["log10_share_lower_bound"]) for t in rep.tokens}


def test_resume_with_volume_gives_the_same_report(tmp_path, monkeypatch):
    from unspeakable.engine.loader import load

    head = load(SYN)
    opts = {"hardest": 1, "samples": 4000, "split": FAST}
    kw = dict(domain="box", device="cpu", backend="torch", volume=opts)
    clean = scan_head(head, **kw)
    # 1. killed while deciding: the resumed scan with --volume ends with the same verdicts and volume entries
    ckpt = str(tmp_path / "r.json.partial")
    real = crash_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        scan_head(head, checkpoint=ckpt, **kw)
    monkeypatch.setattr(Ledger, "record", real)
    assert os.path.exists(ckpt)
    resumed = scan_head(head, checkpoint=ckpt, resume=True, **kw)
    assert _entries(resumed) == _entries(clean)
    assert not os.path.exists(ckpt)
    # 2. killed in the volume pass itself: the verdicts are all in the checkpoint, which is kept
    import unspeakable.engine.pipeline as pl

    def die(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(pl, "for_scan", die)
        with pytest.raises(KeyboardInterrupt):
            scan_head(head, checkpoint=ckpt, **kw)
    assert os.path.exists(ckpt)
    again = scan_head(head, checkpoint=ckpt, resume=True, **kw)
    assert _entries(again) == _entries(clean)
    # without --volume nothing of it appears
    plain = scan_head(head, domain="box", device="cpu", backend="torch")
    assert plain.volume is None and all(t.volume is None for t in plain.tokens)
    assert "volume" not in plain.to_json() and "volume" not in plain.to_json()["timings_s"]
