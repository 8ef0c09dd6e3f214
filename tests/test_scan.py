"""Pipeline properties: --resume ends with the same report as an uninterrupted scan; verdicts do not
depend on the worker count.

The uninterrupted scan and the interrupted one are made once per module (fixtures): every test compares
against the same clean report and resumes from the same checkpoint text, written afresh into its own file.
"""
import json
import os
import time

import numpy as np
import pytest

import unspeakable.engine.pipeline as es
from unspeakable.engine.head import InputError
from unspeakable.engine.ledger import CHECKPOINT_SCHEMA, Ledger
from unspeakable.engine.loader import load
from interrupt import crash_after

SOURCE = "synthetic:V=800,d=12,seed=9"


def _interrupted_scan(head, ckpt, monkeypatch, after: int = 2) -> tuple[str, bytes]:
    """Run a scan that dies (KeyboardInterrupt) after its ``after``-th persisted ledger record; return the
    checkpoint it leaves: the JSON lines as text and the witness rows (``.x``) as bytes."""
    real = crash_after(monkeypatch, after)
    with pytest.raises(KeyboardInterrupt):
        es.scan_head(head, domain="box", device="cpu", backend="torch", checkpoint=ckpt)
    monkeypatch.setattr(Ledger, "record", real)
    with open(ckpt) as f, open(ckpt + ".x", "rb") as fx:
        return f.read(), fx.read()


@pytest.fixture(scope="module")
def head():
    return load(SOURCE)


@pytest.fixture(scope="module")
def clean(head):
    return es.scan_head(head, domain="box", device="cpu", backend="torch", workers=1)


@pytest.fixture(scope="module")
def interrupted(head, tmp_path_factory):
    """The checkpoint text an interrupted scan leaves behind (header and the tokens settled so far)."""
    with pytest.MonkeyPatch.context() as mp:
        return _interrupted_scan(head, str(tmp_path_factory.mktemp("interrupted") / "r.json.partial"), mp)


def _strip(rep):
    return [(t.id, t.verdict, t.reason, t.hard_to_speak, t.gram_argmax) for t in rep.tokens]


def test_resume_after_interruption_gives_the_same_report(head, clean, interrupted, tmp_path, monkeypatch):
    text, xrows = interrupted
    lines = [json.loads(ln) for ln in text.splitlines()]
    assert lines[0]["schema"] == CHECKPOINT_SCHEMA and 0 < len(lines) - 1 < len(clean.tokens)
    cited = [rec["certificate"]["x"]["row"] for rec in lines[1:]
             if isinstance((rec.get("certificate") or {}).get("x"), dict)]
    assert cited and len(xrows) == 8 * lines[0]["d"] * len(cited)  # 8·d bytes per witness, each row cited once
    ckpt = str(tmp_path / "r.json.partial")
    with open(ckpt, "w") as f:
        f.write(text)
        f.write('{"id": 12, "verdict": "speak')  # a torn last line, as a crash mid-write leaves it
    with open(ckpt + ".x", "wb") as f:
        f.write(xrows + b"\x00" * 5)  # and a torn row
    restored = []
    real = es._rederive
    monkeypatch.setattr(es, "_rederive", lambda sc, t, rec: restored.append(t) or real(sc, t, rec))
    resumed = es.scan_head(head, domain="box", device="cpu", backend="torch", checkpoint=ckpt, resume=True)
    assert np.array_equal(clean.verdicts_all, resumed.verdicts_all)
    assert _strip(clean) == _strip(resumed)
    assert clean.counts == resumed.counts
    assert len(restored) == len(lines) - 1  # every stored token, witnesses from the rows included, was re-checked
    assert not os.path.exists(ckpt) and not os.path.exists(ckpt + ".x")  # a finished scan removes its checkpoint
    # a checkpoint from other settings is refused, not silently reused
    p = tmp_path / "other.partial"
    p.write_text(json.dumps({"schema": CHECKPOINT_SCHEMA, "fingerprint": "x"}) + "\n")
    with pytest.raises(InputError):
        es.scan_head(head, domain="box", device="cpu", backend="torch", checkpoint=str(p), resume=True)


