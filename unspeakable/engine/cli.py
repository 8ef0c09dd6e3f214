"""The ``unspeakable`` command line (DESIGN §5): ``scan``, ``gram``, ``check``, ``bench``, ``demo``, ``audit``, ``volume``.

Each subcommand is a small dataclass with a ``run()`` method. Everything that can be checked before the
work starts is checked first — output paths, ``--tokens``, backend and device, the source itself, token ids
against V — so bad input exits with status 2, a message on stderr naming what is wrong, and no output file
created or touched. Reports are written atomically (``engine.report``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np

from unspeakable.engine.domain import DOMAINS
from unspeakable.engine.head import InputError
from unspeakable.engine.memory import DEFAULT_WORKING, GB
from unspeakable.engine.ledger import remove_checkpoint

DEMO_SOURCE = "synthetic:V=50257,d=768,seed=0"

_PART = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")


# --------------------------------------------------------------------------------------------- --tokens
@dataclass(frozen=True)
class TokenSpec:
    """A parsed ``--tokens`` spec: inclusive ranges, expanded only once V is known."""

    ranges: tuple[tuple[int, int], ...]

    def ids(self, V: int) -> np.ndarray:
        """Sorted unique ids, or :class:`InputError` naming the ids that are not below V."""
        merged: list[list[int]] = []
        for a, b in sorted(self.ranges):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        bad = [(max(a, V), b) for a, b in merged if b >= V]
        if bad:
            n_bad = sum(b - a + 1 for a, b in bad)
            shown = [t for a, b in bad for t in range(a, min(b, a + 9) + 1)][:10]
            more = f" ({n_bad} in all)" if n_bad > len(shown) else ""
            raise InputError(f"token ids {', '.join(map(str, shown))}{more} are out of range for V = {V}")
        return np.concatenate([np.arange(a, b + 1, dtype=np.int64) for a, b in merged])


def parse_tokens(spec: str) -> TokenSpec:
    """Parse ``"1,5,100-200"``: ids and inclusive ranges, comma separated.

    Raises :class:`ValueError` on an empty part, a negative id, a reversed range or anything else.
    """
    if not spec or not spec.strip():
        raise ValueError("empty token spec; expected ids and ranges like 1,5,100-200")
    ranges = []
    for part in spec.split(","):
        p = part.strip()
        if not p:
            raise ValueError(f"empty item in token spec {spec!r}; expected ids and ranges like 1,5,100-200")
        if re.match(r"^(?:[0-9]+-)?-[0-9]", p):
            raise ValueError(f"negative token id in {p!r}; token ids are 0 … V-1")
        m = _PART.match(p)
        if not m:
            raise ValueError(f"cannot read {p!r} in token spec {spec!r}; expected an id (5) or a range (100-200)")
        a = int(m.group(1))
        b = a if m.group(2) is None else int(m.group(2))
        if b < a:
            raise ValueError(f"reversed range {p!r}: {a} > {b}; write {b}-{a}")
        ranges.append((a, b))
    return TokenSpec(tuple(ranges))


def _token_spec_arg(spec: str) -> TokenSpec:
    try:
        return parse_tokens(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _positive_float(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s!r}")
    return x


def _gigabytes(s: str) -> float:
    from unspeakable.engine.memory import GB, parse_gb

    try:
        return parse_gb(s, "--memory") / GB
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(lo: int, what: str, below: int | None = None):
    """An argparse type: an integer >= ``lo`` (and < ``below``; ``what`` names it in the message)."""
    def parse(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {s!r}") from None
        if n < lo or below is not None and n >= below:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {n}")
        return n
    return parse


_positive_int = _int_at_least(1, "positive")
_nonnegative_int = _int_at_least(0, "non-negative")
_seed = _int_at_least(0, "seed (0 <= S < 2^63)", 2**63)


# --------------------------------------------------------------------------------------------- checks
def check_outputs(source: str | tuple | None = None, **paths: str | None) -> None:
    """Every output path must be a file in an existing, writable directory, distinct from the others and
    from the inputs (``source``: a path, or a tuple of them: the source and the ``--vocab`` file). Raises
    :class:`InputError` before any work is done."""
    seen: dict[str, str] = {}
    inputs = source if isinstance(source, tuple) else (source,)
    srcs = {os.path.realpath(p): p for p in inputs if p and os.path.exists(p)}
    for flag, path in paths.items():
        opt = "--" + flag
        if path is None:
            continue
        if not path:
            raise InputError(f"{opt}: empty file name")
        if path.endswith(("/", os.sep)):
            raise InputError(f"{opt} {path} ends in a separator (a directory); expected a file name")
        real = os.path.realpath(path)
        # the temp files beside it (atomic_write's, and that of the JSON's companion) need longer names
        from unspeakable.engine.report import NAME_OVERHEAD

        name_max = _name_max(os.path.dirname(real))
        if len(os.fsencode(os.path.basename(real))) + NAME_OVERHEAD > name_max:
            raise InputError(f"{opt} {path}: file name too long (at most {name_max - NAME_OVERHEAD} bytes here: "
                             "the temp files beside it need the rest)")
        if os.path.isdir(real):
            raise InputError(f"{opt} {path} is a directory; expected a file name")
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise InputError(f"{opt} {path}: directory {os.path.dirname(path) or '.'} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"{opt} {path}: directory {os.path.dirname(path) or '.'} is not writable")
        if os.path.exists(real) and not os.path.isfile(real):
            raise InputError(f"{opt} {path} exists and is not a regular file")
        if real in srcs:
            what = "the source file" if srcs[real] == inputs[0] else "an input file"
            raise InputError(f"{opt} {path} is {what}; refusing to overwrite the input")
        if real in seen:
            raise InputError(f"{opt} and {seen[real]} both name {path}; give each output its own file")
        seen[real] = opt
        if flag == "plot":
            from unspeakable.engine.report import plot_formats

            ext = os.path.splitext(path)[1].lower().lstrip(".")
            if ext and ext not in plot_formats():
                raise InputError(f"--plot {path}: cannot write a .{ext} figure; "
                                 f"expected one of {', '.join('.' + f for f in sorted(plot_formats()))}")


def _name_max(directory: str) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _check_backend(backend: str, device: str, precision: str = "auto") -> None:
    from unspeakable.kernels import resolve_backend, resolve_precision  # torch only once a command runs: --help stays quick

    resolve_precision(precision, *resolve_backend(backend, device))


def _warn(messages) -> None:
    for m in messages or ():
        print(f"unspeakable: warning: {m}", file=sys.stderr)


@contextmanager
def _stage(message: str):
    """A rich spinner on stderr while a stage runs, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _load(source: str, vocab: str | None = None):
    from unspeakable.engine.loader import load

    t0 = time.perf_counter()
    with _stage(f"loading {source}"):
        head = load(source) if vocab is None else load(source, vocab=vocab)
    return head, time.perf_counter() - t0


