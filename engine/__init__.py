"""unspeakable — prove, token by token, whether any hidden state can make a token the argmax.

    from engine import scan, load, check
    report = scan(W_U, b_U, ln_w=ln_w, ln_b=ln_b)       # numpy arrays or torch tensors, any device
    report = engine.scan_head(engine.load("synthetic:V=5000,d=64,seed=0"))
    head = engine.load("model.gguf")        # or a checkpoint directory, a cached model name, a transformers /
    head = engine.load(model)               # TransformerLens model object; vocab="tokenizer.json" for texts
"""
from engine.load import Head, InputError, Problem, fold, load
from engine.report import ScanReport, TokenReport
from engine.scan import bench_head, check, gram_head, scan, scan_head

__all__ = ["scan", "scan_head", "gram_head", "check", "bench_head", "load", "fold", "Head", "Problem",
           "ScanReport", "TokenReport", "InputError"]
