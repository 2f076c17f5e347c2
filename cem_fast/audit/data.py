"""What an audit runs on: images from any source, the encoder's features, and seeded stratified splits.

Images are kept in [0, 1] (de-normalised); the encoder sees them normalised with the stated mean/std.
Every split here is seeded and stratified by class, so no result depends on the order of a data file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "FeatureSet",
    "Normalization",
    "Perturbation",
    "as_tensors",
    "compute_features",
    "gaussian_perturbation",
    "make_perturbation",
    "stratified_split",
    "stratified_subset",
    "class_counts",
    "progress_bar",
]

Perturbation = Callable[[torch.Tensor], torch.Tensor]
RANGE_TOLERANCE = 0.01  # de-normalised images may leave [0, 1] by this much (rounding), no more


def progress_bar(iterable, desc: str, progress: Optional[bool] = None, **kwargs):
    """A tqdm bar over ``iterable`` when ``progress`` (default: stderr is a terminal), else the iterable."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return iterable
    from tqdm.auto import tqdm  # the `audit` extra

    return tqdm(iterable, desc=desc, **kwargs)


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std`` the encoder's inputs are normalised with (``x_enc = (x01 - mean) / std``)."""

    mean: tuple
    std: tuple

    def __post_init__(self) -> None:
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"normalization: mean and std need the same number of channels, got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"normalization: std must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def coerce(cls, value) -> Optional["Normalization"]:
        """None (images already in [0, 1]), a Normalization, a ``(mean, std)`` pair or a ``{"mean", "std"}`` dict."""
        if value is None or isinstance(value, Normalization):
            return value
        if isinstance(value, dict):
            return cls(value["mean"], value["std"])
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(value[0], value[1])
        raise TypeError(f"normalization must be None, (mean, std) or a Normalization, got {value!r}")

    def _view(self, values, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != len(values):
            raise ValueError(f"normalization has {len(values)} channels but the images have shape {list(x.shape)}")
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._view(self.std, x) + self._view(self.mean, x)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self._view(self.mean, x01)) / self._view(self.std, x01)


def to_unit_range(x: torch.Tensor, normalization: Optional[Normalization]) -> torch.Tensor:
    """De-normalise ``x`` and check it lies in [0, 1] (up to ``RANGE_TOLERANCE``); clamp the rounding away."""
    x01 = x.float() if normalization is None else normalization.denormalize(x.float())
    low, high = x01.min().item(), x01.max().item()
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        how = "no normalization was given" if normalization is None else f"normalization {normalization}"
        raise ValueError(
            f"images are outside [0, 1] after de-normalisation (min {low:.3g}, max {high:.3g}; {how}): "
            f"pass the mean/std your data was normalised with"
        )
    return x01.clamp_(0.0, 1.0)


