"""The authors' CEM losses, loaded at run time from a checkout of their repository (nothing of it is copied here).

``load_official(path)`` parses ``model_training_GMM.py`` and ``model_training_paral_pruning.py`` with
``ast``, takes only the ``compute_class_means`` method of each (the last definition in its class, as
Python would bind it), compiles that one node with its original file name and line numbers, and runs it
in a namespace holding just the imports it uses (``torch``, ``np``, ``nn``, ``F``). The method is bound
to a small stand-in ``self`` carrying the attributes it reads.

Their code calls ``.cuda()`` on intermediate tensors. For CPU inputs the call runs with
``torch.Tensor.cuda`` temporarily replaced by the identity (``_cuda_is_identity``), so everything stays on
the CPU; for CUDA inputs nothing is patched.

This module also builds the identical inputs that parity checks hand to both sides (``parity_case``).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

GMM_FILE = "model_training_GMM.py"
PP_FILE = "model_training_paral_pruning.py"
METHOD = "compute_class_means"
_NAMESPACE = {"torch": torch, "np": np, "nn": nn, "F": F}


class OfficialRepoError(ValueError):
    """The path given as the authors' checkout is not one (or its ``compute_class_means`` cannot be used)."""


def _check_repo(repo) -> Path:
    if not isinstance(repo, (str, Path)):
        raise TypeError(f"official_repo must be a path, got {type(repo).__name__}")
    path = Path(repo).expanduser()
    if not path.is_dir():
        raise OfficialRepoError(
            f"official_repo={str(repo)!r} is not a directory; pass a checkout of "
            f"github.com/xiasong0501/CEM (it must hold {GMM_FILE} and {PP_FILE})"
        )
    missing = [name for name in (GMM_FILE, PP_FILE) if not (path / name).is_file()]
    if missing:
        raise OfficialRepoError(
            f"official_repo={str(repo)!r} is not a checkout of xiasong0501/CEM: missing {', '.join(missing)}"
        )
    return path


def _find_method(tree: ast.Module, file: Path) -> ast.FunctionDef:
    found = []
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef):
            defs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == METHOD]
            if defs:
                found.append(defs[-1])  # a later def in the class body replaces an earlier one
    if len(found) != 1:
        raise OfficialRepoError(f"{file}: expected one class defining {METHOD}, found {len(found)}")
    return found[0]


def _free_names(fn: ast.FunctionDef) -> set:
    """Names the function reads but neither assigns nor takes as arguments (its globals)."""
    bound = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    bound |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    loads = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loads - bound


def _load_method(file: Path) -> Callable:
    source = file.read_text()
    try:
        fn = _find_method(ast.parse(source, filename=str(file)), file)
    except SyntaxError as exc:
        raise OfficialRepoError(f"{file} does not parse: {exc}") from exc
    unknown = sorted(n for n in _free_names(fn) if n not in _NAMESPACE and not hasattr(builtins, n))
    if unknown:
        raise OfficialRepoError(f"{file}:{fn.lineno} {METHOD} uses names this loader does not provide: {unknown}")
    fn.decorator_list = []
    code = compile(ast.Module(body=[fn], type_ignores=[]), filename=str(file), mode="exec")
    namespace = dict(_NAMESPACE)
    exec(code, namespace)
    return namespace[METHOD]


@contextlib.contextmanager
def _cuda_is_identity(active: bool):
    """Within the block ``Tensor.cuda()`` returns the tensor itself (only when ``active``)."""
    if not active:
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@dataclass
class Official:
    """The authors' two loss functions, each taking the batch as their training step hands it over."""

    gmm_method: Callable
    pp_method: Callable
    repo: Path

    def gmm_loss(self, z4d: torch.Tensor, labels: torch.Tensor, centroids_list, *, sigma: float = 0.025):
        """``model_training_GMM.compute_class_means``: ``centroids_list[c]`` is ``[m, D]`` in ``z4d``'s dtype."""
        stand_in = types.SimpleNamespace(regularization_strength=sigma)
        with _cuda_is_identity(not z4d.is_cuda):
            # their step computes torch.unique(labels) right before the call, so it is part of the cost
            loss, _ = self.gmm_method(stand_in, z4d, labels, torch.unique(labels), centroids_list)
        return loss

    def pp_loss(
        self,
        z4d: torch.Tensor,
        labels: torch.Tensor,
        centroids_list,
        weights_list,
        variances_list,
        *,
        sigma: float = 0.025,
        num_classes: int,
        batches_per_epoch: int,
        batch_size: int,
        var_threshold: float = 0.125,
        log_entropy: int = 1,
    ):
        """``model_training_paral_pruning.compute_class_means``; its epoch size is
        ``batches_per_epoch * batch_size`` (``len(client_dataloader[0]) * batch_size`` in their code)."""
        stand_in = types.SimpleNamespace(
            client_dataloader=[range(batches_per_epoch)],
            batch_size=batch_size,
            num_class=num_classes,
            pooling=False,
            log_entropy=log_entropy,
            var_threshold=var_threshold,
            regularization_strength=sigma,
        )
        with _cuda_is_identity(not z4d.is_cuda):
            loss, _ = self.pp_method(
                stand_in, z4d, labels, torch.unique(labels), centroids_list, weights_list, variances_list
            )
        return loss


