"""Datasets as uint8 image tensors (N, C, H, W) and int64 labels (N,), one split at a time.

`load_split(cfg, split, seed)` is the one entry point. Three splits: "test" is the dataset's held-out split;
"val" is a seeded, class-stratified part of the training images (see `validation_split`) and "train" the
rest, so that model selection never looks at the test split. In-memory datasets (fashion_mnist, cifar10, cifar100,
stl10, synthetic) are decoded once, resized once when `data.image_size` asks for it, and served in whole
batches through `__getitems__`, which torch's DataLoader calls instead of one `__getitem__` per image.
imagefolder decodes lazily, per image, so the work happens in DataLoader workers; without
`data.image_size` it keeps the files' own size, which they must all share (`imagefolder_size`).

Every missing file or failed download surfaces as a `DataError`: one line that says what is missing and
what to do about it.

torchvision is imported inside the functions that need it (the torchvision datasets, ImageFolder's decoding
and resizing), not here: importing it costs about 3 s of CPU (its `ops` pull in torch's compiler stack), and
the sweep driver, which loads the splits only to check them before a sweep starts, reads Fashion-MNIST's idx
files without it.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import tarfile
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from bagssl_core.config import (
    NATIVE_IMAGE_SIZE,
    ConfigError,
    DataConfig,
    DataError,
    TrainConfig,
    validate_config,
)
from bagssl_core.memory import Need, require_memory

log = logging.getLogger(__name__)
# In-memory datasets live in the host's memory, whatever device trains.
CPU = torch.device("cpu")

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
# The image sets a dataset ships with: "val" and "train" are both read from the training set.
Source = Literal["train", "test"]
# Streams of random numbers derived from run.seed (see `_derived_seed`).
_SYNTHETIC_TRAIN, _SYNTHETIC_TEST, _VALIDATION = 0, 1, 2

# Where Debian's `dataset-fashion-mnist` package installs the original idx files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES: dict[Source, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_COUNT = {"train": 60_000, "test": 10_000}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Errors torchvision raises for missing, corrupted or undownloadable files.
_DATASET_ERRORS = (RuntimeError, OSError, EOFError, tarfile.TarError, zlib.error)


class ImageData(Dataset, ABC):
    """One split of a dataset: uint8 images (C, H, W) with int labels.

    Attributes:
        name: dataset name as in `data.name`.
        split: "train", "val" or "test".
        num_classes: number of classes (labels are 0 .. num_classes - 1).
        image_size: side S of every (square) image this dataset yields.
        channels: C, 3 for RGB (or replicated grayscale), 1 for grayscale.
        labels: int64 (N,), the label of every image, in index order.
    """

    def __init__(
        self, name: str, split: Split, num_classes: int, image_size: int, channels: int, labels: torch.Tensor
    ) -> None:
        self.name = name
        self.split = split
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Image uint8 (C, S, S) and its label."""

    @abstractmethod
    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 (B, C, S, S) and labels int64 (B,) for B indices, already batched."""

    @abstractmethod
    def subset(self, indices: torch.Tensor) -> ImageData:
        """The images at `indices` (int64 (K,)), in that order, as a dataset of the same kind."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name} {self.split}: {len(self)} images, "
            f"{self.channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes)"
        )


