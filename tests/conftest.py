"""Shared fixtures: offline switches, and the oracles and instance builders several test modules use."""
import os

import numpy as np
import pytest
from scipy.optimize import linprog

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _random_problem(V, d, seed, domain, bias=True):
    """Gaussian rows with lognormal norms around a shared offset, folded onto ``domain``."""
    from unspeakable.engine.loader import problem_from_rows

    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((V, d)) * np.exp(rng.normal(0, 0.3, (V, 1))) + 2.0 * rng.standard_normal(d)
    b = rng.normal(0, 0.5, V) if bias else None
    return problem_from_rows(rows, b, domain)


def _full_lp_margin(keys, bias, t, domain, radius):
    """The margin by one full-size LP over all V rows (balls: an inscribed / circumscribed sandwich)."""
    V, d = keys.shape
    others = np.array([j for j in range(V) if j != t])
    A = np.hstack([-(keys[t] - keys[others]), np.ones((others.size, 1))])
    ub = bias[t] - bias[others]
    if domain == "box":
        res = linprog(np.r_[np.zeros(d), -1.0], A_ub=A, b_ub=ub,
                      bounds=[(-radius, radius)] * d + [(None, None)], method="highs")
        assert res.status == 0
        return -res.fun, -res.fun
    if domain == "cone":
        res = linprog(np.r_[np.zeros(d), -1.0], A_ub=A, b_ub=np.zeros(others.size), A_eq=np.r_[keys[t], 0.0][None],
                      b_eq=[1.0], bounds=[(None, None)] * d + [(None, 1.0)], method="highs")
        assert res.status == 0
        return -res.fun, -res.fun
    # ball (d = 2 or 3): sandwich between an inscribed and a circumscribed polytope
    n_dir = 720 if d == 2 else 2000
    rng = np.random.default_rng(0)
    if d == 2:
        ang = np.linspace(0, 2 * np.pi, n_dir, endpoint=False)
        dirs = np.stack([np.cos(ang), np.sin(ang)], 1)
    else:
        dirs = rng.standard_normal((n_dir, d))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    out = []
    for rr in (radius, radius * (np.cos(np.pi / n_dir) if d == 2 else 0.9)):
        Ab = np.hstack([dirs, np.zeros((n_dir, 1))])
        res = linprog(np.r_[np.zeros(d), -1.0], A_ub=np.vstack([A, Ab]), b_ub=np.r_[ub, np.full(n_dir, rr)],
                      bounds=[(None, None)] * (d + 1), method="highs")
        assert res.status == 0
        out.append(-res.fun)
    upper, lower_poly = out
    return lower_poly, upper



@pytest.fixture(scope="session")
def random_problem():
    return _random_problem


@pytest.fixture(scope="session")
def full_lp_margin():
    return _full_lp_margin


class _Shared:
    """Loaded heads and torch-on-CPU scans, made once per session and shared by the tests that read the
    same instance (test_pins digests a scan, test_oracles checks the planted tokens of the same scan).
    Reports and heads are only read; the engine never writes to its inputs (test_properties checks)."""

    def __init__(self):
        self.heads, self.scans = {}, {}

    def head(self, source: str):
        if source not in self.heads:
            from unspeakable.engine.loader import load

            self.heads[source] = load(source)
        return self.heads[source]

    def scan(self, source: str, domain: str, tokens=None):
        key = (source, domain, None if tokens is None else tuple(int(t) for t in tokens))
        if key not in self.scans:
            from unspeakable.engine.pipeline import scan_head

            self.scans[key] = scan_head(self.head(source), domain=domain, tokens=tokens, device="cpu",
                                        backend="torch")
        return self.scans[key]


@pytest.fixture(scope="session")
def shared():
    return _Shared()
