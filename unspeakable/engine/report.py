"""Stage 7 — the report: JSON (schema ``unspeakable.report/1``), CSV, figure and console table.

Field names here are the public contract (DESIGN §5). ``tokens`` lists every token that is hard-to-speak or
was not settled by the witness screen; ``counts`` cover all V.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import numpy as np

SCHEMA = "unspeakable.report/1"
VERDICTS = ("speakable", "unspeakable", "undecided")


@dataclass
class TokenReport:
    id: int
    text: str | None
    gram_argmax: int
    hard_to_speak: bool
    verdict: str | None = None  # None in a gram-only report
    reason: str | None = None
    margin_lower: float | None = None
    margin_upper: float | None = None
    time_s: float = 0.0
    certificate: dict | None = None
    # Extras, in the JSON only when known (after the contract's keys): the raw vocabulary entry ("Ġthe")
    # when the source has one, and the check of the witness against the model's own arithmetic.
    token: str | None = None
    model_check: str | None = None  # "ok" | "fragile" (engine.modelcheck)
    model_margin: float | None = None
    # scan --volume: the token's share of the norm's output set, engine.volume's entry without id and text
    # ("log10_share", "log10_share_ci", "log10_share_lower_bound", "cap_angle_deg", "method", ...)
    volume: dict | None = None

    def to_json(self, gram: bool = False) -> dict:
        """This token's entry in the report's ``tokens`` list; ``gram=True`` keeps only the gram fields."""
        out = {"id": int(self.id), "text": None if self.text is None else str(self.text),
               "gram_argmax": int(self.gram_argmax), "hard_to_speak": bool(self.hard_to_speak)}
        if gram:
            if self.token is not None:
                out["token"] = str(self.token)
            return out
        out["verdict"] = self.verdict
        out["reason"] = self.reason
        out["margin_lower"] = float_or_none(self.margin_lower)
        out["margin_upper"] = float_or_none(self.margin_upper)
        out["time_s"] = float_or_none(self.time_s)
        out["certificate"] = to_jsonable(self.certificate)
        if self.token is not None:
            out["token"] = str(self.token)
        if self.model_check is not None:
            out["model_check"] = self.model_check
            out["model_margin"] = float_or_none(self.model_margin)
        if self.volume is not None:
            out["volume"] = to_jsonable(self.volume)
        return out


@dataclass
class ScanReport:
    source: str
    V: int
    d: int
    domain: str | None  # None in a gram-only report
    radius: float | None
    bias: bool
    backend: str
    device: str
    counts: dict  # {"tokens", "hard_to_speak", "speakable", "unspeakable", "undecided"}
    timings_s: dict  # {"load", "screen", "search", "decide", "verify", "total"}
    tokens: list[TokenReport]
    kind: str = "scan"  # "scan" | "gram"
    planted: dict | None = None  # synthetic sources: what was planted (not part of the JSON contract)
    warnings: list[str] = field(default_factory=list)
    # Per-token arrays over all V (not serialised token by token): verdict codes and margins, for figures.
    verdicts_all: object = None  # numpy int8 [V]: 1 speakable, -1 unspeakable, 0 undecided
    margin_lower_all: object = None  # numpy float64 [V] (NaN where unknown)
    margin_upper_all: object = None
    gram_argmax_all: object = None  # numpy int64 [V], -1 for tokens not scanned
    screen_stats: dict = field(default_factory=dict)  # the screens' pass: tiles skipped, rows recomputed (bench)
    # The other gram convention's count when the screens' pass made it ({"centred": bool, "hard_to_speak":
    # int}); engine.enrich reads it instead of running a gram pass of its own. Not part of the JSON.
    gram_other: dict | None = None
    # Extra top-level JSON key "gram" (after the contract's keys) when known: the criterion in words and the
    # hard-to-speak count with centred and with uncentred rows (engine.report.gram_summary).
    gram: dict | None = None
    text_scheme: str | None = None  # how the raw tokens decode (engine.text), for the displays
    # Extra top-level JSON key "memory" (scan reports): the budget and the batches sized from it
    # (engine.memory.Budget.to_json) and the process's peak RSS when the engine finished.
    memory: dict | None = None
    # scan --volume: extra top-level JSON key "volume" (engine.volume.scan_summary: settings, the split tokens,
    # the plain pass's histogram over all V); the VolumeReport itself (not serialised) draws the page's histogram.
    volume: dict | None = None
    volume_report: object = None

    # ------------------------------------------------------------------------------------------- contract
    def to_json(self) -> dict:
        """The report as JSON-ready Python objects, schema ``unspeakable.report/1`` (DESIGN §5).

        Keys come in the contract's order. Non-finite floats become ``None`` (JSON has no inf/NaN), numpy
        scalars and arrays become Python numbers and lists. A gram report (``kind == "gram"``) keeps the
        same top-level keys with only the gram fields filled in.
        """
        gram = self.kind == "gram"
        count_keys = _GRAM_COUNT_KEYS if gram else _COUNT_KEYS
        out = {
            "schema": SCHEMA,
            "source": str(self.source),
            "V": int(self.V),
            "d": int(self.d),
            "domain": None if gram else self.domain,
            "radius": None if gram else float_or_none(self.radius),
            "bias": bool(self.bias),
            "backend": str(self.backend),
            "device": str(self.device),
            "counts": {k: int(self.counts.get(k, 0)) for k in count_keys},
            "timings_s": _timings_json(self.timings_s, gram),
            "tokens": [t.to_json(gram=gram) for t in self.tokens],
        }
        if self.gram is not None:
            out["gram"] = to_jsonable(self.gram)
        if self.warnings:  # e.g. "weights dequantized from Q8_0 ...: verdicts describe the quantized head"
            out["warnings"] = [str(w) for w in self.warnings]
        if self.volume is not None:
            out["volume"] = to_jsonable(self.volume)
        if self.memory is not None:
            out["memory"] = to_jsonable(self.memory)
        return out

    def to_csv(self) -> str:
        """One row per listed token: ``id,text,gram_argmax,hard_to_speak,verdict,reason,margin_lower,...``;
        with volume entries also ``log10_share,log10_share_ci_lo,...`` (:data:`CSV_VOLUME_FIELDS`)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        vol = any(t.volume is not None for t in self.tokens)
        w.writerow(CSV_FIELDS + (CSV_VOLUME_FIELDS if vol else ()))
        for t in self.tokens:
            w.writerow([
                int(t.id),
                "" if t.text is None else t.text,
                int(t.gram_argmax),
                "true" if t.hard_to_speak else "false",
                t.verdict or "",
                t.reason or "",
                csv_float(t.margin_lower),
                csv_float(t.margin_upper),
                csv_float(t.time_s),
            ] + (_csv_volume(t.volume) if vol else []))
        return buf.getvalue()