@dataclass
class FeatureSet:
    """Clean encoder features ``[N, ...]`` (float32), their images ``[N, c, h, w]`` in [0, 1], labels ``[N]``."""

    features: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("features", "images", "labels"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        n = self.features.shape[0]
        if self.images.shape[0] != n or self.labels.shape != (n,):
            raise ValueError(
                f"features ({n} rows), images ({self.images.shape[0]}) and labels "
                f"({tuple(self.labels.shape)}) must have the same number of rows"
            )
        if self.images.dim() != 4 or not self.images.is_floating_point():
            raise ValueError(
                f"images must be float [N, c, h, w] in [0, 1], got {self.images.dtype} {list(self.images.shape)}"
            )

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def feature_shape(self) -> tuple:
        return tuple(self.features.shape[1:])

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def subset(self, indices: torch.Tensor) -> "FeatureSet":
        return FeatureSet(self.features[indices], self.images[indices], self.labels[indices])

    def to(self, device) -> "FeatureSet":
        return FeatureSet(self.features.to(device), self.images.to(device), self.labels.to(device))

    def class_counts(self, num_classes: int) -> list:
        return class_counts(self.labels, num_classes)


def class_counts(labels: torch.Tensor, num_classes: int) -> list:
    """How many of ``labels`` fall in each of ``num_classes`` classes (a list, for the records)."""
    return torch.bincount(labels.detach().cpu().long(), minlength=num_classes).tolist()


def as_tensors(data) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(x, y)`` from a tensor, an ``(x, y)`` pair, a Dataset yielding ``x`` or ``(x, y, ...)``, or a DataLoader.

    ``y`` is None when the data carries no labels.
    """
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = DataLoader(data, batch_size=256, shuffle=False, num_workers=0)
    if not isinstance(data, (DataLoader, torch.utils.data.IterableDataset)):
        raise TypeError(
            f"data must be a tensor, an (x, y) pair of tensors, a Dataset or a DataLoader, got {type(data).__name__}"
        )
    xs, ys = [], []
    for batch in data:
        if isinstance(batch, torch.Tensor):
            xs.append(batch)
            continue
        if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], torch.Tensor):
            raise TypeError(f"data must yield x or (x, y, ...) tensors, got a {type(batch).__name__}")
        xs.append(batch[0])
        if len(batch) > 1:
            ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise ValueError("data is empty")
    x = torch.cat(xs)
    y = torch.cat(ys) if ys and len(ys) == len(xs) else None
    return x, y


def check_labels(y: Optional[torch.Tensor], n: int) -> tuple[torch.Tensor, int]:
    """Labels as int64 ``[n]`` and the number of classes (one class when there are no labels)."""
    if y is None:
        return torch.zeros(n, dtype=torch.long), 1
    y = torch.as_tensor(y).reshape(-1)
    if y.shape[0] != n or y.is_floating_point():
        raise ValueError(f"labels must be {n} integers, got {y.dtype} of shape {tuple(y.shape)}")
    y = y.long()
    if y.min().item() < 0:
        raise ValueError(f"labels must be >= 0, got {y.min().item()}")
    return y, int(y.max().item()) + 1


@torch.no_grad()
def compute_features(
    encoder: nn.Module,
    images01: torch.Tensor,
    labels: torch.Tensor,
    normalization: Optional[Normalization] = None,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Optional[bool] = False,
    desc: str = "encoder features",
) -> FeatureSet:
    """Run the frozen ``encoder`` (eval mode) once over ``images01`` (in [0, 1], normalised on the way in)."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(images01) == 0:
        raise ValueError("no images to compute features of")
    was_training = encoder.training
    encoder.eval()
    features = []
    try:
        for start in progress_bar(range(0, len(images01), batch_size), desc, progress, leave=False):
            x = images01[start : start + batch_size].to(device)
            try:
                z = encoder(x if normalization is None else normalization.normalize(x))
            except RuntimeError as err:  # e.g. a channel or size mismatch: the data does not fit this encoder
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ValueError(f"the encoder failed on images of shape {list(x.shape)}: {first}") from err
            if not isinstance(z, torch.Tensor) or z.dim() not in (2, 4):
                raise ValueError(
                    f"the encoder must return [N, D] or [N, C, H, W] features, got "
                    f"{getattr(z, 'shape', type(z).__name__)}"
                )
            features.append(z.float().cpu())
    finally:
        encoder.train(was_training)
    return FeatureSet(torch.cat(features), images01.float().cpu(), labels.cpu().long())


def gaussian_perturbation(sigma: float) -> Perturbation:
    """``z -> z + sigma * N(0, I)``, fresh noise per call (identity when sigma == 0)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
        raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
    sigma = float(sigma)

    def perturb(z: torch.Tensor) -> torch.Tensor:
        if sigma == 0.0:
            return z
        return z + sigma * torch.randn_like(z)

    return perturb


def make_perturbation(sigma) -> tuple[Perturbation, Optional[float]]:
    """The defence's perturbation and its Gaussian sigma (None when it is an arbitrary callable)."""
    if callable(sigma):
        return sigma, None
    return gaussian_perturbation(sigma), float(sigma)


def _split_sizes(counts: Sequence[int], n_part: int, gen: torch.Generator) -> list:
    """Share ``n_part`` over classes in proportion to ``counts`` (largest remainders, ties in seeded order)."""
    total = sum(counts)
    exact = [c * n_part / total for c in counts]
    take = [min(int(e), c) for e, c in zip(exact, counts)]
    order = torch.randperm(len(counts), generator=gen).tolist()
    order.sort(key=lambda k: -(exact[k] - int(exact[k])))
    while sum(take) < n_part:
        for k in order:
            if sum(take) < n_part and take[k] < counts[k]:
                take[k] += 1
    return take


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(len(labels))`` into (rest, part), ``part`` about ``fraction`` of every class.

    ``part`` has ``round(n * fraction)`` rows (at least 1, at most n - 1), shared over the classes in
    proportion to their sizes; which rows of a class go where is drawn with ``seed``. Both are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = torch.as_tensor(labels).reshape(-1).cpu().long()
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples to split, got {n}")
    n_part = min(max(1, round(n * fraction)), n - 1)
    return _stratified_pick(labels, n_part, seed)


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Seeded, class-stratified choice of ``n`` of the rows (sorted); all rows when ``n >= len(labels)``."""
    labels = torch.as_tensor(labels).reshape(-1).cpu().long()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n >= labels.shape[0]:
        return torch.arange(labels.shape[0])
    return _stratified_pick(labels, n, seed)[1]


def _stratified_pick(labels: torch.Tensor, n_part: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(labels).tolist()
    pools = [torch.nonzero(labels == c).flatten() for c in classes]
    pools = [p[torch.randperm(len(p), generator=gen)] for p in pools]
    take = _split_sizes([len(p) for p in pools], n_part, gen)
    part = torch.cat([p[:k] for p, k in zip(pools, take)])
    rest = torch.cat([p[k:] for p, k in zip(pools, take)])
    return rest.sort().values, part.sort().values
