"""bagssl_core.data on real files: Debian's Fashion-MNIST, image trees written here, torchvision's layouts;
the validation split carved from the training images."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import write_png

from bagssl_core import data
from bagssl_core.config import ConfigError, DataConfig, load_config
from bagssl_core.data import (
    DataError,
    ImageData,
    collate_images,
    load_split,
    read_idx,
    stratified_counts,
    validation_split,
)

FMNIST = data.FASHION_MNIST_SYSTEM_DIR
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FMNIST} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fmnist_train() -> ImageData:
    return load_split(DataConfig(), "train", seed=0)


@pytest.fixture(scope="module")
def fmnist_test() -> ImageData:
    return load_split(DataConfig(), "test", seed=0)


# --- Fashion-MNIST ------------------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist_splits(fmnist_train: ImageData, fmnist_test: ImageData) -> None:
    fmnist_val = load_split(DataConfig(), "val", seed=0)
    for ds, n in ((fmnist_train, 54_000), (fmnist_val, 6_000), (fmnist_test, 10_000)):
        assert len(ds) == n and ds.name == "fashion_mnist"
        assert (ds.num_classes, ds.image_size, ds.channels) == (10, 28, 3)
        img, label = ds[0]
        assert img.shape == (3, 28, 28) and img.dtype == torch.uint8 and isinstance(label, int)
        assert ds.labels.dtype == torch.int64
        # The published dataset is exactly balanced (6000 / 1000 images per class), and the default
        # validation split takes a stratified 10% of the training images: 600 of each class.
        assert ds.labels.bincount().tolist() == [n // 10] * 10
        # Real photographs of clothing on a black background, not a blank or constant array.
        assert img.max() > 200 and img[:, 0, 0].eq(0).all()


@needs_fmnist
def test_fashion_mnist_to_rgb(fmnist_test: ImageData) -> None:
    gray = load_split(DataConfig(to_rgb=False), "test", seed=0)
    assert gray.channels == 1 and gray[0][0].shape == (1, 28, 28)
    rgb, _ = fmnist_test.__getitems__(range(100))
    assert rgb.shape == (100, 3, 28, 28) and rgb.is_contiguous()
    assert torch.equal(rgb, gray.__getitems__(range(100))[0].expand(-1, 3, -1, -1))


@needs_fmnist
def test_fashion_mnist_resized_once_at_load() -> None:
    ds = load_split(DataConfig(image_size=32, test_subset=64), "test", seed=0)
    native = load_split(DataConfig(test_subset=64), "test", seed=0)
    assert ds.image_size == 32 and ds[0][0].shape == (3, 32, 32) and ds[0][0].dtype == torch.uint8
    assert torch.equal(ds.labels, native.labels)
    ref = F.interpolate(native.images.float(), size=(32, 32), mode="bilinear", antialias=True)
    assert (ds.images.float() - ref).abs().max() <= 0.5


@needs_fmnist
@needs_fmnist
def test_fashion_mnist_from_root_gz_or_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "a" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    plain = tmp_path / "b"
    plain.mkdir()
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(FMNIST / f"{stem}.gz", raw)
        (plain / stem).write_bytes(gzip.decompress((FMNIST / f"{stem}.gz").read_bytes()))
    a = load_split(DataConfig(root=str(tmp_path / "a"), to_rgb=False), "test", seed=0)
    b = load_split(DataConfig(root=str(plain), to_rgb=False), "test", seed=0)
    assert len(a) == 10_000 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert np.array_equal(a.images[:, 0].numpy(), read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"))
    # Files in neither data.root nor the system directory: one line saying where they were looked for.
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(DataError) as err:
        load_split(DataConfig(root=str(tmp_path / "a")), "train", seed=0)
    msg = str(err.value)
    assert "\n" not in msg and "fashion_mnist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg


@needs_fmnist
def test_a_damaged_fashion_mnist_in_data_root_is_refused_not_replaced_by_the_system_copy(
    tmp_path: Path,
) -> None:
    """data.root is read first: its files are what the user pointed at, so a damaged copy there is an error
    naming it, even though the system's good copy would load."""
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(FMNIST / f"{stem}.gz", tmp_path)
    raw = gzip.decompress((FMNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError) as err:
        load_split(DataConfig(root=str(tmp_path)), "test", seed=0)
    assert str(err.value).startswith(f"{tmp_path / 't10k-images-idx3-ubyte.gz'}: ")


def _idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return np.array([magic, *dims], dtype=">i4").tobytes() + payload


def test_read_idx_valid_round_trip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "img.gz").write_bytes(gzip.compress(_idx_bytes(2051, (2, 3, 4), images.tobytes())))
    (tmp_path / "lbl").write_bytes(_idx_bytes(2049, (2,), bytes([7, 1])))
    assert np.array_equal(read_idx(tmp_path / "img.gz"), images)
    assert read_idx(tmp_path / "lbl").tolist() == [7, 1]