CSV_FIELDS = ("id", "text", "gram_argmax", "hard_to_speak", "verdict", "reason", "margin_lower", "margin_upper",
              "time_s")
CSV_VOLUME_FIELDS = ("log10_share", "log10_share_ci_lo", "log10_share_ci_hi", "log10_share_lower_bound",
                     "cap_angle_deg", "volume_method")


def _csv_volume(v: dict | None) -> list:
    if v is None:
        return [""] * len(CSV_VOLUME_FIELDS)
    ci = v.get("log10_share_ci") or (None, None)
    return [csv_float(v.get("log10_share")), csv_float(ci[0]), csv_float(ci[1]),
            csv_float(v.get("log10_share_lower_bound")), csv_float(v.get("cap_angle_deg")), v.get("method") or ""]


_TOP_KEYS = ("schema", "source", "V", "d", "domain", "radius", "bias", "backend", "device", "counts", "timings_s",
             "tokens")
_COUNT_KEYS = ("tokens", "hard_to_speak", "speakable", "unspeakable", "undecided")
_GRAM_COUNT_KEYS = ("tokens", "hard_to_speak")
_TIMING_KEYS = ("load", "screen", "search", "decide", "verify", "total")
_TOKEN_KEYS = ("id", "text", "gram_argmax", "hard_to_speak", "verdict", "reason", "margin_lower", "margin_upper",
               "time_s", "certificate")
_GRAM_TOKEN_KEYS = ("id", "text", "gram_argmax", "hard_to_speak")




# --------------------------------------------------------------------------------------------- values
def float_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (``getrusage``; 0 where the platform has none)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def csv_float(x) -> str:
    x = float_or_none(x)
    return "" if x is None else repr(x)