def _enrich(report, head, **kw):
    """Raw tokens, both gram counts, the model check (engine.enrich)."""
    from unspeakable.engine.enrich import enrich

    with _stage("gram counts (centred and uncentred) and the model check"):
        return enrich(report, head, **kw)


def time_line(timings: dict, enrich_s: float, write_s: float) -> str:
    """Where a scan command's time went, every part timed on its own: the engine's stages (which add up
    to its total, the checkpoint's appends included), the enrichment after it (raw tokens, the other gram
    count, the model check) and the console table plus the files written."""
    from unspeakable.engine.report import peak_rss_bytes

    keys = ("load", "screen", "search", "decide", "verify") + (("volume",) if "volume" in timings else ())
    stages = ", ".join(f"{k} {timings.get(k, 0.0):.1f} s" for k in keys)
    total = timings.get("total", 0.0)
    return (f"time: {stages} (engine {total:.1f} s); enrich {enrich_s:.1f} s; table and files {write_s:.1f} s; "
            f"{total + enrich_s + write_s:.1f} s in all; peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")


def _show(write) -> None:
    """``write()`` the table to stdout. A reader that went away (``| head``) cuts the table short, not the
    command: stdout then points at /dev/null and the files asked for are still written (status 0)."""
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()


def _print(report) -> None:
    from unspeakable.engine.report import print_console

    _show(lambda: print_console(report))


def _write_reports(report, out: str | None, csv: str | None = None, plot: str | None = None,
                   html: str | None = None) -> None:
    from unspeakable.engine.report import write_csv, write_json, write_plot, write_together

    # all or none of them (write_together); the JSON last
    with write_together():
        if plot:
            write_plot(report, plot)
        if csv:
            write_csv(report, csv)
        if html:
            from unspeakable.engine.html import write_html

            with _stage(f"writing {html}"):
                write_html(report, html)
        if out:
            write_json(report, out)


