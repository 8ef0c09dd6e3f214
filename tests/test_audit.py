"""The audit re-derives every claim of a saved report from the weights alone: engine reports audit clean on all
four domains (ties and a box/no-bias head included), and every kind of claim tampered by one number fails and
names its token. Oracles are brute-force numpy logits and exact fractions, not the engine."""
import copy
import json
from fractions import Fraction

import numpy as np
import pytest

import unspeakable
from unspeakable.engine.auditor import (AuditResult, _witness_precise, audit, cert_arrays, check_dual, check_gordan, check_tie,
                          check_witnesses, exact_colsum, fold64)
from unspeakable.engine.cli import main
from unspeakable.engine.head import InputError, head_from_arrays

V, D = 300, 10
SOURCE = f"synthetic:V={V},d={D},seed=0"
CASES = [("layernorm", True), ("rmsnorm", True), ("box", True), ("cone", True), ("box", False)]


@pytest.fixture(scope="module")
def head():
    return unspeakable.load(SOURCE)


class Reports(dict):
    """One engine scan per (domain, bias), made on first use, as the JSON a report file holds."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def __missing__(self, key):
        # Subsets (with the planted duplicates) keep the LP-heavy scans short; layernorm and cone scan all V
        ids = None
        if key in (("box", True), ("box", False), ("rmsnorm", True)):
            ids = np.r_[0:120, self.head.planted["duplicate"][0]]
        if key == ("layernorm", False):  # margin exactly 0 in the projected space: a few hull-interior tokens
            ids = [t["id"] for t in entries(self["cone", True], "cone")][:8]
        rep = unspeakable.scan_head(self.head, domain=key[0], bias=key[1], tokens=ids, device="cpu", backend="torch")
        self[key] = json.loads(json.dumps(rep.to_json()))
        return self[key]


@pytest.fixture(scope="module")
def reports(head):
    return Reports(head)


def fresh(reports, domain="layernorm", bias=True):
    return copy.deepcopy(reports[domain, bias])


def entries(rep, kind=None, verdict=None):
    return [t for t in rep["tokens"] if (kind is None or (t["certificate"] or {}).get("kind") == kind)
            and (verdict is None or t["verdict"] == verdict)]


def failed_tokens(res: AuditResult) -> set:
    return {int(line.split(":")[0].split()[1]) for line in res.failures if line.startswith("token ")}


def brute_logits(head, domain, x, bias=True):
    """Logits at x straight from the stored weights (the layernorm point is x − mean(x))."""
    W = np.asarray(head.W_U, dtype=np.float64)
    z = x - x.mean() if domain == "layernorm" else x
    rows = W.T * head.ln_w if head.ln_w is not None else W.T
    b = np.zeros(W.shape[1])
    if bias and domain != "cone":
        b = (head.b_U if head.b_U is not None else 0) + (W.T @ head.ln_b if head.ln_b is not None else 0)
    return rows @ z + b


def own_point(head, rep, t):
    """Token t's witness point, the screen point recomputed here from the stored weights for "self-direction"."""
    x = next(e for e in rep["tokens"] if e["id"] == t)["certificate"]["x"]
    if isinstance(x, list):
        return np.array(x)
    rows = np.asarray(head.W_U, dtype=np.float64).T * head.ln_w
    k = rows - rows.mean(axis=0)
    k = (k - k.mean(axis=1, keepdims=True))[t] if rep["domain"] == "layernorm" else k[t]
    if rep["domain"] == "box":
        return rep["radius"] * np.sign(k)
    return k / (k @ k) if rep["domain"] == "cone" else rep["radius"] * (1 - 1e-12) * k / np.linalg.norm(k)


