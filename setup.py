"""cem_fast: fast conditional entropy maximisation (CEM) against model inversion in split inference.

``pip install -e .`` installs the pure-Python package; the C++ and CUDA kernels in ``csrc/`` are built
just in time on first use (torch.utils.cpp_extension + ninja) and cached. ``CEM_FAST_BUILD_EXT=1``
builds them ahead of time instead (``cuda`` too when a CUDA toolkit is found).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def long_description():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def ahead_of_time_extensions():
    if os.environ.get("CEM_FAST_BUILD_EXT") != "1":
        return {}, {}
    from torch.utils.cpp_extension import BuildExtension

    from cem_fast.backends.extension import aot_extensions
    return {"ext_modules": aot_extensions()}, {"cmdclass": {"build_ext": BuildExtension}}


ext_kw, cmd_kw = ahead_of_time_extensions()

setup(
    name="cem_fast",
    version="0.1.0",
    description="Conditional entropy maximisation (CEM, CVPR 2025) as a fast drop-in PyTorch loss, "
                "with the paper's split-inference experiments",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cem_fast", "cem_fast.*", "reproduce", "reproduce.*"]) + ["cem_fast.csrc"],
    package_dir={"cem_fast.csrc": "csrc"},
    package_data={"cem_fast.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"],
                  "reproduce": ["data/sample/*.npz", "data/sample/*.md"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "ninja>=1.11",
        "pybind11>=2.11",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "torchmetrics>=1.0",
        "pillow>=9.0",
        "torch-pruning>=1.4",
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-benchmark>=4.0"],
        "triton": ["triton>=3.0"],
    },
    **ext_kw,
    **cmd_kw,
)