# --------------------------------------------------------------------------------------------- commands
@dataclass
class Scan:
    """Decide every token (or --tokens): speakable, unspeakable or undecided, with proofs."""

    source: str | list[str]  # one source, or several (and @FILE lists) scanned as one job
    domain: str | None = None
    radius: float | None = None
    bias: bool = True
    tokens: TokenSpec | None = None
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    verify: str = "bounded"
    workers: int = 1
    memory: float | None = None  # GB
    out: str | None = None
    csv: str | None = None
    plot: str | None = None
    html: str | None = None
    resume: bool = False
    vocab: str | None = None
    ray: str | None = None  # "local" (a Ray started here) or an address
    max_in_flight: int | None = None
    ray_cpus: int | None = None
    object_store_memory: int | None = None
    out_dir: str | None = None
    volume: bool = False
    volume_tokens: TokenSpec | None = None
    volume_hardest: int | None = None
    volume_samples: int | None = None
    volume_seed: int | None = None

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", nargs="+", help=_SOURCE_HELP + "; several, or @FILE listing one per line, "
                                                                "scan as one job (--out-dir)")
        _domain_args(p)
        p.add_argument("--tokens", type=_token_spec_arg, help="scan only these ids, e.g. 1,5,100-200")
        _device_args(p)
        p.add_argument("--precision", choices=("auto", "ieee", "tf32", "bf16"), default="auto",
                       help="the screens' fast pass (auto: TF32 for the Triton kernels on sm_80+, IEEE float32 "
                            "elsewhere); near ties are recomputed in float64 whatever the precision")
        p.add_argument("--verify", choices=("bounded", "full"), default="bounded",
                       help="bounded: competitors the verifier's own float32 bound cannot exclude are re-scored in "
                            "float64; full: all of them, for audits")
        p.add_argument("--workers", type=_positive_int, default=1, help="parallel LP workers (default 1)")
        p.add_argument("--memory", type=_gigabytes, metavar="GB",
                       help="memory budget in GB (10^9 bytes), the whole process: what the scan holds throughout (the "
                            "interpreter, the head, 8 x V x d bytes of float64 keys, 4 x V x d of shared float32 keys; "
                            "the float64 rows too where the fold rounds) plus a working set from which the batches that "
                            "grow with V are sized (default: what the machine has available beyond the held part, at "
                            f"most {DEFAULT_WORKING / GB:g} GB; the report's \"memory\" key shows the sizes and the "
                            "peak)")
        _report_args(p)
        p.add_argument("--resume", action="store_true", help="continue an interrupted scan from OUT.partial "
                                                             "(with --out-dir: skip the models already reported)")
        _vocab_arg(p)
        p.add_argument("--out-dir", metavar="DIR", help="several sources (with or without --ray): write "
                                                         "DIR/<name>.json per model and DIR/summary.json")
        _volume_args(p)
        _ray_args(p)

    def run(self) -> int:
        sources = expand_sources(self.source)
        if len(sources) > 1 or self.out_dir:
            return self._run_many(sources)
        if self.resume and not self.out:
            raise InputError("--resume needs --out: an interrupted scan keeps its progress in OUT.partial")
        check_outputs((sources[0], self.vocab), out=self.out, csv=self.csv, plot=self.plot, html=self.html)
        self._check()
        with self._cluster() as cluster:
            self._scan_one(sources[0], self.out, self.csv, self.plot, self.html, cluster)
        return 0

    def _check(self) -> None:
        _check_vocab(self.vocab)
        _check_backend(self.backend, self.device, self.precision)
        local_only = {"--ray-cpus": self.ray_cpus, "--object-store-memory": self.object_store_memory}
        given = [k for k, v in local_only.items() if v is not None]
        if given and self.ray not in (None, "local"):
            raise InputError(f"{', '.join(given)} size a local Ray; the cluster at {self.ray} has its own")
        if self.ray is None and (given or self.max_in_flight is not None):
            raise InputError("--max-in-flight, --ray-cpus and --object-store-memory need --ray")
        vol = {"--volume-tokens": self.volume_tokens, "--volume-hardest": self.volume_hardest,
               "--volume-samples": self.volume_samples, "--volume-seed": self.volume_seed}
        given = [k for k, v in vol.items() if v is not None]
        if given and not self.volume:
            raise InputError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --volume")

    def _volume_options(self, V: int):
        """The volume options for a head of V tokens (ids checked here, before the scan), or None."""
        if not self.volume:
            return None
        from unspeakable.engine.volume import VolumeOptions

        given = {"tokens": None if self.volume_tokens is None else self.volume_tokens.ids(V),
                 "hardest": self.volume_hardest, "samples": self.volume_samples, "seed": self.volume_seed}
        return VolumeOptions.resolve({k: v for k, v in given.items() if v is not None}, V)

    def _cluster(self):
        """The Ray cluster for ``--ray`` (started or joined here, before any work), else nothing."""
        if self.ray is None:
            from contextlib import nullcontext

            return nullcontext()
        from unspeakable.engine.cluster import Cluster

        return Cluster(address=None if self.ray == "local" else self.ray, num_cpus=self.ray_cpus,
                       max_in_flight=self.max_in_flight, object_store_memory=self.object_store_memory).start()

    def _scan_one(self, source: str, out, csv, plot, html, cluster):
        from unspeakable.engine.pipeline import scan_head

        head, load_time = _load(source, self.vocab)
        ids = None if self.tokens is None else self.tokens.ids(head.d_vocab)
        volume = self._volume_options(head.d_vocab)
        checkpoint = None if not out else out + ".partial"
        try:
            report = scan_head(head, domain=self.domain, radius=self.radius, bias=self.bias, tokens=ids,
                               device=self.device, backend=self.backend, precision=self.precision,
                               verify=self.verify, workers=self.workers, memory=self.memory,
                               checkpoint=checkpoint, resume=self.resume, progress=sys.stderr.isatty(),
                               load_time=load_time, keep_checkpoint=True, cluster=cluster, volume=volume)
        except KeyboardInterrupt:
            if checkpoint and os.path.exists(checkpoint):
                print(f"unspeakable: interrupted; decided tokens are kept in {checkpoint}: "
                      f"rerun with --resume to continue", file=sys.stderr)
            raise
        t0 = time.perf_counter()
        _enrich(report, head, domain=self.domain, radius=self.radius, bias=self.bias, backend=self.backend,
                device=self.device)
        t1 = time.perf_counter()
        _warn(report.warnings)
        _print(report)
        _write_reports(report, out, csv, plot, html)
        # Only now is the progress safe to drop: a failed report write leaves OUT.partial for --resume.
        if checkpoint:
            remove_checkpoint(checkpoint)
        print(f"unspeakable: {time_line(report.timings_s, t1 - t0, time.perf_counter() - t1)}", file=sys.stderr)
        return report

    def _run_many(self, sources: list[str]) -> int:
        """Several models as one job: ``DIR/<name>.json`` each as it finishes (``DIR/<name>.json.partial``
        while it runs), ``DIR/summary.json`` rewritten after each, a summary table at the end."""
        single = {"--out": self.out, "--csv": self.csv, "--plot": self.plot, "--html": self.html}
        given = [k for k, v in single.items() if v]
        if given:
            raise InputError(f"{', '.join(given)} name one model's files; with several sources use --out-dir DIR")
        if not self.out_dir:
            raise InputError("several sources need --out-dir DIR (DIR/<name>.json per model, DIR/summary.json)")
        if not os.path.isdir(self.out_dir) or not os.access(self.out_dir, os.W_OK | os.X_OK):
            raise InputError(f"--out-dir {self.out_dir}: not an existing, writable directory")
        names = safe_names(sources)
        for src, name in zip(sources, names):
            check_outputs((src, self.vocab), out=os.path.join(self.out_dir, name + ".json"))
        self._check()
        rows = []
        with self._cluster() as cluster:
            for src, name in zip(sources, names):
                out = os.path.join(self.out_dir, name + ".json")
                done = self.resume and os.path.isfile(out) and not os.path.exists(out + ".partial")
                rep = _read_report(out) if done else self._scan_one(src, out, None, None, None, cluster)
                rows.append(summary_row(src, out, rep, resumed=done))
                _write_summary(os.path.join(self.out_dir, "summary.json"), rows)
        print(format_summary(rows))
        return 0


