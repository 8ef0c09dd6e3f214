"""Check witnesses against the model itself: its own final norm and unembedding, in its own dtype.

A witness ``x`` proves a token speakable on the folded head in float64 (``engine.verify``). The model computes
``logits = unembed(norm(h))`` in its dtype. For each witness this module builds a hidden state ``h`` that the
model's norm maps onto ``x`` and runs the model's modules on it:

* RMSNorm ``N(h) = γ ⊙ h / sqrt(mean(h²) + eps)`` and LayerNorm ``N(h) = γ ⊙ (h − mean h)/sqrt(var h + eps) + β``
  both map ``h = c·x`` (``x`` centred for LayerNorm) to ``x · c/sqrt(c² s² + eps)`` with ``s² = mean(x²)``.
  ``c = sqrt(eps / (1 − s²))`` makes that exactly ``x`` whenever ``s < 1`` (``‖x‖ < √d``: the witnesses sit a
  few ulps inside the ball); at ``s ≥ 1`` no ``h`` reaches ``x`` exactly and ``c`` is capped, giving
  ``x·(1 − O(1e-12))``.
* the logits are computed by the model's own modules (Hugging Face / TransformerLens sources) or by torch
  modules built from the file's dequantized weights (GGUF, float32, eps from the metadata).

``model_check`` per token: ``"ok"`` when the model's argmax at ``h`` is the token and its margin there
exceeds the dtype's resolution at that logit scale (two ulps of the largest logit: one rounding of each of
the two logits can erase less than that); ``"fragile"`` otherwise — the verdict holds for the exact head but
the model's own rounding may not reproduce it. ``None`` when there is no witness (unspeakable, undecided),
no model, or the domain is not the model's (another norm or radius).
"""
from __future__ import annotations

import math

import numpy as np

MAX_SCALE_GAP = 1e-12  # 1 − s² below this: x is on the sphere, where no finite h reaches it exactly


def hidden_states(X: np.ndarray, eps: float | None) -> np.ndarray:
    """Hidden states ``h = c·x`` that an RMSNorm / LayerNorm with this eps maps onto each row of X."""
    X = np.asarray(X, dtype=np.float64)
    if not eps:
        return X.copy()
    s2 = np.mean(X * X, axis=1)
    gap = np.maximum(1.0 - s2, MAX_SCALE_GAP)
    return X * np.sqrt(eps / gap)[:, None]