def _timings_json(timings: dict, gram: bool) -> dict:
    if gram:  # the stages a gram run has: those of the contract's keys that exist, in the contract's order
        return {k: float_or_none(timings[k]) for k in _TIMING_KEYS if k in timings}
    out = {k: float_or_none(timings.get(k)) for k in _TIMING_KEYS}
    if "volume" in timings:  # scan --volume: its stage, after the contract's keys (total includes it)
        out["volume"] = float_or_none(timings["volume"])
    return out


def to_jsonable(obj):
    """Certificates and other free-form payloads: plain JSON types, non-finite floats as ``None``."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float_or_none(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "tolist"):  # torch tensors
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        if all(type(v) is float for v in obj):  # witness coordinates, the bulk of a real head's report
            return [v if math.isfinite(v) else None for v in obj]
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "to_json"):
        return to_jsonable(obj.to_json())
    raise TypeError(f"cannot put a {type(obj).__name__} into the report JSON; expected numbers, strings, lists, dicts")


# --------------------------------------------------------------------------------------------- atomic files
_STAGED: list | None = None  # inside write_together: (temp, path) pairs waiting to be moved into place
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # atomic_write's temp file: ".NAME." + 8 random characters + ".tmp"
COMPANION_SUFFIX = ".witnesses.npz"  # write_json's companion of the witness points: "NAME.witnesses.npz"
# bytes a file name may need beyond its own for the files written beside it (the companion's temp file)
NAME_OVERHEAD = len(COMPANION_SUFFIX) + len(TEMP_PREFIX) + 1 + 8 + len(TEMP_SUFFIX)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Yield a temp file in ``path``'s directory; on success ``os.replace`` it onto ``path`` (inside
    :func:`write_together`: at the end of that block, with the others).

    On any exception the temp file is removed and ``path`` is left exactly as it was: nothing half-written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
    try:
        kw = {"newline": ""} if "b" not in mode else {}
        if "b" not in mode:
            kw["encoding"] = "utf-8"
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        if _STAGED is not None:
            _STAGED.append((tmp, path))
        else:
            os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextmanager
def write_together():
    """The files :func:`atomic_write` writes inside this block appear together at its end, or none of them:
    a JSON that fails after its CSV and page were written left those two behind. Each is complete in a temp
    file beside its target first; an OSError while writing them (a name too long for the temp file, a full
    disk) becomes an :class:`InputError` naming the file, and every temp file is removed."""
    from unspeakable.engine.head import InputError

    global _STAGED
    outer, _STAGED = _STAGED, []
    staged = _STAGED
    try:
        try:
            yield
        except OSError as e:
            raise InputError(f"cannot write {e.filename or 'the output'}: {e.strerror or e}") from e
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    finally:
        _STAGED = outer


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Above this many witness coordinates the report moves them to a companion binary file: a real head lists
# thousands of witnesses of hundreds of numbers each (143 MB of JSON for SmolLM2 otherwise).
COMPANION_MIN_NUMBERS = 100_000


def write_json(report: ScanReport, path, companion_min: int = COMPANION_MIN_NUMBERS) -> None:
    """Write ``report.to_json()`` atomically. Refuses NaN/inf rather than writing invalid JSON.

    When the listed witness points hold more than ``companion_min`` numbers they go to ``PATH.witnesses.npz``
    (arrays ``witness_ids`` [n] int64, ``witness_x`` [n, d] float64, written first, atomically); the JSON
    names it under ``"companion"`` and each such witness reads ``"x": {"companion": i}``.
    """
    data = report.to_json()
    _split_witnesses(data, os.fspath(path), companion_min)
    with atomic_write(path) as f:
        json.dump(data, f, indent=1, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def _split_witnesses(data: dict, path: str, companion_min: int) -> None:
    rows = [t for t in data["tokens"] if isinstance((t.get("certificate") or {}).get("x"), list)]
    if sum(len(t["certificate"]["x"]) for t in rows) <= companion_min:
        return
    name = os.path.basename(path) + COMPANION_SUFFIX
    ids = np.array([t["id"] for t in rows], dtype=np.int64)
    X = np.array([t["certificate"]["x"] for t in rows], dtype=np.float64)
    with atomic_write(os.path.join(os.path.dirname(os.path.abspath(path)), name), "wb") as f:
        np.savez(f, witness_ids=ids, witness_x=X)
    for i, t in enumerate(rows):
        t["certificate"]["x"] = {"companion": i}
    data["companion"] = name


def write_csv(report: ScanReport, path) -> None:
    """Write ``report.to_csv()`` atomically."""
    text = report.to_csv()
    with atomic_write(path) as f:
        f.write(text)


def read_json(path) -> ScanReport:
    """Read a report written by :func:`write_json`, checking the schema string and the contract's keys."""
    from unspeakable.engine.head import InputError

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read report {path}: {e}") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{path}: expected schema {SCHEMA!r}, got {got!r}")
    missing = [k for k in _TOP_KEYS if k not in data]
    if missing:
        raise InputError(f"{path}: report is missing keys {', '.join(missing)}")
    gram = "speakable" not in data["counts"]
    tokens = []
    for i, t in enumerate(data["tokens"]):
        want = _GRAM_TOKEN_KEYS if gram else _TOKEN_KEYS
        lost = [k for k in want if k not in t]
        if lost:
            raise InputError(f"{path}: tokens[{i}] is missing keys {', '.join(lost)}")
        extra = {k: t[k] for k in ("token", "model_check", "model_margin", "volume") if k in t}
        tokens.append(TokenReport(**{k: t[k] for k in want if k in t}, **extra))
        if tokens[-1].time_s is None:
            tokens[-1].time_s = 0.0
    return ScanReport(
        source=data["source"], V=data["V"], d=data["d"], domain=data["domain"], radius=data["radius"],
        bias=data["bias"], backend=data["backend"], device=data["device"], counts=dict(data["counts"]),
        timings_s=dict(data["timings_s"]), tokens=tokens, kind="gram" if gram else "scan", gram=data.get("gram"),
        warnings=list(data.get("warnings") or []), memory=data.get("memory"),
        volume=data.get("volume"),
    )