class TensorImageData(ImageData):
    """A split held in memory as one uint8 tensor (N, C, S, S); batches are gathered with one index op."""

    def __init__(
        self, name: str, split: Split, images: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"expected uint8 images (N, C, S, S), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
        super().__init__(name, split, num_classes, images.shape[-1], images.shape[1], labels.to(torch.int64))
        self.images = images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        # Advanced indexing copies into a fresh contiguous batch, even from an expanded (to_rgb) tensor.
        return self.images[idx], self.labels[idx]

    def subset(self, indices: torch.Tensor) -> TensorImageData:
        return TensorImageData(
            self.name, self.split, self.images[indices], self.labels[indices], self.num_classes
        )


class ImageFolderData(ImageData):
    """A `root/<split dir>/<class>/<image>` tree, decoded to RGB and resized per image on access.

    Each image's shorter side is resized to `image_size` (bilinear, antialiased), then centre-cropped; an
    image already `image_size` square is used as it is.
    """

    def __init__(
        self, split: Split, files: list[Path], labels: torch.Tensor, classes: list[str], image_size: int
    ) -> None:
        super().__init__("imagefolder", split, len(classes), image_size, 3, labels)
        self.files = files
        self.classes = classes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._load(self.files[index]), int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return torch.stack([self._load(self.files[i]) for i in idx.tolist()]), self.labels[idx]

    def subset(self, indices: torch.Tensor) -> ImageFolderData:
        return ImageFolderData(
            self.split,
            [self.files[i] for i in indices.tolist()],
            self.labels[indices],
            self.classes,
            self.image_size,
        )

    def _load(self, path: Path) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        from torchvision.io import ImageReadMode, decode_image

        try:
            img = decode_image(str(path), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as err:
            raise DataError(f"imagefolder: cannot decode {path}: {str(err).splitlines()[0]}") from None
        if img.dtype != torch.uint8:  # a 16-bit PNG: scaled to 8 bits, as every other image is held
            img = TF.to_dtype(img, torch.uint8, scale=True)
        if img.shape[-2:] == (self.image_size, self.image_size):
            return img
        img = TF.resize(img, [self.image_size], antialias=True)
        return TF.center_crop(img, [self.image_size, self.image_size])


def data_identity(train: ImageData) -> dict[str, Any]:
    """What tells one dataset from another, for a checkpoint to keep: its classes, its number of training
    images and a fingerprint of them as a run draws them (their labels in order; an ImageFolder's class and
    file names too, and its files' own sizes). A data.root that moved gives the same; other images or
    labels do not."""
    digest = hashlib.sha256(train.labels.numpy().tobytes())
    classes = train.classes if isinstance(train, ImageFolderData) else None
    if isinstance(train, ImageFolderData):
        for f in train.files:
            digest.update(f"{f.parent.name}/{f.name}\n".encode())
    return {
        "name": train.name,
        "num_classes": train.num_classes,
        "classes": classes,
        "images": len(train),
        "fingerprint": digest.hexdigest()[:16],
        "sizes": _file_sizes(train) if isinstance(train, ImageFolderData) else None,
    }


# Files whose own size `data_identity` reads from their headers: enough to tell a tree re-encoded at another
# size (which a run resizes to its own size without a word), few enough for every checkpoint.
_IDENTITY_FILES = 16


def _file_sizes(data: ImageFolderData) -> list[str]:
    """The distinct sizes ("WxH") of an ImageFolder's first files as stored, before any resize; a file whose
    header cannot be read is left out (the loader says so when it decodes it)."""
    sizes = set()
    for path in data.files[:_IDENTITY_FILES]:
        try:
            with Image.open(path) as img:
                sizes.add(f"{img.size[0]}x{img.size[1]}")
        except (OSError, UnidentifiedImageError):
            continue
    return sorted(sizes)


def check_same_data(saved: Mapping[str, Any] | None, now: Mapping[str, Any], root: str, source: str) -> None:
    """ConfigError unless `now` (`data_identity` of the data found now) is the data a checkpoint (`source`)
    saved as `saved`; a checkpoint written before identities were saved (None) is taken as it is."""
    if not saved:
        return
    differ = []
    if (saved["num_classes"], saved["classes"]) != (now["num_classes"], now["classes"]):
        then, found = (
            f"{d['num_classes']} classes" + (f" ({', '.join(d['classes'][:5])})" if d["classes"] else "")
            for d in (saved, now)
        )
        differ.append(f"{then} then, {found} now")
    if saved["images"] != now["images"]:
        differ.append(f"{saved['images']} training images then, {now['images']} now")
    if saved.get("sizes") and now.get("sizes") and saved["sizes"] != now["sizes"]:
        differ.append(f"images of {', '.join(saved['sizes'])} px then, {', '.join(now['sizes'])} px now")
    if not differ and saved["fingerprint"] != now["fingerprint"]:
        differ.append("other training images or labels")
    if differ:
        raise ConfigError(
            f"data.root: {root}: not the {now['name']} data {source} was trained on ({'; '.join(differ)}); "
            "expected the same images (data.root may move them, not change them)"
        )


def collate_images(
    batch: tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader `collate_fn` for ImageData: passes `__getitems__` batches through, stacks single items.

    Args:
        batch: what the DataLoader fetched: either `(images (B, C, S, S), labels (B,))` from
            `__getitems__`, or a list of B `(image (C, S, S), label)` pairs.

    Returns:
        Images uint8 (B, C, S, S) and labels int64 (B,).
    """
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch
    images, labels = zip(*batch, strict=True)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


def load_split(cfg: DataConfig, split: Split, seed: int) -> ImageData:
    """Load one split of `cfg.name`, resized to `cfg.image_size` and cut to the configured subset.

    "train" and "val" both come from the dataset's training images: first cut to `data.train_subset`, then
    split by `validation_split` into disjoint parts that together are that (subset) training set. "test" is
    the dataset's own held-out split (cut to `data.test_subset`). For imagefolder, "train" and "val" come
    from `root/train/` and "test" from `root/val/` (or `root/test/`): ImageNet's `val/` is its held-out
    split, so it stays the test split.

    Args:
        cfg: the data part of the run config.
        split: "train", "val" or "test".
        seed: seeds the subset choice, the validation split (and the synthetic images).

    Returns:
        The split as an ImageData; images uint8 (C, S, S), S = cfg.image_size or the native size.

    Raises:
        DataError: the dataset is missing, corrupted, or could not be downloaded.
        ConfigError: a subset larger than the split, or a `data.val_size` that leaves no room to train.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    start = time.perf_counter()
    source: Source = "test" if split == "test" else "train"
    if cfg.name == "imagefolder":
        data: ImageData = _load_imagefolder(Path(cfg.root), source, cfg.image_size)
    else:
        data = _load_in_memory(cfg, source, seed)
    subset = cfg.train_subset if source == "train" else cfg.test_subset
    if subset is not None:
        key = f"data.{source}_subset"
        if subset > len(data):
            raise ConfigError(
                f"{key}: {subset} is more than the {len(data)} images of {cfg.name} {source}; "
                f"expected at most {len(data)}"
            )
        gen = torch.Generator().manual_seed(seed)
        data = data.subset(torch.randperm(len(data), generator=gen)[:subset])
    if source == "train":
        val, train = validation_split(data.labels, cfg, seed)
        data = data.subset(val if split == "val" else train)
    data.split = split
    if isinstance(data, TensorImageData):
        # Resize after subsetting (fewer images) and before replicating channels (fewer pixels).
        images = data.images
        size = cfg.image_size or images.shape[-1]
        if images.shape[-1] != size:
            require_memory([_images_need(cfg, split, images.shape[0], images.shape[1], size)], CPU)
            images = resize_images(images, size)
        if cfg.to_rgb and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        data = TensorImageData(data.name, split, images, data.labels, data.num_classes)
    log.info("%r loaded in %.2f s", data, time.perf_counter() - start)
    return data


def _load_in_memory(cfg: DataConfig, source: Source, seed: int) -> TensorImageData:
    """A whole split of an in-memory dataset, at its native size (synthetic: drawn at the asked size)."""
    if cfg.name == "synthetic":
        n = cfg.synthetic_train if source == "train" else cfg.synthetic_test
        size = cfg.image_size or NATIVE_IMAGE_SIZE["synthetic"] or 32  # the table types imagefolder's None
        require_memory([_images_need(cfg, source, n, 3, size)], CPU)
        images, labels = synthetic_images(n, cfg.synthetic_classes, size, seed, source)
        return TensorImageData("synthetic", source, images, labels, cfg.synthetic_classes)
    images, labels, num_classes = _LOADERS[cfg.name](cfg, source)
    return TensorImageData(cfg.name, source, images, labels, num_classes)


def _images_need(cfg: DataConfig, split: str, n: int, channels: int, size: int) -> Need:
    """The memory of `n` images held at `size` px, as an in-memory dataset holds them (uint8)."""
    return Need(
        f"the {n:,} {split} images of {cfg.name} at {size}x{size} px ({channels} channel"
        f"{'s' if channels > 1 else ''}, uint8)",
        n * channels * size * size,
        "data.image_size",
        f"a smaller data.image_size (got {size}), or fewer images (data.train_subset, data.test_subset)",
    )


def validation_size(cfg: DataConfig, num_train: int) -> int:
    """How many of `num_train` training images `data.val_size` sets aside for validation.

    An int is that many images; a fraction f gives round(f * num_train).

    Raises:
        ConfigError: fewer than 1 image, all the training images, or so many that fewer than one global
            batch (`data.batch_size`) of training images is left.
    """
    v = cfg.val_size
    count = round(v * num_train) if isinstance(v, float) else v
    if count < 1:
        raise ConfigError(
            f"data.val_size: {v} of {num_train} training images is {count} images; "
            "expected at least 1 validation image"
        )
    if count >= num_train:
        raise ConfigError(
            f"data.val_size: {count} validation images out of {num_train} training images; "
            f"expected fewer than {num_train} (an int) or a fraction in (0, 1)"
        )
    # When the whole training set is smaller than a batch, the batch size is the problem (train.py says so).
    if num_train - count < cfg.batch_size <= num_train:
        room = num_train - cfg.batch_size
        expected = (
            f"at most {room} validation images"
            if room >= 1
            else "a smaller data.batch_size to leave room for them"
        )
        raise ConfigError(
            f"data.val_size: {count} validation images leave {num_train - count} of the {num_train} training "
            f"images, less than one batch (data.batch_size={cfg.batch_size}); expected {expected}"
        )
    return count


def stratified_counts(class_sizes: torch.Tensor, total: int) -> torch.Tensor:
    """How many of `total` images each class gives to a stratified sample.

    Class c, with n_c of the N images, gets its share q_c = total * n_c / N rounded by largest remainder:
    floor(q_c) each, then one more for the `total - sum floor(q_c)` classes with the largest fractional
    parts (ties to the lower class index), so the counts sum to `total`. Then each class with at least 2
    images but none drawn takes one from the class with the most drawn, while that one keeps at least 1:
    every class is represented when `total` allows.

    Args:
        class_sizes: int64 (C,), n_c for each class (zeros allowed), total N >= 1.
        total: how many to draw, 0 <= total <= N.

    Returns:
        int64 (C,) counts, 0 <= count_c <= n_c, summing to `total`.
    """
    quota = class_sizes.double() * total / int(class_sizes.sum())
    counts = quota.floor().long()
    by_remainder = torch.sort(quota - counts, descending=True, stable=True).indices
    counts[by_remainder[: total - int(counts.sum())]] += 1
    for c in ((counts == 0) & (class_sizes >= 2)).nonzero().flatten().tolist():
        donor = int(counts.argmax())
        if counts[donor] < 2:
            break
        counts[donor] -= 1
        counts[c] += 1
    return counts


def validation_split(labels: torch.Tensor, cfg: DataConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded, class-stratified validation split of a training set.

    `validation_size` images are set aside, `stratified_counts` of them from each class; which images of a
    class is drawn by a permutation seeded from `seed` (a stream of its own, not the subset's). The same
    labels, config and seed always give the same split.

    Args:
        labels: int64 (N,) labels of the training images, in index order.

    Returns:
        (validation indices, training indices): int64, ascending, disjoint, together 0 .. N-1.
    """
    n = len(labels)
    sizes = torch.bincount(labels)
    counts = stratified_counts(sizes, validation_size(cfg, n))
    gen = torch.Generator().manual_seed(_derived_seed(seed, _VALIDATION))
    perm = torch.randperm(n, generator=gen)
    # Grouped by class (stable sort keeps the random order within a class): the first counts[c] of class
    # c's run go to validation.
    grouped = perm[torch.sort(labels[perm], stable=True).indices]
    grouped_labels = labels[grouped]
    rank_in_class = torch.arange(n) - (torch.cumsum(sizes, 0) - sizes)[grouped_labels]
    is_val = rank_in_class < counts[grouped_labels]
    return grouped[is_val].sort().values, grouped[~is_val].sort().values


def _derived_seed(seed: int, stream: int) -> int:
    """An independent seed for one use (`stream`) of the run's seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 images (N, C, H, W) to (N, C, size, size): bilinear, antialiased, rounded to uint8."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --- idx files (MNIST / Fashion-MNIST) --------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzip-compressed when the name ends in .gz).

    Returns:
        uint8 array (N, rows, cols) for an image file (magic 2051) or (N,) for a label file (magic 2049).

    Raises:
        DataError: unreadable, not gzip, wrong magic number, or a size that disagrees with the header.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: unreadable ({err}); reinstall the dataset or delete the file") from None
    if len(raw) < 8:
        raise DataError(
            f"{path}: truncated idx file ({len(raw)} bytes); reinstall the dataset or delete the file"
        )
    magic, n = np.frombuffer(raw, dtype=">i4", count=2)
    if magic == _IDX_IMAGES_MAGIC:
        if len(raw) < 16:
            raise DataError(f"{path}: truncated idx header; reinstall the dataset or delete the file")
        dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=4)[1:])
        offset = 16
    elif magic == _IDX_LABELS_MAGIC:
        dims, offset = (int(n),), 8
    else:
        raise DataError(
            f"{path}: not an idx file of unsigned bytes (magic {int(magic)}, expected "
            f"{_IDX_IMAGES_MAGIC} or {_IDX_LABELS_MAGIC}); reinstall the dataset or delete the file"
        )
    expected = offset + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw)} bytes, but its header {dims} implies {expected}; "
            "reinstall the dataset or delete the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _load_fashion_mnist(cfg: DataConfig, split: Source) -> tuple[torch.Tensor, torch.Tensor, int]:
    root = Path(cfg.root)
    # data.root first: files the user points at are used (and checked), never silently replaced by the
    # system's copy, which serves when data.root holds none.
    dirs = [root, root / "FashionMNIST" / "raw", FASHION_MNIST_SYSTEM_DIR]
    img_stem, lbl_stem = _FASHION_MNIST_FILES[split]
    for d in dirs:
        img_path, lbl_path = _find_idx(d, img_stem), _find_idx(d, lbl_stem)
        if img_path is not None and lbl_path is not None:
            images, labels = read_idx(img_path), read_idx(lbl_path)
            _check_fashion_mnist(images, labels, split, img_path, lbl_path)
            log.debug("fashion_mnist %s from %s", split, d)
            return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), 10
    if not cfg.download:
        raise DataError(
            f"fashion_mnist: {split} files not found in {root}, {root / 'FashionMNIST' / 'raw'} or "
            f"{FASHION_MNIST_SYSTEM_DIR}; install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or set data.download=true"
        )
    import torchvision

    ds = _torchvision_dataset(torchvision.datasets.FashionMNIST, "fashion_mnist", cfg, train=split == "train")
    return ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64), 10


