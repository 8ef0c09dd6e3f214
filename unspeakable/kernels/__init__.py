"""Tiled screens: Triton kernels on CUDA, torch elsewhere, behind one backend choice.

``resolve_backend`` is the only place a backend is chosen: ``auto`` means Triton on CUDA and torch
everywhere else. Triton on a machine without CUDA is allowed only under ``TRITON_INTERPRET=1`` (the
interpreter runs the kernels on the CPU, for tests and for checking them by hand).
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "torch", "triton")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "ieee", "tf32", "bf16")


class BackendError(ValueError):
    """A backend or device that cannot run here; the message says why."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def resolve_backend(backend: str = "auto", device: str = "auto") -> tuple[str, torch.device]:
    """Return ``(backend, device)`` actually used, or raise :class:`BackendError`."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise BackendError("--device cuda was asked for but torch sees no CUDA device on this machine")
    dev = torch.device("cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu")
    if backend == "auto":
        backend = "triton" if dev.type == "cuda" else "torch"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:  # pragma: no cover - triton is a dev dependency
            raise BackendError(f"--backend triton needs the triton package: {e}") from e
        if dev.type != "cuda" and not triton_interpret():
            raise BackendError(
                "--backend triton needs a CUDA device; none is available here "
                "(set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
            )
    return backend, dev


def resolve_precision(precision: str, backend: str, device: torch.device) -> str:
    """The fast pass's input precision: ``auto`` is TF32 for the Triton kernels on sm_80 and newer, IEEE
    float32 elsewhere. Rows near a tie within the precision's error bound are recomputed in float64 either
    way (kernels.screen), so the precision changes speed, never the result."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    on_gpu = backend == "triton" and device.type == "cuda"
    if precision == "auto":
        return "tf32" if on_gpu and torch.cuda.get_device_capability(device) >= (8, 0) else "ieee"
    if precision != "ieee" and backend != "triton":
        raise BackendError(f"--precision {precision} needs the triton backend (the torch backend computes in "
                           f"IEEE float32)")
    return precision


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block. Apart from their GEMMs the tiled passes are many
    small and medium ops (epilogues, top-K folds, O(V d) preparation): on a shared machine every
    multi-threaded op waits at its barrier for a descheduled thread (a scheduler quantum), so they run on
    one thread and only the GEMMs use the caller's threads (measured at V = 8192, d = 768 under a load of 12
    on 2 cores: the whole symmetric pass 3-4x slower with every op on 2 threads than on 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