@dataclass
class Gram:
    """The seed-faithful gram screen only: hard-to-speak tokens, argmax_j u_t·u_j."""

    source: str
    center: bool | None = None
    device: str = "auto"
    backend: str = "auto"
    out: str | None = None
    html: str | None = None
    vocab: str | None = None

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", help=_SOURCE_HELP)
        p.add_argument("--center", action=argparse.BooleanOptionalAction, default=None,
                       help="centre the rows TransformerLens-style (default: yes for models, no for files); "
                            "the report shows both counts")
        _device_args(p)
        p.add_argument("--out", help="write the report JSON (gram fields only) here")
        p.add_argument("--html", help="write a self-contained HTML page of the report here")
        _vocab_arg(p)

    def run(self) -> int:
        check_outputs((self.source, self.vocab), out=self.out, html=self.html)
        _check_vocab(self.vocab)
        _check_backend(self.backend, self.device)
        from unspeakable.engine.pipeline import gram_head

        head, load_time = _load(self.source, self.vocab)
        report = gram_head(head, center=self.center, device=self.device, backend=self.backend, load_time=load_time)
        _enrich(report, head, center=self.center, backend=self.backend, device=self.device)
        _warn(report.warnings)
        _print(report)
        _write_reports(report, self.out, html=self.html)
        return 0


