"""The engine's verdicts are identical whichever backend screened (issue 3). Triton runs in its CPU
interpreter here, in a subprocess because interpreter mode is fixed when triton is first imported."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unspeakable.engine.loader import load
from unspeakable.engine.pipeline import scan_head

SOURCE = "synthetic:V=200,d=16,seed=5"  # planted tokens of every kind; 13 interpreter tiles (16 rows), the last ragged; the interpreter is slow
DOMAINS = ("layernorm", "cone")
# One interpreter process scans every domain (each process pays the torch and triton imports).
SCRIPT = """
import json, sys
from unspeakable.engine.loader import load
from unspeakable.engine.pipeline import scan_head
head = load(sys.argv[1])
out = {}
for domain in sys.argv[3:]:
    rep = scan_head(head, domain=domain, device="cpu", backend=sys.argv[2])
    out[domain] = {"backend": rep.backend, "verdicts": [int(v) for v in rep.verdicts_all],
                   "hard": [t.id for t in rep.tokens if t.hard_to_speak]}
print(json.dumps(out))
"""


def run_sub(domains, backend):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT, SOURCE, backend, *domains], env=env, capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_triton_interpreter_and_torch_give_identical_verdicts():
    triton = run_sub(DOMAINS, "triton")
    assert set(triton) == set(DOMAINS)
    head = load(SOURCE)
    for domain in DOMAINS:
        ref = scan_head(head, domain=domain, device="cpu", backend="torch")
        tri = triton[domain]
        assert tri["backend"] == "triton"
        assert tri["verdicts"] == [int(v) for v in ref.verdicts_all]
        assert tri["hard"] == [t.id for t in ref.tokens if t.hard_to_speak]
        assert np.all(np.asarray(ref.verdicts_all) != 0)


def test_precision_is_resolved_in_one_place():
    import torch

    from unspeakable.kernels import BackendError, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", "torch", cpu) == "ieee"  # the CPU's float32 is IEEE
    assert resolve_precision("tf32", "triton", cpu) == "tf32"  # the interpreter: a looser bound, same result
    with pytest.raises(BackendError, match="needs the triton backend"):
        resolve_precision("bf16", "torch", cpu)
    with pytest.raises(BackendError, match="unknown precision"):
        resolve_precision("fp8", "triton", cpu)