def overstated_margins(head, rep, res) -> set:
    """The audit's failures on an engine report. Every proof must hold; the only failures allowed are stated
    margin_lower values above the brute-force margin at the token's own witness point, each confirmed here.
    (engine/verify.py prunes competitors per batch and reports the minimum over the survivors, so a pruned
    runner-up can make it overstate margin_lower; the verdict stays right.)"""
    bad = set()
    for line in res.failures:
        assert "stated margin_lower" in line, line
        t = int(line.split(":")[0].split()[1])
        logits = brute_logits(head, rep["domain"], own_point(head, rep, t), rep["bias"])
        true = logits[t] - np.max(np.delete(logits, t))
        if rep["domain"] == "cone":
            rows = np.asarray(head.W_U, dtype=np.float64).T * head.ln_w
            true /= (rows[t] - rows.mean(axis=0)) @ own_point(head, rep, t)
        stated = next(e for e in rep["tokens"] if e["id"] == t)["margin_lower"]
        assert stated > true + 1e-9 * abs(true), line
        bad.add(t)
    return bad


def without(rep, ids):
    """The report with the margin_lower of these tokens withdrawn."""
    rep = copy.deepcopy(rep)
    for e in rep["tokens"]:
        if e["id"] in ids:
            e["margin_lower"] = None
    return rep


# ------------------------------------------------------------------------------------------ clean reports
@pytest.mark.parametrize("domain,bias", CASES)
def test_engine_reports_audit_clean(head, reports, domain, bias):
    rep = reports[domain, bias]
    res = audit(rep, head)
    bad = overstated_margins(head, rep, res)
    c = rep["counts"]
    listed = sum(t["verdict"] == "speakable" for t in rep["tokens"])
    # every speakable token had its witness re-checked (a subset scan does not name its unlisted ones)
    assert res.witnesses == (c["speakable"] if c["tokens"] == V else listed)
    assert res.certificates + res.ties == c["unspeakable"]
    assert res.ties == 2 and head.planted["duplicate"]  # the planted duplicate pair
    res = audit(without(rep, bad), head)
    assert res.summary() == (f"{res.witnesses + res.certificates + 2} proofs checked: {res.witnesses} witnesses, "
                             f"{res.certificates} certificates, 2 ties, all hold")


def test_cli_audits_a_saved_report(tmp_path, head, reports, capsys):
    good = reports["rmsnorm", True]
    good = without(good, overstated_margins(head, good, audit(good, head)))
    path = tmp_path / "report.json"
    path.write_text(json.dumps(good))
    assert main(["audit", str(path), SOURCE]) == 0
    assert capsys.readouterr().out.strip().endswith("all hold")
    rep = copy.deepcopy(good)
    t = entries(rep, "dual")[0]
    t["certificate"]["deficit"] = 1e6  # claims far more than the multipliers give
    path.write_text(json.dumps(rep))
    assert main(["audit", str(path), SOURCE]) == 1
    out = capsys.readouterr().out
    assert f"token {t['id']}: unspeakable: stated deficit" in out and "1 fail" in out


def test_sample_audits_only_n_claims(head, reports, tmp_path, capsys):
    rep = reports["box", True]
    a, b = audit(rep, head, sample=40, seed=3), audit(rep, head, sample=40, seed=3)
    assert a.ok and a.witnesses + a.certificates + a.ties == 40
    assert (a.witnesses, a.certificates, a.ties) == (b.witnesses, b.certificates, b.ties)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    assert main(["audit", str(path), SOURCE, "--sample", "7", "--seed", "1"]) == 0
    assert "7 proofs checked" in capsys.readouterr().out


def test_audit_never_writes_to_the_weights(reports):
    h = unspeakable.load(SOURCE)
    for a in (h.W_U, h.b_U, h.ln_w, h.ln_b):
        if a is not None:
            a.setflags(write=False)  # any write would raise
    before = h.W_U.copy()
    assert audit(reports["layernorm", True], h).ok
    assert np.array_equal(before, h.W_U)


# ------------------------------------------------------------------------------------------ witnesses
def test_tampered_witness_coordinate_fails(head, reports):
    rep = fresh(reports, "box")
    for t in entries(rep, "witness", "speakable"):
        x = t["certificate"]["x"]
        if not isinstance(x, list):
            continue
        for i in range(len(x)):
            y = np.array(x)
            y[i] = -y[i] if y[i] else 1.0
            logits = brute_logits(head, "box", y)
            if np.argmax(logits) != t["id"]:  # the oracle: t no longer wins at the tampered point
                t["certificate"]["x"] = y.tolist()
                res = audit(rep, head)
                assert failed_tokens(res) == {t["id"]}
                assert "not > 0" in res.failures[0]
                return
    pytest.fail("no witness could be broken by one coordinate")


