"""After the scan: what people need to read a report, added without touching its verdicts.

* the raw vocabulary entry of each listed token (``token``, e.g. ``Ġthe``) beside its decoded ``text``;
* the gram criterion in words, and the hard-to-speak count with both row conventions, centred and
  uncentred (DESIGN §3.2: the choice moves the count; reduced from the scan's own Gram tiles, or one more gram pass, V²·d);
* the check of each witness against the model's own final norm and unembedding (``engine.modelcheck``).

``enrich(report, head, ...)`` does all three; the CLI calls it for scan, gram and demo.
"""
from __future__ import annotations

import numpy as np

CRITERION = ("hard_to_speak(t) <=> max_{j != t} g_t.g_j >= g_t.g_t (a tie is not a win), g_j = token j's "
             "unembedding column of W_U with the final norm's gain folded in; centred rows (TransformerLens "
             "from_pretrained: centred over d_model for a LayerNorm, mean token vector removed) or uncentred rows "
             "(as stored)")


def _scanned_ids(report) -> np.ndarray | None:
    """The ids the report's counts cover (None: all V)."""
    ga = getattr(report, "gram_argmax_all", None)
    if ga is None or report.counts.get("tokens") == report.V:
        return None
    return np.nonzero(np.asarray(ga) >= 0)[0].astype(np.int64)


def gram_summary(report, head, center: bool | None = None, backend: str = "torch", device="cpu") -> dict:
    """``{"criterion", "counted_with", "hard_to_speak_centred", "hard_to_speak_uncentred"}`` for the report.

    The report's own count (``counts.hard_to_speak``, made with ``center``, default ``head.gram_center``)
    is reused, and so is the other convention's when the scan's pass reduced it from the same tiles
    (``report.gram_other``); otherwise it costs one more gram screen over the same tokens.
    """
    from unspeakable.engine.loader import gram_rows
    from unspeakable.engine.screen import gram_screen

    used = head.gram_center if center is None else bool(center)
    made = getattr(report, "gram_other", None)  # counted by the scan's own pass, from the same tiles
    if made is not None and made.get("centred") == (not used):
        n_other = int(made["hard_to_speak"])
    else:
        n_other = int(gram_screen(gram_rows(head, not used), _scanned_ids(report), backend=backend,
                                  device=device).hard_to_speak.sum())
    n_used = int(report.counts.get("hard_to_speak", 0))
    centred, uncentred = (n_used, n_other) if used else (n_other, n_used)
    return {"criterion": CRITERION, "counted_with": "centred" if used else "uncentred",
            "hard_to_speak_centred": centred, "hard_to_speak_uncentred": uncentred}


def attach_raw_tokens(report, head) -> None:
    """Copy each listed token's raw vocabulary entry onto the report (when the source has one)."""
    tokens = getattr(head, "tokens", None)
    report.text_scheme = getattr(head, "text_scheme", None)
    if tokens is None:
        return
    for r in report.tokens:
        if 0 <= r.id < len(tokens):
            r.token = tokens[r.id]


def enrich(report, head, *, center: bool | None = None, domain=None, radius=None, bias: bool = True,
           backend: str = "torch", device="cpu", model_check: bool = True):
    """Raw tokens, both gram counts and (scan reports of model sources) the model check; returns the report."""
    from unspeakable.kernels import resolve_backend

    backend, dev = resolve_backend(backend, device)
    attach_raw_tokens(report, head)
    report.gram = gram_summary(report, head, center, backend=backend, device=dev)
    for w in getattr(head, "warnings", None) or ():
        if w not in report.warnings:
            report.warnings.append(w)
    if model_check and report.kind == "scan" and getattr(head, "model", None) is not None:
        from unspeakable.engine.loader import fold
        from unspeakable.engine.modelcheck import annotate

        annotate(report, head, fold(head, domain=domain, radius=radius, bias=bias))
    return report