def test_resumed_tokens_are_reverified_not_trusted(head, clean, interrupted, tmp_path):
    text, xrows = interrupted
    lines = [json.loads(ln) for ln in text.splitlines()]
    # forge the stored proofs: every witness moved off its point, every unspeakable claim flipped
    forged = [lines[0]]
    rows = np.frombuffer(xrows, dtype="<f8").reshape(-1, lines[0]["d"]).copy()
    moved = 0
    for rec in lines[1:]:
        cert = rec.get("certificate") or {}
        if cert.get("kind") == "witness" and isinstance(cert.get("x"), dict):
            rows[cert["x"]["row"]] *= -1.0
            moved += 1
        rec["verdict"] = {"speakable": "unspeakable", "unspeakable": "speakable"}.get(rec["verdict"], rec["verdict"])
        forged.append(rec)
    assert moved, "no witness row reached the checkpoint"
    ckpt = str(tmp_path / "r.json.partial")
    with open(ckpt, "w") as f:
        f.write("\n".join(json.dumps(r) for r in forged) + "\n")
    rows.astype("<f8").tofile(ckpt + ".x")
    resumed = es.scan_head(head, domain="box", device="cpu", backend="torch", checkpoint=ckpt, resume=True)
    assert np.array_equal(clean.verdicts_all, resumed.verdicts_all)
    assert any("did not re-verify" in w for w in resumed.warnings)


def test_verdicts_do_not_depend_on_workers(head, clean):
    two = es.scan_head(head, domain="box", device="cpu", backend="torch", workers=2)
    assert np.array_equal(clean.verdicts_all, two.verdicts_all)
    assert clean.counts["undecided"] == 0


@pytest.mark.parametrize("norm,domain,gram_center,one_pass", [
    ("layernorm", "layernorm", False, True),  # the demo's case: uncentred rows counted, centred from the keys
    ("layernorm", "layernorm", True, True),
    ("rmsnorm", "rmsnorm", True, True),  # SmolLM2's case
    ("rmsnorm", "rmsnorm", False, True),
    ("layernorm", "rmsnorm", True, False),  # keys not derived from the centred rows: a separate pass
])
def test_both_gram_counts_equal_the_float64_oracle(norm, domain, gram_center, one_pass):
    """The report's hard-to-speak counts with centred and with uncentred rows (the other one reduced from
    the screens' own tiles where it can be) equal a float64 V x V count from the weights."""
    from unspeakable.engine.enrich import enrich
    from unspeakable.engine.head import head_from_arrays

    rng = np.random.default_rng(11)
    V, d = 300, 10
    W_U = rng.normal(size=(d, V)) * rng.uniform(0.3, 1.5, V) + 0.8 * rng.normal(size=(d, 1))
    ln_w = rng.uniform(0.5, 1.5, d)
    head = head_from_arrays(W_U, rng.normal(size=V), ln_w, None, norm, gram_center=gram_center)
    rep = es.scan_head(head, domain=domain, device="cpu", backend="torch")
    assert (rep.gram_other is not None) == one_pass
    enrich(rep, head)

    def oracle(centred):
        rows = (W_U * ln_w[:, None]).T.astype(np.float64)
        if centred:
            if norm == "layernorm":
                rows = rows - rows.mean(axis=1, keepdims=True)
            rows = rows - rows.mean(axis=0)
        G = rows @ rows.T
        selfv = np.diag(G).copy()
        np.fill_diagonal(G, -np.inf)
        return int((G.max(axis=1) >= selfv).sum())

    want = {"hard_to_speak_centred": oracle(True), "hard_to_speak_uncentred": oracle(False)}
    assert {k: rep.gram[k] for k in want} == want
    assert want["hard_to_speak_centred"] != want["hard_to_speak_uncentred"]  # the conventions really differ
    assert rep.counts["hard_to_speak"] == want["hard_to_speak_centred" if gram_center else "hard_to_speak_uncentred"]


STAGES = ("load", "screen", "search", "decide", "verify")


def _assert_adds_up(timings):
    parts = sum(timings[k] for k in STAGES)
    assert all(timings[k] >= 0 for k in STAGES)
    assert abs(timings["total"] - parts) <= 0.02 * timings["total"] + 0.02, (timings, parts)