def test_witness_outside_the_domain_or_on_a_tie_fails(head, reports):
    rep = fresh(reports, "box")
    t = next(t for t in entries(rep, "witness") if isinstance(t["certificate"]["x"], list))
    t["certificate"]["x"][0] = float(np.nextafter(1.0, 2.0))  # one ulp outside the box
    res = audit(rep, head)
    assert failed_tokens(res) == {t["id"]} and "outside the domain" in res.failures[0]
    # a tie is not a win: the planted duplicate a has b's row and bias, so no x makes it the strict argmax
    a, b = head.planted["duplicate"][0]
    rep = fresh(reports, "layernorm")
    tie = next(t for t in rep["tokens"] if t["id"] == a)
    x = np.asarray(head.W_U, dtype=np.float64)[:, a] * head.ln_w
    tie.update(verdict="speakable", certificate={"kind": "witness", "x": ((x - x.mean()) / np.linalg.norm(x)).tolist()})
    rep["counts"]["speakable"] += 1
    rep["counts"]["unspeakable"] -= 1
    res = audit(rep, head)
    assert failed_tokens(res) == {a}


@pytest.mark.parametrize("domain", ["layernorm", "rmsnorm", "box", "cone"])
def test_witness_bounds_bracket_the_exact_margin(domain):
    """Oracle: margins in Fractions of the head as given (its weights, gain and biases, not their rounded fold:
    issue 18). lo <= exact margin <= hi, on both bounds (the cheap Cauchy–Schwarz pass and the precise |A||x|
    pass), and ok only where the exact margin is > 0."""
    rng = np.random.default_rng(7)
    V, d = 40, 5
    W = rng.standard_normal((d, V)) * 3 + 1.0
    bU, g, beta = rng.standard_normal(V), rng.random(d) + 0.5, rng.standard_normal(d)
    h = head_from_arrays(W, bU, g, beta, "layernorm", source="tiny")
    F = fold64(h, domain, None if domain == "cone" else 2.0, True)
    rows_q = [[Fraction(W[i, j]) * Fraction(g[i]) for i in range(d)] for j in range(V)]
    bias_q = [Fraction(0) if domain == "cone" else
              Fraction(bU[j]) + sum(Fraction(W[i, j]) * Fraction(beta[i]) for i in range(d)) for j in range(V)]
    ts = np.arange(V)
    X = rng.standard_normal((V, d))
    X *= (1.5 / np.linalg.norm(X, axis=1))[:, None] if domain != "box" else 1.0
    X = np.clip(X, -2.0, 2.0)
    Xq = [[Fraction(v) for v in x] for x in X]
    for ok, lo, hi, _ in (check_witnesses(F, ts, X), _witness_precise(F, ts, X)):
        for t in range(V):
            z = Xq[t]
            if domain == "layernorm":
                m = sum(z) / d
                z = [v - m for v in z]
            logit = [sum(rows_q[j][i] * z[i] for i in range(d)) + bias_q[j] for j in range(V)]
            exact = logit[t] - max(logit[j] for j in range(V) if j != t)
            if domain == "cone":
                c = [sum(rows_q[j][i] for j in range(V)) / V for i in range(d)]
                scale = sum((rows_q[t][i] - c[i]) * z[i] for i in range(d))
                exact = exact / scale if scale > 0 else None
            if exact is not None and domain != "cone":
                assert lo[t] <= exact <= hi[t]
            elif exact is not None:  # the audit normalises by its float (ũ_t − c)·x: a relative hair either way
                assert lo[t] <= exact * (1 + 1e-12) + 1e-300 and exact * (1 - 1e-12) <= hi[t] + 1e-300 \
                    if exact > 0 else lo[t] <= exact * (1 - 1e-12) and exact * (1 + 1e-12) <= hi[t]
            assert ok[t] == (exact is not None and exact > 0)


