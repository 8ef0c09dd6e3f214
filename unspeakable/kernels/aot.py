"""Ahead-of-time build of the Triton kernels for sm_80 and sm_90, on a machine without a GPU.

Every tile configuration of ``configs_for(cc)`` and every precision is compiled through Triton's full
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for ``GPUTarget("cuda", cc, 32)``. Per kernel and
target it reports the registers and spill bytes from ``ptxas -v`` (the same bundled ptxas Triton itself
runs for that architecture, with its flags), the register count of the cubin Triton built (read back
with the bundled ``cuobjdump``, as a cross-check), the shared memory Triton allocated, and whether the
PTX uses ``mma.sync`` (Ampere tensor cores) or ``wgmma`` (Hopper warpgroup MMA).

    python -m unspeakable.kernels.aot            # table
    python -m unspeakable.kernels.aot --json     # [{"kernel", "target", "registers", "spills_bytes", ...}]
    python -m unspeakable.kernels.aot --kernel all   # also the symmetric screen kernel (kernels.triton_sym)

The kernel is compiled with every feature switch on (self, scale, bias): the witness screen, a superset
of the gram screen's code and the register-hungriest variant.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # Run as the AOT report (never on import, where a library must not touch the caller's environment):
    # compiled kernels go to the (git-ignored) build tree, not ~/.triton, and compiling needs triton's
    # compiled (not interpreted) jit functions; both are read when triton is imported.
    os.environ.setdefault("TRITON_CACHE_DIR", str(_ROOT / "build" / "triton-cache"))
    os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from unspeakable.kernels.triton_sym import SymConfig, sym_kernel, sym_configs_for  # noqa: E402
from unspeakable.kernels.triton_top2 import PRECISIONS, TileConfig, top2_kernel, configs_for  # noqa: E402

TARGETS = (80, 90)

# Argument types as the launcher passes them. Pointers, d and row strides get Triton's 16-divisibility
# hint, as its JIT specialises at run time: torch allocations are 16-byte aligned and the launcher pads
# d to a multiple of 16 on the GPU (768, 1600, 4096 already are).
_POINTERS = {
    "q_ptr": "*fp32", "k_ptr": "*fp32", "self_ptr": "*i64", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
    "best_val_ptr": "*fp32", "best_idx_ptr": "*i64", "second_val_ptr": "*fp32", "second_idx_ptr": "*i64",
    "self_val_ptr": "*fp32",
}
_SIZES = {"B": "i32", "V": "i32", "D": "i32", "stride_qm": "i32", "stride_kn": "i32"}
_DIVISIBLE_BY_16 = set(_POINTERS) | {"D", "stride_qm", "stride_kn"}


@dataclass
class AotResult:
    kernel: str
    target: str
    precision: str
    config: str
    registers: int
    spills_bytes: int
    shared_bytes: int
    mma: bool
    wgmma: bool
    cubin_registers: int
    ptxas: str


def _compiled_fn(kernel):
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("triton was imported under TRITON_INTERPRET=1, so its kernels are interpreted "
                           "functions that cannot be compiled; run kernels.aot in a process without it")
    return kernel


@functools.lru_cache(maxsize=None)
def _triton_tool(name: str) -> Path:
    """A binary bundled inside the installed triton package (searched, not assumed at one path)."""
    hits = sorted(p for p in Path(triton.__file__).parent.rglob(name) if p.is_file() and os.access(p, os.X_OK))
    if not hits:
        raise FileNotFoundError(f"no {name} under {Path(triton.__file__).parent}")
    return hits[0]


def _ptxas_for(cc: int) -> Path:
    # Triton assembles sm_90+ with ptxas-blackwell (CUDA 13) and older targets with ptxas (CUDA 12).
    return _triton_tool("ptxas-blackwell" if cc >= 90 else "ptxas")


def _gpu_name(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"  # wgmma needs the arch-specific sm_90a


def ptxas_usage(ptx: str, cc: int, fmad: bool) -> tuple[int, int, str]:
    """(registers, spill store + load bytes, tool) from ``ptxas -v`` with the flags Triton uses."""
    ptxas = _ptxas_for(cc)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(ptxas), "-lineinfo", *([] if fmad else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={_gpu_name(cc)}", str(src), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True)
    text = log.stdout + log.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{text}")
    return int(regs.group(1)), int(spill.group(1)) + int(spill.group(2)), ptxas.name


def cubin_registers(cubin: bytes) -> int:
    """Register count recorded in the cubin itself (``cuobjdump --dump-resource-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_triton_tool("cuobjdump")), "--dump-resource-usage", f.name],
                             check=True, capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", out)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{out}")
    return int(m.group(1))