def _torch_dtype(name: str):
    import torch

    dt = getattr(torch, str(name), None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


ROW_BLOCK = 1024  # witnesses per block of the GGUF head's tiled logits
COL_BLOCK = 2048  # vocabulary columns per tile: a 1024 x 2048 float32 tile (8 MB) is reduced while in cache


def _normed(head, H: np.ndarray):
    """The model's final norm applied to hidden states H ``[n, d]`` in the model's dtype: ``(y, unembed,
    whole)``. ``unembed(y_rows, c0, c1)`` gives the logits of vocabulary columns c0:c1 as a fresh torch
    tensor the caller may write; ``whole``: the unembedding is the model's own module, which gives all V
    columns at once (c0, c1 ignored)."""
    import torch

    m = head.model
    dtype = _torch_dtype(m.get("dtype", "float32"))
    h = torch.from_numpy(np.ascontiguousarray(H))
    if m["kind"] == "torch":
        param = next(iter(m["unembed"].parameters()), None)
        dev = param.device if param is not None else "cpu"
        y = h.to(dev, dtype)[:, None, :]  # [n, pos=1, d]: TransformerLens modules want a position axis
        if m.get("norm") is not None:
            y = m["norm"](y)
        unembed = m["unembed"]
        if isinstance(unembed, torch.nn.Embedding):  # tied head read from the input embedding
            return y, lambda y, c0, c1: torch.nn.functional.linear(y, unembed.weight)[:, 0, :], True
        return y, lambda y, c0, c1: unembed(y)[:, 0, :], True
    h = h.to(dtype)
    d = h.shape[1]
    eps = m.get("eps") or 0.0
    w = None if head.ln_w is None else torch.from_numpy(np.array(head.ln_w, dtype=np.float32))  # a copy: [d]
    b = None if head.ln_b is None else torch.from_numpy(np.array(head.ln_b, dtype=np.float32))
    if head.norm == "rmsnorm":
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # llama.cpp's ggml_rms_norm, then the gain
        y = y if w is None else y * w
        y = y if b is None else y + b
    elif head.norm == "layernorm":
        y = torch.nn.functional.layer_norm(h, (d,), w, b, eps)
    else:
        y = h
    W = np.asarray(head.W_U, dtype=np.float32)  # [d, V]: a view of the dequantized head, read only
    Wt = torch.from_numpy(W) if W.flags.writeable else torch.tensor(W)
    bu = None if head.b_U is None else torch.from_numpy(np.array(head.b_U, dtype=np.float32))

    def tile(y, c0, c1):
        out = y @ Wt[:, c0:c1]
        return out if bu is None else out.add_(bu[c0:c1])
    return y, tile, False


def model_logits(head, H: np.ndarray):
    """Logits ``[n, V]`` of the model at hidden states H ``[n, d]``, in the model's dtype (a torch tensor)."""
    import torch

    with torch.no_grad():
        y, unembed, _ = _normed(head, H)
        return unembed(y, 0, head.d_vocab)


class _RowStats:
    """Per witness, reduced over the column tiles of its logits as they come: its own logit, the first
    maximum over the other tokens (value, index), the largest magnitude, and whether a NaN was seen."""

    def __init__(self, ts):
        import torch

        n, f64 = ts.numel(), torch.float64
        self.ts = ts
        self.self_v = torch.full((n,), math.nan, dtype=f64)
        self.omax, self.oidx = torch.full((n,), -math.inf, dtype=f64), torch.full((n,), -1, dtype=torch.int64)
        self.amax, self.nan = torch.zeros(n, dtype=f64), torch.zeros(n, dtype=torch.bool)

    def add(self, L, c0: int) -> None:
        """Fold the logits ``L`` ``[n, m]`` of columns c0:c0+m in (L is written: its own token masked)."""
        import torch

        lo, hi = torch.aminmax(L, dim=1)
        self.amax = torch.maximum(self.amax, torch.maximum(-lo.double().cpu(), hi.double().cpu()))
        self.nan |= torch.isnan(hi).cpu() | torch.isnan(lo).cpu()
        inside = ((self.ts >= c0) & (self.ts < c0 + L.shape[1])).nonzero().squeeze(1)
        if inside.numel():
            r, c = inside.to(L.device), (self.ts[inside] - c0).to(L.device)
            self.self_v[inside] = L[r, c].double().cpu()
            L[r, c] = -math.inf
        v, i = L.max(dim=1)  # the first index of the maximum within the tile
        v, i = v.double().cpu(), i.cpu() + c0
        better = v > self.omax  # strictly: on a tie the earlier tile's (smaller) index stays
        self.omax, self.oidx = torch.where(better, v, self.omax), torch.where(better, i, self.oidx)

    def checks(self, fin: float) -> list[dict]:
        """np.argmax's answer (first index of the row maximum), the margin and resolution, the status."""
        import torch

        t, sv, om = self.ts, self.self_v, self.omax
        argmax = torch.where((sv > om) | ((sv == om) & (t < self.oidx)) | (self.oidx < 0), t, self.oidx)
        margin = sv - om
        margin[self.nan] = math.nan
        res = 2.0 * fin * self.amax
        return [{"status": "ok" if int(a) == int(tt) and math.isfinite(mg) and mg > rs else "fragile",
                 "argmax": int(a), "margin": float(mg), "resolution": float(rs)}
                for a, tt, mg, rs in zip(argmax.tolist(), t.tolist(), margin.tolist(), res.tolist())]


def check_witnesses(head, tokens, X) -> list[dict]:
    """For each (token, witness x): the model's argmax, margin and resolution at ``h(x)``, and the status.

    The logits are reduced as they are made, never held whole: per block of witnesses, the model's own
    unembedding module called whole (model objects), or the dequantized head in column tiles (GGUF).

    Returns:
        one dict per token: ``{"status": "ok"|"fragile", "argmax": int, "margin": float, "resolution": float}``.
    """
    import torch

    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0:
        return []
    H = hidden_states(X, head.model.get("eps"))
    V, out = head.d_vocab, []
    with torch.no_grad():
        y, unembed, whole = _normed(head, H)
        rb = 256 if whole else ROW_BLOCK  # a module called whole makes [rb, V] logits at once
        for b0 in range(0, tokens.size, rb):
            st = _RowStats(torch.from_numpy(tokens[b0:b0 + rb]))
            for c0 in range(0, V, V if whole else COL_BLOCK):
                L = unembed(y[b0:b0 + rb], c0, min(V, c0 + COL_BLOCK))
                if c0 == 0:
                    fin = torch.finfo(L.dtype).eps
                st.add(L, c0)
            out.extend(st.checks(fin))
    return out


def annotate(report, head, problem) -> int:
    """Set ``model_check`` / ``model_margin`` on the report's speakable tokens that carry a witness.

    The screen's witnesses (``"x": "self-direction"``) are rebuilt with ``engine.screen.witness_points``.
    Returns the number of fragile tokens; adds a warning to the report when there are any, or when the
    domain is not the one the model's norm reaches.
    """
    if getattr(head, "model", None) is None:
        return 0
    radius = problem.radius_reported
    if problem.domain.name != head.norm or (radius is not None and not math.isclose(radius, math.sqrt(head.d_model))):
        report.warnings.append(f"model check skipped: the verdicts are on domain {problem.domain.name} (radius "
                               f"{radius}), not on the outputs of the model's final norm ({head.norm}, "
                               f"radius sqrt(d_model))")
        return 0
    from unspeakable.engine.screen import witness_points

    chosen = [r for r in report.tokens if r.verdict == "speakable" and isinstance(r.certificate, dict)
              and r.certificate.get("x") is not None]
    if not chosen:
        return 0
    # the screen's points all at once (each call normalises every key)
    screen_ids = np.array([r.id for r in chosen if isinstance(r.certificate["x"], str)], dtype=np.int64)
    screen_x = dict(zip(screen_ids.tolist(), problem.report_x(witness_points(problem, screen_ids)))) \
        if screen_ids.size else {}
    rows = [screen_x[r.id] if isinstance(r.certificate["x"], str) else np.asarray(r.certificate["x"], dtype=np.float64)
            for r in chosen]
    results = check_witnesses(head, [r.id for r in chosen], np.stack(rows))
    for r, res in zip(chosen, results):
        r.model_check, r.model_margin = res["status"], res["margin"]
    fragile = [r.id for r in chosen if r.model_check == "fragile"]
    if fragile:
        report.warnings.append(f"{len(fragile)} speakable tokens are fragile in the model's own "
                               f"{head.model.get('dtype')} arithmetic (its rounding may not reproduce the witness): "
                               f"ids {', '.join(map(str, fragile[:10]))}" + (" ..." if len(fragile) > 10 else ""))
    return len(fragile)
