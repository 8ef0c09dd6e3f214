"""A GPT-2-shaped synthetic head with planted tokens whose verdicts are known by construction.

``make_synthetic(V, d, seed)`` builds an anisotropic cloud of unembedding rows ``u_j = m + r_j · Q (σ ⊙ z_j)``:
a large shared mean vector ``m`` (the zero point of a real unembedding is not meaningful), a decaying
per-direction spread ``σ`` in a random rotation ``Q``, log-normal per-token norms ``r_j`` and a Gaussian
logit bias. A final LayerNorm (gain around 1 with some spread, small bias) sits in front of it. The spread
of the norms sets how many tokens the self-direction witness screen leaves open (a few hundred at
V = 50257, d = 768), the bias spread how much the bias matters in the bounded domains.

Planted tokens (ids drawn by the rng, spread over the vocabulary, no overlaps):

* ``interior`` — ``u_t = ½·(mean of the non-planted rows) + ½·(convex combination of 3 non-planted rows)``
  and the same combination of their biases minus a clear gap. The folded bias ``b̃ = u·β + b`` is linear
  in ``u``, so the combination survives folding: ``l_t(x) = Σ μ_j l_j(x) − gap`` for every ``x``, which
  makes the token unspeakable in every bounded domain; in ``cone`` it is a non-vertex deep inside the
  hull (the pull toward the centroid keeps it off the hull's faces, where few-point combinations lie in
  high dimension). The cone claim needs V > d + 1: a smaller hull is flat, and float32 rounding of
  ``u_t`` can lift the point off it.
* ``duplicate`` — pairs ``[a, b]``: column ``b`` of ``W_U`` and ``b_U`` is an exact copy of column ``a``.
  Both are ties.
* ``low_bias`` — long rows (their centred self-direction wins in ``cone``) whose bias is so negative that
  they lose at every point of the ball of radius √d and of the box up to ρ = 100. Speakable in ``cone``
  only, where the bias is ignored.
* ``shadow`` — ``u_s = m + 0.9·(u_L − m) + q``: a shrunken copy of a long row ``L`` pushed sideways by a
  small ``q`` orthogonal (after the gain) to the deviation, the mean and the all-ones vector. Its gram
  argmax is not itself (hard-to-speak, raw and TransformerLens-style), but it may well be speakable.

:func:`synthesize` also returns the recipe (interior combinations, gap, shadow sources) so tests can check
the construction independently.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unspeakable.engine.head import Head, InputError, head_from_arrays

# Shape of the cloud. The deviation from the shared mean has RMS norm DEV_SCALE before the per-token factor.
DEV_SCALE = 3.0
MEAN_SCALE = 3.0  # ||m|| = MEAN_SCALE · DEV_SCALE: a large shared mean vector, as in real unembeddings
SPECTRUM_KNEE = 1.0 / 16  # σ_k ∝ (1 + k / (SPECTRUM_KNEE · d))^(−SPECTRUM_POWER)
SPECTRUM_POWER = 0.75
NORM_SPREAD = 0.19  # log-normal σ of the per-token norm factor r_j; sets how many tokens the witness screen leaves open
BIAS_SPREAD = 0.1  # σ_b = BIAS_SPREAD · √d · DEV_SCALE: a tenth of the typical self-logit at the ball's rim
LN_W_SPREAD = 0.2  # ln_w = exp(N(0, LN_W_SPREAD))
LN_B_SCALE = 0.02  # ln_b = N(0, LN_B_SCALE)

# Planted tokens.
MIN_V_PLANTED = 40  # below this nothing is planted
SHADOW_SHRINK = 0.9
SHADOW_PUSH = 0.2  # ||q|| = SHADOW_PUSH · ||γ ⊙ (u_L − m)||
LOW_BIAS_RHO = 100.0  # low-bias tokens lose in the box up to this ρ (and in the ball of radius √d)


@dataclass
class Recipe:
    """How the planted tokens were built (for tests; not part of any report)."""

    interior_sources: list[list[int]] = field(default_factory=list)  # 3 non-planted ids per interior token
    interior_weights: list[list[float]] = field(default_factory=list)  # their convex weights (sum 1)
    interior_gap: float = 0.0  # folded bias deficit against the combination
    shadow_of: list[int] = field(default_factory=list)  # the long row L each shadow token copies
    sigma_b: float = 0.0
    mean: np.ndarray | None = None  # the shared mean vector m (float64)
    params: dict = field(default_factory=dict)


@dataclass
class Synthetic:
    head: Head
    recipe: Recipe


def make_synthetic(V: int = 50257, d: int = 768, seed: int = 0, norm: str = "layernorm") -> Head:
    """The synthetic head ``synthetic:V=..,d=..,seed=..`` (deterministic in ``(V, d, seed)``).

    ``norm=rmsnorm``: the same cloud and gain under an RMSNorm, with no norm bias and no unembedding bias,
    as in Llama, Gemma or SmolLM2 heads (``synthetic:...,norm=rmsnorm``). Nothing is claimed planted there:
    the planted recipe relies on the biases."""
    h = synthesize(V, d, seed).head
    if norm == "layernorm":
        return h
    return head_from_arrays(h.W_U, None, h.ln_w, None, "rmsnorm", source=f"{h.source},norm=rmsnorm", texts=h.texts,
                            gram_center=False)


def _n_planted(V: int) -> int:
    """Tokens planted per kind: 0 below MIN_V_PLANTED, then 1, growing to 5 at GPT-2 size."""
    if V < MIN_V_PLANTED:
        return 0
    return int(min(5, max(1, V // 10000)))


def synthesize(V: int = 50257, d: int = 768, seed: int = 0) -> Synthetic:
    """Build the synthetic head and the recipe of its planted tokens."""
    V, d, seed = int(V), int(d), int(seed)
    if V < 2:
        raise InputError(f"synthetic: V = {V}; need at least 2 tokens")
    if d < 1:
        raise InputError(f"synthetic: d = {d}; need d >= 1")
    rng = np.random.default_rng(seed)

    # --- the cloud -------------------------------------------------------------------------------------
    k = np.arange(d, dtype=np.float64)
    sigma = (1.0 + k / max(SPECTRUM_KNEE * d, 1.0)) ** (-SPECTRUM_POWER)
    sigma *= DEV_SCALE / np.sqrt((sigma**2).sum())  # E||σ ⊙ z||² = DEV_SCALE²
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q *= np.sign(np.diag(R))  # Haar-distributed rotation, independent of the LAPACK sign convention
    mix = (sigma[:, None] * Q.T).astype(np.float32)  # dev = z @ diag(σ) @ Q^T
    z = rng.standard_normal((V, d), dtype=np.float32)
    U = z @ mix  # [V, d] float32
    del z
    r = np.exp(NORM_SPREAD * rng.standard_normal(V)).astype(np.float32)
    U *= r[:, None]
    m = rng.standard_normal(d)
    m = (m * (MEAN_SCALE * DEV_SCALE / np.linalg.norm(m))).astype(np.float32).astype(np.float64)  # as stored
    U += m.astype(np.float32)

    ln_w = np.exp(LN_W_SPREAD * rng.standard_normal(d))
    ln_b = LN_B_SCALE * rng.standard_normal(d)
    sigma_b = BIAS_SPREAD * np.sqrt(d) * DEV_SCALE
    b = (sigma_b * rng.standard_normal(V)).astype(np.float32)
    ln_w32, ln_b32 = ln_w.astype(np.float32), ln_b.astype(np.float32)
    ln_w, ln_b = ln_w32.astype(np.float64), ln_b32.astype(np.float64)  # fold with the stored values

    recipe = Recipe(sigma_b=float(sigma_b), mean=m, params=dict(
        dev_scale=DEV_SCALE, mean_norm=MEAN_SCALE * DEV_SCALE, spectrum_knee=SPECTRUM_KNEE,
        spectrum_power=SPECTRUM_POWER, norm_spread=NORM_SPREAD, sigma_b=float(sigma_b),
        ln_w_spread=LN_W_SPREAD, ln_b_scale=LN_B_SCALE))
    planted = {"interior": [], "duplicate": [], "low_bias": [], "shadow": []}
    n = _n_planted(V)
    if n:
        _plant(U, b, m, ln_w, ln_b, r, n, rng, planted, recipe)

    # The same validation as any input: the synthetic head is arrays like every other source.
    head = head_from_arrays(np.ascontiguousarray(U.T), b, ln_w32, ln_b32, "layernorm",
                            source=f"synthetic:V={V},d={d},seed={seed}", texts=[f"tok{i}" for i in range(V)],
                            planted=planted, gram_center=False)
    return Synthetic(head=head, recipe=recipe)


def _plant(U, b, m, ln_w, ln_b, r, n, rng, planted, recipe) -> None:
    """Plant ``n`` tokens of each kind in place (U [V, d] float32, b [V] float32)."""
    V, d = U.shape
    # Candidates for low-bias rows and shadow sources: the longest quarter of the cloud.
    order = np.argsort(-r, kind="stable")
    long_iter = iter(rng.permutation(order[: max(V // 4, 4 * n + 4)]).tolist())
    low_bias = _pick_low_bias(U, ln_w, long_iter, n)
    shadow_src, shadow_rows = _pick_shadows(U, m, ln_w, long_iter, n, rng) if d >= 4 else ([], [])

    # The rest of the planted ids: drawn uniformly from what is left.
    taken = set(low_bias) | set(shadow_src)
    rest = rng.permutation(np.array([i for i in range(V) if i not in taken], dtype=np.int64))
    interior = rest[:n].tolist()
    dup_flat = rest[n: 3 * n].tolist()
    shadow = rest[3 * n: 3 * n + len(shadow_src)].tolist()
    duplicate = [[dup_flat[2 * i], dup_flat[2 * i + 1]] for i in range(n)]
    planted_ids = set(interior) | set(dup_flat) | set(shadow) | set(low_bias)
    non_planted = np.array([i for i in range(V) if i not in planted_ids], dtype=np.int64)

    _plant_interior(U, b, interior, non_planted, rng, recipe)
    for (a_id, b_id) in duplicate:
        U[b_id] = U[a_id]
        b[b_id] = b[a_id]
    for s_id, u_s in zip(shadow, shadow_rows):
        U[s_id] = u_s
    _sink_low_bias(U, b, ln_w, ln_b, low_bias)

    recipe.shadow_of = [int(L) for L in shadow_src]
    planted["interior"] = [int(t) for t in interior]
    planted["duplicate"] = [[int(x), int(y)] for x, y in duplicate]
    planted["low_bias"] = [int(t) for t in low_bias]
    planted["shadow"] = [int(s_id) for s_id in shadow]


def _pick_low_bias(U, ln_w, long_iter, n) -> list[int]:
    """Long rows whose centred self-direction wins in ``cone`` (checked on gain-folded float32 rows)."""
    keys = U * ln_w.astype(np.float32)
    keys -= keys.mean(axis=0, dtype=np.float64).astype(np.float32)
    low_bias = []
    for t in long_iter:
        if len(low_bias) == n:
            break
        s = keys @ keys[t]
        own = s[t]
        s[t] = -np.inf
        if s.max() < own * (1 - 1e-3):
            low_bias.append(t)
    return low_bias


def _pick_shadows(U, m, ln_w, long_iter, n, rng):
    """Shadow sources L: long rows whose shadow is hard-to-speak with margin in the raw and centred gram."""
    d = U.shape[1]
    a = ln_w * m
    ones = np.ones(d)
    shadow_src, shadow_rows = [], []
    for L in long_iter:
        if len(shadow_src) == n:
            break
        e = ln_w * (U[L].astype(np.float64) - m)
        q = rng.standard_normal(d)
        basis = np.linalg.qr(np.stack([e, a, ones], axis=1))[0]
        q -= basis @ (basis.T @ q)
        q *= SHADOW_PUSH * np.linalg.norm(e) / np.linalg.norm(q)
        u_s = m + SHADOW_SHRINK * (U[L].astype(np.float64) - m) + q / ln_w
        g_s, g_L = ln_w * u_s, ln_w * U[L].astype(np.float64)
        raw_ok = g_s @ (g_L - g_s) > 0.01 * (e @ e)
        c_s, c_L = g_s - a - (g_s - a).mean(), g_L - a - (g_L - a).mean()  # centred over d, mean token ≈ a
        cen_ok = c_s @ (c_L - c_s) > 0.01 * (e @ e)
        if raw_ok and cen_ok:
            shadow_src.append(L)
            shadow_rows.append(u_s)
    return shadow_src, shadow_rows


_CHUNK = 8192  # rows per float64 block of the planting's reductions


def _mean_rows(U: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``U[ids].astype(np.float64).mean(axis=0)`` from float64 row blocks, summed in the order numpy's
    reduction over axis 0 adds them (row after row), so the head does not depend on the block size."""
    acc = np.zeros(U.shape[1])
    for r0 in range(0, ids.size, _CHUNK):
        for row in U[ids[r0: r0 + _CHUNK]].astype(np.float64):
            acc += row
    return acc / ids.size


