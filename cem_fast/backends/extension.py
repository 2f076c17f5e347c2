"""Build and load the C++ (``csrc/cem_cpu.cpp``) and CUDA (``csrc/cem_cuda.cu``) extensions.

``load_cpp_extension()`` / ``load_cuda_extension()`` return the extension module (functions
``assign_stats`` and ``scatter_grad``), importing an ahead-of-time build (``cem_fast._cem_cpu`` /
``cem_fast._cem_cuda``, made by ``setup.py`` under ``CEM_FAST_BUILD_EXT=1``) when there is one, else
compiling once with ``torch.utils.cpp_extension.load`` into a cache folder:
``$CEM_FAST_CACHE`` (default ``~/.cache/cem_fast``) ``/<torch and python version>/<name>``.
Both raise on failure (the compiler's output is in the message); the backends turn that into a warning.
``aot_extensions()`` gives ``setup.py`` the same sources and flags.
"""

from __future__ import annotations

import functools
import glob
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

CPU_NAME = "cem_fast_cpu"
CUDA_NAME = "cem_fast_cuda"
CPU_SOURCES = ("cem_cpu.cpp",)
CPU_HEADERS = ("cem_cpu_kernels.h", "cem_cpu_variants.h")
CUDA_SOURCES = ("cem_cuda.cu",)
# -ffp-contract=off: no fused multiply-add, so every instruction-set tier gives the same bits.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]
DEFAULT_CUDA_ARCH = "9.0+PTX"  # H200 SASS when no GPU is visible to pick the architecture from; PTX for newer GPUs