def load_official(repo) -> Official:
    """Load the authors' ``compute_class_means`` (GMM and PP) from the checkout at ``repo``."""
    path = _check_repo(repo)
    return Official(_load_method(path / GMM_FILE), _load_method(path / PP_FILE), path)


def official_arg(repo) -> Optional[Official]:
    """``--official-repo`` of the bench scripts: ``None`` when not given, else the loaded functions; a bad
    checkout ends the script with one line naming it."""
    if not repo:
        return None
    try:
        return load_official(repo)
    except OfficialRepoError as exc:
        raise SystemExit(f"error: --official-repo: {exc}")


# --------------------------------------------------------------------------- identical inputs for both sides


@dataclass
class Case:
    """One batch and cluster state, as tensors for ``CEMLoss.set_clusters`` and as the authors' lists."""

    z: torch.Tensor  # [B, 8, H, W]
    labels: torch.Tensor  # [B] int64
    centroids: torch.Tensor  # [C, m, D]
    weights: torch.Tensor  # [C, m], each row sums to 1
    variances: torch.Tensor  # [C, m] scalar variances

    @property
    def centroids_list(self):
        return [c for c in self.centroids]

    @property
    def weights_list(self):
        return [w for w in self.weights]

    @property
    def variances_list(self):
        return [v for v in self.variances]


def parity_case(
    B: int,
    C: int,
    m: int,
    H: int,
    *,
    seed: int,
    dtype=torch.float64,
    tight: bool = False,
    device: Optional[torch.device] = None,
) -> Case:
    """Sigmoid-range features ``[B, 8, H, H]``, random labels and a full cluster state.

    Every class holds exactly ``m`` clusters with a weight and a variance each, so the authors' lists line
    up index for index (their k-means padding of under-populated clusters never arises). ``tight=True``
    puts each sample next to a centroid of its class and draws variances around the official-trained hinge
    (``var_threshold * sigma^2 = 7.8e-5`` at the defaults), so that it is inactive for some clusters only.
    """
    gen = torch.Generator().manual_seed(seed)
    D = 8 * H * H
    labels = torch.randint(0, C, (B,), generator=gen)
    centroids = torch.sigmoid(torch.randn(C, m, D, generator=gen, dtype=torch.float64))
    if tight:
        member = torch.randint(0, m, (B,), generator=gen)
        z = centroids[labels, member] + 0.003 * torch.randn(B, D, generator=gen, dtype=torch.float64)
        variances = torch.rand(C, m, generator=gen, dtype=torch.float64) * 3.2e-4  # the hinge sits at 7.8e-5
    else:
        z = torch.sigmoid(torch.randn(B, D, generator=gen, dtype=torch.float64))
        variances = torch.rand(C, m, generator=gen, dtype=torch.float64) * 0.05
    weights = torch.rand(C, m, generator=gen, dtype=torch.float64) + 0.05
    weights = weights / weights.sum(1, keepdim=True)
    to = dict(device=device, dtype=dtype)
    return Case(
        z.reshape(B, 8, H, H).to(**to), labels.to(device), centroids.to(**to), weights.to(**to), variances.to(**to)
    )


# --------------------------------------------------------------------------- parity: ours against theirs


