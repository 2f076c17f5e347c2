"""Tests for reproduce.data: dataset info, the shipped sample, the offline npz copies, errors, helpers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED_DATA, needs_shared_data
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from reproduce.data import DATASETS, SAMPLE_PATH, dataset_info, denormalize, load_dataset, subset

SHARED = SHARED_DATA
needs_shared = needs_shared_data


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # per-image tensor ops: threads only add overhead on a shared 2-core box
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sample():
    return load_dataset("cifar10-sample", "train"), load_dataset("cifar10-sample", "test")


def test_dataset_info_values():
    assert set(DATASETS) >= {"cifar10", "cifar100", "facescrub", "tinyimagenet", "cifar10-sample"}
    c10 = dataset_info("cifar10")
    assert (c10.num_classes, c10.image_size, c10.channels) == (10, 32, 3)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.247, 0.243, 0.261)
    s = dataset_info("cifar10-sample")
    assert (s.num_classes, s.image_size, s.channels, s.mean, s.std) == (10, 32, 3, c10.mean, c10.std)
    assert (dataset_info("cifar100").num_classes, dataset_info("cifar100").image_size) == (100, 32)
    assert (dataset_info("facescrub").num_classes, dataset_info("facescrub").image_size) == (530, 48)
    assert (dataset_info("tinyimagenet").num_classes, dataset_info("tinyimagenet").image_size) == (200, 64)
    with pytest.raises(ValueError, match="name"):
        dataset_info("mnist")


def test_sample_file_is_small_and_shipped():
    assert SAMPLE_PATH.exists()
    assert SAMPLE_PATH.stat().st_size <= 4_000_000
    assert (SAMPLE_PATH.parent / "README.md").exists()


def test_sample_loads_with_expected_shapes(sample):
    train, test = sample
    assert (len(train), len(test)) == (5000, 1000)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    assert torch.equal(torch.bincount(train.targets), torch.full((10,), 500))
    assert train.targets.dtype == torch.int64 and test.targets.min() >= 0 and test.targets.max() <= 9
    assert train.classes[:2] == ["airplane", "automobile"]
    # canonical CIFAR-10 label order starts 6, 9, 9, 4, 1 (train) and 3, 8, 8, 0, 6 (test)
    assert train.targets[:5].tolist() == [6, 9, 9, 4, 1]
    assert test.targets[:5].tolist() == [3, 8, 8, 0, 6]
    # normalised: roughly zero mean, unit std per channel over the sample
    xs = torch.stack([train[i][0] for i in range(0, 5000, 5)])
    assert xs.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (xs.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1


def test_sample_index_keys():
    with np.load(SAMPLE_PATH) as d:
        idx = d["train_canonical_index"]
        assert len(idx) == 5000 and np.all(np.diff(idx) > 0) and idx.max() < 50000
        assert np.array_equal(d["test_canonical_index"], np.arange(1000))


def test_normalisation_round_trip(sample):
    train, _ = sample
    for i in (0, 17, 4999):
        x, _ = train[i]
        back = denormalize(x, "cifar10-sample")
        assert back.min() >= 0 and back.max() <= 1
        assert torch.allclose(back * 255, train.images[i].float(), atol=1e-3)
    batch = torch.stack([train[i][0] for i in range(4)])
    assert denormalize(batch, "cifar10").shape == (4, 3, 32, 32)
    assert denormalize(torch.full((3, 2, 2), 100.0), "cifar10").max() == 1  # clamped
    with pytest.raises(ValueError, match="x"):
        denormalize(torch.zeros(1, 32, 32), "cifar10")


def test_augmentation_changes_images_but_keeps_shape_and_range(sample):
    train, _ = sample
    aug = load_dataset("cifar10-sample", "train", augment=True)
    torch.manual_seed(0)
    changed = 0
    for i in range(20):
        xa, ya = aug[i]
        x, y = train[i]
        assert xa.shape == x.shape and ya == y
        back = denormalize(xa, "cifar10")
        assert torch.allclose(back * 255, (back * 255).round(), atol=1e-3)  # still uint8 pixel values
        changed += not torch.equal(xa, x)
    assert changed >= 15
    torch.manual_seed(1)
    a = aug[3][0]
    torch.manual_seed(1)
    assert torch.equal(a, aug[3][0])  # augmentation draws from torch's RNG


def test_dataloader_batches(sample):
    train, _ = sample
    x, y = next(iter(DataLoader(train, batch_size=64, shuffle=True, num_workers=0)))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,) and y.dtype == torch.int64


def _head_of_jpeg_npz(src: Path, dst: Path, n: int) -> None:
    """Copy the first n images of one of the shared *_jpeg.npz files (same keys) to dst."""
    with np.load(src) as d:
        off = d["offsets"][: n + 1]
        arrays = {k: d[k] for k in d.files if k not in ("jpeg_bytes", "offsets")}
        arrays = {k: (v[:n] if len(v) == len(d["offsets"]) - 1 else v) for k, v in arrays.items()}
        np.savez(dst, jpeg_bytes=d["jpeg_bytes"][: off[-1]], offsets=off, **arrays)


@needs_shared
def test_shared_cifar10_matches_sample(sample, tmp_path):
    train_s, test_s = sample
    test = load_dataset("cifar10", "test", data_root=SHARED)
    assert len(test) == 10000 and torch.equal(torch.bincount(test.targets), torch.full((10,), 1000))
    assert torch.equal(test.images[:1000], test_s.images)  # PNG in the sample is lossless
    assert torch.equal(test.targets[:1000], test_s.targets)
    with np.load(SHARED / "cifar10_train_jpeg.npz") as d:
        all_y = torch.from_numpy(d["y"])
    with np.load(SAMPLE_PATH) as d:
        idx = torch.from_numpy(d["train_canonical_index"])
    first_500 = torch.cat([torch.nonzero(all_y == c).flatten()[:500] for c in range(10)]).sort().values
    assert torch.equal(idx, first_500)  # provenance: first 500 occurrences of each class, canonical order
    assert torch.equal(all_y[idx], train_s.targets)
    # the JPEG-npz train path, on the first 2,000 images (decoding all 50,000 takes ~5 s)
    _head_of_jpeg_npz(SHARED / "cifar10_train_jpeg.npz", tmp_path / "cifar10_train_jpeg.npz", 2000)
    train = load_dataset("cifar10", "train", data_root=tmp_path)
    assert len(train) == 2000 and train.images.dtype == torch.uint8 and train.source.endswith(".npz")
    in_head = idx < 2000
    assert in_head.sum() > 100
    assert torch.equal(train.images[idx[in_head]], train_s.images[in_head])  # same JPEG bytes, same pixels
    # decoded once per process: a second load reuses the same tensor
    assert load_dataset("cifar10", "train", data_root=tmp_path).images.data_ptr() == train.images.data_ptr()
    x, y = train[123]
    assert x.shape == (3, 32, 32) and y == int(all_y[123])


@needs_shared
def test_shared_facescrub_standin():
    with pytest.warns(UserWarning, match="6-identity"):
        train = load_dataset("facescrub", "train", data_root=SHARED)
    test = load_dataset("facescrub-6id", "test", data_root=SHARED)
    assert train.info.num_classes == 6 and train.info.image_size == 48
    assert len(train) + len(test) == 868
    assert len(test) == pytest.approx(0.15 * 868, abs=6)
    assert train[0][0].shape == (3, 48, 48)
    assert set(train.targets.tolist()) == set(test.targets.tolist()) == set(range(6))
    again = load_dataset("facescrub-6id", "test", data_root=SHARED)
    assert torch.equal(again.images, test.images)  # deterministic split


@needs_shared
def test_shared_tinyimagenet_val(tmp_path):
    _head_of_jpeg_npz(SHARED / "tinyimagenet_val_jpeg.npz", tmp_path / "tinyimagenet_val_jpeg.npz", 500)
    test = load_dataset("tinyimagenet", "test", data_root=tmp_path)
    assert len(test) == 500 and test.images.shape[1:] == (3, 64, 64)
    assert len(test.classes) == 200 and test.classes == sorted(test.classes)  # ImageFolder's label order
    with np.load(SHARED / "tinyimagenet_val_jpeg.npz") as d:
        wnids = [str(w) for w in d["wnids"][d["y"][:500]]]
    assert [test.classes[int(t)] for t in test.targets] == wnids


def _write_jpeg(path: Path, size: int, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format="JPEG")


def test_imagefolder_layouts(tmp_path):
    for wnid, value in (("n01", 40), ("n02", 200)):
        for i in range(2):
            _write_jpeg(tmp_path / "tiny-imagenet-200" / "val" / "images" / wnid / f"{i}.JPEG", 64, value)
    for person in ("alice", "bob"):
        _write_jpeg(tmp_path / "facescrub" / "48x48" / "train" / person / "0.jpg", 48, 128)
    tiny = load_dataset("tinyimagenet", "test", data_root=tmp_path)
    assert len(tiny) == 4 and tiny.classes == ["n01", "n02"]
    x, y = tiny[3]
    assert x.shape == (3, 64, 64) and y == 1
    assert abs(denormalize(x, "tinyimagenet").mean().item() * 255 - 200) < 3
    face = load_dataset("facescrub", "train", data_root=tmp_path, augment=True)
    assert len(face) == 2 and face[0][0].shape == (3, 48, 48) and face.info.num_classes == 530


@pytest.mark.parametrize(
    "name,hint",
    [
        ("cifar10", "download=True"),
        ("cifar100", "download=True"),
        ("facescrub", "prepare_facescrub"),
        ("tinyimagenet", "prepare_tinyimagenet"),
    ],
)
def test_missing_dataset_says_how_to_get_it(tmp_path, name, hint):
    with pytest.raises(FileNotFoundError, match=hint) as err:
        load_dataset(name, "train", data_root=tmp_path, download=False)
    assert str(tmp_path) in str(err.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_dataset("cifar10-sample", "val")
    with pytest.raises(ValueError, match="name"):
        load_dataset("svhn", "train")


def test_subset_is_balanced_and_deterministic(sample):
    train, _ = sample
    a = subset(train, 105, seed=1)
    assert len(a) == 105 and len(set(a.indices)) == 105
    counts = torch.bincount(train.targets[a.indices], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert subset(train, 105, seed=1).indices == a.indices
    assert subset(train, 105, seed=2).indices != a.indices
    x, y = a[0]
    assert x.shape == (3, 32, 32)
    nested = subset(a, 10, seed=0)  # works on a Subset too
    assert torch.equal(torch.bincount(train.targets[[a.indices[i] for i in nested.indices]]), torch.ones(10).long())


def test_subset_fills_up_from_larger_classes():
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    ds = TensorDataset(torch.zeros(len(labels), 1), labels)  # no .targets: labels are read item by item
    s = subset(ds, 9, seed=0)
    counts = torch.bincount(labels[s.indices], minlength=3).tolist()
    assert sum(counts) == 9 and counts[0] == 2 and abs(counts[1] - counts[2]) <= 1
    with pytest.raises(ValueError, match="n"):
        subset(ds, 15)
    with pytest.raises(TypeError, match="n"):
        subset(ds, 2.0)


def _class_sorted_test_npz(path: Path, known: int = 20, per_class: int = 10) -> np.ndarray:
    """A cifar10_test.npz laid out like the real one: ``known`` rows in canonical order, then the rest grouped
    by class (canonical_index -1, within_class_index their rank in the class). Returns the labels."""
    rng = np.random.default_rng(0)
    y_known = rng.permutation(np.arange(known) % 10)
    rest = np.repeat(np.arange(10), per_class)
    y = np.concatenate([y_known, rest])
    x = np.zeros((len(y), 32, 32, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(len(y))  # each image carries its file row
    within = np.zeros(len(y), dtype=np.int64)
    for c in range(10):
        rows = np.flatnonzero(y == c)
        within[rows] = np.arange(len(rows))
    canonical = np.concatenate([np.arange(known), np.full(len(rest), -1)])
    np.savez(
        path,
        x=x,
        y=y,
        canonical_index=canonical,
        within_class_index=within,
        class_names=np.array([f"c{i}" for i in range(10)]),
    )
    return y


def test_loader_restores_canonical_order_and_interleaves_a_class_sorted_tail(tmp_path):
    y = _class_sorted_test_npz(tmp_path / "cifar10_test.npz")
    test = load_dataset("cifar10", "test", data_root=tmp_path)
    rows = test.images[:, 0, 0, 0].long()
    assert torch.equal(rows[:20], torch.arange(20))  # the known canonical rows first, in order
    assert sorted(rows.tolist()) == list(range(len(y)))  # a permutation: nothing lost or repeated
    assert torch.equal(test.targets, torch.from_numpy(y)[rows])  # labels travel with their images
    tail = torch.bincount(test.targets[-len(test) // 10 :], minlength=10)  # the last 10 %: the inference-time
    assert tail.max() - tail.min() <= 1  # attack's scored images; in file order they would all be class 9
    assert torch.equal(torch.bincount(test.targets[-10:], minlength=10), torch.ones(10, dtype=torch.long))
    for c in range(10):  # the order inside each class is kept
        inside = rows[test.targets == c]
        assert torch.equal(inside, inside.sort().values)


def test_canonical_order_sorts_known_positions():
    from reproduce.data.datasets import canonical_order

    order = canonical_order(np.array([2, 0, 1, -1, -1]), np.array([0, 1, 0, 1, 1]))
    assert order.tolist() == [1, 2, 0, 3, 4]
    with pytest.raises(ValueError, match="canonical_index"):
        canonical_order(np.array([0, 1]), np.array([0]))


@needs_shared
def test_shared_cifar10_test_tail_is_class_balanced():
    test = load_dataset("cifar10", "test", data_root=SHARED)
    counts = torch.bincount(test.targets[-1000:], minlength=10)
    assert counts.min() >= 90 and counts.max() <= 110, counts.tolist()
