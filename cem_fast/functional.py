"""``cem_loss``: the stateless form of the CEM loss (the module ``CEMLoss`` holds the state)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import backends, checks
from .backends.torch_backend import accumulation_dtype
from .ops import CEMFunction
from .variants import LossParams, Variant, variant_type


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def cem_loss(
    z: torch.Tensor,
    labels: Optional[torch.Tensor],
    centroids: torch.Tensor,
    *,
    variant: Union[str, Variant] = "paper",
    sigma: float = 0.025,
    pi: Optional[torch.Tensor] = None,
    variance: Optional[torch.Tensor] = None,
    dataset_size: Optional[float] = None,
    covariance: str = "diag",
    reduction: str = "mean_dim",
    class_conditional: bool = True,
    var_threshold: float = 0.125,
    log_entropy: int = 1,
    replicate_index_bug: bool = False,
    backend: str = "auto",
    process_group=None,
    update_state: bool = False,
    validate_labels: bool = False,
):
    """CEM loss of features ``z [B, D]`` given the cluster state; returns ``(loss, new_pi, new_variance)``.

    No argument checking beyond what the kernels do (``CEMLoss`` validates), except the label range with
    ``validate_labels=True`` (skipped when the backend checks it itself). ``centroids [C, m, D]``; ``pi [C, m]``
    and ``variance`` as in ``cem_fast.reference.reference_loss``. ``variant`` is a name (its options taken from
    ``var_threshold``, ``log_entropy``, ``replicate_index_bug``) or a ``cem_fast.variants.Variant``. For the
    official variants ``new_pi``/``new_variance`` equal the inputs. ``update_state=True`` says the new state
    will replace the given one, so a backend may write it into ``pi``/``variance`` (then returned as they are).
    """
    if not isinstance(variant, Variant):
        given = {"var_threshold": var_threshold, "log_entropy": log_entropy, "replicate_index_bug": replicate_index_bug}
        kind = variant_type(variant)
        variant = kind(**{k: v for k, v in given.items() if k in kind.defaults})
    C, m, D = centroids.shape
    acc = accumulation_dtype(z.dtype)
    z2d = checks.flatten(z).contiguous()
    cent = _as(centroids.reshape(C * m, D), acc).contiguous()
    name = backends.resolve(backend, z.device)
    # Unconditional assignment ignores the labels; every backend still gets one (unused) label per row.
    if class_conditional and labels is not None:
        lab = _as(labels, torch.int64).contiguous()
        if validate_labels and not getattr(backends.get(name), "CHECKS_LABELS", False):
            checks.label_range("labels", lab, C)
    else:
        lab = torch.zeros(z2d.shape[0], dtype=torch.int64, device=z.device)
    if pi is None or variance is None:
        empty = cent.new_zeros(C, m)
    pi = empty if pi is None else _as(pi, acc)
    variance = empty if variance is None else _as(variance, acc)
    params = LossParams(
        num_classes=C,
        m=m,
        sigma=float(sigma),
        class_conditional=class_conditional,
        covariance=covariance,
        reduction=reduction,
        dataset_size=float(dataset_size) if dataset_size is not None else 0.0,
        backend=name,
        process_group=process_group,
        update_state=update_state,
    )
    loss, new_pi, new_var = CEMFunction.apply(z2d, lab, cent, pi, variance, variant, params)
    if new_pi is None:  # the backend wrote the new state into pi and variance
        new_pi, new_var = pi, variance
    return loss, new_pi, new_var