def _check_fashion_mnist(
    images: np.ndarray, labels: np.ndarray, split: Source, img_path: Path, lbl_path: Path
) -> None:
    n = _FASHION_MNIST_COUNT[split]
    if images.shape != (n, 28, 28):
        raise DataError(
            f"{img_path}: expected {n} images of 28x28 (idx3), got shape {images.shape}; "
            "reinstall the dataset or delete the file"
        )
    if labels.shape != (n,) or labels.max() > 9:
        raise DataError(
            f"{lbl_path}: expected {n} labels in 0..9 (idx1), got shape {labels.shape}; "
            "reinstall the dataset or delete the file"
        )


# --- torchvision datasets -----------------------------------------------------------------------------


def _torchvision_dataset(cls: type, name: str, cfg: DataConfig, **kwargs: object) -> Any:
    """Instantiate a torchvision dataset, turning its missing-file and download errors into DataError.

    Typed Any: each torchvision class keeps its arrays in attributes of its own (`data`, `targets`,
    `labels`) that its base `Dataset` type does not declare."""
    try:
        return cls(cfg.root, download=cfg.download, **kwargs)
    except _DATASET_ERRORS as err:
        if cfg.download:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(
                f"{name}: download into {cfg.root} failed ({reason}); check the internet connection, "
                "or put the files in data.root yourself and set data.download=false"
            ) from None
        raise DataError(
            f"{name}: not found (or corrupted) in {cfg.root}; set data.download=true to fetch it "
            "(needs internet), or set data.root to the directory that holds it"
        ) from None