# --------------------------------------------------------------------------------------------- figure
_COLOURS = {"speakable": "tab:green", "unspeakable": "tab:red", "undecided": "tab:orange"}


def plot_formats() -> set[str]:
    """File extensions :func:`write_plot` can produce (matplotlib's own list)."""
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def _fig_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext or "png"


def write_plot(report: ScanReport, path, max_intervals: int = 200) -> None:
    """Figure, written atomically (format from the extension, PNG by default).

    Left: histogram over all scanned tokens of the best margin bound (witness lower bound for speakable,
    certificate upper bound for unspeakable), coloured by verdict. Right: the margin intervals
    ``[margin_lower, margin_upper]`` of the listed tokens. A gram report shows its counts instead.
    """
    fmt = _fig_format(os.fspath(path))
    if fmt not in plot_formats():
        raise ValueError(f"cannot write a {fmt!r} figure to {path}; expected one of {', '.join(sorted(plot_formats()))}")
    fig = make_figure(report, max_intervals)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=110)


def make_figure(report: ScanReport, max_intervals: int = 200):
    """The figure of :func:`write_plot` as a matplotlib ``Figure``, for other writers (HTML)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_h, ax_i = fig.subplots(1, 2)
    if report.kind == "gram":
        ax_h.bar(["tokens", "hard-to-speak"], [report.counts.get("tokens", 0), report.counts.get("hard_to_speak", 0)],
                 color=["tab:gray", "tab:purple"])
        ax_h.set_yscale("log")
        ax_h.set_title("gram screen")
        ids = [t.id for t in report.tokens[:max_intervals]]
        ax_i.scatter(ids, [t.gram_argmax for t in report.tokens[:max_intervals]], s=8, color="tab:purple")
        ax_i.set_xlabel("hard-to-speak token id")
        ax_i.set_ylabel("gram argmax")
    else:
        _margin_histogram(ax_h, report)
        _margin_intervals(ax_i, report, max_intervals)
    c = report.counts
    counts = ", ".join(f"{k.replace('_', '-')} {c[k]}" for k in c)
    where = "gram" if report.kind == "gram" else f"{report.domain}" + ("" if report.radius is None else f" R={report.radius:.4g}")
    fig.suptitle(f"{report.source} — V={report.V}, d={report.d}, {where}\n{counts}", fontsize=10)
    return fig


def _margin_histogram(ax, report: ScanReport) -> None:
    if report.verdicts_all is not None and report.margin_lower_all is not None and report.margin_upper_all is not None:
        codes = np.asarray(report.verdicts_all)
        lo = np.asarray(report.margin_lower_all, dtype=np.float64)
        hi = np.asarray(report.margin_upper_all, dtype=np.float64)
    else:  # a report read back from JSON: only the listed tokens are known
        codes = np.array([{"speakable": 1, "unspeakable": -1}.get(t.verdict, 0) for t in report.tokens], dtype=np.int8)
        lo = np.array([np.nan if t.margin_lower is None else t.margin_lower for t in report.tokens], dtype=np.float64)
        hi = np.array([np.nan if t.margin_upper is None else t.margin_upper for t in report.tokens], dtype=np.float64)
    # the bound that proves the verdict; undecided: the midpoint of whatever is known
    best = np.where(codes == 1, lo, np.where(codes == -1, hi, np.where(np.isfinite(lo) & np.isfinite(hi),
                                                                         (lo + hi) / 2, np.where(np.isfinite(lo), lo, hi))))
    data, labels, colours = [], [], []
    for code, name in ((1, "speakable"), (-1, "unspeakable"), (0, "undecided")):
        v = best[(codes == code) & np.isfinite(best)]
        if v.size:
            data.append(v)
            labels.append(f"{name} ({v.size})")
            colours.append(_COLOURS[name])
    xlabel = "margin bound (speakable: lower, unspeakable: upper)"
    if data:
        allv = np.concatenate(data)
        med = float(np.median(np.abs(allv))) or 1.0
        if float(np.max(np.abs(allv))) > 100 * med:
            # a few huge bounds (e.g. very negative biases) would squash the rest into one bin: compress
            # both tails logarithmically, keeping the sign (0 stays at 0).
            data = [np.sign(v) * np.log10(1.0 + np.abs(v)) for v in data]
            allv = np.concatenate(data)
            xlabel = "sign · log10(1 + |margin bound|)  (speakable: lower, unspeakable: upper)"
        lo_e, hi_e = float(allv.min()), float(allv.max())
        if lo_e == hi_e:
            lo_e, hi_e = lo_e - 0.5, hi_e + 0.5
        ax.hist(data, bins=np.linspace(lo_e, hi_e, 61), stacked=True, color=colours, label=labels)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no margin bounds", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    ax.set_title("margins over the scanned vocabulary")


def _margin_intervals(ax, report: ScanReport, max_intervals: int) -> None:
    shown = report.tokens[:max_intervals]
    for y, t in enumerate(shown):
        lo, hi = float_or_none(t.margin_lower), float_or_none(t.margin_upper)
        col = _COLOURS.get(t.verdict, "tab:gray")
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color=col, lw=1.5)
        for v, m in ((lo, "|"), (hi, "|")):
            if v is not None:
                ax.plot([v], [y], marker=m, color=col, ms=5)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("[margin_lower, margin_upper]")
    ax.set_ylabel("listed token (row)")
    if shown and len(shown) <= 40:
        ax.set_yticks(range(len(shown)), [f"{t.id}" for t in shown], fontsize=6)
    more = len(report.tokens) - len(shown)
    ax.set_title(f"listed tokens ({len(report.tokens)})" + (f", first {len(shown)} shown" if more else ""))
    if not shown:
        ax.text(0.5, 0.5, "no listed tokens", ha="center", va="center", transform=ax.transAxes)


# --------------------------------------------------------------------------------------------- console
def _fmt(x) -> str:
    if x is None:
        return "—"
    x = float(x)
    if not math.isfinite(x):
        return "—" if math.isnan(x) else ("+inf" if x > 0 else "-inf")
    return f"{x:.4g}"


def short_repr(s: str | None, width: int = 18) -> str:
    if s is None:
        return "—"
    r = repr(s)
    return r if len(r) <= width else r[: width - 1] + "…"


def format_tokens(tokens: list[TokenReport], max_rows: int = 40, gram: bool = False) -> list[str]:
    """Table lines for token reports, capped at ``max_rows`` with a "... N more" line."""
    if gram:
        hdr = f"{'id':>7}  {'text':<18}  {'gram_argmax':>11}"
    else:
        hdr = (f"{'id':>7}  {'text':<18}  {'gram_argmax':>11}  {'hard':>4}  {'verdict':<11}  "
               f"{'[margin_lower, margin_upper]':<28}  reason")
    lines = [hdr, "-" * len(hdr)]
    for t in tokens[:max_rows]:
        row = f"{t.id:>7}  {short_repr(t.text):<18}  {t.gram_argmax:>11}"
        if not gram:
            iv = f"[{_fmt(t.margin_lower)}, {_fmt(t.margin_upper)}]"
            row += f"  {'yes' if t.hard_to_speak else 'no':>4}  {t.verdict or '—':<11}  {iv:<28}  {t.reason or ''}"
        lines.append(row)
    if len(tokens) > max_rows:
        lines.append(f"... {len(tokens) - max_rows} more")
    return lines


def format_certificate(cert: dict | None, top: int = 5) -> str:
    """One line saying what proves a verdict: the witness, the dual weights, the tie."""
    if not cert:
        return "no certificate"
    kind = cert.get("kind", "?")
    parts = [kind]
    if kind == "tie":
        parts.append(f"identical row to token {cert.get('tie_with')}")
    x = cert.get("x")
    if isinstance(x, (list, tuple)) and x:
        parts.append(f"x: d={len(x)}, ||x||_2={_fmt(math.sqrt(sum(float(v) ** 2 for v in x)))}")
    elif isinstance(x, str):
        parts.append(f"x: {x}")
    for key in ("runner_up", "allowance", "deficit", "mu"):
        if cert.get(key) is not None:
            v = cert[key]
            parts.append(f"{key}={v if isinstance(v, (int, str)) else _fmt(v)}")
    comp, w = cert.get("competitors"), cert.get("weights")
    if comp is not None and w is not None and len(comp):
        order = sorted(range(len(comp)), key=lambda i: -float(w[i]))[:top]
        lam = ", ".join(f"{comp[i]}:{float(w[i]):.3g}" for i in order)
        parts.append(f"lambda over {len(comp)} competitors (largest: {lam}{', …' if len(comp) > top else ''})")
    return "; ".join(parts)


def format_table(report: ScanReport, max_rows: int = 40) -> str:
    """The console summary: header, counts, stage timings, the listed tokens, and planted vs found."""
    lines = []
    gram = report.kind == "gram"
    radius = "—" if report.radius is None else f"{report.radius:.6g}"
    head = f"unspeakable {'gram' if gram else 'scan'}: {report.source}  V={report.V}  d={report.d}"
    if not gram:
        head += f"  domain={report.domain}  radius={radius}  bias={'on' if report.bias else 'off'}"
    head += f"  backend={report.backend}/{report.device}"
    lines.append(head)
    lines.append("counts:  " + "  ".join(f"{k.replace('_', '-')}={v}" for k, v in report.counts.items()))
    if report.timings_s:
        lines.append("timings: " + "  ".join(f"{k}={_fmt(v)}s" for k, v in report.timings_s.items()))
    lines.append("")
    if not report.tokens:
        lines.append("no tokens listed (none hard-to-speak or left open by the witness screen)")
    else:
        lines.extend(format_tokens(report.tokens, max_rows=max_rows, gram=gram))
    if report.planted:
        lines.append("")
        lines.extend(_planted_table(report))
    return "\n".join(lines)


def _expected(kind: str, report: ScanReport) -> str | None:
    """What a planted token must come out as in this report's domain (None: no verdict expected)."""
    if report.kind == "gram":
        return None
    if kind in ("interior", "duplicate"):
        return "unspeakable"
    if kind == "low_bias":
        # its bias is what sinks it: only on a bounded domain with the bias in use
        return "unspeakable" if report.radius is not None and report.bias else "speakable"  # bounded: a radius
    return None


