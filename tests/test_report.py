"""engine.report: the JSON contract (DESIGN §5), CSV, figure, console table, atomic writes.

Reports are built by hand here, so nothing of the pipeline is needed.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import stat

import numpy as np
import pytest

from unspeakable.engine import report as rp
from unspeakable.engine.loader import InputError
from unspeakable.engine.report import (
    SCHEMA,
    ScanReport,
    TokenReport,
    format_certificate,
    format_table,
    read_json,
    write_csv,
    write_json,
    write_plot,
)

TOP_KEYS = ["schema", "source", "V", "d", "domain", "radius", "bias", "backend", "device", "counts", "timings_s",
            "tokens"]
TOKEN_KEYS = ["id", "text", "gram_argmax", "hard_to_speak", "verdict", "reason", "margin_lower", "margin_upper",
              "time_s", "certificate"]
COUNT_KEYS = ["tokens", "hard_to_speak", "speakable", "unspeakable", "undecided"]
TIMING_KEYS = ["load", "screen", "search", "decide", "verify", "total"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as any strict JSON reader would."""
    def bad(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def make_report(n_listed: int = 4, planted: dict | None = None, with_arrays: bool = True, V: int = 60) -> ScanReport:
    rng = np.random.default_rng(0)
    toks = [
        TokenReport(id=3, text="hello", gram_argmax=7, hard_to_speak=True, verdict="speakable",
                    reason="witness (screen)", margin_lower=np.float64(0.25), margin_upper=None, time_s=0.0,
                    certificate={"kind": "witness", "x": np.array([0.5, -0.5, 0.0]), "runner_up": np.int64(7),
                                 "allowance": np.float32(1e-9)}),
        TokenReport(id=5, text=" Solid,Gold\n\"Magikarp\"", gram_argmax=5, hard_to_speak=False, verdict="unspeakable",
                    reason="certificate (lp)", margin_lower=float("-inf"), margin_upper=-0.125, time_s=0.031,
                    certificate={"kind": "dual", "competitors": [1, 2, 9], "weights": [0.5, 0.3, 0.2],
                                 "deficit": 0.125}),
        TokenReport(id=11, text=None, gram_argmax=12, hard_to_speak=True, verdict="unspeakable", reason="tie",
                    margin_lower=None, margin_upper=0.0, time_s=0.0, certificate={"kind": "tie", "tie_with": 12}),
        TokenReport(id=12, text="x", gram_argmax=11, hard_to_speak=True, verdict="undecided", reason="lp: time limit",
                    margin_lower=-1e-9, margin_upper=float("nan"), time_s=30.0, certificate=None),
    ]
    toks += [TokenReport(id=20 + i, text=f"t{i}", gram_argmax=0, hard_to_speak=True, verdict="speakable",
                         reason="witness (search)", margin_lower=0.01 * (i + 1), margin_upper=0.5, time_s=0.001)
             for i in range(max(0, n_listed - 4))]
    toks = toks[:n_listed] if n_listed < 4 else toks
    rep = ScanReport(
        source="synthetic:V=60,d=3,seed=0", V=V, d=3, domain="layernorm", radius=math.sqrt(3), bias=True,
        backend="torch", device="cpu",
        counts={"tokens": V, "hard_to_speak": 3, "speakable": V - 3, "unspeakable": 2, "undecided": 1},
        timings_s={"load": 0.01, "screen": 0.02, "search": 0.03, "decide": 0.04, "verify": 0.05, "total": 0.15},
        tokens=toks, planted=planted,
    )
    if with_arrays:
        codes = np.ones(V, dtype=np.int8)
        codes[[5, 11]] = -1
        codes[12] = 0
        lo = rng.uniform(0.0, 1.0, V)
        hi = np.full(V, np.nan)
        lo[[5, 11, 12]] = np.nan
        hi[[5, 11]] = [-0.125, 0.0]
        rep.verdicts_all, rep.margin_lower_all, rep.margin_upper_all = codes, lo, hi
    return rep


def make_gram_report() -> ScanReport:
    return ScanReport(source="w.npz", V=10, d=4, domain=None, radius=None, bias=False, backend="torch", device="cpu",
                      counts={"tokens": 10, "hard_to_speak": 2}, timings_s={"load": 0.1, "screen": 0.2, "total": 0.3},
                      tokens=[TokenReport(id=1, text=None, gram_argmax=4, hard_to_speak=True),
                              TokenReport(id=6, text="ab", gram_argmax=2, hard_to_speak=True)],
                      kind="gram")


# --------------------------------------------------------------------------------------------- JSON
def test_to_json_has_exactly_the_contract_keys_in_order():
    data = make_report().to_json()
    assert list(data) == TOP_KEYS
    assert data["schema"] == SCHEMA == "unspeakable.report/1"
    assert list(data["counts"]) == COUNT_KEYS
    assert list(data["timings_s"]) == TIMING_KEYS
    assert data["tokens"] and all(list(t) == TOKEN_KEYS for t in data["tokens"])
    assert "planted" not in data and "warnings" not in data and "kind" not in data
    # plain Python types only: numpy scalars and arrays are converted
    assert type(data["tokens"][0]["margin_lower"]) is float
    assert data["tokens"][0]["certificate"]["x"] == [0.5, -0.5, 0.0]
    assert type(data["tokens"][0]["certificate"]["runner_up"]) is int
    _strict_loads(json.dumps(data, allow_nan=False))


def test_to_json_leaves_planted_out():
    data = make_report(planted={"interior": [5], "duplicate": [[11, 12]]}).to_json()
    assert "planted" not in data


def test_non_finite_floats_become_null(tmp_path):
    rep = make_report()
    rep.radius = float("inf")
    rep.timings_s["search"] = float("nan")
    rep.tokens[0].certificate["allowance"] = np.float64(np.inf)
    rep.tokens[1].certificate["weights"] = np.array([0.5, np.nan, 0.5])
    path = tmp_path / "r.json"
    write_json(rep, path)
    data = _strict_loads(path.read_text())
    assert data["radius"] is None
    assert data["timings_s"]["search"] is None
    t = {x["id"]: x for x in data["tokens"]}
    assert t[5]["margin_lower"] is None  # -inf
    assert t[12]["margin_upper"] is None  # NaN
    assert t[3]["margin_upper"] is None  # None stays None
    assert t[3]["certificate"]["allowance"] is None
    assert t[5]["certificate"]["weights"] == [0.5, None, 0.5]


def test_gram_report_has_the_same_top_level_keys_and_gram_fields_only(tmp_path):
    data = make_gram_report().to_json()
    assert list(data) == TOP_KEYS
    assert data["domain"] is None and data["radius"] is None
    assert list(data["counts"]) == ["tokens", "hard_to_speak"]
    assert list(data["timings_s"]) == ["load", "screen", "total"]
    assert all(list(t) == ["id", "text", "gram_argmax", "hard_to_speak"] for t in data["tokens"])
    path = tmp_path / "g.json"
    write_json(make_gram_report(), path)
    back = read_json(path)
    assert back.kind == "gram"
    assert back.to_json() == data


def test_json_round_trip(tmp_path):
    rep = make_report(n_listed=7)
    path = tmp_path / "r.json"
    write_json(rep, path)
    back = read_json(path)
    assert back.kind == "scan"
    assert back.to_json() == rep.to_json()
    assert [t.id for t in back.tokens] == [t.id for t in rep.tokens]
    assert back.tokens[1].text == ' Solid,Gold\n"Magikarp"'


def test_read_json_checks_the_schema(tmp_path):
    path = tmp_path / "r.json"
    data = make_report().to_json()
    data["schema"] = "unspeakable.report/0"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"unspeakable\.report/1.*unspeakable\.report/0"):
        read_json(path)
    del data["schema"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="schema"):
        read_json(path)
    data["schema"] = SCHEMA
    del data["counts"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="counts"):
        read_json(path)
    path.write_text('{"schema": "unspeakable.report/1", "source": ')
    with pytest.raises(InputError, match="cannot read"):
        read_json(path)