def csrc_dir() -> Path:
    """The folder holding the C++/CUDA sources: ``cem_fast/csrc`` (installed) or ``<repo>/csrc`` (checkout)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"cem_fast: C++ sources not found in {package / 'csrc'} or {package.parent / 'csrc'}")


def cache_dir(name: str) -> Path:
    """Build folder of one extension, per torch and Python version (the binary depends on both)."""
    root = Path(os.environ.get("CEM_FAST_CACHE") or Path.home() / ".cache" / "cem_fast")
    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    path = root / tag / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _valid_cuda_home(path: str | os.PathLike | None) -> bool:
    if not path:
        return False
    p = Path(path)
    has_cudart = any(
        (p / sub / "libcudart.so").exists()
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    )
    return has_cudart and (p / "bin" / "nvcc").exists()


def find_cuda_home() -> str:
    """The CUDA toolkit folder (holding ``bin/nvcc`` and ``lib64/libcudart.so``).

    Order: a valid ``$CUDA_HOME`` / ``$CUDA_PATH``; ``/usr/local/cuda``; ``/usr/local/cuda-*`` (the one
    matching torch's CUDA version first, then newest); the resolved ``nvcc`` on ``PATH``. A wrapper
    script named nvcc (as in ``/usr/local/bin``) is not a toolkit and is skipped.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    wanted = f"/usr/local/cuda-{torch.version.cuda}" if torch.version.cuda else None
    candidates += [p for p in versioned if p == wanted] + [p for p in versioned if p != wanted]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for cand in candidates:
        if _valid_cuda_home(cand):
            return str(Path(cand).resolve())
    raise RuntimeError(
        "cem_fast: no CUDA toolkit found (need bin/nvcc and lib64/libcudart.so); "
        f"looked at {[c for c in candidates if c]}; set CUDA_HOME"
    )


def _version_key(path: str) -> tuple:
    parts = path.rsplit("-", 1)[-1].split(".")
    return tuple(int(p) if p.isdigit() else -1 for p in parts)


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported quietly: on import it guesses CUDA_HOME from the ``nvcc`` on
    PATH (wrong for a wrapper script) and logs a warning when no GPU is visible; we set CUDA_HOME ourselves."""
    if "torch.utils.cpp_extension" not in sys.modules:
        if not _valid_cuda_home(os.environ.get("CUDA_HOME")):
            try:
                os.environ["CUDA_HOME"] = find_cuda_home()
            except RuntimeError:
                pass
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            import torch.utils.cpp_extension  # noqa: F401  (imported for sys.modules, quietly)
        finally:
            logger.setLevel(level)
    return sys.modules["torch.utils.cpp_extension"]


def _configure_cuda_env():
    """Point torch's extension builder at the real toolkit, and give it an arch list when it cannot ask a GPU."""
    cpp_extension = _cpp_extension()
    home = find_cuda_home()
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
    return home, cpp_extension


def _cuda_header_flags(home: str) -> list[str]:
    """``-isystem`` flags for the CUDA library headers torch's ATen/cuda includes (cusparse.h, cublas_v2.h, ...)
    when the toolkit lacks them, taken from the pip ``nvidia-*`` wheels torch depends on. Placed after the
    toolkit's own include folder, so they only fill gaps."""
    if (Path(home) / "include" / "cusparse.h").exists():
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = sorted({d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include"))})
    return [flag for d in dirs for flag in ("-isystem", d)]


def _import_aot(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


@functools.cache
def load_cpp_extension():
    """The C++/OpenMP CPU extension: the ahead-of-time build if installed, else built on first use (~1 min)."""
    prebuilt = _import_aot("cem_fast._cem_cpu")
    if prebuilt is not None:
        return prebuilt
    return build_cpp_extension(csrc_dir())


def build_cpp_extension(src: Path):
    """Compile (or reuse from the cache folder when unchanged) and import the CPU sources of the folder ``src``."""
    return _cpp_extension().load(
        name=CPU_NAME,
        sources=[str(src / s) for s in CPU_SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LD_FLAGS,
        build_directory=str(cache_dir(CPU_NAME)),
        verbose=False,
    )


def cuda_sources(src: Path | None = None) -> list[str]:
    """Paths of the CUDA extension's sources in ``src`` (default ``csrc_dir()``); raises if the .cu is missing."""
    src = src or csrc_dir()
    missing = [s for s in CUDA_SOURCES if not (src / s).is_file()]
    if missing:
        raise FileNotFoundError(f"cem_fast: CUDA sources {missing} not found in {src}")
    return [str(src / s) for s in CUDA_SOURCES]


@functools.cache
def load_cuda_extension():
    """The CUDA extension: the ahead-of-time build if installed, else built with nvcc on first use.
    It imports without a GPU too (only libcudart must load)."""
    prebuilt = _import_aot("cem_fast._cem_cuda")
    if prebuilt is not None:
        return prebuilt
    return build_cuda_extension(csrc_dir())


def build_cuda_extension(src: Path, name: str = CUDA_NAME):
    """Compile (or reuse from the cache folder when unchanged) and import the CUDA sources of the folder ``src``
    with the nvcc of ``find_cuda_home()``."""
    if not torch.version.cuda:
        raise RuntimeError("cem_fast: this torch build has no CUDA support")
    home, cpp_extension = _configure_cuda_env()
    headers = _cuda_header_flags(home)
    # The cache folder names the arch list: a build for one GPU generation is not reused for another.
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "native").replace(" ", "_").replace(";", "_").replace("+", "p")
    return cpp_extension.load(
        name=name,
        sources=cuda_sources(src),
        extra_include_paths=[str(src)],
        extra_cflags=CXX_FLAGS + headers,
        extra_cuda_cflags=NVCC_FLAGS + headers,
        extra_ldflags=LD_FLAGS,
        build_directory=str(cache_dir(f"{name}-{arch}")),
        verbose=False,
    )


def aot_extensions(with_cuda: bool | None = None) -> list:
    """``ext_modules`` for ``setup.py`` (run from the repository root): the CPU extension, plus the CUDA one
    when ``with_cuda`` (default: when torch has CUDA, a toolkit is found and ``csrc/cem_cuda.cu`` exists)."""
    cpp_extension = _cpp_extension()
    src = csrc_dir()
    rel = os.path.relpath(src, Path.cwd())  # setuptools wants source paths relative to setup.py
    exts = [
        cpp_extension.CppExtension(
            "cem_fast._cem_cpu",
            [os.path.join(rel, s) for s in CPU_SOURCES],
            include_dirs=[str(src)],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=LD_FLAGS,
        )
    ]
    if with_cuda is None:
        try:
            with_cuda = bool(torch.version.cuda) and bool(cuda_sources()) and bool(find_cuda_home())
        except (FileNotFoundError, RuntimeError):
            with_cuda = False
    if with_cuda:
        home = _configure_cuda_env()[0]
        headers = _cuda_header_flags(home)
        sources = [os.path.join(rel, os.path.basename(s)) for s in cuda_sources()]
        exts.append(
            cpp_extension.CUDAExtension(
                "cem_fast._cem_cuda",
                sources,
                include_dirs=[str(src)],
                extra_compile_args={"cxx": CXX_FLAGS + headers, "nvcc": NVCC_FLAGS + headers},
                extra_link_args=LD_FLAGS,
            )
        )
    return exts