def _flat_ids(v) -> list[int]:
    """Planted entries are ids or lists of ids (duplicates come as pairs): flatten to ids."""
    if isinstance(v, (int, np.integer)):
        return [int(v)]
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, dict):
        v = list(v.values())
    return [t for x in v for t in _flat_ids(x)]


def _found(report: ScanReport, t: int, listed: dict) -> tuple[str, bool | None]:
    """(verdict found for token t, whether it is hard-to-speak) — from the listed tokens or the full arrays."""
    r = listed.get(t)
    if r is not None:
        return (r.verdict or "—"), bool(r.hard_to_speak)
    # unlisted: settled by the witness screen and not hard-to-speak — or not scanned at all
    if not (0 <= t < report.V):
        return "out of range", None
    if report.kind == "gram":
        return "—", False
    if report.verdicts_all is not None:
        return ("speakable" if int(np.asarray(report.verdicts_all)[t]) == 1 else "not scanned"), False
    if report.counts.get("tokens") == report.V:
        return "speakable", False
    return "not scanned", None


def _planted_table(report: ScanReport) -> list[str]:
    listed = {t.id: t for t in report.tokens}
    lines = ["planted vs found:"]
    hdr = f"  {'kind':<10}  {'n':>4}  {'expected':<24}  {'found':<40}  ok"
    lines.append(hdr)
    lines.append("  " + "-" * (len(hdr) - 2))
    kinds = [k for k in ("interior", "duplicate", "low_bias", "shadow") if k in report.planted]
    kinds += [k for k in report.planted if k not in kinds]
    for kind in kinds:
        ids = sorted(set(_flat_ids(report.planted[kind])))
        if not ids:
            continue
        want = _expected(kind, report)
        found = {t: _found(report, t, listed) for t in ids}
        tally: dict[str, int] = {}
        for v, _ in found.values():
            tally[v] = tally.get(v, 0) + 1
        if kind == "shadow":
            expect = "hard-to-speak"
            bad = [t for t, (v, h) in found.items() if h is not True and v != "not scanned"]
        elif want is None:
            expect = "—"
            bad = []
        else:
            expect = want
            bad = [t for t, (v, _) in found.items() if v != want and v != "not scanned"]
        ok = "yes" if not bad else f"NO: {', '.join(map(str, bad[:8]))}" + (" …" if len(bad) > 8 else "")
        found_s = ", ".join(f"{v} {n}" for v, n in sorted(tally.items()))
        lines.append(f"  {kind:<10}  {len(ids):>4}  {expect:<24}  {found_s:<40}  {ok}")
        shown = ", ".join(map(str, ids[:12])) + (" …" if len(ids) > 12 else "")
        lines.append(f"  {'':<10}  ids: {shown}")
    return lines


