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


def model_logits(head, H: np.ndarray):
    """Logits ``[n, V]`` of the model at hidden states H ``[n, d]``, in the model's dtype (a torch tensor)."""
    import torch

    m = head.model
    dtype = _torch_dtype(m.get("dtype", "float32"))
    h = torch.from_numpy(np.ascontiguousarray(H))
    with torch.no_grad():
        if m["kind"] == "torch":
            param = next(iter(m["unembed"].parameters()), None)
            dev = param.device if param is not None else "cpu"
            y = h.to(dev, dtype)[:, None, :]  # [n, pos=1, d]: TransformerLens modules want a position axis
            if m.get("norm") is not None:
                y = m["norm"](y)
            unembed = m["unembed"]
            if isinstance(unembed, torch.nn.Embedding):  # tied head read from the input embedding
                return torch.nn.functional.linear(y, unembed.weight)[:, 0, :]
            return unembed(y)[:, 0, :]
        return _gguf_logits(head, h.to(dtype), m.get("eps") or 0.0)


def _gguf_logits(head, h, eps: float):
    import torch

    d = h.shape[1]
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
    logits = y @ (torch.from_numpy(W) if W.flags.writeable else torch.tensor(W))
    return logits if head.b_U is None else logits + torch.from_numpy(np.array(head.b_U, dtype=np.float32))


def check_witnesses(head, tokens, X) -> list[dict]:
    """For each (token, witness x): the model's argmax, margin and resolution at ``h(x)``, and the status.

    Returns:
        one dict per token: ``{"status": "ok"|"fragile", "argmax": int, "margin": float, "resolution": float}``.
    """
    import torch

    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0:
        return []
    H = hidden_states(X, head.model.get("eps"))
    out = []
    for b0 in range(0, tokens.size, 256):  # a few [256, V] logit blocks at a time
        L = model_logits(head, H[b0:b0 + 256])
        fin = torch.finfo(L.dtype).eps
        out.extend(_row_checks(L.double().cpu().numpy(), tokens[b0:b0 + 256], fin))
    return out


def _row_checks(L64: np.ndarray, ts: np.ndarray, fin: float) -> list[dict]:
    """Per row k of the model's logits: argmax, margin of ``ts[k]`` over the others, resolution, status."""
    ar = np.arange(ts.size)
    self_v = L64[ar, ts].copy()
    argmax = np.argmax(L64, axis=1)
    res = 2.0 * fin * np.max(np.abs(L64), axis=1)
    L64[ar, ts] = -np.inf  # the others' best (the logits are a fresh float64 copy)
    margin = self_v - L64.max(axis=1)
    return [{"status": "ok" if int(argmax[k]) == int(t) and math.isfinite(margin[k]) and margin[k] > res[k]
             else "fragile", "argmax": int(argmax[k]), "margin": float(margin[k]), "resolution": float(res[k])}
            for k, t in enumerate(ts)]


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
    from engine.screen import witness_points

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