_PIXELS = np.random.default_rng(0).integers(0, 256, 100 * 784, dtype=np.uint8).tobytes()
_FULL = gzip.compress(_idx_bytes(2051, (100, 28, 28), _PIXELS))
_CORRUPTED = {
    "not_gzip.gz": b"this is not gzip data at all" * 10,
    "cut_gzip.gz": _FULL[: len(_FULL) // 2],
    "flipped_byte.gz": _FULL[:1000] + bytes([_FULL[1000] ^ 0xFF]) + _FULL[1001:],
    "short_payload.gz": gzip.compress(_idx_bytes(2051, (100, 28, 28), _PIXELS[:-784])),
    "bad_magic.gz": gzip.compress(_idx_bytes(1234, (2,), bytes(2))),
    "empty.gz": gzip.compress(b""),
}


@pytest.mark.parametrize("name", sorted(_CORRUPTED))
def test_read_idx_rejects_corrupted_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(_CORRUPTED[name])
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@needs_fmnist
def test_subset_is_seeded(fmnist_test: ImageData) -> None:
    a = load_split(DataConfig(test_subset=100), "test", seed=3)
    b = load_split(DataConfig(test_subset=100), "test", seed=3)
    c = load_split(DataConfig(test_subset=100), "test", seed=4)
    assert len(a) == 100 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    # A subset holds real images of the split, with their own labels.
    first, label = a[0]
    matches = (fmnist_test.images == first).flatten(1).all(1).nonzero().flatten()
    assert len(matches) >= 1 and label in fmnist_test.labels[matches].tolist()
    with pytest.raises(ConfigError, match=r"data\.test_subset: 10001 is more than the 10000"):
        load_split(DataConfig(test_subset=10_001), "test", seed=0)


@needs_fmnist
def test_dataloader_batches_equal_items(fmnist_test: ImageData) -> None:
    order = torch.randperm(len(fmnist_test), generator=torch.Generator().manual_seed(0))[:70].tolist()
    loader = DataLoader(fmnist_test, batch_size=32, sampler=order, collate_fn=collate_images)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 6]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.dtype == torch.uint8 and images.shape == (70, 3, 28, 28) and labels.dtype == torch.int64
    assert torch.equal(images, torch.stack([fmnist_test[i][0] for i in order]))
    assert labels.tolist() == [fmnist_test[i][1] for i in order]


def test_collate_stacks_single_items() -> None:
    items = [(torch.full((3, 4, 4), i, dtype=torch.uint8), i) for i in range(3)]
    images, labels = collate_images(items)
    assert images.shape == (3, 3, 4, 4) and labels.tolist() == [0, 1, 2] and labels.dtype == torch.int64


# --- torchvision datasets -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_missing_dataset_is_one_line_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as err:
        load_split(DataConfig(name=name, root=str(tmp_path)), "train", seed=0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name}:") and str(tmp_path) in msg
    assert "data.download=true" in msg and "data.root" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


# --- imagefolder ------------------------------------------------------------------------------------


def _write_tree(root: Path) -> None:
    """train/ and val/ with two classes; each image is a centre square of the class colour in a grey frame."""
    colours = {"ant": (250, 10, 10), "bee": (10, 10, 250)}
    for split, count in (("train", 3), ("val", 2)):
        for cls, colour in colours.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(count):
                h, w = (40, 60) if i % 2 == 0 else (50, 30)  # landscape and portrait
                img = torch.full((3, h, w), 128, dtype=torch.uint8)
                s = min(h, w) // 2
                top, left = (h - s) // 2, (w - s) // 2
                fill = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
                img[:, top : top + s, left : left + s] = fill
                if i == 0:
                    write_png(img, str(d / f"{i}.png"))
                else:
                    Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.JPEG", quality=95)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")


