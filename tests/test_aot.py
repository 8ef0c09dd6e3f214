"""Ahead-of-time build of every kernel configuration for sm_80 and sm_90, without a GPU.

``python -m unspeakable.kernels.aot --json`` runs in its own process: compiling needs triton imported compiled, and
the interpreter tests import it interpreted (Triton makes that choice once per process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Per-block limits: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100); 255 registers per thread.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}


@pytest.fixture(scope="module")
def aot():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "unspeakable.kernels.aot", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_configuration_compiles_for_both_targets(aot):
    # Imported here, not at the top: importing triton during collection would decide, for the whole
    # session, that it is compiled, and push the interpreter tests into a subprocess.
    from unspeakable.kernels import triton_top2 as tt

    want = {(f"sm_{cc}{'a' if cc >= 90 else ''}", p, c.name) for cc in (80, 90) for p in tt.PRECISIONS
            for c in tt.configs_for(cc, p)}
    got = {(r["target"], r["precision"], r["config"]) for r in aot}
    assert got == want and len(aot) == len(want)
    for r in aot:
        assert {"kernel", "target", "registers", "spills_bytes", "shared_bytes", "mma", "wgmma"} <= set(r)


def test_no_configuration_spills(aot):
    for r in aot:
        assert r["spills_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
        # ptxas -v on the PTX and the cubin Triton built agree: the report describes what would run.
        assert r["registers"] == r["cubin_registers"], r
        assert 0 < r["shared_bytes"] <= SHARED_LIMIT[r["target"]], r


def test_tensor_core_instructions(aot):
    for r in aot:
        if r["precision"] == "ieee":
            assert not r["mma"] and not r["wgmma"], r  # fp32 FMA, no tensor cores
        elif r["target"] == "sm_90a":
            assert r["wgmma"], r  # Hopper warpgroup MMA
        else:
            assert r["mma"] and not r["wgmma"], r  # Ampere mma.sync
    assert any(r["precision"] == "tf32" and r["target"] == "sm_90a" and r["wgmma"] for r in aot)
    assert any(r["precision"] == "tf32" and r["target"] == "sm_80" and r["mma"] for r in aot)
