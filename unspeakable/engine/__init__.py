"""unspeakable — prove, token by token, whether any hidden state can make a token the argmax.

    import engine
    report = engine.scan(W_U, b_U, ln_w=ln_w, ln_b=ln_b)      # numpy arrays or torch tensors, any device
    report = engine.scan_head(engine.load("synthetic:V=5000,d=64,seed=0"))
    result = engine.audit("report.json", "weights.npz")   # re-derive a saved report's claims
    head = engine.load("model.gguf")        # or a checkpoint directory, a cached model name, a transformers /
    head = engine.load(model)               # TransformerLens model object; vocab="tokenizer.json" for texts

The modules read top-down as the pipeline: ``loader`` → ``screen`` → ``search`` → ``decide`` → ``verify`` →
``report``, run by ``pipeline``; ``head`` (shared types) and ``domain`` (geometry) are leaves; ``auditor``
re-checks a saved report on its own.
"""
from engine.auditor import audit
from engine.head import Head, InputError, Problem
from engine.loader import fold, load
from engine.pipeline import bench_head, check, gram_head, scan, scan_head
from engine.report import ScanReport, TokenReport

__all__ = ["audit", "scan", "scan_head", "gram_head", "check", "bench_head", "load", "fold", "Head", "Problem",
           "ScanReport", "TokenReport", "InputError"]