def test_witness_margin_lower_must_follow_from_x(head, reports):
    rep = reports["rmsnorm", True]
    rep = without(rep, overstated_margins(head, rep, audit(rep, head)))
    t = next(t for t in entries(rep, "witness") if isinstance(t["certificate"]["x"], list) and t["margin_lower"])
    logits = brute_logits(head, "rmsnorm", np.array(t["certificate"]["x"]))
    true = logits[t["id"]] - np.max(np.delete(logits, t["id"]))
    assert t["margin_lower"] == pytest.approx(true, rel=1e-9, abs=1e-12)
    assert audit(rep, head).ok
    t["margin_lower"] = true * (1 + 1e-3)
    assert failed_tokens(audit(rep, head)) == {t["id"]}


def test_companion_file_witnesses(head, reports, tmp_path):
    rep = fresh(reports, "layernorm")
    listed = [t for t in entries(rep, "witness") if isinstance(t["certificate"]["x"], list)]
    ids = np.array([t["id"] for t in listed], dtype=np.int64)
    X = np.array([t["certificate"]["x"] for t in listed], dtype=np.float64)
    for i, t in enumerate(listed):
        t["certificate"]["x"] = {"companion": i}
    rep["companion"] = "witnesses.npz"
    path = tmp_path / "report.json"
    path.write_text(json.dumps(rep))
    np.savez(tmp_path / "witnesses.npz", witness_ids=ids, witness_x=X)
    assert audit(str(path), head).ok
    k = 5
    X2 = X.copy()
    X2[k] = -X2[k]  # one row's point moved to where its token does not win (checked by the oracle)
    assert np.argmax(brute_logits(head, "layernorm", X2[k])) != ids[k]
    np.savez(tmp_path / "witnesses.npz", witness_ids=ids, witness_x=X2)
    assert failed_tokens(audit(str(path), head)) == {int(ids[k])}
    ids2 = ids.copy()
    ids2[[0, 1]] = ids2[[1, 0]]  # rows swapped between two tokens
    np.savez(tmp_path / "witnesses.npz", witness_ids=ids2, witness_x=X)
    assert failed_tokens(audit(str(path), head)) == {int(ids[0]), int(ids[1])}
    (tmp_path / "witnesses.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="companion"):
        audit(str(path), head)
    (tmp_path / "witnesses.npz").unlink()
    with pytest.raises(InputError, match="companion"):
        audit(str(path), head)


# ------------------------------------------------------------------------------------------ certificates
def exact_deficit_box(head, t, comp, lam, rho=1.0):
    """Oracle: the box deficit of a dual certificate in Fractions, from the stored weights."""
    W = np.asarray(head.W_U, dtype=np.float64).T * head.ln_w
    b = head.b_U + np.asarray(head.W_U, dtype=np.float64).T @ head.ln_b
    r = [sum(Fraction(l) * (Fraction(W[j, i]) - Fraction(W[t, i])) for j, l in zip(comp, lam))
         for i in range(W.shape[1])]
    c0 = sum(Fraction(l) * (Fraction(b[j]) - Fraction(b[t])) for j, l in zip(comp, lam))
    return c0 - Fraction(rho) * sum(abs(v) for v in r)


def test_tampered_dual_multiplier_fails(head, reports):
    rep = fresh(reports, "box")
    for t in entries(rep, "dual"):
        c = t["certificate"]
        assert exact_deficit_box(head, t["id"], c["competitors"], c["weights"]) > 0  # the engine's claim is true
        k = int(np.argmin(c["weights"]))
        lam = list(c["weights"])
        lam[k] = 1e3  # one multiplier: now one competitor carries the certificate
        if exact_deficit_box(head, t["id"], c["competitors"], lam) < 0:
            c["weights"] = lam
            res = audit(rep, head)
            assert failed_tokens(res) == {t["id"]} and "deficit" in res.failures[0]
            return
    pytest.fail("no dual certificate broken by one multiplier")


def test_dual_margin_upper_must_follow(head, reports):
    rep = fresh(reports, "layernorm")
    t = entries(rep, "dual")[3]
    t["margin_upper"] = t["margin_upper"] * 1.01 if t["margin_upper"] < 0 else -1.0
    assert failed_tokens(audit(rep, head)) == {t["id"]}


def test_exact_fallback_settles_a_deficit_float_cannot():
    """Two tokens in d = 1, box rho = 1: t = 0 loses everywhere iff b_1 − b_0 > |u_1 − u_0|. Around the float
    nearest that gap the deficit is a few ulps either way, far inside float64's allowance: exact rationals
    must decide, and both answers occur."""
    u = np.array([[0.1, 0.7]])
    gap = float(Fraction(0.7) - Fraction(0.1))
    seen = set()
    for b1 in (np.nextafter(gap, 0.0), gap, np.nextafter(gap, 1.0)):
        h = head_from_arrays(u, np.array([0.0, float(b1)]), source="tiny")
        exact = Fraction(float(b1)) - (Fraction(0.7) - Fraction(0.1))
        ok, _, _ = check_dual(fold64(h, "box", 1.0, True), 0, np.array([1]), np.array([1.0]))
        assert ok == (exact > 0)
        seen.add(ok)
    assert seen == {True, False}


def test_cone_certificates_and_a_false_cone_claim(head, reports):
    rep = fresh(reports, "cone")
    cone = entries(rep, "cone")
    assert cone and audit(rep, head).ok
    # the planted interior token's certificate, claimed for a token the engine proved speakable
    sp = next(t for t in entries(rep, "witness") if isinstance(t["certificate"]["x"], list))
    donor = cone[0]["certificate"]
    comps = [j if j != sp["id"] else cone[0]["id"] for j in donor["competitors"]]
    sp.update(verdict="unspeakable", certificate=dict(donor, competitors=comps), margin_lower=None)
    rep["counts"]["speakable"] -= 1
    rep["counts"]["unspeakable"] += 1
    assert failed_tokens(audit(rep, head)) == {sp["id"]}


def test_gordan_weights_cancel_exactly(head, reports):
    """Oracle in Fractions: the audit's final weights are >= 0, not all 0, and Σ_j w_j (ũ_j − ũ_t) is exactly 0."""
    F = fold64(head, "cone", None, False)
    for entry in entries(reports["cone", True], "cone")[:2]:
        t = entry["id"]
        w = {}
        ok, _, _ = check_gordan(F, t, *cert_arrays(entry["certificate"], t, V, with_mu=True), weights_out=w)
        assert ok
        weight = {j: Fraction(int(v.p), int(v.q)) for j, v in w.items() if j != "kappa"}
        k = Fraction(abs(entry["certificate"]["mu"])) / V  # the weight of every token the solve left alone
        assert Fraction(int(w["kappa"].p), int(w["kappa"].q)) == k
        full = [weight.get(j, k) for j in range(V) if j != t]
        assert min(full) >= 0 and sum(full) > 0
        others = [j for j in range(V) if j != t]
        for i in range(D):
            ut = Fraction(F.rows[t, i])
            assert sum(wj * (Fraction(F.rows[j, i]) - ut) for wj, j in zip(full, others)) == 0


def test_exact_colsum_matches_fractions():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 3)) * np.exp2(rng.integers(-60, 60, (50, 3)))
    a[0, 0], a[1, 1] = 0.0, -0.0
    assert [Fraction(int(v.p), int(v.q)) for v in exact_colsum(a)] == [sum(map(Fraction, a[:, i])) for i in range(3)]


