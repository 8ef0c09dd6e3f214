from setuptools import find_packages, setup

setup(
    name="unspeakable",
    version="0.1.0",
    description="Prove, token by token, whether any hidden state can make a token the argmax of the logits.",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "highspy>=1.7",
        "safetensors>=0.4",
    ],
    extras_require={
        # triton: CUDA kernels (imports without a GPU; interpreter mode for tests).
        # scipy: independent oracles in tests (qhull, linprog). faiss-cpu: benchmark peer.
        # transformer_lens: loading TransformerLens / Hugging Face models by name.
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "scipy>=1.10",
            "triton>=3.0",
            "matplotlib>=3.7",
        ],
        "models": ["transformer_lens"],
        "bench": ["faiss-cpu"],
    },
    entry_points={"console_scripts": ["unspeakable=engine.cli:main"]},
)