# --------------------------------------------------------------------------------------------- rich console
_ORDER = {"unspeakable": 0, "undecided": 1}


def ordered_tokens(tokens: list[TokenReport]) -> list[TokenReport]:
    """Tokens in reading order: unspeakable (deepest first: lowest margin_upper), then undecided, then the
    rest — hard-to-speak tokens — by margin_lower, smallest first (the hardest to speak). Ids break ties."""
    def key(t: TokenReport):
        group = _ORDER.get(t.verdict, 2)
        m = t.margin_upper if group == 0 else t.margin_lower
        m = float_or_none(m)
        return (group, math.inf if m is None else m, t.id)

    return sorted(tokens, key=key)


def display_text(t: TokenReport, scheme: str | None) -> str:
    from unspeakable.engine.text import display_token, escape

    if t.token is not None and scheme:
        return display_token(t.token, scheme)
    return "—" if t.text is None else escape(t.text)


def summary_lines(report: ScanReport) -> list[str]:
    """Header, counts (both gram counts when known), the gram criterion and the stage timings, as text."""
    gram = report.kind == "gram"
    radius = "—" if report.radius is None else f"{report.radius:.6g}"
    head = f"unspeakable {'gram' if gram else 'scan'}: {report.source}  V={report.V}  d={report.d}"
    if not gram:
        head += f"  domain={report.domain}  radius={radius}  bias={'on' if report.bias else 'off'}"
    lines = [head + f"  backend={report.backend}/{report.device}",
             "counts:  " + "  ".join(f"{k.replace('_', '-')}={v}" for k, v in report.counts.items())]
    g = report.gram
    if g:
        lines.append(f"gram:    hard-to-speak centred={g.get('hard_to_speak_centred')}  "
                     f"uncentred={g.get('hard_to_speak_uncentred')}  (counts and table use {g.get('counted_with')} rows)")
        lines.append(f"         criterion: {g.get('criterion')}")
    if report.timings_s:
        lines.append("timings: " + "  ".join(f"{k}={_fmt(v)}s" for k, v in report.timings_s.items()))
    v = report.volume
    if v:
        lines.append(f"volume:  share of the {v.get('domain')} output set (dimension {v.get('dimension')}); "
                     f"{v.get('samples')} plain samples over all V ({v.get('histogram', {}).get('no_hit')} tokens won "
                     f"none); split and cap-bounded: {len(v.get('split') or ())} ({v.get('selection')}); "
                     f"intervals at {v.get('confidence')}")
    return lines


