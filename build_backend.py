"""In-tree PEP 517 build backend: setuptools, plus torch and ninja as build requirements when
``CEM_FAST_BUILD_EXT=1`` asks for the ahead-of-time C++/CUDA build.

A plain ``pip install .`` builds a pure-Python wheel and needs no torch in its build environment (the
kernels are compiled on first use instead), so torch is requested only for the ahead-of-time build.
"""

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the PEP 517 / 660 hooks, unchanged)

EXT_BUILD_REQUIRES = ["torch>=2.4", "ninja>=1.11", "numpy>=1.24"]


def _extra():
    return EXT_BUILD_REQUIRES if os.environ.get("CEM_FAST_BUILD_EXT") == "1" else []


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _extra()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _extra()
