"""The scan's state: one :class:`Ledger` per scan, written through one method, :meth:`Ledger.record`.

It holds, for the scanned token ids, the verdict codes, the verified bounds (in the caller's units), the
listed :class:`~engine.report.TokenReport` entries and the time spent per token, and appends every settled
token to the :class:`Checkpoint` (when there is one). Resume goes through the same ``record``.

The checkpoint is a JSON-lines file: a header ``{"schema", "fingerprint"}`` then one token report per line,
appended and fsync'd per batch (cost linear in the tokens settled, not quadratic). A torn last line (a
crash mid-write) is ignored on resume; a header that does not match the input is refused.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from unspeakable.engine.head import VERDICT_CODE, InputError
from unspeakable.engine.report import TokenReport, to_jsonable

CHECKPOINT_SCHEMA = "unspeakable.checkpoint/3"  # 3: the fold residual in the fingerprint; both bounds' evidence


def fingerprint(problem) -> str:
    """What a checkpoint belongs to: the folded rows, bias, domain and radius."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(problem.rows).tobytes())
    h.update(np.ascontiguousarray(problem.bias).tobytes())
    for a in (problem.rows_lo, problem.row_err, problem.bias_lo, problem.bias_err):  # the fold's residual
        h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    h.update(f"{problem.domain.name}|{problem.radius!r}|{problem.bias_used}|{problem.margin_exp}|"
             f"{problem.x_exp}".encode())
    return h.hexdigest()


class Checkpoint:
    """Settled tokens appended to ``path`` (JSON lines), read back by :meth:`restore`."""

    def __init__(self, path: str | None, fp: str, resume: bool):
        self.path, self.fp = path, fp
        self.stored: dict[int, dict] = {}
        if not path:
            return
        if resume and os.path.exists(path):
            self.stored = self._read(path, fp)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"schema": CHECKPOINT_SCHEMA, "fingerprint": fp}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _read(path: str, fp: str) -> dict[int, dict]:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            head = json.loads(lines[0])
        except (OSError, ValueError, IndexError) as e:
            raise InputError(f"cannot resume from {path}: {e}") from e
        if not isinstance(head, dict) or head.get("schema") != CHECKPOINT_SCHEMA or head.get("fingerprint") != fp:
            raise InputError(f"cannot resume from {path}: it belongs to a different input or settings")
        stored = {}
        for ln in lines[1:]:
            try:
                rec = json.loads(ln)
            except ValueError:
                continue  # a torn last line: that token is simply decided again
            if isinstance(rec, dict) and isinstance(rec.get("id"), int):
                stored[rec["id"]] = rec
        return stored

    def append(self, reports: list[TokenReport]) -> None:
        if not self.path or not reports:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for r in reports:
                f.write(json.dumps(to_jsonable(r.__dict__), allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


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
