"""``CEMLoss``: conditional entropy maximisation as an ``nn.Module`` that drops into a training loop."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from . import backends, checks, variants
from .clustering import kmeans
from .distributed import all_gather_rows, world_size
from .feature_bank import FeatureBank
from .functional import accumulation_dtype, cem_loss

_COMMON_OPTIONS = {"kmeans_iters": None, "seed": 0}
# A refit whose features vary less than this fraction of the noise variance has collapsed.
_COLLAPSE_RATIO = 1e-3
# Below this signal-to-noise ratio (per-dimension variance of the clean features / sigma^2) the features hide
# under the noise: the task accuracy falls next.
_SNR_WARN = 1.0
# The paper's CIFAR-10 epoch: the reference for how hard a weight pushes at another dataset size.
PAPER_EPOCH = 50_000
# Training steps between two SNR readings of the batch (each reads the device once; only with validate=True).
_SNR_EVERY = 8


class CEMLoss(nn.Module):
    """Conditional entropy maximisation loss (Xia et al., CVPR 2025) for split-inference encoders.

    ``loss = cem(z, labels)`` on the encoder output ``z`` (before the defence's noise), added to the
    task loss with a weight lambda; ``cem.refit(features, labels)`` at each epoch end fits the clusters
    (k-means inside each class) from that epoch's features. The variants (one file each in
    ``cem_fast/variants/``, which says what each computes):

    * ``"paper"`` (default): Eq. 5-7, streaming ``pi`` and covariances (``covariance="diag"|"full"``), log-det.
    * ``"official"``: the authors' ``model_training_GMM.py`` loss (per-batch diagonal variances).
    * ``"official-trained"``: the loss their training scripts ran (scalar variances, hinge at
      ``var_threshold * sigma^2``); needs ``dataset_size`` (batches per epoch x batch size) or takes
      the refit's sample count. Options ``var_threshold=0.125``, ``log_entropy=1``, ``replicate_index_bug=False``.

    ``cem.variant`` is the name, ``cem.variant_impl`` the ``cem_fast.variants.Variant`` (its options in
    ``cem.variant_impl.options``). Other options: ``kmeans_iters`` (default 50, 60 for official), ``seed``
    (k-means RNG), ``backend``
    (``"auto"``, ``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``), ``warmup`` (``"raise"`` before the first
    refit, or ``"zero"``: a zero loss that joins the graph), ``process_group`` (data parallel: statistics
    are all-reduced so every rank sees the global batch), ``validate`` (label range, NaN/Inf and overflow
    checks and the SNR monitor, which synchronise with the device; turn off for CUDA graphs and for
    ``torch.compile(..., fullgraph=True)``).

    Training-loop options: ``weight`` multiplies the returned loss (lambda); ``reference_size`` makes it mean
    the same at every dataset size (the loss is scaled by ``N / reference_size``, N the samples per epoch, so
    the per-sample push is the one of an epoch of ``reference_size`` samples; e.g. 50,000 for the paper's
    CIFAR-10 runs); ``feature_bank`` (samples kept per class) makes the loss keep the features it sees in
    training mode, so that ``cem.end_epoch()`` refits from them: no bookkeeping, and before the first refit
    the loss is a zero that joins the graph.

    State: in training mode the ``paper`` variant's forward updates ``pi`` and ``variance`` (Eq. 5-6), also
    under ``torch.no_grad()``; ``cem.eval()`` evaluates without changing them. The state stays float32 (float64
    after a refit on float64 features) whatever ``.to(dtype)`` / ``.half()`` does to the module. A batch whose
    loss is not finite raises (with ``validate=True``) and leaves the state as it was. A ``RuntimeWarning``
    says when the clean features' signal-to-noise ratio (per-dimension variance / sigma^2) falls below 1,
    and again when the features collapse, once per refit.
    """

    def __init__(
        self,
        num_classes: int,
        clusters_per_class: Optional[int] = None,
        sigma: float = 0.025,
        variant: str = "paper",
        covariance: str = "diag",
        reduction: str = "mean_dim",
        dataset_size: Optional[int] = None,
        class_conditional: bool = True,
        backend: str = "auto",
        warmup: str = "raise",
        process_group=None,
        validate: bool = True,
        weight: float = 1.0,
        reference_size: Optional[int] = None,
        feature_bank: Optional[int] = None,
        **variant_options,
    ):
        super().__init__()
        kind = variants.variant_type(variant)
        self.variant = variant
        self.num_classes = checks.positive_int("num_classes", num_classes)
        self.m = checks.positive_int(
            "clusters_per_class", kind.default_clusters if clusters_per_class is None else clusters_per_class
        )
        self.sigma = checks.positive_float("sigma", sigma)
        self.covariance = checks.choice("covariance", covariance, ("diag", "full"))
        self.reduction = checks.choice("reduction", reduction, ("mean_dim", "sum"))
        self.dataset_size = None if dataset_size is None else checks.positive_int("dataset_size", dataset_size)
        if not isinstance(class_conditional, bool):
            raise TypeError(f"class_conditional must be a bool, got {type(class_conditional).__name__}")
        self.class_conditional = class_conditional
        self.backend = backends.check_name(backend)
        self.warmup = checks.choice("warmup", warmup, ("raise", "zero"))
        self.process_group = process_group
        self.validate = bool(validate)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.reference_size = None if reference_size is None else checks.positive_int("reference_size", reference_size)
        self.bank = None
        if feature_bank is not None:
            self.bank = FeatureBank(num_classes if class_conditional else 1, feature_bank, seed=0)
            self.warmup = "zero"
        allowed = {**_COMMON_OPTIONS, **kind.defaults}
        unknown = sorted(set(variant_options) - set(allowed))
        if unknown:
            raise TypeError(f"unexpected option(s) {unknown} for variant={variant!r}; allowed: {sorted(allowed)}")
        opts = {**allowed, **variant_options}
        self.variant_impl = kind(**{k: opts[k] for k in kind.defaults})
        self.variant_impl.check_config(self.covariance, self.reduction, class_conditional)
        self.variant_impl.kernel_options(self.sigma)  # builds (and caches) any constant now, outside compiled graphs
        iters = opts["kmeans_iters"] if opts["kmeans_iters"] is not None else kind.kmeans_iters
        self.kmeans_iters = checks.positive_int("kmeans_iters", iters)
        self.seed = int(opts["seed"])
        if self.reference_size is not None and self.variant_impl.dataset_size(None, 1.0, 1) is None:
            raise ValueError(
                f"reference_size applies to variants whose push depends on the dataset size "
                f"('paper', 'official-trained'), not variant={variant!r}"
            )
        self.refits = 0
        self.last_refit_iterations = 0  # Lloyd iterations of the last refit (not saved in the state)
        self.last_snr: Optional[float] = None  # the last SNR reading (refit features or a training batch)
        self._warned = set()  # warnings given since the last refit ("snr", "collapse")
        self._warned_once = set()  # warnings given once per loss ("strength")
        self._seen_since_refit = 0  # training-mode rows since the last refit (to check the refit's epoch size)
        self._steps = 0
        # The same count inside torch.compile'd calls: there a Python int attribute changed by forward becomes a
        # guard that fails on the next call (a recompile every step), so compiled calls count on the device.
        self.register_buffer("_seen_compiled", torch.zeros((), dtype=torch.int64), persistent=False)
        C, m = self.num_classes, self.m
        self.register_buffer("centroids", torch.zeros(C, m, 0))
        self.register_buffer("pi", torch.zeros(C, m))
        self.register_buffer("variance", torch.zeros(C, m, 0))
        # samples in the last refit; 0 = never fitted
        self.register_buffer("fitted_size", torch.zeros((), dtype=torch.float64))
        self._fitted_size = 0.0  # host mirror of the buffer, so the forward never reads the device

    # ------------------------------------------------------------------ state

    @property
    def fitted(self) -> bool:
        """Whether ``refit`` (or ``set_clusters``) has installed centroids."""
        return self.centroids.shape[-1] > 0

    # The official-trained options, readable on every CEMLoss (the other variants ignore them: their defaults).
    @property
    def var_threshold(self) -> float:
        return self._trained_option("var_threshold")

    @property
    def log_entropy(self) -> int:
        return self._trained_option("log_entropy")

    @property
    def replicate_index_bug(self) -> bool:
        return self._trained_option("replicate_index_bug")

    def _trained_option(self, name: str):
        return self.variant_impl.options.get(name, variants.OfficialTrained.defaults[name])

    @property
    def feature_dim(self) -> Optional[int]:
        return self.centroids.shape[-1] if self.fitted else None

    def _config(self) -> dict:
        return {
            "variant": self.variant,
            "num_classes": self.num_classes,
            "clusters_per_class": self.m,
            "covariance": self.covariance,
            "class_conditional": self.class_conditional,
        }

    def get_extra_state(self):
        return {"config": self._config(), "refits": self.refits}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or state.get("config") != self._config():
            theirs = state.get("config") if isinstance(state, dict) else state
            raise ValueError(
                f"state_dict is from another CEMLoss configuration: expected {self._config()}, got {theirs}"
            )
        self.refits = int(state.get("refits", 0))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
        for name in ("centroids", "pi", "variance"):
            src = state_dict.get(prefix + name)
            if src is not None and src.shape[:2] != (self.num_classes, self.m):
                raise ValueError(
                    f"state_dict[{prefix + name!r}] has shape {tuple(src.shape)}; this CEMLoss needs "
                    f"[{self.num_classes}, {self.m}, ...]"
                )
            if src is not None and src.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(src, device=getattr(self, name).device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._fitted_size = float(self.fitted_size)
        self._choose_backend()

    def _choose_backend(self) -> None:
        """Choose (import, build, probe) the backend for the state's device now, in eager code, once clusters
        exist: a step compiled with ``fullgraph=True`` can then be the loss's first evaluation (a trace cannot
        follow an import)."""
        if self.fitted:
            backends.resolve(self.backend, self.centroids.device)

    def set_clusters(
        self, centroids: torch.Tensor, weights: Optional[torch.Tensor] = None, variances: Optional[torch.Tensor] = None
    ) -> "CEMLoss":
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
            weights = torch.full((C, m), self.variant_impl.default_weight(C, m), dtype=dtype)
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (C, m):
            raise ValueError(f"weights must be a tensor of shape [{C}, {m}], got {_shape_or_type(weights)}")
        vshape = self.variant_impl.variance_shape(C, m, D, self.covariance)
        if variances is None:
            variances = torch.zeros(vshape, dtype=dtype)
        if not isinstance(variances, torch.Tensor) or tuple(variances.shape) != vshape:
            raise ValueError(
                f"variances must be a tensor of shape {list(vshape)} for variant={self.variant!r}, "
                f"covariance={self.covariance!r}, got "
                f"{_shape_or_type(variances)}"
            )
        for name, t in (("centroids", centroids), ("weights", weights), ("variances", variances)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
        self.centroids = centroids.detach().to(dev, dtype).clone()
        self.pi = weights.detach().to(dev, dtype).clone()
        self.variance = variances.detach().to(dev, dtype).clone()
        if self._fitted_size == 0:
            self._fitted_size = float(self.dataset_size or 0)
            self.fitted_size.fill_(self._fitted_size)
        self._choose_backend()
        return self

    # ------------------------------------------------------------------ refit

    @torch.no_grad()
    def refit(
        self,
        features: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        gather: bool = True,
        epoch_size: Optional[int] = None,
    ) -> "CEMLoss":
        """Fit the clusters (k-means inside each class) on a whole epoch of features ``[N, ...]``.

        The variant decides the start: ``official`` draws fresh random members every time (as the authors);
        ``paper`` and ``official-trained`` use k-means++ the first time and warm-start afterwards. Under a
        ``process_group`` the features of all ranks are gathered so every rank holds the same clusters;
        ``gather=False`` skips that when every rank already passes the same, complete set of features.

        ``epoch_size``: the samples per epoch that the features were drawn from, which sets the streaming rate
        of the paper variant (and official-trained's blend) until the next refit; default: ``dataset_size``
        if the loss was built with one, else the number of features. A refit on fewer features than the loss
        saw in training mode since the last refit, without ``epoch_size``, warns.
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
        if epoch_size is not None:
            epoch_size = checks.positive_int("epoch_size", epoch_size)
            if epoch_size < N:
                raise ValueError(f"epoch_size ({epoch_size}) is smaller than the number of features ({N})")
        seen = (self._seen_since_refit + int(self._seen_compiled)) * world_size(self.process_group)
        if epoch_size is None and self.dataset_size is None and seen > N:
            warnings.warn(
                f"cem_fast: refit on {N} samples, but the loss saw {seen} in training since the last "
                f"refit: the streaming rate would assume {N} samples per epoch; pass "
                f"refit(..., epoch_size={seen}) (or CEMLoss(dataset_size=...))",
                RuntimeWarning,
                stacklevel=2,
            )
        checks.finite("features", x)
        x = x.to(accumulation_dtype(x.dtype))
        self._warned.clear()
        if N > 1:
            self._check_snr(_mean_variance(x), stacklevel=4)
        if self.fitted and self.centroids.shape[-1] != x.shape[1]:
            raise ValueError(f"features have {x.shape[1]} dimensions but the clusters have {self.centroids.shape[-1]}")
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.refits)
        prev = self.centroids.to(x) if self.fitted else None
        res = kmeans(
            x,
            y,
            self.num_classes,
            self.m,
            init=self.variant_impl.kmeans_init(self.fitted),
            centroids=prev,
            max_iter=self.kmeans_iters,
            generator=gen,
        )
        pi, var = self.variant_impl.state_from_kmeans(x, res, self.num_classes, self.m, self.covariance)
        dev = self.fitted_size.device
        self.centroids = res.centroids.to(dev).contiguous()
        self.pi = pi.to(dev)
        self.variance = var.to(dev)
        size = float(epoch_size or self.dataset_size or N)
        self.fitted_size.fill_(size)
        self._fitted_size = size
        self._seen_since_refit = 0
        self._seen_compiled.zero_()
        self.refits += 1
        self.last_refit_iterations = res.iterations
        self._choose_backend()
        return self

    def end_epoch(self) -> "CEMLoss":
        """Refit from the features the loss kept this epoch (``feature_bank=...``), then empty the bank."""
        if self.bank is None:
            raise RuntimeError(
                "end_epoch needs a feature bank: construct CEMLoss(..., feature_bank=N) "
                "(samples kept per class), or call refit(features, labels) yourself"
            )
        if len(self.bank) == 0:
            raise RuntimeError(
                "end_epoch: the loss saw no features in training mode this epoch "
                "(call it in cem.train() mode on every batch)"
            )
        x, y = self.bank.features()
        epoch = self.bank.seen * world_size(self.process_group)
        self.refit(
            x,
            y if self.class_conditional else None,
            epoch_size=max(epoch, x.shape[0]) if self.process_group is None else None,
        )
        self.bank.clear()
        return self

    def _check_strength(self, epoch: float, stacklevel: int) -> None:
        """Warn once (at the first training step) when the variant's 1/N push makes this weight much stronger
        than at the paper's N."""
        self._warned_once.add("strength")
        if self.reference_size is not None or self.weight == 0 or epoch * 4 > PAPER_EPOCH:
            return
        ratio = PAPER_EPOCH / epoch
        warnings.warn(
            f"cem_fast: with {epoch:.0f} samples per epoch the {self.variant!r} variant pushes each sample "
            f"{ratio:.3g}x harder than at the paper's {PAPER_EPOCH:,} (its gradient scales as 1/N): "
            f"lambda = {self.weight:g} here acts like {self.weight * ratio:.3g} there (times any weight you "
            f"apply yourself), which can collapse the encoder; pass reference_size={PAPER_EPOCH} to keep "
            f"lambda's meaning, or lower lambda",
            RuntimeWarning,
            stacklevel=stacklevel,
        )

    def _check_snr(self, spread: float, stacklevel: int) -> None:
        """Record the clean features' SNR and warn (once per refit) when it is below 1, and at collapse."""
        snr = spread / self.sigma**2
        self.last_snr = snr
        if snr < _COLLAPSE_RATIO and "collapse" not in self._warned:
            self._warned.update(("collapse", "snr"))
            warnings.warn(
                f"cem_fast: the features have collapsed (mean per-dimension variance {spread:.3g} = "
                f"{snr:.2g} x sigma^2 < {_COLLAPSE_RATIO:g} x sigma^2): the encoder is close to a "
                f"constant; lower the CEM weight (now {self.weight:g} x the loss), set reference_size, "
                f"or use the official-trained hinge / the authors' weight schedule",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        elif snr < _SNR_WARN and "snr" not in self._warned:
            self._warned.add("snr")
            warnings.warn(
                f"cem_fast: the clean features' signal-to-noise ratio (per-dimension variance / "
                f"sigma^2) is {snr:.3g} < {_SNR_WARN:g}: the features are hiding under the noise and "
                f"the task accuracy will fall; if that is not wanted, lower the CEM weight (lambda; "
                f"this loss multiplies by {self.weight:g}), set reference_size (lambda then means the "
                f"same at every dataset size: the paper variant's push grows as 1/N), or use the "
                f"official-trained hinge",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() move the state but never change its precision (statistics stay fp32/fp64).
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # from the original: no round trip through fp16/bf16
        self._choose_backend()  # a new device may have another backend
        return self

    # ------------------------------------------------------------------ loss

    def _dataset_size(self, batch: int) -> Optional[float]:
        """The ``N`` of the variant's math for a batch of ``batch`` rows (None: the variant needs none)."""
        return self.variant_impl.dataset_size(self.dataset_size, self._fitted_size, batch)

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The CEM loss of encoder features ``z [B, C, H, W]`` or ``[B, D]`` with class ``labels [B]``."""
        z2d = checks.features("z", z)
        B = z2d.shape[0]
        # On the CPU the NaN/Inf check follows the loss: a NaN or Inf in z always reaches it (its row joins a
        # cluster whose statistics and term it poisons), so z is scanned only when the loss is not finite.
        # Once fitted, the label range is checked by cem_loss (or by a backend that checks it itself).
        check_after = self.validate and z.device.type == "cpu"
        if self.class_conditional:
            if labels is None:
                raise ValueError("labels are required when class_conditional=True")
            labels = checks.labels("labels", labels, B, self.num_classes, z.device, self.validate and not self.fitted)
        elif labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[:1] != (B,)):
            raise ValueError(f"labels must be None or a tensor of shape [{B}] when class_conditional=False")
        if self.validate and not (check_after and self.fitted):
            checks.finite("z", z2d)
        if self.training:
            self._observe(z2d, labels)
        if not self.fitted:
            if self.warmup == "zero":
                return z2d.sum() * 0.0
            raise RuntimeError(
                "CEMLoss has no clusters yet: call cem.refit(features, labels) on an epoch of "
                "features (or cem.set_clusters(...)) first, or construct it with warmup='zero'"
            )
        if z2d.shape[1] != self.centroids.shape[-1]:
            raise ValueError(
                f"z has {z2d.shape[1]} features per sample but the clusters were fitted on {self.centroids.shape[-1]}"
            )
        if self.centroids.device != z.device:
            raise ValueError(f"z is on {z.device} but CEMLoss is on {self.centroids.device}: call cem.to(device)")
        update = self.training and self.variant_impl.streams_state
        N = self._dataset_size(B)
        if (
            self.training
            and "strength" not in self._warned_once
            and N is not None
            and not torch.compiler.is_compiling()
        ):
            self._check_strength(N, stacklevel=3)
        # With validate=True the new state is kept only after the loss is seen to be finite, so a bad batch
        # leaves the state as it was; without the checks a backend may write it in place (fewer launches).
        loss, new_pi, new_var = cem_loss(
            z2d,
            labels,
            self.centroids,
            variant=self.variant_impl,
            sigma=self.sigma,
            pi=self.pi,
            variance=self.variance,
            dataset_size=N,
            covariance=self.covariance,
            reduction=self.reduction,
            class_conditional=self.class_conditional,
            backend=self.backend,
            process_group=self.process_group,
            update_state=update and not self.validate,
            validate_labels=self.validate,
        )
        if self.validate and not math.isfinite(loss.item()):
            checks.finite("z", z2d)
            scale = float(z2d.detach().abs().max())
            raise ValueError(
                f"z is finite but too large for the CEM statistics in {loss.dtype} (max |z| = "
                f"{scale:.3g}: squared deviations overflow); rescale the features (e.g. a bounded "
                f"activation such as Sigmoid at the cut)"
            )
        if update and new_pi is not self.pi:  # else the backend has written the state in place
            with torch.no_grad():
                self.pi.copy_(new_pi)
                self.variance.copy_(new_var)
        scale = self.weight
        if self.reference_size is not None:
            scale *= N / self.reference_size
        return loss if scale == 1.0 else loss * scale

    def _observe(self, z2d: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        """Training-mode bookkeeping: the feature bank, the rows since the refit, the SNR monitor."""
        B = z2d.shape[0]
        compiling = torch.compiler.is_compiling()
        if compiling:
            self._seen_compiled.add_(B)
        else:
            self._seen_since_refit += B
        if self.bank is not None:
            self.bank.add(
                z2d, labels if self.class_conditional else torch.zeros(B, dtype=torch.int64, device=z2d.device)
            )
        if compiling:  # the SNR monitor reads a float on the host: eager calls only
            return
        if self.validate and B > 1 and self._steps % _SNR_EVERY == 0 and "collapse" not in self._warned:
            self._check_snr(_mean_variance(z2d.detach().float()), stacklevel=4)
        self._steps += 1

    def entropy_bound(self) -> torch.Tensor:
        """Eq. 3's bound on H(x | z_noisy) up to H(x), from the current state (paper and official-trained)."""
        if not self.fitted:
            raise RuntimeError("CEMLoss has no clusters yet: call refit first")
        return self.variant_impl.entropy_bound(self.pi, self.variance, self.sigma, self.centroids.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, clusters_per_class={self.m}, variant={self.variant!r}, "
            f"sigma={self.sigma}, covariance={self.covariance!r}, backend={self.backend!r}, fitted={self.fitted}"
        )


def _shape_or_type(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def feature_spread(z: torch.Tensor) -> float:
    """Mean per-dimension variance of a batch of features: a collapse monitor for training loops."""
    z2d = checks.flatten(z.detach()).float()
    return _mean_variance(z2d) if z2d.shape[0] > 1 else math.nan


def _mean_variance(x: torch.Tensor, chunk_rows: int = 4096) -> float:
    """``x.var(0, unbiased=False).mean()`` for ``x [N, D]``, two-pass in row chunks (``var(0)`` is a slow
    strided reduction on the CPU: 8x slower at 50,000 x 512)."""
    mu = x.mean(0)
    total = sum(
        float(torch.linalg.vector_norm(x[s : s + chunk_rows] - mu).square()) for s in range(0, x.shape[0], chunk_rows)
    )
    return total / x.numel()