def volume_cell(v: dict | None) -> str:
    """A token's volume in one short cell: the log10 share estimate, "< hi" when only the interval's top is
    known (no plain hit), "share 0" for a proven unspeakable token, "—" without an entry."""
    if not v:
        return "—"
    if v.get("method") == "unspeakable":
        return "share 0"
    est = float_or_none(v.get("log10_share"))
    if est is not None:
        return f"{est:.2f}"
    hi = float_or_none((v.get("log10_share_ci") or (None, None))[1])
    return "—" if hi is None else f"< {hi:.2f}"


def print_console(report: ScanReport, file=None, max_rows: int = 40) -> None:
    """The console report with ``rich``: summary, then the listed tokens in :func:`ordered_tokens` order
    with escaped text (``engine.text``), margins, reasons and, when known, the model check."""
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    class _Console(Console):
        def on_broken_pipe(self) -> None:  # rich's own exits the process (status 1): let the caller decide
            raise BrokenPipeError(32, "stdout closed")

    file = file or sys.stdout
    console = _Console(file=file, highlight=False, soft_wrap=False)
    if not console.is_terminal:  # a pipe or a file: wide enough that rows are not wrapped
        console = _Console(file=file, highlight=False, soft_wrap=False, width=max(console.width, 160))
    for line in summary_lines(report):
        console.print(Text(line))
    if not report.tokens:
        console.print(Text("no tokens listed (none hard-to-speak or left open by the witness screen)"))
    else:
        console.print(_rich_table(report, ordered_tokens(report.tokens)[:max_rows], Table, Text))
        if len(report.tokens) > max_rows:
            console.print(Text(f"... {len(report.tokens) - max_rows} more (--out / --csv / --html list them all)"))
    if report.planted:
        console.print(Text("\n".join(_planted_table(report))))


