"""engine.cli: --tokens parsing, bad input (exit 2, message on stderr, no output file), and the subcommands.

The CLI runs in-process through ``main([...])``. Plumbing tests swap in a fake pipeline (a fake
``engine.scan`` module and loader), so they run whatever state the pipeline is in; the end-to-end tests
need the real ``engine.load.load`` and ``engine.scan.scan_head`` and skip until both exist.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from unspeakable.engine.cli import TokenSpec, main, parse_tokens
from unspeakable.engine.loader import Head, InputError
from unspeakable.engine.report import SCHEMA, ScanReport, TokenReport

REPO = Path(__file__).resolve().parents[1]
TOP_KEYS = ["schema", "source", "V", "d", "domain", "radius", "bias", "backend", "device", "counts", "timings_s",
            "tokens"]
TOKEN_KEYS = ["id", "text", "gram_argmax", "hard_to_speak", "verdict", "reason", "margin_lower", "margin_upper",
              "time_s", "certificate"]
SMALL = "synthetic:V=300,d=8,seed=1"


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --------------------------------------------------------------------------------------------- --tokens
@pytest.mark.parametrize("spec, V, want", [
    ("1,5,100-102", 200, [1, 5, 100, 101, 102]),
    (" 7 ", 8, [7]),
    ("3-3", 4, [3]),
    ("5,1-6,2", 10, [1, 2, 3, 4, 5, 6]),  # overlaps and repeats: sorted unique
    ("0", 2, [0]),
    ("0-49999,50000-50256", 50257, list(range(50257))),
])
def test_parse_tokens_good(spec, V, want):
    ids = parse_tokens(spec).ids(V)
    assert ids.dtype == np.int64
    assert ids.tolist() == want


@pytest.mark.parametrize("spec, match", [
    ("", "empty"),
    ("1,,2", "empty item"),
    ("1,", "empty item"),
    ("-5", "negative"),
    ("3,-1", "negative"),
    ("5--3", "negative"),
    ("200-100", "reversed range '200-100'"),
    ("1-2-3", "cannot read '1-2-3'"),
    ("a", "cannot read 'a'"),
    ("1.5", "cannot read '1.5'"),
    ("1;2", "cannot read"),
    ("0x10", "cannot read"),
])
def test_parse_tokens_bad(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_tokens(spec)


def test_token_ids_out_of_range_are_named():
    with pytest.raises(InputError, match=r"^token ids 50300, 60000 are out of range for V = 50257$"):
        parse_tokens("1,50300,60000").ids(50257)
    # a long range is named by its first ids and counted, never expanded in full
    with pytest.raises(InputError, match=r"token ids 10, 11, .*, 19 \(999999999991 in all\) are out of range for V = 10"):
        TokenSpec(((0, 10**12),)).ids(10)


# --------------------------------------------------------------------------------------------- a fake pipeline
def fake_report(V: int, ids=None, kind="scan") -> ScanReport:
    n = V if ids is None else len(ids)
    toks = [TokenReport(id=1, text="one", gram_argmax=2, hard_to_speak=True, verdict="unspeakable",
                        reason="certificate (lp)", margin_lower=None, margin_upper=-0.5, time_s=0.01,
                        certificate={"kind": "dual", "competitors": [0, 2], "weights": [0.5, 0.5], "deficit": 0.5})]
    if kind == "gram":
        return ScanReport(source="fake", V=V, d=4, domain=None, radius=None, bias=False, backend="torch",
                          device="cpu", counts={"tokens": V, "hard_to_speak": 1}, timings_s={"load": 0.0, "screen": 0.0,
                                                                                            "total": 0.0},
                          tokens=[TokenReport(id=1, text="one", gram_argmax=2, hard_to_speak=True)], kind="gram")
    return ScanReport(source="fake", V=V, d=4, domain="layernorm", radius=2.0, bias=True, backend="torch", device="cpu",
                      counts={"tokens": n, "hard_to_speak": 1, "speakable": n - 1, "unspeakable": 1, "undecided": 0},
                      timings_s={k: 0.0 for k in ("load", "screen", "search", "decide", "verify", "total")},
                      tokens=toks, warnings=["no norm: using cone, the bias is ignored; --domain box keeps it"])


@pytest.fixture
def fake(monkeypatch):
    """Replace the loader and engine.scan with fakes; record what the CLI passes them."""
    calls: dict = {}
    V = 300
    head = Head(W_U=np.zeros((4, V), dtype=np.float32), b_U=None, ln_w=None, ln_b=None, norm="none", source="fake",
                texts=[f"tok{i}" for i in range(V - 2)] + ["dup", "dup"])

    def load(source):
        calls["load"] = source
        if source.startswith("missing"):
            raise InputError(f"{source}: no such file")
        return head

    def scan_head(h, **kw):
        calls["scan_head"] = kw
        if kw.get("checkpoint"):
            Path(kw["checkpoint"]).write_text("partial")  # what a real long scan leaves while it runs
            os.remove(kw["checkpoint"])
        return fake_report(V, kw.get("tokens"))

    def gram_head(h, **kw):
        calls["gram_head"] = kw
        return fake_report(V, kind="gram")

    def check(h, tokens, **kw):
        calls["check"] = (list(tokens), kw)
        return [TokenReport(id=t, text=None, gram_argmax=0, hard_to_speak=False, verdict="unspeakable", reason="tie",
                            margin_upper=0.0, certificate={"kind": "tie", "tie_with": 0}) for t in tokens]

    def bench_head(h, **kw):
        calls["bench_head"] = kw
        return {"V": V, "screen_tokens_per_s": 1.5e6, "open_token_time_s": {"median": 0.01, "p95": float("nan")}}

    def fold(h, **kw):
        return types.SimpleNamespace(warnings=["a fold warning"])

    mod = types.ModuleType("unspeakable.engine.pipeline")
    mod.scan_head, mod.gram_head, mod.check, mod.bench_head = scan_head, gram_head, check, bench_head
    monkeypatch.setitem(sys.modules, "unspeakable.engine.pipeline", mod)
    # sys.modules, not the attribute: the package re-exports the function engine.load (DESIGN §5), which
    # shadows the module of the same name as an attribute of `engine`.
    load_mod = sys.modules["unspeakable.engine.loader"]
    monkeypatch.setattr(load_mod, "load", load, raising=False)
    monkeypatch.setattr(load_mod, "fold", fold, raising=False)
    return calls


def test_scan_plumbing(fake, capsys, tmp_path):
    out, tab, fig = tmp_path / "r.json", tmp_path / "t.csv", tmp_path / "f.png"
    rc, so, se = run_cli(capsys, "scan", "src.npz", "--domain", "box", "--radius", "100", "--no-bias",
                         "--tokens", "5,1-3", "--workers", "2", "--device", "cpu", "--backend", "torch",
                         "--memory", "2.5", "--out", out, "--csv", tab, "--plot", fig)
    assert rc == 0, se
    kw = fake["scan_head"]
    assert kw["memory"] == 2.5
    assert kw["domain"] == "box" and kw["radius"] == 100.0 and kw["bias"] is False
    assert kw["tokens"].tolist() == [1, 2, 3, 5]
    assert kw["workers"] == 2 and kw["device"] == "cpu" and kw["backend"] == "torch"
    assert kw["checkpoint"] == str(out) + ".partial" and kw["resume"] is False
    assert "unspeakable scan: fake" in so and "certificate (lp)" in so
    assert "warning: no norm: using cone" in se and "no norm" not in so
    data = json.loads(out.read_text())
    assert list(data) == TOP_KEYS + ["gram", "warnings"] and data["schema"] == SCHEMA
    assert data["warnings"] == ["no norm: using cone, the bias is ignored; --domain box keeps it"]
    assert list(csv.reader(tab.open()))[0][0] == "id"
    assert fig.read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["f.png", "r.json", "t.csv"]


def test_scan_resume_passes_the_checkpoint(fake, capsys, tmp_path):
    out = tmp_path / "r.json"
    rc, _, se = run_cli(capsys, "scan", "src.npz", "--out", out, "--resume")
    assert rc == 0, se
    assert fake["scan_head"]["checkpoint"] == str(out) + ".partial"
    assert fake["scan_head"]["resume"] is True


def test_scan_defaults(fake, capsys):
    rc, so, _ = run_cli(capsys, "scan", "src.npz")
    assert rc == 0
    kw = fake["scan_head"]
    assert kw["domain"] is None and kw["radius"] is None and kw["bias"] is True and kw["tokens"] is None
    assert kw["checkpoint"] is None and kw["device"] == "auto" and kw["backend"] == "auto"


def test_demo_scans_the_default_synthetic_head_in_layernorm(fake, capsys, tmp_path):
    rc, so, _ = run_cli(capsys, "demo", "--out", tmp_path / "d.json")
    assert rc == 0
    assert fake["load"] == "synthetic:V=50257,d=768,seed=0"
    assert fake["scan_head"]["domain"] == "layernorm"
    assert (tmp_path / "d.json").exists()
    rc, _, _ = run_cli(capsys, "demo", "--source", SMALL)
    assert rc == 0 and fake["load"] == SMALL


def test_gram_plumbing(fake, capsys, tmp_path):
    out = tmp_path / "g.json"
    rc, so, _ = run_cli(capsys, "gram", "src.npz", "--no-center", "--out", out)
    assert rc == 0
    assert fake["gram_head"]["center"] is False
    data = json.loads(out.read_text())
    assert list(data) == TOP_KEYS + ["gram"] and list(data["tokens"][0]) == ["id", "text", "gram_argmax", "hard_to_speak"]
    run_cli(capsys, "gram", "src.npz", "--center")
    assert fake["gram_head"]["center"] is True
    run_cli(capsys, "gram", "src.npz")
    assert fake["gram_head"]["center"] is None


def test_check_takes_ids_ranges_and_texts(fake, capsys):
    rc, so, se = run_cli(capsys, "check", "src.npz", "7", "10-11", "tok3", "--domain", "rmsnorm")
    assert rc == 0, se
    tokens, kw = fake["check"]
    assert tokens == [3, 7, 10, 11]
    assert kw["domain"] == "rmsnorm" and kw["bias"] is True
    assert "identical row to token 0" in so
    assert "a fold warning" in se
    rc, _, se = run_cli(capsys, "check", "src.npz", "dup")
    assert rc == 2 and "'dup'" in se and "2 tokens have this text" in se
    rc, _, se = run_cli(capsys, "check", "src.npz", "nonesuch")
    assert rc == 2 and "'nonesuch'" in se
    rc, _, se = run_cli(capsys, "check", "src.npz", "299", "300")
    assert rc == 2 and "token ids 300 are out of range for V = 300" in se


def test_bench_json(fake, capsys):
    rc, so, _ = run_cli(capsys, "bench", "src.npz", "--tokens", "0-9", "--json")
    assert rc == 0
    data = json.loads(so)  # strict JSON: the NaN became null
    assert data["open_token_time_s"]["p95"] is None
    assert fake["bench_head"]["tokens"].tolist() == list(range(10))
    rc, so, _ = run_cli(capsys, "bench", "src.npz")
    assert rc == 0 and "screen_tokens_per_s" in so


# --------------------------------------------------------------------------------------------- bad input
def assert_bad(capsys, tmp_path, *args, match: str, keep=()):
    """Exit 2, ``match`` in the message, and tmp_path holds exactly what it held before (``keep``)."""
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rc, so, se = run_cli(capsys, *args)
    assert rc == 2, (so, se)
    assert match in se, se
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    return se


def outputs(tmp_path):
    return ["--out", tmp_path / "r.json", "--csv", tmp_path / "t.csv", "--plot", tmp_path / "f.png"]


@pytest.mark.parametrize("spec, match", [
    ("200-100", "reversed range '200-100'"),
    ("-3", "negative token id"),
    ("1,,2", "empty item"),
    ("x7", "cannot read 'x7'"),
])
def test_bad_tokens_spec(capsys, tmp_path, spec, match):
    se = assert_bad(capsys, tmp_path, "scan", SMALL, "--tokens", spec, *outputs(tmp_path), match=match)
    assert "--tokens" in se


def test_token_id_out_of_range(fake, capsys, tmp_path):
    assert_bad(capsys, tmp_path, "scan", "src.npz", "--tokens", "1,300,5000,299", *outputs(tmp_path),
               match="token ids 300, 5000 are out of range for V = 300")
    assert "scan_head" not in fake


def test_resume_without_out(capsys, tmp_path):
    assert_bad(capsys, tmp_path, "scan", SMALL, "--resume", "--csv", tmp_path / "t.csv",
               match="--resume needs --out")


def test_triton_without_cuda(capsys, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert_bad(capsys, tmp_path, "scan", SMALL, "--backend", "triton", *outputs(tmp_path), match="CUDA")
    assert_bad(capsys, tmp_path, "gram", SMALL, "--backend", "triton", "--out", tmp_path / "g.json", match="CUDA")


def test_cuda_device_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_bad(capsys, tmp_path, "scan", SMALL, "--device", "cuda", *outputs(tmp_path), match="CUDA")


@pytest.mark.parametrize("args, match", [
    (["--radius", "-1"], "positive"),
    (["--radius", "inf"], "positive finite"),
    (["--workers", "0"], "positive integer"),
    (["--memory", "0"], "positive number of gigabytes"),
    (["--memory", "-2"], "positive number of gigabytes"),
    (["--memory", "nan"], "positive number of gigabytes"),
    (["--memory", "lots"], "not a number of gigabytes"),
    (["--domain", "sphere"], "invalid choice: 'sphere'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_options(capsys, tmp_path, args, match):
    assert_bad(capsys, tmp_path, "scan", SMALL, *args, *outputs(tmp_path), match=match)


def test_bad_output_paths(capsys, tmp_path):
    (tmp_path / "adir").mkdir()
    keep = ["adir"]
    assert_bad(capsys, tmp_path, "scan", SMALL, "--out", tmp_path / "nodir" / "r.json",
               match="nodir does not exist", keep=keep)
    assert_bad(capsys, tmp_path, "scan", SMALL, "--csv", tmp_path / "adir", match="is a directory", keep=keep)
    assert_bad(capsys, tmp_path, "scan", SMALL, "--out", tmp_path / "same", "--csv", tmp_path / "same",
               match="both name", keep=keep)
    assert_bad(capsys, tmp_path, "scan", SMALL, "--plot", tmp_path / "f.xyz", match="cannot write a .xyz figure",
               keep=keep)
    src = tmp_path / "w.npz"
    np.savez(src, W_U=np.ones((3, 4), dtype=np.float32))
    assert_bad(capsys, tmp_path, "scan", src, "--out", src, match="is the source file", keep=keep + ["w.npz"])


def test_output_names_refused_before_any_work(capsys, tmp_path):
    """Found by an adversarial pass: a name too long for atomic_write's temp file ('.NAME.XXXXXXXX.tmp') and
    a name ending in '/' failed only at the last write (OSError traceback, exit 1) with the CSV and the page
    already written; --out naming the --vocab file overwrote it; an empty --out was ignored."""
    long = tmp_path / ("x" * 248 + ".json")
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([f"t{i}" for i in range(300)]))
    for cmd in (["scan", SMALL], ["volume", SMALL, "--samples", "500"]):
        assert_bad(capsys, tmp_path, *cmd, "--csv", tmp_path / "c.csv", "--out", long, match="file name too long",
                   keep=["vocab.json"])
        assert_bad(capsys, tmp_path, *cmd, "--csv", tmp_path / "c.csv", "--out", f"{tmp_path}/foo/",
                   match="ends in a separator", keep=["vocab.json"])
        assert_bad(capsys, tmp_path, *cmd, "--vocab", vocab, "--out", vocab, match="is an input file",
                   keep=["vocab.json"])
        assert_bad(capsys, tmp_path, *cmd, "--out", "", match="empty file name", keep=["vocab.json"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["a", "\ud800", "b"]))  # a lone surrogate: the reports could not be written
    assert_bad(capsys, tmp_path, "volume", SMALL, "--samples", "500", "--vocab", bad, "--out", tmp_path / "r.json",
               match="not valid Unicode", keep=["vocab.json", "bad.json"])
    bad.unlink()
    assert_bad(capsys, tmp_path, "volume", SMALL, "--seed", "-1", match="seed", keep=["vocab.json"])
    assert_bad(capsys, tmp_path, "volume", "synthetic:V=10,d=4,seed=-1", "--samples", "100", match="seed",
               keep=["vocab.json"])
    assert_bad(capsys, tmp_path, "scan", SMALL, "--volume", "--volume-seed", str(2**63), "--out", tmp_path / "r.json",
               match="seed", keep=["vocab.json"])


def test_outputs_appear_together_or_not_at_all(tmp_path, monkeypatch):
    """The JSON failing after the CSV and the page were written left those two behind: write_together moves
    them into place only once every one is complete, and an OSError is an InputError naming the file."""
    from unspeakable.engine import report as rp

    def fail(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "r.json"))

    import importlib

    vol = importlib.import_module("unspeakable.engine.volume")
    monkeypatch.setattr(vol, "write_json", fail)
    rc = main(["volume", SMALL, "--samples", "500", "--csv", str(tmp_path / "c.csv"), "--html",
               str(tmp_path / "p.html"), "--out", str(tmp_path / "r.json")])
    assert rc == 2 and sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    with rp.write_together():
        with rp.atomic_write(tmp_path / "a.txt") as f:
            f.write("a")
        assert not (tmp_path / "a.txt").exists()  # staged until the block ends
    assert (tmp_path / "a.txt").read_text() == "a"


def test_existing_output_untouched_on_bad_input(capsys, tmp_path):
    (tmp_path / "r.json").write_text("previous report")
    assert_bad(capsys, tmp_path, "scan", SMALL, "--tokens", "9-1", "--out", tmp_path / "r.json",
               match="reversed range", keep=["r.json"])
    assert (tmp_path / "r.json").read_text() == "previous report"


# bad sources: these need the real loader
def test_missing_file(capsys, tmp_path):
    missing = tmp_path / "nope.npz"
    assert_bad(capsys, tmp_path, "scan", missing, *outputs(tmp_path), match="nope.npz")


def test_npz_without_W_U(capsys, tmp_path):
    src = tmp_path / "w.npz"
    np.savez(src, W=np.ones((3, 4), dtype=np.float32), b_U=np.zeros(4, dtype=np.float32))
    assert_bad(capsys, tmp_path, "scan", src, *outputs(tmp_path), match="W_U", keep=["w.npz"])


def test_non_finite_W_U_names_token_ids(capsys, tmp_path):
    rng = np.random.default_rng(0)
    W_U = rng.standard_normal((8, 50)).astype(np.float32)
    W_U[2, 13] = np.nan
    W_U[5, 41] = np.inf
    src = tmp_path / "w.npz"
    np.savez(src, W_U=W_U)
    for args in (["scan", src, *outputs(tmp_path)], ["gram", src, "--out", tmp_path / "g.json"]):
        se = assert_bad(capsys, tmp_path, *args, match="", keep=["w.npz"]).replace(str(tmp_path), "")
        assert re.search(r"\b13\b", se) and re.search(r"\b41\b", se), se


def test_token_id_out_of_range_real_loader(capsys, tmp_path):
    assert_bad(capsys, tmp_path, "scan", SMALL, "--tokens", "0,300,301", *outputs(tmp_path),
               match="token ids 300, 301 are out of range for V = 300")


# --------------------------------------------------------------------------------------------- end to end
def test_scan_end_to_end(capsys, tmp_path):
    out, tab, fig = tmp_path / "r.json", tmp_path / "t.csv", tmp_path / "f.png"
    rc, so, se = run_cli(capsys, "scan", SMALL, "--domain", "layernorm", "--device", "cpu", "--out", out,
                         "--csv", tab, "--plot", fig)
    assert rc == 0, se
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert list(data) == TOP_KEYS + ["gram", "memory"] and data["schema"] == SCHEMA
    assert data["V"] == 300 and data["d"] == 8 and data["domain"] == "layernorm"
    mem = data["memory"]  # the budget, the batches sized from it and the peak (engine.memory)
    assert 300 * 8 * 4 <= mem["resident_bytes"] and 0 < mem["working_bytes"]
    # The peak is getrusage's, in bytes (KiB read as bytes would be 1024 times too small). It need not exceed
    # the resident part: that is VmRSS read at the fold plus the float32 keys, which a long-lived process
    # (an xdist worker) may place in memory already resident, and Linux's per-CPU RSS counters lag by pages.
    assert mem["peak_rss_bytes"] > mem["resident_bytes"] // 2
    assert 1 <= mem["search_batch"] <= 256 and 1 <= mem["witness_batch"] <= 192
    assert math.isclose(data["radius"], math.sqrt(8))
    c = data["counts"]
    assert c["tokens"] == 300 and c["speakable"] + c["unspeakable"] + c["undecided"] == 300
    assert all(list(t) == TOKEN_KEYS for t in data["tokens"])
    assert all(t["verdict"] in ("speakable", "unspeakable", "undecided") for t in data["tokens"])
    assert sum(t["hard_to_speak"] for t in data["tokens"]) == c["hard_to_speak"]
    assert sum(t["verdict"] == "unspeakable" for t in data["tokens"]) == c["unspeakable"]
    rows = list(csv.reader(tab.open(newline="")))
    assert len(rows) == 1 + len(data["tokens"])
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["f.png", "r.json", "t.csv"]  # no .partial, no temp files
    assert "planted vs found" in so

    # a --tokens subset: counts cover the scanned ids; the same verdicts as in the full scan
    rc, _, se = run_cli(capsys, "scan", SMALL, "--domain", "layernorm", "--device", "cpu", "--tokens", "0-49",
                        "--out", tmp_path / "s.json")
    assert rc == 0, se
    sub = json.loads((tmp_path / "s.json").read_text())
    assert sub["counts"]["tokens"] == 50
    full = {t["id"]: t["verdict"] for t in data["tokens"]}
    assert all(full.get(t["id"], t["verdict"]) == t["verdict"] for t in sub["tokens"])


def test_gram_end_to_end(capsys, tmp_path):
    rc, _, se = run_cli(capsys, "gram", SMALL, "--device", "cpu", "--out", tmp_path / "g.json")
    assert rc == 0, se
    data = json.loads((tmp_path / "g.json").read_text())
    assert list(data) == TOP_KEYS + ["gram"] and data["domain"] is None
    assert list(data["counts"]) == ["tokens", "hard_to_speak"]
    assert len(data["tokens"]) == data["counts"]["hard_to_speak"]


def test_check_end_to_end(capsys):
    rc, so, se = run_cli(capsys, "check", SMALL, "0", "1", "2")
    assert rc == 0, se
    from unspeakable.engine.loader import load
    from unspeakable.engine.pipeline import check

    # each token's certificate line carries the verdict the library gives for it (word-exact)
    for r in check(load(SMALL), [0, 1, 2]):
        assert re.search(rf"^\s*{r.id}  {r.verdict}:", so, re.M), (r.id, r.verdict, so)


# --------------------------------------------------------------------------------------------- the process
def test_console_entry_in_a_subprocess(tmp_path):
    script = shutil.which("unspeakable")
    cmd = [script] if script else [sys.executable, "-m", "unspeakable"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    for name in ("scan", "gram", "check", "bench", "demo"):
        assert name in p.stdout
    p = subprocess.run(cmd + ["scan", SMALL, "--resume"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("unspeakable: error: --resume needs --out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [["scan", SMALL, "--out", "r.json", "--csv", "r.csv"],
                                  ["volume", SMALL, "--tokens", "0-3", "--samples", "4000", "--particles", "8",
                                   "--replicates", "2", "--out", "r.json", "--csv", "r.csv"]])
def test_a_closed_stdout_cuts_the_table_not_the_files(tmp_path, args):
    """`unspeakable scan ... --out r.json | head`: the reader of the table goes away before it is printed.
    The command still writes every file in full, exits 0 and prints no traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "unspeakable"] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=tmp_path, env=env)
    p.stdout.close()  # before the command writes anything: its first write to stdout meets EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    data = json.loads((tmp_path / "r.json").read_text())
    rows = list(csv.reader((tmp_path / "r.csv").open(newline="")))
    assert len(rows) == 1 + len(data["tokens"]) and len(data["tokens"]) > 0
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.json"]


