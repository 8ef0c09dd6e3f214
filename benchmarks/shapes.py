"""Real model shapes and the one setup factory every benchmark provider uses (STYLE guideline 7).

Every provider — ours (``engine.screen``), faiss, the chunked torch GEMM, the seed's ``W_U.T @ W_U`` —
starts from the same :class:`BenchProblem`, built by :func:`setup_problem` from ``(V, d, seed)`` only, so
a timing difference is never a difference in data.

The cloud is anisotropic, like a real unembedding: ``u_j = m + r_j · Q (σ ⊙ z_j)`` with a large shared
mean vector ``m`` (its norm is three times the typical deviation), a decaying spectrum ``σ`` in a random
rotation ``Q``, log-normal per-token norms ``r_j`` and a Gaussian folded bias. The domain is ``layernorm``
with R = √d, as for GPT-2 and Pythia. (The engine's own ``synthetic:`` source adds planted tokens on top
of a cloud of this kind; the benchmarks do not need them and must not depend on a file others are editing.)
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from any directory

from unspeakable.engine.head import Problem  # noqa: E402
from unspeakable.engine.domain import domain_for  # noqa: E402
from unspeakable.engine.loader import problem_from_rows  # noqa: E402

# name -> (d_vocab V, d_model d), as published for each model.
SHAPES: dict[str, tuple[int, int]] = {
    "gpt2-small": (50257, 768),
    "gpt2-xl": (50257, 1600),
    "pythia-160m": (50304, 768),
    "llama3-8b": (128256, 4096),
    "smollm2-135m": (49152, 576),
    "gemma3-270m": (262144, 640),  # the 262144 x 640 head of DESIGN §7's memory target
}

# A CI-sized head: GPT-2's d_model with a sixth of its vocabulary. Ratios, not times, carry over.
CI_V, CI_D = 8192, 768

DEV_SCALE = 3.0  # RMS norm of a row's deviation from the shared mean, before the per-token factor
MEAN_SCALE = 3.0  # ||m|| = MEAN_SCALE · DEV_SCALE
SPECTRUM_KNEE = 1.0 / 16  # σ_k ∝ (1 + k / (SPECTRUM_KNEE · d))^(−SPECTRUM_POWER)
SPECTRUM_POWER = 0.75
NORM_SPREAD = 0.19  # log-normal σ of r_j: sets how many tokens the witness screen leaves open
BIAS_SPREAD = 0.1  # σ_b = BIAS_SPREAD · √d · DEV_SCALE, a tenth of a typical self-logit at the rim
MAX_ROTATED_D = 2048  # above this the random rotation (V·d² float64 work) is skipped: the spectrum stays axis-aligned


@dataclass
class BenchProblem:
    """What every provider reads. ``rows``: the gram screen's rows (as stored, float64 ``[V, d]``);
    ``problem``: the folded head on its domain, with ``keys = P(rows − c)`` and the bias."""

    name: str
    V: int
    d: int
    seed: int
    rows: np.ndarray
    problem: Problem

    @property
    def bias(self) -> np.ndarray:
        return self.problem.bias

    def witness_queries(self) -> tuple[np.ndarray, np.ndarray]:
        """The witness screen's query rows and per-row scale: ``x_t = scale_t · keys_t``, the domain's own
        screen points (the peers are written for domains whose screen point is a scaled key)."""
        q, s = self.problem.domain.screen_queries(self.problem.keys)
        if s is None or q is not self.problem.keys:
            raise ValueError("the screen peers are written for domains whose screen point is a scaled key")
        return q, s


def shape_of(name_or_V, d: int | None = None) -> tuple[str, int, int]:
    """``("gpt2-small", 50257, 768)`` from a registry name, or ``("V=..,d=..", V, d)`` from sizes."""
    if isinstance(name_or_V, str) and name_or_V in SHAPES:
        V, dd = SHAPES[name_or_V]
        return name_or_V, V, dd
    V, d = int(name_or_V), int(d)
    named = [n for n, s in SHAPES.items() if s == (V, d)]
    return (named[0] if named else f"V={V},d={d}"), V, d


def setup_problem(V: int, d: int, seed: int = 0, domain: str = "layernorm") -> BenchProblem:
    """The benchmark head of shape ``(V, d)``, deterministic in ``(V, d, seed)``. All arrays float64.

    ``domain``: ``layernorm`` (R = √d, keys projected onto 1⊥; the default, as for GPT-2), ``rmsnorm``
    (R = √d) or ``box`` (ρ = 1, the seed's LP). The cloud is the same for every domain."""
    if domain not in ("layernorm", "rmsnorm", "box"):
        raise ValueError(f"domain must be layernorm, rmsnorm or box, got {domain!r}")
    name, V, d = shape_of(V, d)
    rng = np.random.default_rng(seed)
    k = np.arange(d, dtype=np.float64)
    sigma = (1.0 + k / max(SPECTRUM_KNEE * d, 1.0)) ** (-SPECTRUM_POWER)
    sigma *= DEV_SCALE / np.sqrt((sigma**2).sum())  # E||σ ⊙ z||² = DEV_SCALE²
    if d <= MAX_ROTATED_D:
        Q, R = np.linalg.qr(rng.standard_normal((d, d)))
        Q *= np.sign(np.diag(R))
        mix = sigma[:, None] * Q.T  # dev = z @ diag(σ) @ Q^T
    else:
        mix = None
    rows = rng.standard_normal((V, d))
    if mix is not None:
        rows = rows @ mix
    else:
        rows *= sigma
    rows *= np.exp(NORM_SPREAD * rng.standard_normal(V))[:, None]
    m = rng.standard_normal(d)
    rows += m * (MEAN_SCALE * DEV_SCALE / np.linalg.norm(m))
    # Round through float32, as weights are stored: every provider then sees exactly representable data.
    rows = np.ascontiguousarray(rows.astype(np.float32).astype(np.float64))
    bias = (BIAS_SPREAD * math.sqrt(d) * DEV_SCALE * rng.standard_normal(V)).astype(np.float32).astype(np.float64)

    problem = problem_from_rows(rows, bias, domain, source=f"bench:{name},seed={seed}")
    return BenchProblem(name=name, V=V, d=d, seed=seed, rows=rows, problem=problem)


def bytes_of(*arrays) -> int:
    return int(sum(a.nbytes for a in arrays))


# ------------------------------------------------------------------------------ transport to subprocesses
def save_problem(bp: BenchProblem, directory: str) -> None:
    """Write the arrays of ``bp`` as ``.npy`` files, so that a subprocess can load exactly the same head
    without regenerating it (and without the generator's temporaries inflating its peak memory)."""
    os.makedirs(directory, exist_ok=True)
    p = bp.problem
    for name, a in (("rows", bp.rows), ("bias", p.bias), ("center", p.center), ("keys", p.keys)):
        np.save(os.path.join(directory, name + ".npy"), a)
    with open(os.path.join(directory, "meta.txt"), "w") as f:
        f.write(f"{bp.name} {bp.V} {bp.d} {bp.seed} {p.domain.name} {p.radius!r}\n")


def load_problem(directory: str, mmap: bool = False) -> BenchProblem:
    """The :class:`BenchProblem` written by :func:`save_problem`. ``mmap``: read-only memory maps, so that
    a provider's peak RSS counts only the arrays it reads."""
    with open(os.path.join(directory, "meta.txt")) as f:
        name, V, d, seed, domain, radius = f.read().split()
    a = {n: np.load(os.path.join(directory, n + ".npy"), mmap_mode="r" if mmap else None)
         for n in ("rows", "bias", "center", "keys")}
    # The arrays as saved (memory-mapped on request, so a provider's RSS counts only what it reads): the
    # keys were built by problem_from_rows when the problem was set up.
    dom = domain_for(domain, domain, int(d), float(radius))[0]
    problem = Problem(rows=a["rows"], bias=a["bias"], domain=dom, center=a["center"], keys=a["keys"],
                      bias_used=True, source=f"bench:{name},seed={seed}")
    return BenchProblem(name=name, V=int(V), d=int(d), seed=int(seed), rows=a["rows"], problem=problem)


__all__ = ["SHAPES", "CI_V", "CI_D", "BenchProblem", "setup_problem", "shape_of", "bytes_of", "save_problem",
           "load_problem"]