def test_cone_claim_on_tampered_weights_fails(head, reports, tmp_path):
    """One entry of W_U moves an interior token out to a vertex: its cone claim is now false, and the oracle
    (brute-force logits at x = e_i) shows it winning. The certificate's multipliers only guide the exact solve,
    so the audit fails it because no exact Gordan certificate exists, not because a number changed."""
    rep = reports["cone", True]
    t = entries(rep, "cone")[0]["id"]
    W = np.array(head.W_U, dtype=np.float64)
    i = int(np.argmax(np.abs(head.ln_w)))
    W[i, t] = 1e3 * np.sign(head.ln_w[i])
    np.savez(tmp_path / "w.npz", W_U=W, b_U=head.b_U, ln_w=head.ln_w, ln_b=head.ln_b)
    x = np.zeros(W.shape[0])
    x[i] = 1.0
    assert np.argmax(brute_logits(unspeakable.load(str(tmp_path / "w.npz")), "cone", x)) == t
    res = audit(rep, str(tmp_path / "w.npz"))
    assert t in failed_tokens(res)
    assert any(f.startswith(f"token {t}: unspeakable:") for f in res.failures)
    bad = fresh(reports, "cone")
    c = entries(bad, "cone")[0]
    c["certificate"]["mu"] = 0.5  # the normalisation multiplier of a hull point is <= 0
    assert failed_tokens(audit(bad, head)) == {c["id"]}