def _load_cifar(cfg: DataConfig, split: Source) -> tuple[torch.Tensor, torch.Tensor, int]:
    import torchvision

    cls, classes = (
        (torchvision.datasets.CIFAR10, 10) if cfg.name == "cifar10" else (torchvision.datasets.CIFAR100, 100)
    )
    ds = _torchvision_dataset(cls, cfg.name, cfg, train=split == "train")
    # torchvision keeps CIFAR as numpy (N, 32, 32, 3).
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64), classes


def _load_stl10(cfg: DataConfig, split: Source) -> tuple[torch.Tensor, torch.Tensor, int]:
    import torchvision

    ds = _torchvision_dataset(torchvision.datasets.STL10, "stl10", cfg, split=split)
    return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)), 10


_LOADERS = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "stl10": _load_stl10,
}


# --- imagefolder ------------------------------------------------------------------------------------


def _list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def imagefolder_size(files: Sequence[Path], where: str | Path) -> int:
    """The side S of the images in `files` when they are all S x S (read from the file headers only).

    Raises:
        ConfigError: naming data.image_size and the sizes found, when the images are not all one square
            size (the scan stops at the third size found).
        DataError: a file whose header cannot be read.
    """
    found: dict[tuple[int, int], tuple[int, Path]] = {}  # (width, height) -> (files, first file)
    for path in files:
        try:
            with Image.open(path) as img:
                wh = img.size
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"imagefolder: cannot read {path}: {str(err).splitlines()[0]}") from None
        count, first = found.get(wh, (0, path))
        found[wh] = (count + 1, first)
        if len(found) == 3:
            break
    if not found:
        raise DataError(f"imagefolder: no images under {where}")
    (w, h), _ = next(iter(found.items()))
    if len(found) == 1 and w == h:
        return w
    sizes = ", ".join(f"{w}x{h} ({first})" for (w, h), (_, first) in found.items())
    more = " and more" if len(found) == 3 else ""
    raise ConfigError(
        f"data.image_size: not set, and the images under {where} do not share one square size (found "
        f"{sizes}{more}); set data.image_size=S to resize each image's shorter side to S and centre-crop it"
    )