@pytest.mark.parametrize("domain", ["box", "layernorm", "cone"])
def test_stage_times_add_up_to_the_total(head, clean, domain, tmp_path, monkeypatch):
    """Every part of a scan is inside one stage's timer (ties, recording and the checkpoint's appends
    included): the five stages add up to the total, with a checkpoint, and slowed-down appends land in a
    stage rather than in the gap."""
    rep = clean if domain == "box" else es.scan_head(head, domain=domain, device="cpu", backend="torch")
    _assert_adds_up(rep.timings_s)
    real = Ledger.record

    def slow_record(self, reports, **k):
        if reports and k.get("persist", True):
            time.sleep(0.05)
        return real(self, reports, **k)
    monkeypatch.setattr(Ledger, "record", slow_record)
    rep = es.scan_head(head, domain=domain, device="cpu", backend="torch", checkpoint=str(tmp_path / "r.partial"))
    _assert_adds_up(rep.timings_s)


def test_cli_prints_where_the_time_went(tmp_path, capsys):
    """After the files are written, one stderr line accounts for the whole command: the engine's stages
    (adding up to the engine's total), the enrichment and the table and files, adding up to the sum."""
    import re

    from unspeakable.engine.cli import main

    assert main(["scan", "synthetic:V=300,d=8,seed=1", "--device", "cpu", "--out", str(tmp_path / "r.json")]) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("unspeakable: time:")]
    assert len(line) == 1
    nums = {k: float(v) for k, v in re.findall(r"(load|screen|search|decide|verify|engine|enrich|files) ([0-9.]+) s",
                                                line[0])}
    nums["all"] = float(re.search(r"([0-9.]+) s in all; peak RSS ([0-9.]+) GiB$", line[0]).group(1))
    peak = float(re.search(r"peak RSS ([0-9.]+) GiB$", line[0]).group(1))
    assert 0.05 < peak < 24, peak  # this process's own high-water mark: at least the interpreter and torch
    assert set(nums) == {*STAGES, "engine", "enrich", "files", "all"}
    assert abs(sum(nums[k] for k in STAGES) - nums["engine"]) <= 0.05 * nums["engine"] + 0.3  # one decimal each
    assert abs(nums["engine"] + nums["enrich"] + nums["files"] - nums["all"]) <= 0.15
    assert json.loads((tmp_path / "r.json").read_text())["timings_s"]["total"] == pytest.approx(nums["engine"], abs=0.05)


@pytest.mark.parametrize("domain", ["layernorm", "rmsnorm", "box", "cone"])
def test_find_ties_against_brute_force(domain):
    """Tie candidates: every pair of rows equal by value (±0.0 alike) with equal bias, and in layernorm
    also rows equal up to a multiple of the ones vector (a null direction); each such pair found both
    ways, in ascending partner order, and nothing else (compared with an all-pairs check)."""
    from unspeakable.engine.loader import problem_from_rows
    from unspeakable.engine.pipeline import find_ties

    rng = np.random.default_rng(7)
    V, d = 600, 9
    rows = rng.integers(-3, 4, size=(V, d)).astype(np.float64)
    b = rng.integers(-2, 3, size=V).astype(np.float64)
    for a, c in ((5, 6), (5, 300), (40, 41), (599, 0)):
        rows[c], b[c] = rows[a], b[a]
    rows[70], rows[71], b[70], b[71] = 0.0, -0.0, 1.0, 1.0
    rows[72] = np.where(rows[72] == 0, -0.0, rows[72])
    rows[73], b[73] = np.where(rows[72] == 0, 0.0, rows[72]), b[72]
    rows[80], b[80] = rows[81] + 2.0, b[81]  # equal after the layernorm projection only
    p = problem_from_rows(rows, b, domain)
    ties = find_ties(p)
    proj = p.domain.null_directions(p.d).shape[1] > 0
    want = {}
    for t in range(V):
        for j in range(V):
            same = np.array_equal(p.rows[t], p.rows[j]) and p.bias[t] == p.bias[j]
            if proj:
                same |= np.allclose(p.keys[t], p.keys[j], rtol=0, atol=1e-12) and p.bias[t] == p.bias[j]
            if j != t and same:
                want.setdefault(t, []).append(j)
    assert {t: sorted(set(v)) for t, v in ties.items()} == want
    assert (80 in want) == proj and 5 in want and 70 in want and 72 in want