def test_a_closed_stdout_ends_a_command_that_only_prints_quietly(tmp_path):
    """`unspeakable check` has nothing but stdout: with its reader gone it stops with status 1 and no
    traceback (not Python's 'Exception ignored' at exit, status 120)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "unspeakable", "check", SMALL, "0-2"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.skipif(shutil.which("unspeakable") is None, reason="the console script is not installed")
def test_installed_script_runs_outside_the_checkout(tmp_path):
    """The installed command from a directory that is not the checkout, with no PYTHONPATH: what a user
    types after pip install. The import names are ours alone (a dependency's 'kernels' shadowed ours once)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([shutil.which("unspeakable"), "scan", "synthetic:V=300,d=8,seed=1", "--out", "x.json"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "x.json").read_text())["schema"] == SCHEMA
    p = subprocess.run([sys.executable, "-c", "import unspeakable, unspeakable.engine, unspeakable.kernels; "
                        "print(unspeakable.__file__)"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()).parent.name == "unspeakable"


def test_our_import_name_is_ours_alone():
    """No other installed distribution ships a top-level 'unspeakable' (transformers' 'kernels' dependency once
    shadowed a package of ours with that generic name)."""
    from importlib.metadata import packages_distributions

    owners = set(packages_distributions().get("unspeakable", ["unspeakable"]))
    assert owners == {"unspeakable"}, owners
