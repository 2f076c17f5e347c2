"""Count the GPU kernels of one CEM forward+backward on the triton path, without a GPU.

Run under the Triton interpreter (CPU tensors stand in for CUDA ones)::

    TRITON_INTERPRET=1 python bench/launch_count.py          # paper, diag; last line: launches per ...: N
    TRITON_INTERPRET=1 python bench/launch_count.py --all    # one line per variant x covariance

Counting boundary: from the loss call ``cem(z, y)`` (``CEMLoss(backend="triton")`` in training mode,
``validate=False``) to the end of the CEM backward, ``torch.autograd.grad(loss, z, g)`` with the upstream
gradient ``g`` already on the device (what CEM adds to a training step). ``--validate`` also counts the
``validate=True`` checks. Counted: every Triton kernel launch (a hook on the launcher) and every ATen op that
launches a kernel on a GPU. Not counted: views and metadata ops, ``empty``/``empty_like``/``empty_strided``
(the caching allocator launches nothing). Host syncs (``.item()``, ``aten._local_scalar_dense``: a
device-to-host copy, not a kernel) are reported apart. On the CPU, ``CEMLoss`` checks NaN/Inf after the loss
(with one ``.item()``) where a GPU checks before it; the ``validate=True`` row is therefore a CPU count.

Two paths are counted: ``cemloss`` (the library as a user calls it) and ``direct`` (the backend's
``forward_diag(update_state=True)`` + ``scatter_grad(grad_out=...)`` in a minimal autograd.Function: what
``CEMLoss`` costs once it calls them for the fused variants).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

# ATen ops that launch no kernel on a GPU (besides views, found by OpOverload.is_view)
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "resize_",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "set_",
}
_SYNC = {"_local_scalar_dense", "item", "equal", "is_nonzero"}


class LaunchCounter(TorchDispatchMode):
    """Context manager recording the would-be GPU kernels: ``.aten`` (op names), ``.triton`` (kernel names),
    ``.syncs`` (host syncs); ``.total`` = Triton launches + ATen kernels."""

    def __init__(self):
        super().__init__()
        self.aten = collections.Counter()
        self.triton = collections.Counter()
        self.syncs = collections.Counter()
        self._patched = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC:
            self.syncs[name] += 1
        elif not (func.is_view or name in _NO_KERNEL):
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    def _hook(self, cls):
        original = cls.run
        counter = self

        def run(fn_self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                counter.triton[getattr(fn_self, "__name__", None) or fn_self.fn.__name__] += 1
            with _disable_current_modes():  # the interpreter's own tensor copies are not the kernel's
                return original(fn_self, *args, **kwargs)

        cls.run = run
        self._patched.append((cls, original))

    def __enter__(self):
        import triton.runtime.jit as jit

        self._hook(jit.JITFunction)
        try:
            from triton.runtime.interpreter import InterpretedFunction

            self._hook(InterpretedFunction)
        except ImportError:  # pragma: no cover - an interpreter-less triton
            pass
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, original in reversed(self._patched):
            cls.run = original
        self._patched.clear()
        return super().__exit__(*exc)

    def describe(self) -> str:
        parts = (
            [f"{k} x{v}" for k, v in sorted(self.triton.items())]
            + [f"aten.{k} x{v}" for k, v in sorted(self.aten.items())]
            + [f"sync aten.{k} x{v}" for k, v in sorted(self.syncs.items())]
        )
        return ", ".join(parts) or "nothing"


VARIANT_CODES = {"official": 0, "official-trained": 1, "paper": 2}


def make_case(variant: str, covariance: str, *, B=48, D=20, C=3, m=2, device="cpu", validate=False, seed=0):
    """A fitted ``CEMLoss`` on the triton backend and a batch ``(z, labels)``; small: the interpreter is slow."""
    from cem_fast import CEMLoss

    gen = torch.Generator().manual_seed(seed)
    cem = CEMLoss(
        C, m, variant=variant, covariance=covariance, backend="triton", dataset_size=10 * B, validate=validate
    ).to(device)
    cent = torch.randn(C, m, D, generator=gen)
    if variant == "official":
        cem.set_clusters(cent)
    elif variant == "official-trained":
        cem.set_clusters(cent, torch.full((C, m), 1.0 / m), torch.rand(C, m, generator=gen))
    elif covariance == "diag":
        cem.set_clusters(cent, torch.full((C, m), 1.0 / (C * m)), torch.rand(C, m, D, generator=gen))
    else:
        a = torch.randn(C, m, D, D, generator=gen) / D
        cem.set_clusters(cent, torch.full((C, m), 1.0 / (C * m)), a @ a.transpose(-1, -2))
    if variant == "official-trained":
        # the hinge constant: host arithmetic on CPU tensors (whatever the device), cached per (sigma, threshold);
        # computed here so that the count holds only what the device would run
        from cem_fast.variants import trained_threshold

        trained_threshold(cem.sigma, cem.var_threshold)
    z = torch.randn(B, D, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    return cem.train(), z, labels


class _Direct(torch.autograd.Function):
    """The fused path as ``CEMLoss`` will take it: one ``forward_diag`` (state in place), one ``scatter_grad``."""

    @staticmethod
    def forward(ctx, z, labels, cem, code):
        from cem_fast.backends import KernelArgs
        from cem_fast.backends import triton_backend as tb
        from cem_fast.variants import trained_threshold

        threshold = trained_threshold(cem.sigma, cem.var_threshold) if code == 1 else 0.0
        args = KernelArgs(
            code,
            cem.m,
            cem.class_conditional,
            cem.sigma,
            cem.num_classes,
            cem._dataset_size(z.shape[0]) or 0.0,
            threshold,
            bool(cem.log_entropy),
            cem.replicate_index_bug,
            cem.reduction == "mean_dim",
        )
        loss, coef, _, _, assign = tb.forward_diag(
            z, labels, cem.centroids.reshape(-1, z.shape[1]), cem.pi, cem.variance, args, update_state=code == 2
        )
        ctx.save_for_backward(z, assign, cem.centroids.reshape(-1, z.shape[1]), coef)
        return loss

    @staticmethod
    def backward(ctx, grad):
        from cem_fast.backends import triton_backend as tb

        z, assign, centroids, coef = ctx.saved_tensors
        return tb.scatter_grad(z, assign, centroids, coef, grad, 2.0), None, None, None


def count(
    variant: str, covariance: str = "diag", path: str = "cemloss", validate: bool = False, device: str = "cpu"
) -> LaunchCounter:
    """One forward+backward of the given configuration under a ``LaunchCounter``."""
    cem, z, labels = make_case(variant, covariance, device=device, validate=validate)
    if path == "direct" and covariance != "diag":
        raise ValueError("the direct path exists for diagonal covariance only")
    g = torch.ones((), dtype=cem.centroids.dtype, device=device)  # the upstream gradient, made before
    counter = LaunchCounter()
    with counter:
        if path == "cemloss":
            loss = cem(z, labels)
        else:
            loss = _Direct.apply(z, labels, cem, VARIANT_CODES[variant])
        torch.autograd.grad(loss, z, g.to(loss.dtype))
    return counter


CONFIGS = [("paper", "diag"), ("official", "diag"), ("official-trained", "diag"), ("paper", "full")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="one line per variant x covariance")
    parser.add_argument("--variant", default="paper", choices=[v for v, _ in CONFIGS[:3]])
    parser.add_argument("--covariance", default="diag", choices=["diag", "full"])
    parser.add_argument("--path", default="cemloss", choices=["cemloss", "direct"])
    parser.add_argument("--validate", action="store_true", help="also count validate=True")
    parser.add_argument("--verbose", "-v", action="store_true", help="list the kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        parser.error("run with TRITON_INTERPRET=1 (no CUDA device here)")
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    configs = CONFIGS if args.all else [(args.variant, args.covariance)]
    last = None
    for variant, cov in configs:
        paths = ["cemloss", "direct"] if cov == "diag" else ["cemloss"]
        for path in paths if args.all else [args.path]:
            for validate in [False, True] if args.validate and path == "cemloss" else [False]:
                c = count(variant, cov, path, validate, device)
                syncs = sum(c.syncs.values())
                line = (
                    f"{variant:>16s} {cov:4s} {path:7s} validate={str(validate):5s}: {c.total:3d} launches "
                    f"({sum(c.triton.values())} triton, {sum(c.aten.values())} aten), {syncs} host syncs"
                )
                print(line + (f"\n    {c.describe()}" if args.verbose else ""), flush=True)
                if not validate:
                    last = c.total if last is None or not args.all else last
    print(f"launches per forward+backward: {last}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.exit(main())
