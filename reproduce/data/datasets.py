"""Datasets of the paper (CIFAR-10/100, FaceScrub, Tiny ImageNet) as normalised tensors.

Every dataset yields ``(image, label)``: a float32 ``[C,H,W]`` image normalised with the
authors' mean/std, and an int label. Images are kept as uint8 (in memory, or read lazily from an
ImageFolder layout); augmentation (``torchvision.transforms.v2``) runs on the uint8 image
before the float conversion, as in the authors' PIL pipeline.

Sources, first found wins (``data_root`` defaults to ``~/.cache/cem_fast/data``):

* ``cifar10``: the offline ``cifar10_{train_jpeg,test}.npz`` copies in ``data_root`` (see the data
  folder's README), rows in canonical order (``canonical_order``), else torchvision's CIFAR10 under
  ``data_root`` (downloaded only with ``download=True``).
* ``cifar100``: torchvision's CIFAR100 under ``data_root``.
* ``facescrub``: ``<root>/facescrub/48x48/{train,validate}/<person>/*.jpg`` (the authors'
  prepare_facescrub.py output), else (with a warning) ``facescrub_6id_64px.npz`` in
  ``data_root``: a **6-identity stand-in** resized to 48 px (bilinear, antialiased), split 85/15
  per identity with a fixed seed. Its ``.info`` is ``dataset_info("facescrub-6id")`` (6 classes),
  so size models with ``ds.info.num_classes``. ``facescrub-6id`` asks for the stand-in directly.
* ``tinyimagenet``: ``<root>/tiny-imagenet-200/{train,val/images}/<wnid>/`` (the authors'
  prepare_tinyimagenet.py output), else ``tinyimagenet_train50pc_jpeg.npz`` (train, 50 per
  class) and ``tinyimagenet_val_jpeg.npz`` (test). Labels follow ImageFolder's sorted-wnid
  order for both sources.
* ``cifar10-sample``: the 5,000 + 1,000 image sample shipped in ``reproduce/data/sample``.
"""

from __future__ import annotations

import io
import os
import socket
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

DEFAULT_ROOT = Path("~/.cache/cem_fast/data").expanduser()
SAMPLE_PATH = Path(__file__).resolve().parent / "sample" / "cifar10_sample.npz"
SPLITS = ("train", "test")
_DOWNLOAD_TIMEOUT_S = 60
_FACESCRUB_SPLIT_SEED = 0
_FACESCRUB_TRAIN_FRACTION = 0.85


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: class count, image size, channels, normalisation."""

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
_FACESCRUB_STATS = ((0.5708, 0.5905, 0.4272), (0.2058, 0.2275, 0.2098))
_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, 32, 3, *_CIFAR10_STATS),
    "cifar10-sample": DatasetInfo("cifar10-sample", 10, 32, 3, *_CIFAR10_STATS),
    "cifar100": DatasetInfo("cifar100", 100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "facescrub": DatasetInfo("facescrub", 530, 48, 3, *_FACESCRUB_STATS),
    "facescrub-6id": DatasetInfo("facescrub-6id", 6, 48, 3, *_FACESCRUB_STATS),
    # The authors' TinyImageNet stats are odd (computed over one image's pixels); kept as they are.
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, 64, 3, (0.5141, 0.5775, 0.3985), (0.2927, 0.2570, 0.1434)),
}
DATASETS = tuple(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """DatasetInfo for one of ``DATASETS``; ValueError for an unknown name."""
    if name not in _INFO:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    return _INFO[name]


def _augmentation(name: str) -> v2.Transform:
    """The authors' training augmentation (their datasets_torch.py)."""
    if name.startswith("cifar"):
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.RandomRotation(15)])
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomRotation(15)])


