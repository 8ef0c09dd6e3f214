"""Pipeline properties: --resume ends with the same report as an uninterrupted scan; verdicts do not
depend on the worker count."""
import importlib
import json
import os

import numpy as np
import pytest

from engine.load import load

es = importlib.import_module("engine.scan")  # the module (the package re-exports a function engine.scan)

SOURCE = "synthetic:V=800,d=12,seed=9"


def test_resume_after_interruption_gives_the_same_report(tmp_path, monkeypatch):
    head = load(SOURCE)
    clean = es.scan_head(head, domain="box", device="cpu", backend="torch")
    ckpt = str(tmp_path / "r.json.partial")
    calls = {"n": 0}
    real = es._record

    def record_then_die(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(es, "_record", record_then_die)
    with pytest.raises(KeyboardInterrupt):
        es.scan_head(head, domain="box", device="cpu", backend="torch", checkpoint=ckpt)
    monkeypatch.setattr(es, "_record", real)
    saved = json.load(open(ckpt))["tokens"]
    assert 0 < len(saved) < len(clean.tokens)
    resumed = es.scan_head(head, domain="box", device="cpu", backend="torch", checkpoint=ckpt, resume=True)
    assert np.array_equal(clean.verdicts_all, resumed.verdicts_all)
    strip = lambda rep: [(t.id, t.verdict, t.reason, t.hard_to_speak, t.gram_argmax) for t in rep.tokens]  # noqa: E731
    assert strip(clean) == strip(resumed)
    assert clean.counts == resumed.counts
    assert not os.path.exists(ckpt)  # a finished scan removes its checkpoint
    # a checkpoint from other settings is refused, not silently reused
    p = tmp_path / "other.partial"
    p.write_text(json.dumps({"schema": es.CHECKPOINT_SCHEMA, "fingerprint": "x", "tokens": {}}))
    with pytest.raises(es.InputError):
        es.scan_head(head, domain="box", device="cpu", backend="torch", checkpoint=str(p), resume=True)


def test_verdicts_do_not_depend_on_workers():
    head = load(SOURCE)
    one = es.scan_head(head, domain="box", device="cpu", backend="torch", workers=1)
    two = es.scan_head(head, domain="box", device="cpu", backend="torch", workers=2)
    assert np.array_equal(one.verdicts_all, two.verdicts_all)
    assert one.counts["undecided"] == 0
