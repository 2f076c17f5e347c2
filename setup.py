"""Only the optional ahead-of-time build of the C++/CUDA kernels; all metadata is in ``pyproject.toml``.

``pip install .`` installs the pure-Python package and the kernels are compiled on first use. With
``CEM_FAST_BUILD_EXT=1`` the C++ extension (and the CUDA one, when a CUDA toolkit is found) is built into the
wheel instead.
"""

import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def ahead_of_time_build():
    if os.environ.get("CEM_FAST_BUILD_EXT") != "1":
        return {}
    # extension.py is loaded on its own: importing the cem_fast package would need numpy and more. It imports
    # torch.utils.cpp_extension itself, after pointing CUDA_HOME at a real toolkit.
    spec = importlib.util.spec_from_file_location(
        "_cem_fast_extension", os.path.join(HERE, "cem_fast", "backends", "extension.py")
    )
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    ext_modules = extension.aot_extensions()
    return {"ext_modules": ext_modules, "cmdclass": {"build_ext": extension._cpp_extension().BuildExtension}}


# csrc/ is installed as the package cem_fast.csrc (package-dir in pyproject.toml); pyproject.toml's find directive
# cannot add a mapped folder to the packages it finds, so the list is made here.
PACKAGES = find_packages(include=["cem_fast", "cem_fast.*", "reproduce", "reproduce.*"]) + ["cem_fast.csrc"]

setup(packages=PACKAGES, **ahead_of_time_build())