@dataclass
class Check:
    """Decide the given tokens with the full machinery and print their certificates."""

    source: str
    token: list[str]
    domain: str | None = None
    radius: float | None = None
    bias: bool = True
    vocab: str | None = None

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", help=_SOURCE_HELP)
        p.add_argument("token", nargs="+", help="token ids, ranges (100-200) or exact token texts (decoded or raw)")
        _domain_args(p)
        _vocab_arg(p)

    def run(self) -> int:
        _check_vocab(self.vocab)
        from unspeakable.engine.report import format_certificate, format_tokens
        from unspeakable.engine.pipeline import check

        head, _ = _load(self.source, self.vocab)
        ids = self._ids(head)
        try:
            from unspeakable.engine.loader import fold

            _warn(fold(head, domain=self.domain, radius=self.radius, bias=self.bias).warnings)
        except ImportError:  # pragma: no cover - the warnings are a courtesy
            pass
        reports = check(head, [int(t) for t in ids], domain=self.domain, radius=self.radius, bias=self.bias)
        print(f"unspeakable check: {head.source}  V={head.d_vocab}  d={head.d_model}")
        print("\n".join(format_tokens(reports, max_rows=len(reports))))
        print()
        for r in reports:
            print(f"{r.id:>7}  {r.verdict}: {format_certificate(r.certificate)}")
        return 0

    def _ids(self, head) -> np.ndarray:
        V = head.d_vocab
        out = []
        for tok in self.token:
            try:
                spec = parse_tokens(tok)
            except ValueError:
                spec = None
            if spec is not None:
                out.append(spec.ids(V))
                continue
            hits = [i for i, s in enumerate(head.texts or ()) if s == tok]
            if not hits:  # the raw vocabulary entry ("Ġthe") when the decoded text did not match
                hits = [i for i, s in enumerate(getattr(head, "tokens", None) or ()) if s == tok]
            if len(hits) != 1:
                why = "no tokenizer is known for this source" if head.texts is None else (
                    "no token has this text" if not hits else f"{len(hits)} tokens have this text: {hits[:10]}")
                raise InputError(f"token {tok!r} is neither an id, a range nor one token's text ({why})")
            out.append(np.array(hits, dtype=np.int64))
        return np.unique(np.concatenate(out))


@dataclass
class Bench:
    """Wall time and throughput per stage of one scan on this head."""

    source: str
    tokens: TokenSpec | None = None
    json: bool = False

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", help="a .npz/.safetensors file, a model name or directory, or synthetic:...")
        p.add_argument("--tokens", type=_token_spec_arg, help="bench only these ids, e.g. 1,5,100-200")
        p.add_argument("--json", action="store_true", help="print the measurements as JSON")

    def run(self) -> int:
        from unspeakable.engine.report import to_jsonable
        from unspeakable.engine.pipeline import bench_head

        head, _ = _load(self.source)
        ids = None if self.tokens is None else self.tokens.ids(head.d_vocab)
        result = to_jsonable(bench_head(head, tokens=ids))
        if self.json:
            print(json.dumps(result, indent=1, allow_nan=False))
            return 0
        for key, value in result.items():
            if isinstance(value, dict):
                value = "  ".join(f"{k}={_num(v)}" for k, v in value.items())
            print(f"{key:>20}: {_num(value)}")
        return 0


@dataclass
class Demo:
    """Scan the built-in GPT-2-shaped synthetic head (planted tokens included) in the layernorm domain."""

    source: str = DEMO_SOURCE
    out: str | None = None
    csv: str | None = None
    plot: str | None = None
    html: str | None = None

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", default=DEMO_SOURCE, help=f"override the demo head (default {DEMO_SOURCE})")
        _report_args(p)

    def run(self) -> int:
        return Scan(source=self.source, domain="layernorm", out=self.out, csv=self.csv, plot=self.plot,
                    html=self.html).run()


