"""What a CEM variant provides, the settings of one loss evaluation, and the registry of variants by name.

A variant turns the per-cluster statistics of a batch into the loss. The ``K = num_classes * m`` clusters are
numbered ``k = c * m + j`` (cluster ``j`` of class ``c``); the statistics are ``counts [K]`` (members in the
batch) and ``sqdev [K, D]`` (sum over members of ``(z - mu)^2``), or for full covariance ``moments [K, D, D]``
(sum of ``(z - mu)(z - mu)^T``). ``Variant.math`` returns the loss and ``coef``, the gradient of the loss with
respect to that statistic, from which the backward pass writes ``dL/dz_i = 2 * coef[a_i] * (z_i - mu[a_i])``.
The state is ``pi [C, m]`` and ``variance`` (shape per variant, ``Variant.variance_shape``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..backends.contract import KernelArgs


@dataclass  # not frozen: a frozen dataclass costs 1.5 us more to build, and one is built per loss evaluation
class LossParams:
    """The settings of one loss evaluation besides the state and the variant (``ops.CEMFunction`` reads them).

    The variant math reads the first seven; ``backend`` (a resolved backend name), ``process_group`` and
    ``update_state`` (the state will replace the module's: a backend may write it in place) are for ``ops``.
    """

    num_classes: int
    m: int
    sigma: float
    class_conditional: bool = True
    covariance: str = "diag"
    reduction: str = "mean_dim"
    dataset_size: float = 0.0
    backend: str = "torch"
    process_group: Optional[object] = None
    update_state: bool = False


class Variant:
    """One CEM variant: its defaults, its options, the shapes of its state, how a refit builds that state, its
    math on the per-cluster statistics and its number in the C++ kernels. Subclasses set the class attributes
    and implement ``state_from_kmeans`` and ``math``; ``get_variant(name, **options)`` builds one."""

    name: str = ""
    code: int = -1  # the variant's number in csrc/cem_cpu_variants.h
    default_clusters: int = 1  # clusters per class when CEMLoss is given none
    kmeans_iters: int = 50  # Lloyd iterations of a refit at most, by default
    warm_start: bool = True  # later refits start from the last centroids (else a fresh start each time)
    fresh_init: str = "kmeans++"  # the k-means start of a fresh refit
    streams_state: bool = False  # pi and variance change at every training step (Eq. 5-6)
    covariances: tuple = ("diag",)
    reductions: tuple = ("mean_dim",)
    defaults: dict = {}  # the variant's own options and their defaults

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"unexpected option(s) {unknown} for variant={self.name!r}; allowed: {sorted(self.defaults)}"
            )
        self.options = self.check_options({**self.defaults, **options})

    def check_options(self, options: dict) -> dict:
        """The options, checked (ValueError/TypeError naming the option)."""
        return options

    def check_config(self, covariance: str, reduction: str, class_conditional: bool) -> None:
        """Reject a combination of CEMLoss settings that this variant does not define."""
        if covariance not in self.covariances:
            raise ValueError(
                f"covariance={covariance!r} is not defined for variant={self.name!r}, which has "
                f"covariance in {self.covariances}"
            )
        if reduction not in self.reductions:
            raise ValueError(
                f"reduction={reduction!r} is not defined for variant={self.name!r}, which has "
                f"reduction in {self.reductions} (its loss is a per-dimension mean by construction)"
            )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    # ------------------------------------------------------------------ state

    def variance_shape(self, num_classes: int, m: int, D: int, covariance: str) -> tuple:
        """Shape of the ``variance`` state for ``D`` features."""
        raise NotImplementedError

    def default_weight(self, num_classes: int, m: int) -> float:
        """The uniform ``pi`` of ``CEMLoss.set_clusters`` (within-class shares unless the variant says otherwise)."""
        return 1.0 / m

    def kmeans_init(self, fitted: bool) -> str:
        """The ``init`` of ``clustering.kmeans`` for a refit (``fitted``: centroids exist already)."""
        return "warm" if fitted and self.warm_start else self.fresh_init

    def state_from_kmeans(
        self, x: torch.Tensor, result, num_classes: int, m: int, covariance: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pi [C, m], variance)`` after a refit on features ``x [N, D]`` with k-means ``result``."""
        raise NotImplementedError

    def dataset_size(self, configured: Optional[int], fitted_size: float, batch: int) -> Optional[float]:
        """The ``N`` of the math: CEMLoss's ``dataset_size``, else the last refit's sample count."""
        N = configured or fitted_size
        if N <= 0:
            raise ValueError(f"variant={self.name!r} needs dataset_size (samples per epoch)")
        return float(N)

    # ------------------------------------------------------------------ math

    def math(self, counts: torch.Tensor, stat: torch.Tensor, pi: torch.Tensor, variance: torch.Tensor, p: LossParams):
        """``(loss, coef, new_pi, new_variance)`` from the batch statistics; the state keeps its shapes.

        Tensor math with no host synchronisation; it runs under ``torch.no_grad`` (or inside the autograd
        Function's forward). For full covariance ``coef`` is ``(chol, factor)`` (see ``variants.paper``).
        """
        raise NotImplementedError

    def kernel_options(self, sigma: float) -> tuple[float, bool, bool]:
        """``(trained_threshold, log_entropy, replicate_index_bug)`` of the C++ kernels (only official-trained
        reads them)."""
        return 0.0, True, False

    def kernel_args(self, p: LossParams) -> KernelArgs:
        """The ``args`` of a backend's ``forward_diag`` / ``variant_math`` (after the state)."""
        return KernelArgs(
            self.code,
            p.m,
            p.class_conditional,
            p.sigma,
            p.num_classes,
            p.dataset_size,
            *self.kernel_options(p.sigma),
            p.reduction == "mean_dim",
        )

    def entropy_bound(self, pi: torch.Tensor, variance: torch.Tensor, sigma: float, D: int) -> torch.Tensor:
        """Eq. 3's bound on H(x | z_noisy) up to H(x), from the state."""
        raise ValueError(
            f"variant={self.name!r} keeps no covariance state between batches; entropy_bound needs "
            f"variant='paper' or 'official-trained'"
        )


# --------------------------------------------------------------------------- shared math


def group_counts(counts: torch.Tensor, m: int, class_conditional: bool) -> torch.Tensor:
    """Samples per group (class, or one group of all clusters), broadcast back to ``[K]``."""
    if class_conditional:
        return counts.view(-1, m).sum(1).repeat_interleave(m)
    return counts.sum().expand(counts.shape[0])


def num_present(counts: torch.Tensor, m: int, class_conditional: bool) -> torch.Tensor:
    """|P|: classes present in the batch (1 when not class-conditional), at least 1 to keep an empty batch at 0."""
    if class_conditional:
        present = (counts.view(-1, m).sum(1) > 0).to(counts.dtype).sum()
    else:
        present = (counts.sum() > 0).to(counts.dtype)
    return present.clamp_min(1.0)


# --------------------------------------------------------------------------- registry

REGISTRY: dict[str, type[Variant]] = {}
DEFAULT_VARIANT = "paper"


def register(cls: type[Variant]) -> type[Variant]:
    """Class decorator: make ``cls`` known to ``get_variant`` under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def names() -> tuple:
    """The registered variant names, the default first, then alphabetical."""
    return tuple(sorted(REGISTRY, key=lambda n: (n != DEFAULT_VARIANT, n)))


def variant_type(name) -> type[Variant]:
    """The class of the variant called ``name`` (ValueError naming ``variant`` when there is none)."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"variant must be one of {names()}, got {name!r}")
    return REGISTRY[name]


def get_variant(name, **options) -> Variant:
    """The variant called ``name`` with its ``options`` (checked; the others take their defaults)."""
    return variant_type(name)(**options)
