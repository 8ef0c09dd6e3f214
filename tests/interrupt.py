"""A scan that 'crashes' part-way (for the checkpoint and --resume tests)."""
from unspeakable.engine.ledger import Ledger


def crash_after(monkeypatch, after: int = 2):
    """Make ``Ledger.record`` raise KeyboardInterrupt right after its ``after``-th persisted batch: the scan
    dies as a killed process would, its checkpoint kept. Returns the real ``record`` (to restore it)."""
    real, calls = Ledger.record, {"n": 0}

    def record_then_die(self, reports, **k):
        real(self, reports, **k)
        if k.get("persist", True) and reports:
            calls["n"] += 1
            if calls["n"] == after:
                raise KeyboardInterrupt

    monkeypatch.setattr(Ledger, "record", record_then_die)
    return real
