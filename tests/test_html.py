"""--html (engine.html): one self-contained page; the token table sorts and filters in a real browser."""
import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

from unspeakable.engine.cli import main  # noqa: E402
from unspeakable.engine.html import render_html, write_html  # noqa: E402
from unspeakable.engine.report import ScanReport, TokenReport  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tricky_report() -> ScanReport:
    """Tokens whose text would break a careless page, margins in no particular order, one missing."""
    texts = ["</script><b>x", " the", "\n", "a\u200bb", "", "<!--", "&amp;", "ok", None, "\"'"]
    lows = [0.5, None, -1.0, 3.0, 0.01, 2.0, None, 1.5, 0.2, 7.0]
    verdicts = ["speakable", "unspeakable", "undecided", "speakable", "speakable", "speakable", "unspeakable",
                "speakable", "speakable", "speakable"]
    toks = [TokenReport(id=i * 3, text=t, gram_argmax=1, hard_to_speak=i % 2 == 0, verdict=v, reason="r",
                        margin_lower=lo, margin_upper=None if v == "speakable" else -0.5, time_s=0.0)
            for i, (t, lo, v) in enumerate(zip(texts, lows, verdicts))]
    return ScanReport(source="tricky<src>", V=40, d=4, domain="layernorm", radius=2.0, bias=True, backend="torch",
                      device="cpu", counts={"tokens": 40, "hard_to_speak": 5, "speakable": 36, "unspeakable": 2,
                                            "undecided": 2},
                      timings_s={k: 0.1 for k in ("load", "screen", "search", "decide", "verify", "total")},
                      tokens=toks, warnings=["weights dequantized from Q8_0: verdicts describe the quantized head"],
                      gram={"criterion": "c", "counted_with": "uncentred", "hard_to_speak_centred": 4,
                            "hard_to_speak_uncentred": 5})


class Table(HTMLParser):
    """Rows of ``table#tokens`` and its data-* attributes, from a page or a browser's DOM dump."""

    def __init__(self):
        super().__init__()
        self.attrs, self.header, self.rows = {}, [], []
        self._in, self._cell, self._row, self._where = False, None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "tokens":
            self._in, self.attrs = True, a
        elif self._in and tag in ("thead", "tbody"):
            self._where = tag
        elif self._in and tag == "tr" and self._where == "tbody":
            self._row = []
        elif self._in and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif self._in and tag in ("td", "th") and self._cell is not None:
            (self.header if self._where == "thead" else self._row).append(self._cell)
            self._cell = None
        elif self._in and tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(page: str) -> Table:
    t = Table()
    t.feed(page)
    return t