def zero_report(reports, domain="box"):
    """The engine's own no-bias scan and its "margin exactly 0" claims (Gordan certificates on the rows)."""
    rep = fresh(reports, domain, False)
    und = entries(rep, "zero")
    assert und and all(t["verdict"] == "unspeakable" and t["margin_upper"] == 0.0 for t in und)
    return rep, und


def test_zero_margin_in_layernorm_uses_the_projected_rows(head, reports):
    """x ⊥ 1: the exact solve may leave any multiple of 1 in Σ w_j (ũ_j − ũ_t); a full-rank basis would be
    singular after projection, so this is the path with the extra column of ones."""
    rep, und = zero_report(reports, "layernorm")
    res = audit(rep, head)
    assert res.ok, res.failures[:3]
    assert res.certificates == len(und)


def test_zero_margin_certificates(head, reports):
    rep, und = zero_report(reports)
    res = audit(rep, head)
    assert res.ok, res.failures[:3]
    assert res.certificates == len(und)
    # on a head with a bias the same claim is false: x = 0 no longer ties every token (witnesses found
    # without the bias fail too)
    rep["bias"] = True
    res = audit(rep, head)
    zero = [f for f in res.failures if "constant bias" in f]
    assert {int(f.split(":")[0].split()[1]) for f in zero} == {t["id"] for t in und}
    rep, und = zero_report(reports)
    und[0]["margin_upper"] = -1e-3  # margin exactly 0 is not below 0
    assert failed_tokens(audit(rep, head)) == {und[0]["id"]}


# ------------------------------------------------------------------------------------------ ties and weights
def test_swapped_tie_partner_fails(head, reports):
    rep = fresh(reports, "layernorm")
    t = entries(rep, "tie")[0]
    t["certificate"]["tie_with"] = (t["certificate"]["tie_with"] + 1) % V
    res = audit(rep, head)
    assert failed_tokens(res) == {t["id"]} and "differ" in res.failures[0]


def test_tampered_bias_entry_in_the_weights_fails(head, reports, tmp_path):
    rep = reports["layernorm", True]
    arrays = {"W_U": head.W_U, "b_U": head.b_U.copy(), "ln_w": head.ln_w, "ln_b": head.ln_b}
    np.savez(tmp_path / "w.npz", **arrays)
    assert audit(rep, str(tmp_path / "w.npz")).ok
    a, b = head.planted["duplicate"][0]
    arrays["b_U"][b] = np.nextafter(arrays["b_U"][b], np.inf)  # one bias entry, one ulp: no longer a tie
    np.savez(tmp_path / "w.npz", **arrays)
    res = audit(rep, str(tmp_path / "w.npz"))
    assert {a, b} <= failed_tokens(res)
    assert any("biases of" in f for f in res.failures)


