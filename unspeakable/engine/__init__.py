"""The engine half of unspeakable: load + fold, the screens' driver, search, decide, verify, report, CLI.

The modules read top-down as the pipeline: ``loader`` → ``screen`` → ``search`` → ``decide`` → ``verify`` →
``report``, run by ``pipeline``; ``head`` (shared types) and ``domain`` (geometry) are leaves; ``auditor``
re-checks a saved report on its own. The public API is re-exported by the top-level ``unspeakable`` package.
"""
from unspeakable.engine.auditor import audit
from unspeakable.engine.head import Head, InputError, Problem
from unspeakable.engine.loader import fold, load
from unspeakable.engine.pipeline import bench_head, check, gram_head, scan, scan_head
from unspeakable.engine.report import ScanReport, TokenReport
from unspeakable.engine.volume import VolumeReport, volume

__all__ = ["audit", "scan", "scan_head", "gram_head", "check", "bench_head", "load", "fold", "Head", "Problem",
           "ScanReport", "TokenReport", "InputError", "volume", "VolumeReport"]
