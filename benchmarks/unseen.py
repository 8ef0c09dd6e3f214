"""GPT-2-shaped heads of another kind than ``shapes.setup_problem`` and the engine's ``synthetic:`` source.

The benchmarks' own cloud (one Gaussian shape, log-normal norms) leaves at most a token or two to the LP
stage, while an unseen real head left 40 (issue 17): the LP was tuned on instances easier than real ones.
The heads here are built from the structure real unembeddings have and that cloud lacks, in several
*generators* (``KINDS``), each deterministic in ``(kind, seed, V, d)``:

* a **low-rank part** (a few strong shared directions, the "frequency" axes of a trained head) on top of
  a decaying full-rank spectrum, with **heavy-tailed** (Student-t) per-token norms;
* **BPE variant clusters**: many tokens are a base word plus one of a few shared offset vectors
  (" word" / "word" / " Word" / "WORD") and a small private perturbation, so siblings compete closely;
* **rare / glitch tokens**: small rows pulled towards the mean (as under-trained tokens are);
* a **bias correlated with the norm** (frequent tokens are long and favoured);
* **quantized rows** (a Q4-like grid of 16 levels per block of 32 with a per-block scale);
* a final **LayerNorm** with a gain that has a few outlier dimensions and a bias.

``make_arrays(kind, seed)`` returns ``W_U [d, V]``, ``b_U``, ``ln_w``, ``ln_b`` (float32, the CLI's ``.npz``
layout); ``family_source(kind, seed)`` writes them once to a cached ``.npz`` for ``unspeakable scan``.

    python benchmarks/unseen.py bpe --seed 0 --out /tmp/bpe0.npz
    unspeakable scan /tmp/bpe0.npz --out /tmp/bpe0.json
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# kind -> the parts it has (see the module docstring); rank_scale (default 0.9) and norm_spread (0.22) scale
# the low-rank part and the log-norm spread. Among the first 2048 ids of seed 0 the witness screen and the
# search leave bpe 15, quant 59, mix 145 tokens to the LP (a few hundred to a few thousand per whole head);
# the solver was tuned on stress and bpe (seed 0) only: report on the others.
KINDS: dict[str, dict] = {
    "bpe": dict(rank=0, tail_df=4.0, norm_spread=0.15, variants=0.1, glitch=0.01, bias_corr=0.8, quant=False,
                ln_outliers=0),
    "quant": dict(rank=24, rank_scale=0.3, tail_df=5.0, norm_spread=0.15, variants=0.25, glitch=0.05, bias_corr=1.0,
                  quant=True, ln_outliers=2),
    "mix": dict(rank=16, rank_scale=0.2, tail_df=2.5, variants=0.2, glitch=0.08, bias_corr=0.3, quant=True,
                ln_outliers=6),
    # A strong low-rank part: nearly every token gets past the witness screen and the LP's restricted
    # problems grow to ~1000 rows. Harder than any head seen so far; a stress case, not a likeness.
    "stress": dict(rank=8, tail_df=3.0, variants=0.45, glitch=0.03, bias_corr=0.6, quant=False, ln_outliers=4),
}

STREAM = {"stress": 0, "bpe": 1, "mix": 2, "quant": 3}  # each kind's own random stream, fixed
GPT2_V, GPT2_D = 50257, 768
DEV = 3.0  # RMS norm of a typical row's deviation from the mean
MEAN = 2.0  # ||m|| = MEAN · DEV
N_OFFSETS = 4  # the shared variant offsets (space, capital, both, upper case)


def make_arrays(kind: str, seed: int = 0, V: int = GPT2_V, d: int = GPT2_D) -> dict[str, np.ndarray]:
    """The head ``(kind, seed)`` as float32 arrays ``W_U [d, V]``, ``b_U [V]``, ``ln_w [d]``, ``ln_b [d]``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    k = KINDS[kind]
    rng = np.random.default_rng([seed, STREAM[kind], V, d])
    # Full-rank part: a decaying spectrum in a random basis (a rotation by a random orthogonal-ish matrix).
    sig = (1.0 + np.arange(d) / (d / 12.0)) ** -0.6
    sig *= DEV / np.sqrt((sig**2).sum())
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    mix = sig[:, None] * basis.T
    n_base = V
    rows = rng.standard_normal((n_base, d)) @ mix
    if k["rank"]:
        # Low-rank part: a few strong shared directions, with heavy-tailed coefficients.
        U = np.linalg.qr(rng.standard_normal((d, k["rank"])))[0]
        coef = rng.standard_t(4.0, size=(V, k["rank"])) * (k.get("rank_scale", 0.9) * DEV / np.sqrt(k["rank"]))
        rows += coef @ U.T
    # Heavy-tailed per-token norm factors.
    lognorm = k.get("norm_spread", 0.22) * rng.standard_t(k["tail_df"], size=V)
    lognorm = np.clip(lognorm, -1.5, 1.2)
    rows *= np.exp(lognorm)[:, None]
    # BPE variant clusters: token v = base word w + one shared offset + a small private perturbation.
    n_var = int(k["variants"] * V)
    var_ids = rng.choice(V, size=n_var, replace=False)
    n_words = max(1, n_var // 3)
    words = var_ids[:n_words]  # base words are themselves tokens
    offsets = rng.standard_normal((N_OFFSETS, d)) @ mix * 0.35
    for v in var_ids[n_words:]:
        w = words[rng.integers(n_words)]
        rows[v] = rows[w] * np.exp(0.08 * rng.standard_normal()) + offsets[rng.integers(N_OFFSETS)] \
            + 0.12 * (rng.standard_normal(d) @ mix)
        lognorm[v] = lognorm[w]
    # Rare / glitch tokens: small rows pulled towards the mean.
    n_gl = int(k["glitch"] * V)
    gl = rng.choice(V, size=n_gl, replace=False)
    rows[gl] *= rng.uniform(0.05, 0.5, size=(n_gl, 1))
    lognorm[gl] -= 1.0
    m = rng.standard_normal(d)
    rows += m * (MEAN * DEV / np.linalg.norm(m))
    # Bias correlated with the norm (frequent tokens: long rows, higher bias), plus noise.
    b = DEV * (k["bias_corr"] * lognorm + 0.15 * rng.standard_normal(V))
    if k["quant"]:
        rows = _quantize(rows)
    # Final LayerNorm: the folded rows are rows ⊙ ln_w; store W_U = rows / ln_w so the fold gives them back.
    ln_w = np.exp(0.25 * rng.standard_normal(d))
    if k["ln_outliers"]:
        ln_w[rng.choice(d, size=k["ln_outliers"], replace=False)] *= rng.uniform(3.0, 8.0, size=k["ln_outliers"])
    ln_b = 0.05 * rng.standard_normal(d)
    W_U = (rows / ln_w).T
    return {"W_U": np.ascontiguousarray(W_U, dtype=np.float32), "b_U": b.astype(np.float32),
            "ln_w": ln_w.astype(np.float32), "ln_b": ln_b.astype(np.float32)}


def _quantize(rows: np.ndarray, block: int = 32, levels: int = 16) -> np.ndarray:
    """Q4-like: per block of ``block`` values, 16 levels between the block's min and max."""
    V, d = rows.shape
    pad = (-d) % block
    r = np.pad(rows, ((0, 0), (0, pad))).reshape(V, -1, block)
    lo, hi = r.min(axis=2, keepdims=True), r.max(axis=2, keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / (levels - 1), 1.0)
    q = np.round((r - lo) / scale) * scale + lo
    return q.reshape(V, -1)[:, :d]


def family_source(kind: str, seed: int = 0, V: int = GPT2_V, d: int = GPT2_D, directory: str | None = None) -> str:
    """Path of the ``.npz`` of ``(kind, seed, V, d)`` (written on first use, then reused)."""
    directory = directory or os.environ.get("UNSEEN_DIR", "/tmp/unspeakable_unseen")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{kind}-s{seed}-V{V}-d{d}.npz")
    if not os.path.exists(path):
        tmp = path + ".tmp.npz"
        np.savez(tmp, **make_arrays(kind, seed, V, d))
        os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--V", type=int, default=GPT2_V)
    ap.add_argument("--d", type=int, default=GPT2_D)
    ap.add_argument("--out", required=True, help="the .npz to write")
    a = ap.parse_args(argv)
    np.savez(a.out, **make_arrays(a.kind, a.seed, a.V, a.d))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