def test_certificate_that_is_not_json_is_refused_before_writing(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    rep = make_report()
    rep.tokens[0].certificate = {"kind": "witness", "x": object()}
    with pytest.raises(TypeError, match="object"):
        write_json(rep, path)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.json"]


# --------------------------------------------------------------------------------------------- CSV
def test_csv_header_and_rows(tmp_path):
    rep = make_report(n_listed=6)
    path = tmp_path / "t.csv"
    write_csv(rep, path)
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    assert rows[0] == ["id", "text", "gram_argmax", "hard_to_speak", "verdict", "reason", "margin_lower",
                       "margin_upper", "time_s"]
    assert len(rows) == 1 + len(rep.tokens)
    by_id = {r[0]: r for r in rows[1:]}
    assert by_id["3"] == ["3", "hello", "7", "true", "speakable", "witness (screen)", "0.25", "", "0.0"]
    assert by_id["5"][1] == ' Solid,Gold\n"Magikarp"'  # quoting survives commas, quotes, newlines
    assert by_id["5"][6] == ""  # -inf
    assert float(by_id["5"][7]) == -0.125
    assert by_id["11"][1] == ""  # text None
    assert by_id["12"][7] == ""  # NaN
    assert rep.to_csv() == path.read_text(encoding="utf-8")


def test_csv_of_a_gram_report_leaves_scan_fields_empty(tmp_path):
    path = tmp_path / "g.csv"
    write_csv(make_gram_report(), path)
    rows = list(csv.reader(path.open(newline="")))
    assert rows[1] == ["1", "", "4", "true", "", "", "", "", "0.0"]


# --------------------------------------------------------------------------------------------- figure
@pytest.mark.parametrize("which", ["scan", "scan-from-json", "gram", "empty"])
def test_plot_is_a_valid_png(tmp_path, which):
    rep = {"scan": lambda: make_report(n_listed=8), "scan-from-json": lambda: make_report(with_arrays=False),
           "gram": make_gram_report, "empty": lambda: make_report(n_listed=0, with_arrays=False)}[which]()
    path = tmp_path / "fig.png"
    write_plot(rep, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(tmp_path) == ["fig.png"]


def test_plot_format_follows_the_extension(tmp_path):
    write_plot(make_report(), tmp_path / "fig.pdf")
    assert (tmp_path / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="xyz"):
        write_plot(make_report(), tmp_path / "fig.xyz")
    assert os.listdir(tmp_path) == ["fig.pdf"]


# --------------------------------------------------------------------------------------------- atomic writes
def test_writes_leave_no_temp_files_and_ordinary_permissions(tmp_path):
    rep = make_report()
    write_json(rep, tmp_path / "r.json")
    write_csv(rep, tmp_path / "t.csv")
    write_plot(rep, tmp_path / "f.png")
    write_json(rep, tmp_path / "r.json")  # overwriting is atomic too
    assert sorted(os.listdir(tmp_path)) == ["f.png", "r.json", "t.csv"]
    mask = os.umask(0)
    os.umask(mask)
    mode = stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode)
    assert mode == 0o666 & ~mask  # not mkstemp's 0600


def test_failed_json_write_leaves_the_old_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("previous report")

    def half_dump(obj, f, **kw):
        f.write('{"schema": "unspeakable.report/1", "sou')
        raise OSError("disk full")

    monkeypatch.setattr(rp.json, "dump", half_dump)
    with pytest.raises(OSError, match="disk full"):
        write_json(make_report(), path)
    assert path.read_text() == "previous report"
    assert os.listdir(tmp_path) == ["r.json"]


def test_failed_first_write_creates_nothing(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(rp.os, "replace", failing_replace)
    for writer, name in ((write_json, "r.json"), (write_csv, "t.csv"), (write_plot, "f.png")):
        with pytest.raises(OSError, match="rename failed"):
            writer(make_report(), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_failed_plot_leaves_the_old_figure_untouched(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "f.png"
    path.write_bytes(b"old figure")

    def half_savefig(self, f, **kw):
        f.write(PNG_MAGIC)
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", half_savefig)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_plot(make_report(), path)
    assert path.read_bytes() == b"old figure"
    assert os.listdir(tmp_path) == ["f.png"]


def test_interrupt_during_write_cleans_up(tmp_path, monkeypatch):
    def interrupted(obj, f, **kw):
        f.write("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(rp.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(make_report(), tmp_path / "r.json")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- console
def test_format_table_header_counts_timings_and_rows():
    rep = make_report(n_listed=50)
    text = format_table(rep, max_rows=10)
    first = text.splitlines()[0]
    for part in ("synthetic:V=60,d=3,seed=0", "V=60", "d=3", "domain=layernorm", "radius=1.73205", "bias=on",
                 "torch/cpu"):
        assert part in first
    assert "unspeakable=2" in text and "undecided=1" in text and "hard-to-speak=3" in text
    assert "decide=0.04s" in text
    assert "... 40 more" in text
    assert "'hello'" in text
    assert "[0.25, —]" in text  # a missing bound shows as a dash, not nan
    assert "planted vs found" not in text


def test_format_table_truncates_long_texts():
    rep = make_report()
    rep.tokens[0].text = "a" * 200
    line = next(ln for ln in format_table(rep).splitlines() if ln.lstrip().startswith("3 "))
    assert "a" * 30 not in line and "…" in line


def test_format_table_gram():
    text = format_table(make_gram_report())
    assert "unspeakable gram" in text and "hard-to-speak=2" in text
    assert "verdict" not in text


def test_planted_table():
    planted = {"interior": [5], "duplicate": [[11, 12]], "low_bias": [3], "shadow": [3, 40]}
    rep = make_report(planted=planted)
    text = format_table(rep)
    assert "planted vs found" in text
    lines = {ln.split()[0]: ln for ln in text.split("planted vs found")[1].splitlines() if ln.strip()}
    assert lines["interior"].rstrip().endswith("yes")
    # 12 came out undecided: a duplicate must be unspeakable
    assert "NO: 12" in lines["duplicate"]
    # a low-bias token must be unspeakable in a bounded domain with the bias on; 3 is speakable
    assert "NO: 3" in lines["low_bias"]
    # shadow: hard-to-speak expected; 40 is not listed, so not hard-to-speak
    assert "NO: 40" in lines["shadow"]

    rep.domain, rep.radius = "cone", None  # in the cone the bias is ignored: low-bias tokens are speakable
    lines = {ln.split()[0]: ln for ln in format_table(rep).split("planted vs found")[1].splitlines() if ln.strip()}
    assert lines["low_bias"].rstrip().endswith("yes")


def test_planted_table_without_per_token_arrays_and_for_a_subset():
    rep = make_report(planted={"interior": [5, 30]}, with_arrays=False)
    assert "speakable 1" in format_table(rep)  # 30 unlisted in a full scan: settled by the screen
    rep.counts["tokens"] = 10  # a --tokens scan: an unlisted id may not have been scanned at all
    text = format_table(rep)
    assert "not scanned 1" in text


def test_format_certificate():
    assert format_certificate(None) == "no certificate"
    assert "identical row to token 12" in format_certificate({"kind": "tie", "tie_with": 12})
    s = format_certificate({"kind": "dual", "competitors": [1, 2, 9], "weights": [0.2, 0.7, 0.1], "deficit": 0.5})
    assert "deficit=0.5" in s and "3 competitors" in s and s.index("2:0.7") < s.index("1:0.2")
    s = format_certificate({"kind": "witness", "x": [3.0, 4.0], "runner_up": 7})
    assert "||x||_2=5" in s and "runner_up=7" in s


def test_large_witness_lists_go_to_a_companion_file_that_audits(tmp_path):
    import unspeakable
    from unspeakable.engine.report import write_json

    src = "synthetic:V=600,d=16,seed=5"
    # a subset is enough (the audit checks subset reports too): the search's witnesses are what matter here
    rep = unspeakable.scan_head(unspeakable.load(src), domain="box", tokens=np.arange(200))
    inline, split = tmp_path / "inline.json", tmp_path / "split.json"
    write_json(rep, inline)  # a small report keeps its witnesses in the JSON
    write_json(rep, split, companion_min=0)
    a, b = json.loads(inline.read_text()), json.loads(split.read_text())
    assert "companion" not in a and b["companion"] == "split.json.witnesses.npz"
    xs = [t for t in a["tokens"] if isinstance((t["certificate"] or {}).get("x"), list)]
    with np.load(tmp_path / b["companion"]) as z:
        ids, X = z["witness_ids"], z["witness_x"]
    assert len(xs) >= 10  # witnesses from the search (coordinates, not "self-direction") to move out
    assert ids.tolist() == [t["id"] for t in xs] and np.array_equal(X, [t["certificate"]["x"] for t in xs])
    assert unspeakable.audit(str(split), src).ok and unspeakable.audit(str(inline), src).ok