def resolve_image_size(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `data.image_size` set to the images' own side when it was left to the files (imagefolder
    without data.image_size: every image of train/ and val/ (or test/) must be the same square size);
    `cfg` itself when the size is known. The returned config is validated again, so a patch that does not
    fit the images is an error here."""
    if cfg.image_size_known:
        return cfg
    root = Path(cfg.data.root)
    files = [f for source in ("train", "test") for f in _imagefolder_files(root, source)[0]]
    size = imagefolder_size(files, root)
    log.info("imagefolder: every image under %s is %dx%d: data.image_size=%d", root, size, size, size)
    try:
        return validate_config({"data": {"image_size": size}}, defaults=cfg.model_dump())
    except ConfigError as err:  # about a data.image_size the user never set: say where the size came from
        raise ConfigError(
            f"imagefolder: the images under {root} are {size}x{size} px, kept at their own size as "
            f"data.image_size is not set, and at that size: {err}"
        ) from None


def _load_imagefolder(root: Path, split: Source, image_size: int | None) -> ImageFolderData:
    """The split's images at `image_size`, or (None) at the files' own size (`imagefolder_size`)."""
    files, labels, classes, split_dir = _imagefolder_files(root, split)
    if image_size is None:
        image_size = imagefolder_size(files, split_dir)
    return ImageFolderData(split, files, labels, classes, image_size)


def _imagefolder_files(root: Path, split: Source) -> tuple[list[Path], torch.Tensor, list[str], Path]:
    """The split's image files, their labels, the class names (from train/) and the split's directory."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"imagefolder: {train_dir} not found; set data.root to a directory holding "
            "train/<class>/*.JPEG and val/<class>/*.JPEG (the ImageNet-100 layout)"
        )
    # Class indices always come from train/, so that val labels mean the same classes.
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"imagefolder: no class directories in {train_dir}; expected train/<class>/<image>")
    if split == "train":
        split_dir = train_dir
    else:
        split_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), root / "val")
        if not split_dir.is_dir():
            raise DataError(
                f"imagefolder: {split_dir} not found; expected val/<class>/<image> next to train/"
            )
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_dir.name not in index:
            raise DataError(
                f"imagefolder: class {class_dir.name!r} in {split_dir} has no directory in {train_dir}; "
                "the splits must share class names"
            )
        found = _list_images(class_dir)
        files += found
        labels += [index[class_dir.name]] * len(found)
    if not files:
        raise DataError(
            f"imagefolder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {split_dir}/<class>/"
        )
    return files, torch.tensor(labels, dtype=torch.int64), classes, split_dir