@dataclass
class Audit:
    """Re-derive every claim of a saved report (schema unspeakable.report/1) from the weights alone.

    Checks witnesses, dual/cone/zero certificates, ties, stated margin bounds and counts with a checker that
    trusts nothing of the engine (engine/audit.py). Prints one line per failed claim and a summary.
    Exit 0: every claim holds; 1: some claim fails; 2: bad input.
    """

    report: str
    source: str
    sample: int | None = None
    seed: int = 0

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("report", help="a report JSON written by scan --out (schema unspeakable.report/1)")
        p.add_argument("source", help="the weights the report was made from (same forms as scan's SOURCE)")
        p.add_argument("--sample", type=_positive_int, help="audit a random sample of N claims (counts always)")
        p.add_argument("--seed", type=_seed, default=0, help="seed of --sample (default 0)")

    def run(self) -> int:
        from unspeakable.engine.auditor import audit

        result = audit(self.report, self.source, sample=self.sample, seed=self.seed)
        for line in result.failures:
            print(line)
        for note in result.notes:
            print(f"note: {note}")
        print(result.summary())
        return 0 if result.ok else 1


@dataclass
class Volume:
    """The share of the norm's output set on which each token wins, with intervals and a proven lower bound.

    One plain sampling pass serves every token; listed tokens (--tokens) that it hits fewer than 100 times
    are estimated by multilevel splitting, and get a rigorous lower bound from a proven cap inside their
    region. Without --tokens every token gets the plain pass's estimate only.
    """

    source: str
    tokens: TokenSpec | None = None
    domain: str | None = None
    radius: float | None = None
    bias: bool = True
    samples: int = 65536
    seed: int = 0
    confidence: float = 0.95
    particles: int | None = None  # None: engine.volume.SplitOptions' own defaults
    replicates: int | None = None
    out: str | None = None
    csv: str | None = None
    html: str | None = None
    vocab: str | None = None

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("source", help=_SOURCE_HELP)
        p.add_argument("--tokens", type=_token_spec_arg, help="estimate and bound these ids, e.g. 1,5,100-200 "
                                                              "(default: all, from the plain pass alone)")
        _domain_args(p)
        p.add_argument("--samples", type=_nonnegative_int, default=65536,
                       help="plain uniform samples over all V (default 65536; 0: split every listed token)")
        p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
        p.add_argument("--confidence", type=_probability, default=0.95, help="of the intervals (default 0.95)")
        p.add_argument("--particles", type=_positive_int, help="splitting: particles per replicate (default: "
                                                                "engine.volume.SplitOptions', 64)")
        p.add_argument("--replicates", type=_positive_int,
                       help="splitting: independent replicates (>= 2; their spread gives the interval; default 8)")
        p.add_argument("--out", help="write the JSON (schema unspeakable.volume/1) here")
        p.add_argument("--csv", help="write one row per token as CSV here")
        p.add_argument("--html", help="write a self-contained page (histogram of log10 share, token table) here")
        _vocab_arg(p)

    def run(self) -> int:
        check_outputs((self.source, self.vocab), out=self.out, csv=self.csv, html=self.html)
        _check_vocab(self.vocab)
        if self.replicates is not None and self.replicates < 2:
            raise InputError(f"--replicates {self.replicates}: need at least 2 (their spread gives the interval)")
        if self.particles is not None and self.particles < 2:
            raise InputError(f"--particles {self.particles}: need at least 2")
        import importlib

        vol = importlib.import_module("unspeakable.engine.volume")  # the module: the package re-exports the function

        if self.tokens is None and self.samples == 0:
            raise InputError("--samples 0 needs --tokens: without a token list the plain pass is the only estimate")
        head, _ = _load(self.source, self.vocab)
        ids = None if self.tokens is None else self.tokens.ids(head.d_vocab)
        say = (lambda m: print(f"unspeakable: {m}", file=sys.stderr)) if sys.stderr.isatty() else None
        report = vol.volume(head, ids, domain=self.domain, radius=self.radius, bias=self.bias, samples=self.samples,
                            seed=self.seed, confidence=self.confidence, progress=say,
                            split=vol.SplitOptions(**{k: v for k, v in (("particles", self.particles),
                                                                        ("replicates", self.replicates)) if v is not None}))
        if self.tokens is None:
            few = sum(1 for t in report.tokens if (t.hits or 0) < 100)
            if few:
                report.warnings.append(f"{few} of {report.V} tokens had fewer than 100 of the {self.samples} plain "
                                       f"samples: their interval is the binomial one (open below with no hit); list "
                                       f"them with --tokens for splitting estimates and the proven cap bound")
        _warn(report.warnings)
        _show(lambda: print(vol.format_table(report)))
        from unspeakable.engine.report import write_together

        with write_together():  # all or none of them
            if self.csv:
                vol.write_csv(report, self.csv)
            if self.html:
                vol.write_html(report, self.html)
            if self.out:
                vol.write_json(report, self.out)
        t = report.timings_s
        print(f"unspeakable: time: sampling {t.get('sampling', 0):.1f} s, splitting {t.get('splitting', 0):.1f} s, "
              f"lower bounds {t.get('lower_bound', 0):.1f} s; {t.get('total', 0):.1f} s in all", file=sys.stderr)
        return 0


