"""unspeakable — prove, token by token, whether any hidden state can make a token the argmax of the logits.

    import unspeakable
    report = unspeakable.scan(W_U, b_U, ln_w=ln_w, ln_b=ln_b)   # numpy arrays or torch tensors, any device
    report = unspeakable.scan_head(unspeakable.load("synthetic:V=5000,d=64,seed=0"))
    result = unspeakable.audit("report.json", "weights.npz")     # re-derive a saved report's claims
    shares = unspeakable.volume(head, tokens=[5, 17])            # the share of hidden states each token wins
    head = unspeakable.load("model.gguf")     # or a checkpoint directory, a cached model name, a transformers /
    head = unspeakable.load(model)            # TransformerLens model object; vocab="tokenizer.json" for texts

Two halves, one namespace:

* ``unspeakable.engine`` — load and fold the head, the screens' driver, the witness search, the HiGHS decisions,
  verification, reports, the audit and the command line (``unspeakable``, ``python -m unspeakable``);
* ``unspeakable.kernels`` — the tiled screens: Triton kernels on CUDA, torch on the CPU, behind one backend
  choice (``unspeakable.kernels.resolve_backend``).

The names below are the API people embed; everything else is reached through its module.
"""
from unspeakable.engine import (Head, InputError, Problem, ScanReport, TokenReport, audit, bench_head, check, fold,
                                gram_head, load, scan, scan_head, volume, VolumeReport)

__all__ = ["audit", "scan", "scan_head", "gram_head", "check", "bench_head", "load", "fold", "Head", "Problem",
           "ScanReport", "TokenReport", "InputError", "volume", "VolumeReport"]
