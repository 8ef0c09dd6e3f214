"""The scan's state: one :class:`Ledger` per scan, written through one method, :meth:`Ledger.record`.

It holds, for the scanned token ids, the verdict codes, the verified bounds (in the caller's units), the
listed :class:`~engine.report.TokenReport` entries and the time spent per token, and appends every settled
token to the :class:`Checkpoint` (when there is one). Resume goes through the same ``record``.

The checkpoint is a JSON-lines file: a header ``{"schema", "fingerprint", "d"}`` then one token report per
line, appended and fsync'd per batch (cost linear in the tokens settled, not quadratic). Witness points do
not go into the JSON: each is one binary row of ``d`` float64 values appended to ``PATH.x`` (written and
fsync'd before the lines that cite it), and its certificate reads ``"x": {"row": i}``. A real head's tens of
thousands of witnesses cost ``8·d`` bytes each instead of ~20 bytes per coordinate as JSON text. A torn last
line or row (a crash mid-write) is ignored on resume (that token is decided again); a header that does not
match the input is refused. Restored records are claims, not verdicts: the pipeline re-verifies each.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from unspeakable.engine.head import VERDICT_CODE, InputError, row_chunks
from unspeakable.engine.report import TokenReport, to_jsonable

# 3: the fold residual in the fingerprint, both bounds' evidence; 4: witness points as binary rows (PATH.x)
CHECKPOINT_SCHEMA = "unspeakable.checkpoint/4"
READABLE_SCHEMAS = (CHECKPOINT_SCHEMA,)  # a record may still hold its witness inline, as a JSON list


def checkpoint_files(path: str) -> tuple[str, str]:
    """The checkpoint's two files: the JSON lines and the witness rows."""
    return path, path + ".x"


def fingerprint(problem) -> str:
    """What a checkpoint belongs to: the folded rows, bias, domain and radius."""
    h = hashlib.sha256()
    # the arrays' own buffers: .tobytes() would be a transient copy of the V × d rows
    for _, a in row_chunks(problem.rows):  # the same bytes in row order, derived rows included
        h.update(np.ascontiguousarray(a).data)
    h.update(np.ascontiguousarray(problem.bias).data)
    for a in (problem.rows_lo, problem.row_err, problem.bias_lo, problem.bias_err):  # the fold's residual
        h.update(b"-" if a is None else np.ascontiguousarray(a).data)
    h.update(f"{problem.domain.name}|{problem.radius!r}|{problem.bias_used}|{problem.margin_exp}|"
             f"{problem.x_exp}".encode())
    return h.hexdigest()


class Checkpoint:
    """Settled tokens appended to ``path`` (JSON lines; witness rows in ``path.x``), read back into ``stored``."""

    def __init__(self, path: str | None, fp: str, resume: bool, d: int = 0):
        self.path, self.fp, self.d = path, fp, int(d)
        self.stored: dict[int, dict] = {}
        self.rows = 0  # witness rows in path.x
        if not path:
            return
        self.xpath = checkpoint_files(path)[1]
        if resume and os.path.exists(path):
            self.stored, self.rows = self._read(path, self.xpath, fp, self.d)
            with open(self.xpath, "ab") as f:  # drop a torn row, so that appended rows keep their numbers
                f.truncate(self.rows * 8 * self.d)
        else:
            with open(self.xpath, "wb") as f:
                f.flush()
                os.fsync(f.fileno())
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"schema": CHECKPOINT_SCHEMA, "fingerprint": fp, "d": self.d}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _read(path: str, xpath: str, fp: str, d: int) -> tuple[dict[int, dict], int]:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            head = json.loads(lines[0])
        except (OSError, ValueError, IndexError) as e:
            raise InputError(f"cannot resume from {path}: {e}") from e
        if not isinstance(head, dict) or head.get("schema") not in READABLE_SCHEMAS or head.get("fingerprint") != fp:
            raise InputError(f"cannot resume from {path}: it belongs to a different input or settings")
        rows = np.zeros((0, d))
        if os.path.exists(xpath) and d > 0:
            raw = np.fromfile(xpath, dtype="<f8")
            rows = raw[: raw.size - raw.size % d].reshape(-1, d)
        stored = {}
        for ln in lines[1:]:
            try:
                rec = json.loads(ln)
            except ValueError:
                continue  # a torn last line: that token is simply decided again
            if not (isinstance(rec, dict) and isinstance(rec.get("id"), int) and not isinstance(rec["id"], bool)):
                continue
            cert = rec.get("certificate")
            x = cert.get("x") if isinstance(cert, dict) else None
            if isinstance(x, dict):  # a witness row of path.x; one that is missing (torn) is decided again
                i = x.get("row")
                if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < rows.shape[0]):
                    continue
                cert["x"] = rows[i].tolist()
            stored[rec["id"]] = rec
        return stored, int(rows.shape[0])

    def append(self, reports: list[TokenReport]) -> None:
        if not self.path or not reports:
            return
        recs, X = [], []
        for r in reports:
            rec = to_jsonable(r.__dict__)  # a new dict: the caller's report is left as it is
            cert = rec.get("certificate")
            x = cert.get("x") if isinstance(cert, dict) else None
            if isinstance(x, list) and len(x) == self.d and self.d > 0:
                cert["x"] = {"row": self.rows + len(X)}
                X.append(x)
            recs.append(rec)
        if X:
            with open(self.xpath, "ab") as f:
                f.write(np.asarray(X, dtype="<f8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            self.rows += len(X)
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        if self.path:
            remove_checkpoint(self.path)


def remove_checkpoint(path: str) -> None:
    for f in checkpoint_files(path):
        if os.path.exists(f):
            os.remove(f)


class Ledger:
    """Verdicts and verified bounds of the scanned ids; see the module docstring."""

    def __init__(self, ids: np.ndarray, checkpoint: Checkpoint | None = None):
        self.ids = ids
        self.pos = {int(t): i for i, t in enumerate(ids)}
        self.verdict = np.zeros(ids.size, dtype=np.int8)
        self.lower = np.full(ids.size, np.nan)
        self.upper = np.full(ids.size, np.nan)
        self.listed: dict[int, TokenReport] = {}
        self.checkpoint = checkpoint

    def record(self, reports: list[TokenReport], *, persist: bool = True, listed: bool = True) -> None:
        """Enter token reports (verdict, bounds, certificate, time) and append them to the checkpoint.
        ``listed=False``: count the verdict and bounds only (a screen-settled token that is not listed)."""
        for r in reports:
            i = self.pos[r.id]
            self.verdict[i] = VERDICT_CODE.get(r.verdict, 0)
            self.lower[i] = np.nan if r.margin_lower is None else r.margin_lower
            self.upper[i] = np.nan if r.margin_upper is None else r.margin_upper
            if listed:
                self.listed[r.id] = r
        if persist and self.checkpoint is not None:
            self.checkpoint.append(reports)

    def settled(self, t: int) -> bool:
        return self.verdict[self.pos[int(t)]] != 0 or int(t) in self.listed

    def open_ids(self) -> np.ndarray:
        return np.array([t for t in self.ids if not self.settled(t)], dtype=np.int64)

    def counts(self) -> dict:
        return {"speakable": int((self.verdict == 1).sum()), "unspeakable": int((self.verdict == -1).sum()),
                "undecided": int((self.verdict == 0).sum())}