def test_imagefolder_labels_and_size(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, val_size=2)
    train, val = load_split(cfg, "train", seed=0), load_split(cfg, "test", seed=0)
    assert (len(train), len(val), train.num_classes, train.channels, train.image_size) == (4, 4, 2, 3, 16)
    assert train.labels.tolist() == [0, 0, 1, 1] and val.labels.tolist() == [0, 0, 1, 1]
    images, labels = next(iter(DataLoader(val, batch_size=4, collate_fn=collate_images, num_workers=1)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(labels, val.labels) and torch.equal(images[2], val[2][0])
    # The centre crop keeps the class colour in the middle; the frame survives only at the edges.
    centre = images[:, :, 6:10, 6:10].float().mean(dim=(2, 3))
    assert (centre[:2, 0] > 200).all() and (centre[2:, 2] > 200).all()
    sub = load_split(cfg.model_copy(update={"train_subset": 4}), "train", seed=1)
    assert len(sub) == 2 and all(sub[i][1] == int(sub.labels[i]) for i in range(2))


def test_imagefolder_reads_16_bit_pngs_as_8_bit_images(tmp_path: Path) -> None:
    """torchvision decodes a 16-bit PNG to uint16, which could not be stacked with the uint8 images: it is
    held as the others are, its top 8 bits (40000 >> 8 = 156)."""
    _write_tree(tmp_path)
    Image.fromarray(np.full((16, 16), 40_000, dtype=np.uint16)).save(tmp_path / "train" / "ant" / "deep.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, val_size=2)
    deep = []
    for split in ("train", "val"):
        part = load_split(cfg, split, seed=0)
        images, _ = part.__getitems__(list(range(len(part))))
        assert images.dtype == torch.uint8
        deep += [im for f, im in zip(part.files, images, strict=True) if f.name == "deep.png"]
    assert len(deep) == 1 and deep[0].unique().tolist() == [156]


def test_imagefolder_validation_comes_from_train_and_test_from_val(tmp_path: Path) -> None:
    """ImageNet's layout: val/ is the held-out test split; validation images are carved from train/."""
    _write_tree(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, val_size=2)
    train, val, test = (load_split(cfg, s, seed=0) for s in ("train", "val", "test"))
    assert isinstance(train, data.ImageFolderData) and isinstance(val, data.ImageFolderData)
    assert isinstance(test, data.ImageFolderData)
    assert (train.split, val.split, test.split) == ("train", "val", "test")
    train_files = sorted(p for p in (tmp_path / "train").rglob("*") if p.suffix in (".png", ".JPEG"))
    assert sorted(train.files + val.files) == train_files and not set(train.files) & set(val.files)
    assert val.labels.tolist() == [0, 1]  # one of each class
    assert all(f.parent.name == val.classes[y] for f, y in zip(val.files, val.labels.tolist(), strict=True))
    assert all(f.is_relative_to(tmp_path / "val") for f in test.files) and len(test) == 4
    images, labels = val.__getitems__([0, 1])
    assert images.shape == (2, 3, 16, 16) and torch.equal(labels, val.labels)


def test_imagefolder_errors(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    with pytest.raises(DataError, match=r"imagefolder: .*train not found"):
        load_split(DataConfig(name="imagefolder", root=str(tmp_path / "nowhere")), "train", seed=0)
    (tmp_path / "val" / "cow").mkdir()
    with pytest.raises(DataError, match="class 'cow'"):
        load_split(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16), "test", seed=0)


def _write_fmnist_tree(root: Path, fmnist: ImageData, per_class: int) -> dict[Path, torch.Tensor]:
    """train/ and val/ of real Fashion-MNIST images as 28-px RGB PNGs; returns each file's pixels."""
    written = {}
    for split, offset in (("train", 0), ("val", per_class)):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            idx = (fmnist.labels == c).nonzero().flatten()[offset : offset + per_class]
            for i in idx.tolist():
                img = fmnist[i][0].expand(3, -1, -1).contiguous()
                write_png(img, str(d / f"{i}.png"))
                written[d / f"{i}.png"] = img
    return written


@needs_fmnist
def test_imagefolder_keeps_the_files_own_size(tmp_path: Path, fmnist_test: ImageData) -> None:
    """28-px PNGs (issue 9: resized to 224 by default, evaluation then ran out of memory) stay 28 px,
    pixel for pixel, and a run's config resolves to that size."""
    written = _write_fmnist_tree(tmp_path, fmnist_test, per_class=3)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), val_size=2, batch_size=2)
    train, test = load_split(cfg, "train", seed=0), load_split(cfg, "test", seed=0)
    assert (train.image_size, test.image_size, len(train), len(test)) == (28, 28, 4, 6)
    assert isinstance(test, data.ImageFolderData)
    for i, f in enumerate(test.files):
        assert torch.equal(test[i][0], written[f])
    run = load_config(None, {"data.name": "imagefolder", "data.root": str(tmp_path), "patch.size": 0.5})
    assert not run.image_size_known
    resolved = data.resolve_image_size(run)
    assert (resolved.image_size, resolved.patch_px, resolved.data.image_size) == (28, 14, 28)
    assert data.resolve_image_size(resolved) is resolved
    too_big = load_config(None, {"data.name": "imagefolder", "data.root": str(tmp_path), "patch.size": 40})
    with pytest.raises(ConfigError) as err:
        data.resolve_image_size(too_big)
    assert str(err.value) == (  # names where the size came from: not a data.image_size the user set
        f"imagefolder: the images under {tmp_path} are 28x28 px, kept at their own size as data.image_size is "
        "not set, and at that size: patch.size: a 40-px patch does not fit a 28-px image (imagefolder); "
        "expected at most 28 pixels or a fraction <= 1"
    )


@needs_fmnist
def test_imagefolder_of_mixed_sizes_needs_data_image_size(tmp_path: Path, fmnist_test: ImageData) -> None:
    _write_fmnist_tree(tmp_path, fmnist_test, per_class=2)
    # One real image upsampled to 56 px among the 28-px ones.
    odd = tmp_path / "val" / "class1" / "big.png"
    write_png(data.resize_images(fmnist_test[0][0].expand(3, -1, -1)[None], 56)[0], str(odd))
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), val_size=1, batch_size=2)
    assert load_split(cfg, "train", seed=0).image_size == 28  # train/ alone shares one size
    with pytest.raises(
        ConfigError, match=r"data\.image_size: not set.*found 28x28 \(.*\), 56x56 \(.*big\.png\)"
    ):
        load_split(cfg, "test", seed=0)
    run = load_config(None, {"data.name": "imagefolder", "data.root": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"data\.image_size: not set.*found 28x28 .* 56x56"):
        data.resolve_image_size(run)
    test = load_split(cfg.model_copy(update={"image_size": 32}), "test", seed=0)
    images, _ = test.__getitems__(range(len(test)))
    assert images.shape == (5, 3, 32, 32)
    # Non-square files of one size are not one square size either.
    (tmp_path / "val" / "class1" / "big.png").unlink()
    _write_tree(tmp_path / "rect")
    with pytest.raises(ConfigError, match=r"data\.image_size: not set"):
        load_split(DataConfig(name="imagefolder", root=str(tmp_path / "rect")), "train", seed=0)


# --- synthetic ----------------------------------------------------------------------------------------


def test_synthetic_is_seeded() -> None:
    cfg = DataConfig(name="synthetic", synthetic_train=64, synthetic_test=32, synthetic_classes=4)
    a, b = load_split(cfg, "train", seed=1), load_split(cfg, "train", seed=1)
    val = load_split(cfg, "val", seed=1)
    # 10% of 64 rounds to 6 validation images: shares of 1.5 per class, the two extra to the lower classes.
    assert (len(a), len(val)) == (58, 6) and a[0][0].shape == (3, 32, 32) and a.num_classes == 4
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (a.labels.bincount() + val.labels.bincount()).tolist() == [16] * 4
    assert val.labels.bincount().tolist() == [2, 2, 1, 1]
    assert not torch.equal(a.images, load_split(cfg, "train", seed=2).images)
    test = load_split(cfg, "test", seed=1)
    assert len(test) == 32 and not torch.equal(test.images[:32], a.images[:32])
    big = load_split(cfg.model_copy(update={"image_size": 48}), "train", seed=1)
    assert big.image_size == 48 and big.images.shape == (58, 3, 48, 48)


def test_synthetic_classes_are_learnable() -> None:
    """Nearest class centroid on Fourier magnitudes (orientation + frequency) beats chance by far."""
    cfg = DataConfig(
        name="synthetic", synthetic_train=256, synthetic_test=128, synthetic_classes=4, batch_size=64
    )
    train, test = load_split(cfg, "train", seed=0), load_split(cfg, "test", seed=0)

    def features(images: torch.Tensor) -> torch.Tensor:
        gray = images.float().mean(1)
        mag = torch.fft.fft2(gray - gray.mean(dim=(1, 2), keepdim=True)).abs().flatten(1)
        return F.normalize(mag, dim=1)

    f_train, f_test = features(train.images), features(test.images)
    centroids = torch.stack([f_train[train.labels == c].mean(0) for c in range(4)])
    acc = (torch.cdist(f_test, centroids).argmin(1) == test.labels).float().mean().item()
    assert acc > 0.9


# --- validation split -----------------------------------------------------------------------------------


def _fmnist_train_labels() -> torch.Tensor:
    return torch.from_numpy(read_idx(FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int64))


def _check_split(labels: torch.Tensor, val: torch.Tensor, train: torch.Tensor, n_val: int) -> None:
    """Disjoint, together every index, n_val in validation, and each class within one image of its share."""
    n = len(labels)
    assert len(val) == n_val and len(train) == n - n_val
    assert torch.equal(torch.cat([val, train]).sort().values, torch.arange(n))
    assert torch.equal(val, val.sort().values) and torch.equal(train, train.sort().values)
    sizes = labels.bincount()
    got = labels[val].bincount(minlength=len(sizes))
    assert torch.equal(got, stratified_counts(sizes, n_val))
    assert ((got - sizes * n_val / n).abs() < 1).all()
    assert (got >= 1).all()


@needs_fmnist
@pytest.mark.parametrize(
    ("first", "val_size", "n_val"), [(60_000, 0.1, 6_000), (1_000, 0.15, 150), (997, 33, 33)]
)
def test_validation_split_on_real_labels(first: int, val_size: int | float, n_val: int) -> None:
    # The first images of the file are not balanced (the first 1000 hold 86 to 115 per class).
    labels = _fmnist_train_labels()[:first]
    cfg = DataConfig(val_size=val_size, batch_size=16)
    val, train = validation_split(labels, cfg, seed=0)
    _check_split(labels, val, train, n_val)
    again = validation_split(labels, cfg, seed=0)
    assert torch.equal(again[0], val) and torch.equal(again[1], train)
    other = validation_split(labels, cfg, seed=1)[0]
    assert len(other) == n_val and not torch.equal(other, val)


@needs_fmnist
def test_load_split_val_and_train_are_the_validation_split_of_the_training_images() -> None:
    cfg = DataConfig(to_rgb=False)
    images = torch.from_numpy(read_idx(FMNIST / "train-images-idx3-ubyte.gz").copy())
    val_idx, train_idx = validation_split(_fmnist_train_labels(), cfg, seed=3)
    val, train = load_split(cfg, "val", seed=3), load_split(cfg, "train", seed=3)
    assert torch.equal(val.images[:, 0], images[val_idx]) and torch.equal(
        val.labels, _fmnist_train_labels()[val_idx]
    )
    assert torch.equal(train.images[:, 0], images[train_idx])


@needs_fmnist
def test_quick_preset_subset_gives_3600_training_and_400_validation_images() -> None:
    cfg = DataConfig(train_subset=4000, batch_size=128)
    train, val = load_split(cfg, "train", seed=0), load_split(cfg, "val", seed=0)
    assert (len(train), len(val), val.split) == (3600, 400, "val")
    sizes = train.labels.bincount() + val.labels.bincount()
    assert torch.equal(val.labels.bincount(), stratified_counts(sizes, 400))
    # Disjoint within the subset: no training image is also a validation image (the subset holds no
    # duplicate pictures: 4000 distinct images).
    both = torch.cat([train.images, val.images]).flatten(1)
    assert len(torch.unique(both, dim=0)) == 4000


def test_stratified_counts_sum_to_total_and_keep_every_class() -> None:
    # Largest remainder: shares 3.27, 0.03, 0.07, 1.63 -> 3, 0, 0, 2; then the 2-image class takes one
    # from the largest (a 1-image class never does: it would leave nothing to train on).
    assert stratified_counts(torch.tensor([100, 1, 2, 50, 0]), 5).tolist() == [2, 0, 1, 2, 0]
    assert stratified_counts(torch.tensor([10, 10, 10]), 2).tolist() == [1, 1, 0]  # ties: lower class
    assert stratified_counts(torch.tensor([6000] * 10), 6000).tolist() == [600] * 10


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"val_size": 64}, r"data\.val_size: 64 validation images out of 64 training images; expected fewer"),
        (
            {"val_size": 0.001},
            r"data\.val_size: 0\.001 of 64 training images is 0 images; expected at least 1",
        ),
        (
            {"val_size": 0.5, "batch_size": 40},
            r"data\.val_size: 32 validation images leave 32 of the 64 training images, less than one batch "
            r"\(data\.batch_size=40\); expected at most 24 validation images",
        ),
        (
            {"val_size": 1, "batch_size": 64},
            r"data\.val_size: 1 validation images leave 63 of the 64 training images, less than one batch "
            r"\(data\.batch_size=64\); expected a smaller data\.batch_size to leave room for them",
        ),
    ],
)
def test_bad_validation_sizes_name_data_val_size(update: dict[str, object], message: str) -> None:
    cfg = DataConfig.model_validate({"name": "synthetic", "synthetic_train": 64, **update})
    for split in ("train", "val"):
        with pytest.raises(ConfigError, match=message):
            load_split(cfg, split, seed=0)
    with pytest.raises(ValueError, match="val_size"):
        DataConfig(val_size=0)