def embedded(page: str, id_: str):
    m = re.search(rf'<script type="application/json" id="{id_}">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


# --------------------------------------------------------------------------------------------- the page
def test_page_is_self_contained_and_escaped():
    rep = tricky_report()
    page = render_html(rep)
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', page)  # nothing to fetch at view time
    assert "<link" not in page and "@import" not in page and "url(" not in page
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    # every </script> closes one of the page's own scripts: token text cannot end a script early
    assert page.count("</script>") == page.count("<script")
    rows = embedded(page, "tokens-data")
    assert [r["id"] for r in rows] == [3, 18, 6, 12, 24, 0, 21, 15, 9, 27]  # unspeakable, undecided, then by margin
    by_id = {r["id"]: r for r in rows}
    assert by_id[0]["text"] == "</script><b>x" and by_id[3]["display"] == "␣the" and by_id[6]["display"] == "\\n"
    assert by_id[9]["display"] == "a\\u200bb" and by_id[12]["display"] == "\\∅"
    assert "tricky&lt;src&gt;" in page and "quantized head" in page
    assert "hard-to-speak, centred rows</th><td>4" in page and "uncentred rows</th><td>5" in page


def test_write_html_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "r.html"
    write_html(tricky_report(), p)
    assert p.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    import unspeakable.engine.html as h

    def boom(*a, **k):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(h, "make_figure", boom)
    with pytest.raises(RuntimeError):
        write_html(tricky_report(), tmp_path / "new.html")
    assert sorted(os.listdir(tmp_path)) == ["r.html"]  # nothing half-written, no temp file left


def test_cli_html_for_scan_and_gram(tmp_path, capsys):
    src = "synthetic:V=300,d=8,seed=1"
    assert main(["scan", src, "--device", "cpu", "--out", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert len(embedded(page, "tokens-data")) == len(data["tokens"])
    assert data["gram"]["hard_to_speak_uncentred"] == data["counts"]["hard_to_speak"]  # a file: uncentred rows
    assert main(["gram", src, "--device", "cpu", "--html", str(tmp_path / "g.html")]) == 0
    g = embedded((tmp_path / "g.html").read_text(encoding="utf-8"), "columns-data")
    assert "verdict" not in g and "margin_lower" not in g
    out = capsys.readouterr().out
    assert "criterion" in out and "centred=" in out and "uncentred=" in out
    assert main(["scan", src, "--html", str(tmp_path)]) == 2  # a directory is refused before any work


# --------------------------------------------------------------------------------------------- a browser
def chromium(url: str, tmp_path, *extra) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def margins(t: Table) -> list:
    col = t.header.index("margin_lower")
    return [None if r[col] == "\u2014" else float(r[col]) for r in t.rows]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_table_sorts_and_filters_in_chromium(tmp_path):
    p = tmp_path / "r.html"
    write_html(tricky_report(), p)
    url = p.as_uri()
    t = parse(chromium(url, tmp_path, "--dump-dom").stdout)
    assert t.attrs.get("data-rows") == "10" and len(t.rows) == 10
    assert [int(r[0]) for r in t.rows] == [3, 18, 6, 12, 24, 0, 21, 15, 9, 27]  # the page's reading order

    t = parse(chromium(url + "#click=margin_lower", tmp_path, "--dump-dom").stdout)  # one click: ascending
    assert t.attrs.get("data-sort") == "margin_lower" and t.attrs.get("data-dir") == "asc"
    m = margins(t)
    known = [x for x in m if x is not None]
    assert known == sorted(known) and m[len(known):] == [None] * (len(m) - len(known)) and len(known) == 8

    t = parse(chromium(url + "#click=margin_lower,margin_lower", tmp_path, "--dump-dom").stdout)  # twice: descending
    known = [x for x in margins(t) if x is not None]
    assert t.attrs.get("data-dir") == "desc" and known == sorted(known, reverse=True)

    t = parse(chromium(url + "#verdict=unspeakable", tmp_path, "--dump-dom").stdout)
    assert t.attrs.get("data-rows") == "2" and sorted(int(r[0]) for r in t.rows) == [3, 18]
    t = parse(chromium(url + "#q=the", tmp_path, "--dump-dom").stdout)
    assert [int(r[0]) for r in t.rows] == [3]

    shot = tmp_path / "shot.png"
    chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1300,1400", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- the console
def test_console_table_order_and_escapes():
    import io

    from unspeakable.engine.report import print_console

    buf = io.StringIO()
    rep = tricky_report()
    rep.tokens[1].token, rep.text_scheme = "Ġthe", "bytelevel"
    print_console(rep, file=buf, max_rows=6)
    out = buf.getvalue()
    ids = [int(m.group(1)) for m in re.finditer(r"^│\s+(\d+) │", out, re.M)]
    assert ids == [3, 18, 6, 12, 24, 0]  # unspeakable, undecided, then the smallest margins first; capped at 6
    assert "... 4 more" in out
    assert "centred=4" in out and "uncentred=5" in out and "criterion: c" in out
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^│\s+(\d+) │.*$", out, re.M)}
    row = rows[3]
    assert "␣the" in row and "'Ġthe'" in row  # display text and the raw entry
    assert "\\∅" in rows[12]