@dataclass(frozen=True)
class ParitySpec:
    """One comparison: a variant, the batch shape ``[B, 8, H, H]``, classes, clusters and PP options."""

    variant: str  # "official" (vs GMM) or "official-trained" (vs PP)
    B: int = 128
    C: int = 10
    m: int = 3
    H: int = 8
    batches_per_epoch: int = 391
    log_entropy: int = 1
    tight: bool = False
    seed: int = 0

    @property
    def name(self) -> str:
        extra = (
            f" batches={self.batches_per_epoch} log_entropy={self.log_entropy}"
            if self.variant == "official-trained"
            else ""
        )
        return f"{self.variant} B={self.B} C={self.C} m={self.m} D={8 * self.H * self.H}{extra}" + (
            " tight" if self.tight else ""
        )


PARITY_SPECS = (
    ParitySpec("official", C=10, m=3, H=8),
    ParitySpec("official", C=10, m=10, H=16),
    ParitySpec("official", C=100, m=3, H=8),
    ParitySpec("official-trained", C=10, m=3, H=8),
    ParitySpec("official-trained", C=10, m=10, H=16),
    ParitySpec("official-trained", C=100, m=3, H=8),
    ParitySpec("official-trained", C=10, m=3, H=8, batches_per_epoch=2),  # lambda >= 1 -> 0.99
    ParitySpec("official-trained", C=10, m=3, H=8, tight=True),  # hinge inactive for some clusters
    ParitySpec("official-trained", C=10, m=3, H=8, log_entropy=0),
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _loss_and_grad(fn, z):
    zz = z.detach().clone().requires_grad_(True)
    loss = fn(zz)
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad


def parity(official: Official, spec: ParitySpec, *, backend: str = "torch", sigma: float = 0.025) -> dict:
    """Loss and gradient of ``CEMLoss`` against the authors' function on one float64 case.

    Returns the relative errors and both losses; for official-trained also the loss of the corrected
    default (``replicate_index_bug=False``) and the fraction of samples with a zero gradient.
    """
    from cem_fast import CEMLoss

    case = parity_case(spec.B, spec.C, spec.m, spec.H, seed=spec.seed, tight=spec.tight)
    if spec.variant == "official":
        theirs = lambda z: official.gmm_loss(z, case.labels, case.centroids_list, sigma=sigma)  # noqa: E731
        make = lambda **kw: CEMLoss(spec.C, spec.m, sigma=sigma, variant="official", backend=backend, **kw)  # noqa: E731
        bug_kw = {}
    elif spec.variant == "official-trained":
        theirs = lambda z: official.pp_loss(  # noqa: E731
            z,
            case.labels,
            case.centroids_list,
            case.weights_list,
            case.variances_list,
            sigma=sigma,
            num_classes=spec.C,
            batches_per_epoch=spec.batches_per_epoch,
            batch_size=spec.B,
            log_entropy=spec.log_entropy,
        )
        make = lambda **kw: CEMLoss(  # noqa: E731
            spec.C,
            spec.m,
            sigma=sigma,
            variant="official-trained",
            backend=backend,
            dataset_size=spec.batches_per_epoch * spec.B,
            log_entropy=spec.log_entropy,
            **kw,
        )
        bug_kw = {"replicate_index_bug": True}
    else:
        raise ValueError(f"variant must be 'official' or 'official-trained', got {spec.variant!r}")
    ours = make(**bug_kw).set_clusters(case.centroids, case.weights, case.variances if bug_kw else None)
    ref_loss, ref_grad = _loss_and_grad(theirs, case.z)
    our_loss, our_grad = _loss_and_grad(lambda z: ours(z, case.labels), case.z)
    out = {
        "case": spec.name,
        "backend": backend,
        "theirs": float(ref_loss),
        "ours": float(our_loss),
        "loss_rel_err": abs(float(our_loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-300),
        "grad_rel_err": _rel(our_grad, ref_grad),
        "zero_grad_rows": float((ref_grad.flatten(1).abs().sum(1) == 0).double().mean()),
    }
    if bug_kw:
        fixed = make().set_clusters(case.centroids, case.weights, case.variances)
        fixed_loss, fixed_grad = _loss_and_grad(lambda z: fixed(z, case.labels), case.z)
        out["corrected_loss"] = float(fixed_loss)
        out["corrected_vs_theirs_loss"] = abs(float(fixed_loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-300)
        out["corrected_vs_theirs_grad"] = _rel(fixed_grad, ref_grad)
    return out
