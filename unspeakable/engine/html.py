"""``--html``: one self-contained page for a report — nothing is fetched when it is viewed.

The page holds the summary (source, domain, counts, both gram counts and the gram criterion, timings,
warnings), the figure as a base64 PNG, and a table of the listed tokens that sorts (click a header) and
filters (text box, verdict menu) in inline JavaScript. Token text is shown escaped (``engine.text``): what a
person sees is unambiguous, and the raw vocabulary entry sits beside it when the source has one.

The table's rows are built by the script from a JSON block, so the initial order and filter can also be set
from the URL fragment: ``report.html#sort=margin_lower&dir=asc&verdict=unspeakable&q=the``, and
``#click=margin_lower`` clicks that header once the page is built (``click=a,a`` twice). After each
render the table carries ``data-sort``, ``data-dir`` and ``data-rows`` attributes (used by the tests, handy for
scripts).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math

from unspeakable.engine.report import (ScanReport, atomic_write, display_text, float_or_none, make_figure, ordered_tokens,
                                       summary_lines, to_jsonable)

COLUMNS = ("id", "text", "token", "verdict", "hard_to_speak", "margin_lower", "margin_upper", "reason", "gram_argmax",
           "model_check")
VOLUME_COLUMNS = ("log10_share", "log10_share_ci", "log10_share_lower_bound", "volume_method")  # scan --volume
_NUMERIC = {"id", "margin_lower", "margin_upper", "gram_argmax", "log10_share", "log10_share_lower_bound"}

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f3f3f3;position:sticky;top:0;user-select:none}
th[data-active]::after{content:attr(data-active);margin-left:4px;color:#777}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.txt{font-family:ui-monospace,monospace;white-space:pre}
.speakable{color:#1a7f37}.unspeakable{color:#c62828;font-weight:600}.undecided{color:#b26a00}
.fragile{color:#c62828}.counts td{font-variant-numeric:tabular-nums}
.warn{color:#8a4b00}.note{color:#555}img{max-width:100%}
#controls{margin:.6em 0}#controls input{width:18em}
"""

_JS = r"""
(function(){
const data=JSON.parse(document.getElementById('tokens-data').textContent);
const cols=JSON.parse(document.getElementById('columns-data').textContent);
const numeric=new Set(JSON.parse(document.getElementById('numeric-data').textContent));
const table=document.getElementById('tokens');const tbody=table.tBodies[0];
const q=document.getElementById('q');const vsel=document.getElementById('verdict');
let state={sort:null,dir:'asc'};
function cmp(a,b,c){const x=a[c],y=b[c];
 if(x===y)return a.id-b.id; if(x===null||x===undefined)return 1; if(y===null||y===undefined)return -1;
 if(numeric.has(c))return state.dir==='asc'?x-y:y-x;
 const s=String(x).localeCompare(String(y));return state.dir==='asc'?s:-s;}
function render(){
 const needle=q.value.toLowerCase();const v=vsel.value;
 let rows=data.filter(r=>(!v||r.verdict===v)&&(!needle||String(r.display).toLowerCase().includes(needle)||
   String(r.token||'').toLowerCase().includes(needle)||String(r.id)===needle));
 if(state.sort)rows=rows.slice().sort((a,b)=>cmp(a,b,state.sort));
 const frag=document.createDocumentFragment();
 for(const r of rows){const tr=document.createElement('tr');
  for(const c of cols){const td=document.createElement('td');let val=r[c];
   if(c==='text')val=r.display;
   if(numeric.has(c)){td.className='num';td.textContent=(val===null||val===undefined)?'\u2014':
      (Number.isInteger(val)?String(val):Number(val).toPrecision(5));}
   else{if(c==='text'||c==='token')td.className='txt';
      td.textContent=(val===null||val===undefined)?'\u2014':(typeof val==='boolean'?(val?'yes':'no'):String(val));}
   if(c==='verdict'&&val)td.classList.add(val); if(c==='model_check'&&val==='fragile')td.classList.add('fragile');
   tr.appendChild(td);}
  frag.appendChild(tr);}
 tbody.replaceChildren(frag);
 table.dataset.rows=String(rows.length);table.dataset.sort=state.sort||'';table.dataset.dir=state.dir;
 for(const th of table.tHead.rows[0].cells){if(th.dataset.col===state.sort)th.dataset.active=state.dir==='asc'?'\u25b2':'\u25bc';
  else delete th.dataset.active;}
 document.getElementById('shown').textContent=rows.length+' of '+data.length+' listed tokens shown';}
for(const th of table.tHead.rows[0].cells){th.addEventListener('click',()=>{const c=th.dataset.col;
 state.dir=(state.sort===c&&state.dir==='asc')?'desc':'asc';state.sort=c;render();});}
q.addEventListener('input',render);vsel.addEventListener('change',render);
const p=new URLSearchParams(location.hash.slice(1));
if(p.get('sort')&&cols.includes(p.get('sort'))){state.sort=p.get('sort');state.dir=p.get('dir')==='desc'?'desc':'asc';}
if(p.get('q'))q.value=p.get('q'); if(p.get('verdict'))vsel.value=p.get('verdict');
render();
for(const c of (p.get('click')||'').split(',').filter(Boolean)){  // real clicks on headers, for scripts and tests
 const th=[...table.tHead.rows[0].cells].find(h=>h.dataset.col===c); if(th)th.click();}
window.unspeakableSort=function(c,dir){state.sort=c;state.dir=dir||'asc';render();};
})();
"""