# --- synthetic ----------------------------------------------------------------------------------------


def synthetic_images(
    n: int, num_classes: int, size: int, seed: int, split: Source
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, class-dependent RGB textures, for tests: each class is a stripe grating of its own orientation.

    Class c has stripes at angle pi * c / num_classes and one of two spatial frequencies (alternating with c);
    each image draws its own phase, colour and pixel noise, so the class shows in every patch
    (the texture) but not in the mean colour.

    Args:
        n: number of images.
        num_classes: number of classes; labels are balanced (n // num_classes each, the rest spread).
        size: image side S.
        seed: with `split`, fixes every pixel.
        split: "train" or "test"; the two splits are independent draws.

    Returns:
        Images uint8 (n, 3, S, S) and labels int64 (n,).
    """
    gen = torch.Generator().manual_seed(
        _derived_seed(seed, _SYNTHETIC_TRAIN if split == "train" else _SYNTHETIC_TEST)
    )
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    angle = torch.pi * labels.float() / num_classes
    cycles = torch.where(labels % 2 == 0, 3.0, 5.0) * size / 32  # stripes per 32 px
    phase = 2 * torch.pi * torch.rand(n, generator=gen)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy  # (n, S, S)
    wave = 0.5 + 0.5 * torch.sin(2 * torch.pi * cycles[:, None, None] * proj + phase[:, None, None])
    # A random light colour per image, modulated by the stripes: contrast never vanishes.
    colour = 0.4 + 0.6 * torch.rand(n, 3, 1, 1, generator=gen)
    img = colour * (0.25 + 0.75 * wave[:, None])  # (n, 3, S, S)
    img = img + 0.08 * torch.randn(img.shape, generator=gen)
    return (img * 255).round_().clamp_(0, 255).to(torch.uint8), labels
