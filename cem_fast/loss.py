"""``CEMLoss``: conditional entropy maximisation as an ``nn.Module`` that drops into a training loop."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from . import backends, checks
from .clustering import cluster_second_moments, kmeans
from .distributed import all_gather_rows
from .functional import accumulation_dtype, cem_loss
from .theory import entropy_bound

_VARIANT_OPTIONS = {
    "paper": {},
    "official": {},
    "official-trained": {"var_threshold": 0.125, "log_entropy": 1, "replicate_index_bug": False},
}
_COMMON_OPTIONS = {"kmeans_iters": None, "seed": 0}
_KMEANS_ITERS = {"paper": 50, "official": 60, "official-trained": 50}
# A refit whose features vary less than this fraction of the noise variance has collapsed.
_COLLAPSE_RATIO = 1e-3


class CEMLoss(nn.Module):
    """Conditional entropy maximisation loss (Xia et al., CVPR 2025) for split-inference encoders.

    ``loss = cem(z, labels)`` on the encoder output ``z`` (before the defence's noise), added to the
    task loss with a weight lambda; ``cem.refit(features, labels)`` at each epoch end fits the clusters
    (k-means inside each class) from that epoch's features. See ``docs`` in the README for the variants:

    * ``"paper"`` (default): Eq. 5-7, streaming ``pi`` and covariances (``covariance="diag"|"full"``), log-det.
    * ``"official"``: the authors' ``model_training_GMM.py`` loss (per-batch diagonal variances).
    * ``"official-trained"``: the loss their training scripts ran (scalar variances, hinge at
      ``var_threshold * sigma^2``); needs ``dataset_size`` (batches per epoch x batch size) or takes
      the refit's sample count. Options ``var_threshold=0.125``, ``log_entropy=1``, ``replicate_index_bug=False``.

    Other options: ``kmeans_iters`` (default 50, 60 for official), ``seed`` (k-means RNG), ``backend``
    (``"auto"``, ``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``), ``warmup`` (``"raise"`` before the first
    refit, or ``"zero"``: a zero loss that joins the graph), ``process_group`` (data parallel: statistics
    are all-reduced so every rank sees the global batch), ``validate`` (label range and NaN/Inf checks,
    which synchronise with the device; turn off for CUDA graphs).
    """

    def __init__(self, num_classes: int, clusters_per_class: Optional[int] = None, sigma: float = 0.025,
                 variant: str = "paper", covariance: str = "diag", reduction: str = "mean_dim",
                 dataset_size: Optional[int] = None, class_conditional: bool = True, backend: str = "auto",
                 warmup: str = "raise", process_group=None, validate: bool = True, **variant_options):
        super().__init__()
        self.variant = checks.choice("variant", variant, checks.VARIANTS)
        self.num_classes = checks.positive_int("num_classes", num_classes)
        self.m = checks.positive_int("clusters_per_class",
                                     checks.DEFAULT_CLUSTERS[variant] if clusters_per_class is None else clusters_per_class)
        self.sigma = checks.positive_float("sigma", sigma)
        self.covariance = checks.choice("covariance", covariance, ("diag", "full"))
        if covariance == "full" and variant != "paper":
            raise ValueError(f"covariance='full' exists only for variant='paper', got variant={variant!r}")
        self.reduction = checks.choice("reduction", reduction, ("mean_dim", "sum"))
        if reduction != "mean_dim" and variant != "paper":
            raise ValueError(f"reduction applies to variant='paper' only (the official losses are per-dimension "
                             f"means by construction), got reduction={reduction!r} with variant={variant!r}")
        self.dataset_size = None if dataset_size is None else checks.positive_int("dataset_size", dataset_size)
        if not isinstance(class_conditional, bool):
            raise TypeError(f"class_conditional must be a bool, got {type(class_conditional).__name__}")
        self.class_conditional = class_conditional
        from . import backends
        self.backend = backends._check_name(backend)
        self.warmup = checks.choice("warmup", warmup, ("raise", "zero"))
        self.process_group = process_group
        self.validate = bool(validate)
        allowed = {**_COMMON_OPTIONS, **_VARIANT_OPTIONS[variant]}
        unknown = sorted(set(variant_options) - set(allowed))
        if unknown:
            raise TypeError(f"unexpected option(s) {unknown} for variant={variant!r}; allowed: {sorted(allowed)}")
        opts = {**allowed, **variant_options}
        self.var_threshold = checks.positive_float("var_threshold", opts.get("var_threshold", 0.125))
        self.log_entropy = checks.choice("log_entropy", opts.get("log_entropy", 1), (0, 1))
        self.replicate_index_bug = bool(opts.get("replicate_index_bug", False))
        if self.replicate_index_bug and not class_conditional:
            raise ValueError("replicate_index_bug=True needs class_conditional=True")
        iters = opts["kmeans_iters"] if opts["kmeans_iters"] is not None else _KMEANS_ITERS[variant]
        self.kmeans_iters = checks.positive_int("kmeans_iters", iters)
        self.seed = int(opts["seed"])
        self.refits = 0
        self.last_refit_iterations = 0  # Lloyd iterations of the last refit (not saved in the state)
        C, m = self.num_classes, self.m
        self.register_buffer("centroids", torch.zeros(C, m, 0))
        self.register_buffer("pi", torch.zeros(C, m))
        self.register_buffer("variance", torch.zeros(C, m, 0))
        self.register_buffer("fitted_size", torch.zeros((), dtype=torch.float64))  # samples in the last refit; 0 = never fitted
        self._fitted_size = 0.0  # host mirror of the buffer, so the forward never reads the device

    # ------------------------------------------------------------------ state

    @property
    def fitted(self) -> bool:
        """Whether ``refit`` (or ``set_clusters``) has installed centroids."""
        return self.centroids.shape[-1] > 0

    @property
    def feature_dim(self) -> Optional[int]:
        return self.centroids.shape[-1] if self.fitted else None

    def _config(self) -> dict:
        return {"variant": self.variant, "num_classes": self.num_classes, "clusters_per_class": self.m,
                "covariance": self.covariance, "class_conditional": self.class_conditional}

    def get_extra_state(self):
        return {"config": self._config(), "refits": self.refits}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or state.get("config") != self._config():
            theirs = state.get("config") if isinstance(state, dict) else state
            raise ValueError(f"state_dict is from another CEMLoss configuration: expected {self._config()}, got {theirs}")
        self.refits = int(state.get("refits", 0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
        for name in ("centroids", "pi", "variance"):
            src = state_dict.get(prefix + name)
            if src is not None and src.shape[:2] != (self.num_classes, self.m):
                raise ValueError(f"state_dict[{prefix + name!r}] has shape {tuple(src.shape)}; this CEMLoss needs "
                                 f"[{self.num_classes}, {self.m}, ...]")
            if src is not None and src.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(src, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._fitted_size = float(self.fitted_size)

    def _variance_shape(self, D: int) -> tuple:
        C, m = self.num_classes, self.m
        if self.variant == "official":
            return (C, m, 0)
        if self.variant == "official-trained":
            return (C, m)
        return (C, m, D) if self.covariance == "diag" else (C, m, D, D)

    def set_clusters(self, centroids: torch.Tensor, weights: Optional[torch.Tensor] = None,
                     variances: Optional[torch.Tensor] = None) -> "CEMLoss":
        """Install a cluster state directly.

        ``centroids [num_classes, m, D]``; ``weights [num_classes, m]`` (pi: for the paper variant summing to 1
        over all clusters, for official-trained the within-class shares); ``variances``: ``[num_classes, m]``
        scalars (official-trained), ``[num_classes, m, D]`` (paper, diag) or ``[num_classes, m, D, D]`` (full).
        Weights default to uniform, variances to zero.
        """
        C, m = self.num_classes, self.m
        if not isinstance(centroids, torch.Tensor) or not centroids.dtype.is_floating_point:
            raise TypeError("centroids must be a floating torch.Tensor")
        if centroids.dim() != 3 or centroids.shape[:2] != (C, m) or centroids.shape[2] == 0:
            raise ValueError(f"centroids must have shape [{C}, {m}, D], got {tuple(centroids.shape)}")
        D = centroids.shape[2]
        dtype = torch.float64 if centroids.dtype == torch.float64 else torch.float32
        dev = self.fitted_size.device
        if weights is None:
            weights = torch.full((C, m), 1.0 / (C * m) if self.variant == "paper" else 1.0 / m, dtype=dtype)
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (C, m):
            raise ValueError(f"weights must be a tensor of shape [{C}, {m}], got "
                             f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
        vshape = self._variance_shape(D)
        if variances is None:
            variances = torch.zeros(vshape, dtype=dtype)
        if not isinstance(variances, torch.Tensor) or tuple(variances.shape) != vshape:
            raise ValueError(f"variances must be a tensor of shape {list(vshape)} for variant={self.variant!r}, "
                             f"covariance={self.covariance!r}, got "
                             f"{tuple(variances.shape) if isinstance(variances, torch.Tensor) else type(variances).__name__}")
        for name, t in (("centroids", centroids), ("weights", weights), ("variances", variances)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
        self.centroids = centroids.detach().to(dev, dtype).clone()
        self.pi = weights.detach().to(dev, dtype).clone()
        self.variance = variances.detach().to(dev, dtype).clone()
        if self._fitted_size == 0:
            self._fitted_size = float(self.dataset_size or 0)
            self.fitted_size.fill_(self._fitted_size)
        return self

    # ------------------------------------------------------------------ refit

    @torch.no_grad()
    def refit(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
              gather: bool = True) -> "CEMLoss":
        """Fit the clusters (k-means inside each class) on a whole epoch of features ``[N, ...]``.

        The variant decides the start: ``official`` draws fresh random members every time (as the authors);
        ``paper`` and ``official-trained`` use k-means++ the first time and warm-start afterwards. Under a
        ``process_group`` the features of all ranks are gathered so every rank holds the same clusters;
        ``gather=False`` skips that when every rank already passes the same, complete set of features.
        """
        if not isinstance(gather, bool):
            raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
        x = checks.features("features", features, "[N, C, H, W] or [N, D]").detach()
        if self.class_conditional:
            if labels is None:
                raise ValueError("labels are required for refit when class_conditional=True")
            y = checks.labels("labels", labels, x.shape[0], self.num_classes, x.device, validate=True)
        else:
            y = None
        if self.process_group is not None and gather:
            x = all_gather_rows(x, self.process_group)
            y = all_gather_rows(y, self.process_group) if y is not None else None
        N = x.shape[0]
        if N == 0:
            raise ValueError("features must hold at least one sample")
        checks.finite("features", x)
        x = x.to(accumulation_dtype(x.dtype))
        spread = _mean_variance(x) if N > 1 else float("nan")
        if spread < _COLLAPSE_RATIO * self.sigma ** 2:
            warnings.warn(f"cem_fast: the features have collapsed (mean per-dimension variance {spread:.3g} < "
                          f"{_COLLAPSE_RATIO:g} x sigma^2): the encoder is close to a constant; lower the CEM "
                          f"weight or use the official-trained hinge / the authors' weight schedule",
                          RuntimeWarning, stacklevel=2)
        if self.fitted and self.centroids.shape[-1] != x.shape[1]:
            raise ValueError(f"features have {x.shape[1]} dimensions but the clusters have {self.centroids.shape[-1]}")
        warm = self.fitted and self.variant != "official"
        init = "warm" if warm else ("random" if self.variant == "official" else "kmeans++")
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.refits)
        prev = self.centroids.to(x) if self.fitted else None
        res = kmeans(x, y, self.num_classes, self.m, init=init, centroids=prev, max_iter=self.kmeans_iters, generator=gen)
        C, m, D = self.num_classes, self.m, x.shape[1]
        flat = res.centroids.reshape(C * m, D)
        counts = res.counts
        n_safe = counts.clamp_min(1)
        if self.variant == "paper":
            pi = counts / N
            if self.covariance == "diag":
                sq = torch.zeros_like(flat).index_add_(0, res.assign, (x - flat[res.assign]) ** 2)
                var = sq / n_safe[:, None]
            else:
                var = cluster_second_moments(x, res.assign, flat) / n_safe[:, None, None]
        elif self.variant == "official-trained":
            class_n = counts.view(C, m).sum(1, keepdim=True).clamp_min(1)
            pi = counts.view(C, m) / class_n
            sq = torch.zeros(C * m, dtype=x.dtype, device=x.device).index_add_(0, res.assign, res.sq_dist / D)
            var = sq / n_safe
        else:
            pi = counts / counts.view(C, m).sum(1).repeat_interleave(m).clamp_min(1)
            var = x.new_zeros(C * m, 0)
        dev = self.fitted_size.device
        self.centroids = res.centroids.to(dev).contiguous()
        self.pi = pi.reshape(C, m).to(dev)
        self.variance = var.reshape(self._variance_shape(D)).to(dev)
        self.fitted_size.fill_(float(N))
        self._fitted_size = float(N)
        self.refits += 1
        self.last_refit_iterations = res.iterations
        return self

    # ------------------------------------------------------------------ loss

    def _dataset_size(self, batch: int) -> Optional[float]:
        if self.variant == "official":
            return None
        N = self.dataset_size or self._fitted_size
        if N <= 0:
            raise ValueError(f"variant={self.variant!r} needs dataset_size (samples per epoch)")
        if self.variant == "paper" and batch > N:
            raise ValueError(f"the batch ({batch} samples) is larger than dataset_size ({N:g})")
        return float(N)

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The CEM loss of encoder features ``z [B, C, H, W]`` or ``[B, D]`` with class ``labels [B]``."""
        z2d = checks.features("z", z)
        B = z2d.shape[0]
        backend = backends.resolve(self.backend, z.device)
        # On the CPU the NaN/Inf check follows the loss: a NaN or Inf in z always reaches it (its row joins a
        # cluster whose statistics and term it poisons), so z is scanned only when the loss is not finite.
        # The C++ backend checks the label range itself, with the same message.
        check_after = self.validate and z.device.type == "cpu"
        if self.class_conditional:
            if labels is None:
                raise ValueError("labels are required when class_conditional=True")
            labels = checks.labels("labels", labels, B, self.num_classes, z.device,
                                   self.validate and not (backend == "cpp" and self.fitted))
        elif labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[:1] != (B,)):
            raise ValueError(f"labels must be None or a tensor of shape [{B}] when class_conditional=False")
        if self.validate and not (check_after and self.fitted):
            checks.finite("z", z2d)
        if not self.fitted:
            if self.warmup == "zero":
                return z2d.sum() * 0.0
            raise RuntimeError("CEMLoss has no clusters yet: call cem.refit(features, labels) on an epoch of "
                               "features (or cem.set_clusters(...)) first, or construct it with warmup='zero'")
        if z2d.shape[1] != self.centroids.shape[-1]:
            raise ValueError(f"z has {z2d.shape[1]} features per sample but the clusters were fitted on "
                             f"{self.centroids.shape[-1]}")
        if self.centroids.device != z.device:
            raise ValueError(f"z is on {z.device} but CEMLoss is on {self.centroids.device}: call cem.to(device)")
        loss, new_pi, new_var = cem_loss(
            z2d, labels, self.centroids, variant=self.variant, sigma=self.sigma, pi=self.pi, variance=self.variance,
            dataset_size=self._dataset_size(B), covariance=self.covariance, reduction=self.reduction,
            class_conditional=self.class_conditional, var_threshold=self.var_threshold,
            log_entropy=self.log_entropy, replicate_index_bug=self.replicate_index_bug, backend=backend,
            process_group=self.process_group)
        if check_after and not math.isfinite(loss.item()):
            checks.finite("z", z2d)
        if self.training and self.variant == "paper":
            with torch.no_grad():
                self.pi.copy_(new_pi)
                self.variance.copy_(new_var)
        return loss

    def entropy_bound(self) -> torch.Tensor:
        """Eq. 3's bound on H(x | z_noisy) up to H(x), from the current state (paper and official-trained)."""
        if not self.fitted:
            raise RuntimeError("CEMLoss has no clusters yet: call refit first")
        if self.variant == "official":
            raise ValueError("variant='official' keeps no covariance state between batches; entropy_bound needs "
                             "variant='paper' or 'official-trained'")
        pi = self.pi.reshape(-1)
        if self.variant == "official-trained":
            pi = pi / self.num_classes  # within-class shares -> mixture weights (classes equally likely)
            cov = self.variance.reshape(-1, 1).expand(-1, self.centroids.shape[-1])
            return entropy_bound(pi, cov, self.sigma)
        return entropy_bound(pi, self.variance.reshape(pi.shape[0], *self.variance.shape[2:]), self.sigma)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, clusters_per_class={self.m}, variant={self.variant!r}, "
                f"sigma={self.sigma}, covariance={self.covariance!r}, backend={self.backend!r}, fitted={self.fitted}")


def feature_spread(z: torch.Tensor) -> float:
    """Mean per-dimension variance of a batch of features: a collapse monitor for training loops."""
    z2d = checks.flatten(z.detach()).float()
    return _mean_variance(z2d) if z2d.shape[0] > 1 else math.nan


def _mean_variance(x: torch.Tensor, chunk_rows: int = 4096) -> float:
    """``x.var(0, unbiased=False).mean()`` for ``x [N, D]``, two-pass in row chunks (``var(0)`` is a slow
    strided reduction on the CPU: 8x slower at 50,000 x 512)."""
    mu = x.mean(0)
    total = sum(float(torch.linalg.vector_norm(x[s:s + chunk_rows] - mu).square())
                for s in range(0, x.shape[0], chunk_rows))
    return total / x.numel()