def _json_script(obj, id_: str) -> str:
    """A JSON block that cannot end the script early (``<`` written as ``\\u003c``)."""
    text = json.dumps(to_jsonable(obj), ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    return f'<script type="application/json" id="{id_}">{text}</script>'


def _rows(report: ScanReport) -> list[dict]:
    rows = []
    for t in ordered_tokens(report.tokens):
        rows.append({"id": t.id, "display": display_text(t, report.text_scheme), "text": t.text, "token": t.token,
                     "verdict": t.verdict, "hard_to_speak": t.hard_to_speak, "margin_lower": t.margin_lower,
                     "margin_upper": t.margin_upper, "reason": t.reason, "gram_argmax": t.gram_argmax,
                     "model_check": t.model_check, **_volume_cells(t.volume)})
    return rows


def _volume_cells(v: dict | None) -> dict:
    if v is None:
        return {}
    ci = [float_or_none(x) for x in (v.get("log10_share_ci") or (None, None))]
    return {"log10_share": float_or_none(v.get("log10_share")),
            "log10_share_ci": "[" + ", ".join("—" if x is None else f"{x:.2f}" for x in ci) + "]",
            "log10_share_lower_bound": float_or_none(v.get("log10_share_lower_bound")), "volume_method": v.get("method")}


def _volume_section(report: ScanReport) -> str:
    """The histogram of log10 share (engine.volume's own figure) and what the volume columns mean."""
    import importlib

    vol = importlib.import_module("unspeakable.engine.volume")  # the module: the package re-exports the function
    v = report.volume or {}
    img = ""
    if report.volume_report is not None:
        png = base64.b64encode(vol.histogram_png(report.volume_report)).decode("ascii")
        img = f'<img alt="histogram of log10 share" src="data:image/png;base64,{png}">'
    return (f'<h2>Share of the output set (--volume)</h2>{img}<p class="note">log10_share: the share of the '
            f'{html.escape(str(v.get("domain")))} output set on which the token is the strict argmax, with its '
            f'{html.escape(str(v.get("confidence")))} interval, from {html.escape(str(v.get("samples")))} plain samples '
            f'over all V; splitting and a proven cap (log10_share_lower_bound) for {len(v.get("split") or ())} tokens '
            f'({html.escape(str(v.get("selection")))}). Tokens proven unspeakable own share 0 (method unspeakable); '
            f'identical rows split their cell (tie).</p>')


def _figure_png(report: ScanReport) -> str:
    buf = io.BytesIO()
    make_figure(report).savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _counts_table(report: ScanReport) -> str:
    cells = "".join(f"<tr><th>{html.escape(k.replace('_', '-'))}</th><td>{int(v)}</td></tr>"
                    for k, v in report.counts.items())
    g = report.gram
    if g:
        cells += (f"<tr><th>hard-to-speak, centred rows</th><td>{g.get('hard_to_speak_centred')}</td></tr>"
                  f"<tr><th>hard-to-speak, uncentred rows</th><td>{g.get('hard_to_speak_uncentred')}</td></tr>")
    return f'<table class="counts">{cells}</table>'


def render_html(report: ScanReport, figure: bool = True) -> str:
    """The page as a string (see the module docstring)."""
    gram = report.kind == "gram"
    cols = [c for c in COLUMNS if not (gram and c in ("verdict", "margin_lower", "margin_upper", "reason", "model_check"))]
    if not any(t.token is not None for t in report.tokens):
        cols.remove("token")
    if "model_check" in cols and not any(t.model_check is not None for t in report.tokens):
        cols.remove("model_check")
    volume = not gram and any(t.volume is not None for t in report.tokens)
    if volume:
        cols += VOLUME_COLUMNS
    esc = html.escape
    lines = summary_lines(report)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>unspeakable {'gram' if gram else 'scan'}: {esc(str(report.source))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(lines[0])}</h1>", _counts_table(report),
    ]
    if report.gram:
        parts.append(f'<p class="note">gram criterion: {esc(str(report.gram.get("criterion")))}; the counts and the '
                     f'table use {esc(str(report.gram.get("counted_with")))} rows.</p>')
    if report.timings_s:
        parts.append('<p class="note">timings: ' + esc("  ".join(
            f"{k}={v:.3g}s" for k, v in report.timings_s.items() if isinstance(v, (int, float)) and math.isfinite(v)))
            + "</p>")
    parts += [f'<p class="warn">warning: {esc(w)}</p>' for w in report.warnings]
    if figure:
        parts.append(f'<h2>Figure</h2><img alt="margins figure" src="data:image/png;base64,{_figure_png(report)}">')
    if volume:
        parts.append(_volume_section(report))
    parts += [
        "<h2>Listed tokens</h2>",
        '<p class="note">Text is escaped: \\n \\t \\xNN control bytes, \\uXXXX invisible characters, ␣ a leading or '
        'trailing space, \\∅ the empty string. Click a header to sort.</p>',
        '<div id="controls"><input id="q" type="search" placeholder="filter: text, token or id"> '
        '<select id="verdict"><option value="">all verdicts</option><option>unspeakable</option>'
        '<option>undecided</option><option>speakable</option></select> <span id="shown"></span></div>',
        '<table id="tokens"><thead><tr>' + "".join(f'<th data-col="{c}">{c}</th>' for c in cols)
        + "</tr></thead><tbody></tbody></table>",
        _json_script(_rows(report), "tokens-data"), _json_script(cols, "columns-data"),
        _json_script(sorted(_NUMERIC), "numeric-data"),
        f"<script>{_JS}</script>", "</body></html>",
    ]
    return "\n".join(parts)


def write_html(report: ScanReport, path, figure: bool = True) -> None:
    """Write :func:`render_html` atomically (nothing half-written on failure)."""
    page = render_html(report, figure=figure)
    with atomic_write(path) as f:
        f.write(page)