def test_tie_compares_by_value():
    W = np.array([[1.0, 1.0, 2.0], [0.0, -0.0, 1.0]])  # columns 0 and 1 differ only in the sign of a zero
    h = head_from_arrays(W, np.array([0.0, -0.0, 1.0]), source="signed zeros")
    F = fold64(h, "box", 1.0, True)
    assert check_tie(F, h, 0, {"tie_with": 1}) == 0.0
    with pytest.raises(Exception, match="differ"):
        check_tie(F, h, 0, {"tie_with": 2})


def test_overflow_is_never_a_pass(reports):
    rep = reports["rmsnorm", True]
    h = unspeakable.load(SOURCE)
    h.W_U = h.W_U.astype(np.float64) * 1e307  # logits overflow to inf: nothing can be proven
    res = audit(rep, h)
    c = rep["counts"]
    assert not res.ok and len(res.failures) >= c["speakable"]


# ------------------------------------------------------------------------------------------ counts, bad input
@pytest.mark.parametrize("key,delta", [("speakable", 1), ("unspeakable", -1), ("undecided", 1), ("hard_to_speak", 1)])
def test_tampered_count_fails(head, reports, key, delta):
    rep = fresh(reports, "rmsnorm")
    rep["counts"][key] += delta
    res = audit(rep, head)
    assert not res.ok and any(f.startswith("counts:") for f in res.failures)


def test_unlisted_speakable_tokens_are_checked_at_their_screen_point(head, reports):
    rep = fresh(reports, "layernorm")
    listed = {t["id"] for t in rep["tokens"]}
    unlisted = sorted(set(range(V)) - listed)
    assert unlisted
    # drop a listed unspeakable token: the audit now reads it as screen-settled speakable and must refute it
    t = entries(rep, "dual")[0]
    rep["tokens"].remove(t)
    rep["counts"]["unspeakable"] -= 1
    rep["counts"]["speakable"] += 1
    rep["counts"]["hard_to_speak"] -= int(t["hard_to_speak"])
    res = audit(rep, head)
    assert failed_tokens(res) == {t["id"]} and "speakable (screen)" in res.failures[0]


def test_bad_input_exits_2(tmp_path, reports, capsys):
    good = fresh(reports, "layernorm")
    cases = {
        "schema": dict(good, schema="unspeakable.report/0"),
        "V": dict(good, V=V + 1),
        "domain": dict(good, domain="sphere"),
        "radius": dict(good, radius=None),
        "id": dict(good, tokens=good["tokens"] + [dict(good["tokens"][0], id=V)]),
    }
    for name, rep in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rep))
        assert main(["audit", str(path), SOURCE]) == 2, name
        assert "unspeakable: error:" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["audit", str(tmp_path / "junk.json"), SOURCE]) == 2
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert main(["audit", str(tmp_path / "ok.json"), f"synthetic:V={V},d={D + 1},seed=0"]) == 2
    assert f"d = {D + 1}" in capsys.readouterr().err


# 6 of all-MiniLM-L6-v2's 28 hard-to-speak tokens (gram screen, TransformerLens-style rows)
MINILM_HARD = [103, 1168, 8229, 14305, 15612, 16285]


def test_minilm_subset_report_audits_clean():
    """The real all-MiniLM-L6-v2 head (V = 30522, d = 384): a scan of hard-to-speak tokens audits clean, every
    witness re-checked over all V logits; one witness coordinate tampered fails."""
    from unspeakable.engine.loader import minilm_head

    h = minilm_head()
    rep = unspeakable.scan_head(h, tokens=MINILM_HARD, device="cpu", backend="torch")
    js = json.loads(json.dumps(rep.to_json()))
    assert [t["id"] for t in js["tokens"]] == MINILM_HARD and all(t["hard_to_speak"] for t in js["tokens"])
    res = audit(js, h)
    assert res.ok, res.failures[:3]
    assert res.witnesses + res.certificates + res.ties == len(MINILM_HARD)
    w = next(t for t in js["tokens"] if (t["certificate"] or {}).get("kind") == "witness")
    if w["certificate"]["x"] == "self-direction":
        return
    w["certificate"]["x"] = [-v for v in w["certificate"]["x"]]
    assert failed_tokens(audit(js, h)) == {w["id"]}