def _probability(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}") from None
    if not (0 < x < 1):
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {s!r}")
    return x


def _num(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def _domain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", choices=tuple(DOMAINS), help="default: the source's norm; cone when it has none")
    p.add_argument("--radius", type=_positive_float, help="R for layernorm/rmsnorm (default sqrt(d_model)), rho for box")
    p.add_argument("--no-bias", dest="bias", action="store_false", help="ignore b_U and the norm's bias")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="write the report JSON (schema unspeakable.report/1) here")
    p.add_argument("--csv", help="write the listed tokens as CSV here")
    p.add_argument("--plot", help="write a figure of the margins here (.png, .pdf, .svg, ...)")
    p.add_argument("--html", help="write a self-contained HTML page (counts, figure, sortable token table) here")


_SOURCE_HELP = ("a .npz/.safetensors/.pt/.gguf file, a Hugging Face checkpoint directory, a model name in the local "
                "Hugging Face cache, or synthetic:V=..,d=..,seed=..")


def _bytes_arg(s: str) -> int:
    m = re.match(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?\s*$", s, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size in bytes like 2000000000, 2G or 512M, got {s!r}")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index((m.group(2) or "_").upper()))


def _volume_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "volume (how precisely must the model point? the share of the norm's output set each token wins)",
        "--volume adds a log10_share column to the report, the CSV, the console table and the page (with a histogram "
        "of log10 share). Every listed token gets an entry: a token proven unspeakable owns share 0 (method "
        "'unspeakable', no estimate; identical rows split their cell, method 'tie'); the others get the estimate and "
        "binomial interval of one plain sampling pass over all V (one GEMM pass); the tokens split — by default the "
        "--volume-hardest listed speakable tokens with the smallest margin_lower — also get multilevel splitting and "
        "a proven cap bound (2-15 s per rare token on a 2-core CPU: 1.9 s for a random SmolLM2 token, 13 s for "
        "MiniLM's hardest). `unspeakable volume` has more knobs.")
    g.add_argument("--volume", action="store_true", help="add each listed token's share (runs after the verdicts)")
    g.add_argument("--volume-tokens", type=_token_spec_arg, metavar="SPEC",
                   help="split and cap-bound these ids (listed by the scan) instead of the hardest, e.g. 5,100-110")
    g.add_argument("--volume-hardest", type=_nonnegative_int, metavar="N",
                   help="split and cap-bound the N listed speakable tokens with the smallest margin_lower (default 10)")
    g.add_argument("--volume-samples", type=_positive_int, metavar="N",
                   help="plain uniform samples over all V (default 65536)")
    g.add_argument("--volume-seed", type=_seed, metavar="S", help="random seed of the volume pass (default 0)")


def _ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (pip install -e \".[ray]\")")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the screens and the open tokens as Ray tasks: on the cluster at ADDRESS (HOST:PORT, "
                        "ray://HOST:PORT or auto), or on a local Ray started here when no ADDRESS is given")
    g.add_argument("--max-in-flight", type=_positive_int, metavar="N", help="Ray tasks submitted at a time (default 2 x CPUs)")
    g.add_argument("--ray-cpus", type=_positive_int, metavar="N", help="CPUs of the local Ray (default: all)")
    g.add_argument("--object-store-memory", type=_bytes_arg, metavar="BYTES",
                   help="object store bytes of the local Ray (default: Ray's, 30%% of memory)")