class _ToNormalizedFloat:
    """uint8 ``[C,H,W]`` -> (optional augmentation) -> float in [0,1] -> (x - mean) / std.

    The v2 augmentation runs on a PIL view of the image: at 32 px that is ~6x faster than v2's
    tensor rotation (~0.15 ms vs ~0.9 ms per image) and it is the authors' exact PIL pipeline
    (nearest-neighbour rotation, black fill).
    """

    def __init__(self, info: DatasetInfo, augment: bool):
        self.augment = _augmentation(info.name) if augment else None
        # (x/255 - mean)/std == x*scale - shift, one fused pass
        self.scale = (1.0 / (255.0 * torch.tensor(info.std))).view(-1, 1, 1)
        self.shift = (torch.tensor(info.mean) / torch.tensor(info.std)).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.augment is not None:
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            image = torch.from_numpy(np.array(self.augment(pil))).permute(2, 0, 1)
        return torch.addcmul(-self.shift, image.float(), self.scale).contiguous()


class ImageTensorDataset(Dataset):
    """Images held as one uint8 ``[N,C,H,W]`` tensor plus int64 labels (``targets``)."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        info: DatasetInfo,
        augment: bool,
        classes: list[str],
        source: str,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError("images must be uint8 [N,C,H,W] with one target per image")
        self.images, self.targets = images, targets.long()
        self.info, self.classes, self.source = info, classes, source
        self.transform = _ToNormalizedFloat(info, augment)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


class ImageFolderDataset(Dataset):
    """A ``<split>/<class>/<image>`` folder, decoded lazily (too large to hold decoded)."""

    def __init__(self, folder: Path, info: DatasetInfo, augment: bool):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(folder), loader=_read_rgb)
        self.targets = torch.tensor(self.folder.targets, dtype=torch.long)
        self.info, self.classes, self.source = info, list(self.folder.classes), str(folder)
        self.transform = _ToNormalizedFloat(info, augment)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.folder[index]
        return self.transform(image), int(label)


def _read_rgb(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _decode_images(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode concatenated JPEG/PNG files (``buf[offsets[i]:offsets[i+1]]``) to uint8 ``[N,H,W,3]``."""
    return np.stack(
        [
            np.asarray(Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
            for i in range(len(offsets) - 1)
        ]
    )


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


@lru_cache(maxsize=8)
def _load_npz_split(path: str, mtime: float, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Read (and decode, once per process) one split of one of our npz files. ``mtime`` keys the cache."""
    with np.load(path) as d:
        prefix = ""
        if "train_offsets" in d.files:  # our shipped sample: both splits in one file
            prefix = "train_" if split == "train" else "test_"
            key = "jpeg" if split == "train" else "png"
            x = _decode_images(d[f"{prefix}{key}_bytes"], d[f"{prefix}offsets"])
            y = d[f"{prefix}y"]
        elif "jpeg_bytes" in d.files:
            x, y = _decode_images(d["jpeg_bytes"], d["offsets"]), d["y"]
        else:
            x, y = d["x"], d["y"]
        if f"{prefix}canonical_index" in d.files:
            within = d[f"{prefix}within_class_index"] if f"{prefix}within_class_index" in d.files else None
            order = canonical_order(d[f"{prefix}canonical_index"], np.asarray(y), within)
            x, y = x[order], np.asarray(y)[order]
        if "wnids" in d.files:
            # npz labels index wnids.txt order; ImageFolder (the authors' loader) sorts wnids.
            wnids = d["wnids"]
            rank = np.empty(len(wnids), dtype=np.int64)
            rank[np.argsort(wnids, kind="stable")] = np.arange(len(wnids))
            y = rank[y]
            classes = tuple(str(w) for w in np.sort(wnids))
        else:
            classes = tuple(str(c) for c in d["class_names"])
    return _to_nchw(x), torch.from_numpy(np.asarray(y, dtype=np.int64)), classes


def canonical_order(
    canonical_index: np.ndarray, y: np.ndarray, within_class_index: Optional[np.ndarray] = None
) -> np.ndarray:
    """Row order that restores a file's canonical order (a permutation of ``range(len(y))``).

    Rows with a known position (``canonical_index >= 0``) come first, sorted by it. Rows whose position
    is unknown (``-1``: in ``cifar10_test.npz`` the 9,000 images after canonical 999, stored grouped by
    class) follow with the classes interleaved: sorted by their rank inside their class
    (``within_class_index``), then by label. So no stretch of the returned order is one class, and a
    split by position (e.g. the last 10 %) is class-balanced; the order inside each class is kept.
    """
    canonical_index = np.asarray(canonical_index, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    if canonical_index.shape != y.shape:
        raise ValueError(f"canonical_index has shape {canonical_index.shape}, the labels {y.shape}")
    known = np.flatnonzero(canonical_index >= 0)
    known = known[np.argsort(canonical_index[known], kind="stable")]
    unknown = np.flatnonzero(canonical_index < 0)
    if len(unknown):
        if within_class_index is None:  # rank inside the class by file position
            rank = np.empty(len(unknown), dtype=np.int64)
            for c in np.unique(y[unknown]):
                sel = y[unknown] == c
                rank[sel] = np.arange(int(sel.sum()))
        else:
            rank = np.asarray(within_class_index, dtype=np.int64)[unknown]
        unknown = unknown[np.lexsort((y[unknown], rank))]
    return np.concatenate([known, unknown])


def _npz(path: Path, split: str):
    return _load_npz_split(str(path), path.stat().st_mtime, split)


def _missing(name: str, root: Path, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"dataset {name!r} not found under {root}: {how}")


def _torchvision_cifar(name: str, root: Path, split: str, download: bool):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    place = f"place torchvision's {cls.base_folder} folder in {root}"
    if not download:
        try:
            ds = cls(str(root), train=split == "train", download=False)
        except RuntimeError as err:
            raise _missing(
                name, root, f"pass download=True to fetch it with torchvision (needs network), or {place}"
            ) from err
    else:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # a black-holed network must not hang forever
        try:
            ds = cls(str(root), train=split == "train", download=True)
        except (OSError, RuntimeError) as err:
            raise _missing(
                name, root, f"the torchvision download failed ({err}); retry with network, or {place}"
            ) from err
        finally:
            socket.setdefaulttimeout(previous)
    return _to_nchw(ds.data), torch.tensor(ds.targets, dtype=torch.long), tuple(ds.classes), f"torchvision:{root}"


def _facescrub_standin(path: Path, split: str):
    """The 6-identity FaceScrub npz: resized 64 -> 48 px, per-identity seeded 85/15 split."""
    images, targets, classes = _npz(path, "all")
    rng = np.random.default_rng(_FACESCRUB_SPLIT_SEED)
    keep = []
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(targets.numpy() == c))
        n_train = int(round(_FACESCRUB_TRAIN_FRACTION * len(idx)))
        keep.append(idx[:n_train] if split == "train" else idx[n_train:])
    keep = torch.from_numpy(np.sort(np.concatenate(keep)))
    small = F.interpolate(images[keep].float(), size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    return small.round_().clamp_(0, 255).to(torch.uint8), targets[keep], classes


def load_dataset(
    name: str, split: str, data_root: str | os.PathLike | None = None, augment: bool = False, download: bool = False
) -> Dataset:
    """Load ``split`` ("train"/"test") of dataset ``name`` (see the module docstring for sources).

    Returns a Dataset of ``(normalised float32 [C,H,W] image, int label)`` with ``.targets``
    (int64 tensor), ``.classes``, ``.info`` (the DatasetInfo that matches the data actually
    loaded) and ``.source``. ``augment`` applies the authors' training augmentation.
    Raises FileNotFoundError, saying how to get the data, when no source is present.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = DEFAULT_ROOT if data_root is None else Path(data_root).expanduser()

    if name == "cifar10-sample":
        if not SAMPLE_PATH.exists():
            raise _missing(
                name,
                SAMPLE_PATH.parent,
                "regenerate it with `python -m reproduce.data.make_sample --data-root <folder with cifar10 npz files>`",
            )
        images, targets, classes = _npz(SAMPLE_PATH, split)
        return ImageTensorDataset(images, targets, info, augment, list(classes), str(SAMPLE_PATH))

    if name == "cifar10":
        npz = root / ("cifar10_train_jpeg.npz" if split == "train" else "cifar10_test.npz")
        if npz.exists():
            images, targets, classes = _npz(npz, split)
            return ImageTensorDataset(images, targets, info, augment, list(classes), str(npz))
    if name in ("cifar10", "cifar100"):
        images, targets, classes, source = _torchvision_cifar(name, root, split, download)
        return ImageTensorDataset(images, targets, info, augment, list(classes), source)

    if name in ("facescrub", "facescrub-6id"):
        folder = root / "facescrub" / "48x48" / ("train" if split == "train" else "validate")
        if name == "facescrub" and folder.is_dir():
            return ImageFolderDataset(folder, info, augment)
        npz = root / "facescrub_6id_64px.npz"
        if npz.exists():
            if name == "facescrub":
                warnings.warn(
                    f"FaceScrub not found under {root}/facescrub/48x48; using the 6-identity stand-in "
                    f"{npz.name} (ds.info.num_classes == 6, not 530)",
                    stacklevel=2,
                )
            images, targets, classes = _facescrub_standin(npz, split)
            return ImageTensorDataset(
                images, targets, dataset_info("facescrub-6id"), augment, list(classes), f"{npz} (6-identity stand-in)"
            )
        raise _missing(
            name,
            root,
            "run the authors' prepare_facescrub.py so that "
            f"{root}/facescrub/48x48/{{train,validate}}/<person>/*.jpg exist, or put the "
            "6-identity stand-in facescrub_6id_64px.npz there (no automatic download)",
        )

    # tinyimagenet
    folder = root / "tiny-imagenet-200" / ("train" if split == "train" else "val/images")
    if folder.is_dir():
        return ImageFolderDataset(folder, info, augment)
    npz = root / ("tinyimagenet_train50pc_jpeg.npz" if split == "train" else "tinyimagenet_val_jpeg.npz")
    if npz.exists():
        images, targets, classes = _npz(npz, split)
        return ImageTensorDataset(images, targets, info, augment, list(classes), str(npz))
    raise _missing(
        name,
        root,
        "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and lay it out "
        f"as the authors' prepare_tinyimagenet.py does ({root}/tiny-imagenet-200/train/<wnid>/..., "
        "val/images/<wnid>/...), or put tinyimagenet_{train50pc,val}_jpeg.npz there",
    )


def denormalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo the normalisation of dataset ``name``: ``[C,H,W]`` or ``[B,C,H,W]`` -> images in [0,1]."""
    info = dataset_info(name)
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != info.channels:
        raise ValueError(f"x must be a [C,H,W] or [B,C,H,W] tensor with C={info.channels}")
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


def _targets(dataset: Dataset) -> torch.Tensor:
    if isinstance(dataset, Subset):
        return _targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A deterministic, class-balanced ``Subset`` of ``n`` samples.

    Each class gets ``n // num_present_classes`` (the remainder goes to the lowest labels; a class
    with too few samples gives all it has and the others fill up). Indices within a class are
    drawn with ``seed``; the returned indices are sorted.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 1 <= n <= len(dataset):
        raise ValueError(f"n must be in 1..{len(dataset)} (the dataset size), got {n}")
    targets = _targets(dataset)
    gen = torch.Generator().manual_seed(int(seed))
    pools = {int(c): torch.nonzero(targets == c).flatten() for c in torch.unique(targets)}
    pools = {c: idx[torch.randperm(len(idx), generator=gen)] for c, idx in pools.items()}
    quota = {c: 0 for c in pools}
    remaining = n
    while remaining:
        open_classes = [c for c in sorted(pools) if quota[c] < len(pools[c])]
        share, extra = divmod(remaining, len(open_classes))
        for i, c in enumerate(open_classes):
            take = min(share + (i < extra), len(pools[c]) - quota[c])
            quota[c] += take
            remaining -= take
    chosen = torch.cat([pools[c][: quota[c]] for c in sorted(pools)])
    return Subset(dataset, sorted(chosen.tolist()))