def compile_top2(config: TileConfig, precision: str, cc: int):
    """Compile the witness-screen variant of the top-2 kernel for ``sm_<cc>``; returns a CompiledKernel."""
    fn = _compiled_fn(top2_kernel)
    constexprs = dict(
        HAS_SELF=True, HAS_SCALE=True, HAS_BIAS=True, PRECISION=precision,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
    )
    # The launcher casts both dot operands to bf16 for the bf16 path.
    operands = {"q_ptr": "*bf16", "k_ptr": "*bf16"} if precision == "bf16" else {}
    signature = {**_POINTERS, **operands, **_SIZES, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in _DIVISIBLE_BY_16}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    # enable_fp_fusion as the launcher pins it (the epilogue's scale * acc + bias may become one FMA).
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


# The symmetric screen kernel (kernels.triton_sym), compiled with every switch on: witness, a, beta, bias,
# pruning — the register-hungriest variant, a superset of the others' code.
_SYM_POINTERS = {
    "h_ptr": "*fp32", "pairs_ptr": "*i32", "a_ptr": "*fp32", "beta_ptr": "*fp32", "s_ptr": "*fp32", "b_ptr": "*fp32",
    "g_th_ptr": "*fp32", "w_th_ptr": "*fp32", "g_ub_ptr": "*fp32", "w_ub_ptr": "*fp32", "g_blk_ptr": "*fp32",
    "w_blk_ptr": "*fp32", "g_cv_ptr": "*fp32", "g_ci_ptr": "*i64", "w_cv_ptr": "*fp32", "w_ci_ptr": "*i64",
    "needs_ptr": "*i32",
}
_SYM_SIZES = {"V": "i32", "D": "i32", "stride_h": "i32", "g_mref": "fp32", "w_mref": "fp32"}
_SYM_DIVISIBLE_BY_16 = set(_SYM_POINTERS) | {"D", "stride_h"}


def compile_sym(config: SymConfig, precision: str, cc: int):
    """Compile the all-switches-on variant of the symmetric screen kernel for ``sm_<cc>``."""
    fn = _compiled_fn(sym_kernel)
    constexprs = dict(HAS_WITNESS=True, HAS_A=True, HAS_BETA=True, HAS_BIAS=True, PRUNE=True, PRECISION=precision,
                      K=6, BLOCK=config.block, BLOCK_K=config.block_k)
    operands = {"h_ptr": "*bf16"} if precision == "bf16" else {}
    signature = {**_SYM_POINTERS, **operands, **_SYM_SIZES, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in _SYM_DIVISIBLE_BY_16}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


KERNELS = {"top2": (compile_top2, configs_for), "sym": (compile_sym, sym_configs_for)}


def build_all(targets=TARGETS, kernels=("top2",), precisions=PRECISIONS) -> list[AotResult]:
    results = []
    for name in kernels:
        compile_fn, configs = KERNELS[name]
        for cc in targets:
            for precision in precisions:
                for config in configs(cc, precision):
                    results.append(_report(name, compile_fn(config, precision, cc), config, precision, cc))
    return results


def _report(name, k, config, precision, cc) -> AotResult:
    ptx = k.asm["ptx"]
    regs, spills, tool = ptxas_usage(ptx, cc, fmad=k.metadata.enable_fp_fusion)
    return AotResult(
        kernel=f"{name}[{precision},{config.name}]", target=_gpu_name(cc), precision=precision,
        config=config.name, registers=regs, spills_bytes=spills, shared_bytes=int(k.metadata.shared),
        mma="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx,
        cubin_registers=cubin_registers(k.asm["cubin"]), ptxas=tool,
    )


def format_table(results: list[AotResult]) -> str:
    head = f"| {'kernel':<32} | target | regs | spills (B) | smem (B) | mma.sync | wgmma |"
    rule = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    rows = [
        f"| {r.kernel:<32} | {r.target:<6} | {r.registers:>4} | {r.spills_bytes:>10} | {r.shared_bytes:>8} "
        f"| {'yes' if r.mma else 'no':<8} | {'yes' if r.wgmma else 'no':<5} |"
        for r in results
    ]
    return "\n".join([head, rule, *rows])


def main(args=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unspeakable.kernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--target", type=int, action="append", choices=TARGETS, help="compute capability (repeat)")
    # Default: the top-2 kernel only, the report tests/test_aot.py checks; "--kernel all" adds the
    # symmetric screen kernel (tests/test_sym_screen.py checks that one).
    p.add_argument("--kernel", choices=("top2", "sym", "all"), default="top2", help="which kernels to build")
    p.add_argument("--precision", action="append", choices=PRECISIONS, help="only these precisions (repeat)")
    a = p.parse_args(args)
    kernels = tuple(KERNELS) if a.kernel == "all" else (a.kernel,)
    results = build_all(tuple(a.target) if a.target else TARGETS, kernels,
                        tuple(a.precision) if a.precision else PRECISIONS)
    print(json.dumps([asdict(r) for r in results], indent=1) if a.json else format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