_STYLE = {"speakable": "green", "unspeakable": "bold red", "undecided": "yellow"}


def _rich_table(report: ScanReport, tokens: list[TokenReport], Table, Text):
    gram = report.kind == "gram"
    raw = any(t.token is not None for t in tokens)
    checked = any(t.model_check is not None for t in tokens)
    vol = any(t.volume is not None for t in tokens)
    table = Table(show_lines=False, header_style="bold")
    table.add_column("id", justify="right")
    table.add_column("text", overflow="fold", max_width=24)
    if raw:
        table.add_column("token", overflow="fold", max_width=24)
    table.add_column("gram_argmax", justify="right")
    if not gram:
        for name in ("hard", "verdict", "margin_lower", "margin_upper", "reason"):
            table.add_column(name, justify="right" if name.startswith("margin") else "left")
        if checked:
            table.add_column("model_check")
        if vol:
            table.add_column("log10_share", justify="right")
    for t in tokens:
        cells = [Text(str(t.id)), Text(display_text(t, report.text_scheme))]
        if raw:
            cells.append(Text("—" if t.token is None else repr(t.token)))
        cells.append(Text(str(t.gram_argmax)))
        if not gram:
            cells += [Text("yes" if t.hard_to_speak else "no"), Text(t.verdict or "—", style=_STYLE.get(t.verdict, "")),
                      Text(_fmt(t.margin_lower)), Text(_fmt(t.margin_upper)), Text(t.reason or "")]
            if checked:
                cells.append(Text(t.model_check or "—", style="red" if t.model_check == "fragile" else ""))
            if vol:
                cells.append(Text(volume_cell(t.volume)))
        table.add_row(*cells)
    return table