def _plant_interior(U, b, interior, non_planted, rng, recipe) -> None:
    """Interior: combinations of untouched non-planted rows (sources may be shadow sources L: untouched)."""
    d = U.shape[1]
    mean_u, mean_b = _mean_rows(U, non_planted), b[non_planted].astype(np.float64).mean()
    gap = 0.5 * recipe.sigma_b + 0.01 * np.sqrt(d) * DEV_SCALE
    for t in interior:
        src = rng.choice(non_planted, size=3, replace=False)
        lam = rng.dirichlet(np.ones(3))
        u_t = 0.5 * mean_u + 0.5 * (lam @ U[src].astype(np.float64))
        b_t = 0.5 * mean_b + 0.5 * (lam @ b[src].astype(np.float64)) - gap
        U[t] = u_t
        b[t] = np.nextafter(np.float32(b_t), np.float32(-np.inf)) if np.float32(b_t) > b_t else np.float32(b_t)
        recipe.interior_sources.append([int(s) for s in src])
        recipe.interior_weights.append([float(x) for x in lam])
    recipe.interior_gap = float(gap)


def _sink_low_bias(U, b, ln_w, ln_b, low_bias) -> None:
    """Low bias last, from the final rows and biases: for every x with ||x||_∞ ≤ S and any j,
    l_j(x) − l_t(x) ≥ b_j + u_j·β − b_t − u_t·β − 2·S·max||γ⊙u||_1 > 0."""
    if not low_bias:
        return
    V, d = U.shape
    S = max(np.sqrt(d), LOW_BIAS_RHO)
    folded_l1, ub = np.empty(V), np.empty(V)
    for r0 in range(0, V, _CHUNK):  # float64 row blocks: no V × d float64 copy (row-wise values unchanged)
        U64 = U[r0: r0 + _CHUNK].astype(np.float64)
        folded_l1[r0: r0 + U64.shape[0]] = np.abs(U64 * ln_w).sum(axis=1)
        ub[r0: r0 + U64.shape[0]] = U64 @ ln_b
    others = np.ones(V, dtype=bool)
    others[low_bias] = False
    floor = float(b[others].astype(np.float64).min()) - 2 * S * float(folded_l1.max())
    floor -= float(np.abs(ub).max()) + 1.0
    for t in low_bias:
        b_t = floor - abs(float(ub[t])) - 1.0
        b32 = np.float32(b_t)
        b[t] = np.nextafter(b32, np.float32(-np.inf)) if b32 > b_t else b32