# --------------------------------------------------------------------------------------------- many models
def expand_sources(source) -> list[str]:
    """SOURCE arguments with ``@FILE`` replaced by the file's lines (blank lines and ``#`` comments skipped)."""
    out = []
    for s in [source] if isinstance(source, str) else source:
        if not s.startswith("@"):
            out.append(s)
            continue
        try:
            with open(os.path.expanduser(s[1:]), encoding="utf-8") as f:
                lines = [ln.strip() for ln in f]
        except OSError as e:
            raise InputError(f"cannot read the source list {s[1:]}: {e.strerror or e}") from None
        out.extend(ln for ln in lines if ln and not ln.startswith("#"))
    if not out:
        raise InputError("no source given (the source list is empty)")
    return out


def safe_names(sources: list[str]) -> list[str]:
    """A file name per source: its base name without extension (a model name with / as __), characters
    outside [A-Za-z0-9._-] as _, repeats numbered -2, -3, ..."""
    names, seen = [], {}
    for src in sources:
        base = src.rstrip("/\\")
        base = os.path.basename(base) if os.path.exists(os.path.expanduser(base)) else base.replace("/", "__")
        base = re.sub(r"\.(npz|safetensors|pt|gguf)$", "", base, flags=re.IGNORECASE)
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "model"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def summary_row(source: str, out: str, report, resumed: bool = False) -> dict:
    return {"source": source, "report": out, "V": int(report.V), "d": int(report.d), "domain": report.domain,
            **{k: int(report.counts.get(k, 0)) for k in ("tokens", "hard_to_speak", "speakable", "unspeakable",
                                                        "undecided")},
            "total_s": float(report.timings_s.get("total", 0.0)), "resumed": bool(resumed)}


def _read_report(path: str):
    from unspeakable.engine.report import read_json

    try:
        return read_json(path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"--resume: cannot read the finished report {path}: {e}") from None


def _write_summary(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"schema": "unspeakable.summary/1", "models": rows}, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def format_summary(rows: list[dict]) -> str:
    head = f"{'source':<40} {'V':>7} {'d':>5} {'domain':<9} {'hard':>6} {'speak':>7} {'unspeak':>7} {'undec':>5} {'s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        src = r["source"] if len(r["source"]) <= 40 else "…" + r["source"][-39:]
        lines.append(f"{src:<40} {r['V']:>7} {r['d']:>5} {r['domain']!s:<9} {r['hard_to_speak']:>6} "
                     f"{r['speakable']:>7} {r['unspeakable']:>7} {r['undecided']:>5} {r['total_s']:>7.1f}")
    return "\n".join(lines)


def _vocab_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", help="token texts from this file: a JSON list of strings, or a Hugging Face "
                                   "tokenizer.json / vocab.json / vocab.txt")


def _check_vocab(vocab: str | None) -> None:
    if vocab is not None and not os.path.isfile(os.path.expanduser(vocab)):
        raise InputError(f"--vocab {vocab}: no such file")


COMMANDS = {"scan": Scan, "gram": Gram, "check": Check, "bench": Bench, "demo": Demo, "audit": Audit, "volume": Volume}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unspeakable",
        description="Prove, token by token, whether any hidden state can make a token the argmax of the logits.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, cls in COMMANDS.items():
        p = sub.add_parser(name, help=cls.__doc__.splitlines()[0], description=cls.__doc__)
        cls.add_args(p)
        p.set_defaults(_cls=cls)
    return parser


def main(args: list[str] | None = None) -> int:
    """Console entry point: ``unspeakable`` (setup.py) and ``python -m unspeakable``. Returns the exit status."""
    try:
        ns = build_parser().parse_args(args)
    except SystemExit as e:  # argparse has printed usage and the error (status 2), or --help (status 0)
        return int(e.code or 0)
    from unspeakable.kernels import BackendError

    cls = ns._cls
    command = cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})
    try:
        status = command.run()
        sys.stdout.flush()  # here, not at the interpreter's exit, where a closed pipe could not be answered
        return status
    except (InputError, BackendError) as e:
        print(f"unspeakable: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unspeakable: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`| head`) while stdout was all the command made:
        _stdout_to_devnull()  # quiet, status 1 (scan and volume instead finish their files: _show)
        return 1


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what the closed pipe did not take raises
    nothing more (Python's documented recipe for SIGPIPE); a stdout without a descriptor is left alone."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
