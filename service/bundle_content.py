"""What the files of a bundle must hold: the pool, the splits and the ONNX model, parsed and checked from the
bytes :func:`service.store.load_bundle` read and hashed (every refusal: ``BundleError`` with what, expected, got).

Splits rule: test ∩ (train ∪ pool ∪ calibration) = ∅ and calibration ∩ (train ∪ pool) = ∅.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.backends.signature import check_pool_images, check_signature, read_signature
from service.errors import BundleError
from service.manifest import SPLIT_NAMES, Manifest

#: uint8 (P, C, H, W)
PoolImages = NDArray[np.uint8]
#: int64 (P,), sorted ascending
PoolLabels = NDArray[np.int64]


def _npz(fpath: Path, data: bytes, keys: tuple[str, ...]) -> dict[str, NDArray[Any]]:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # np.save's .npy: a bare array, not an archive
            raise BundleError(
                f"{fpath}: expected a numpy .npz archive of arrays {list(keys)} (np.savez), got a single .npy array"
            )
        with loaded as arrays:
            found = set(arrays.files)
            missing = [k for k in keys if k not in found]
            if missing:
                raise BundleError(f"{fpath}: expected arrays {list(keys)}, missing {missing} (got {sorted(found)})")
            return {k: arrays[k] for k in keys}
    except BundleError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # BadZipFile is no OSError
        raise BundleError(
            f"{fpath}: expected a numpy .npz without pickled objects, got unreadable data ({exc})"
        ) from exc


def load_pool(fpath: Path, data: bytes, manifest: Manifest) -> tuple[PoolImages, PoolLabels]:
    """The pool from ``pool.npz``'s bytes: uint8 images of the manifest's shape, sorted int64 labels, every class
    present; both read-only."""
    arrays = _npz(fpath, data, ("images", "labels"))
    images, labels = arrays["images"], arrays["labels"]
    try:
        check_pool_images(images)
    except ValueError as exc:
        raise BundleError(f"{fpath}: {exc}") from exc
    if tuple(images.shape[1:]) != tuple(manifest.input.shape):
        raise BundleError(
            f"{fpath}: pool image shape must equal the manifest input shape, expected {tuple(manifest.input.shape)}, "
            f"got {tuple(images.shape[1:])}"
        )
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise BundleError(
            f"{fpath}: labels must be int64 ({images.shape[0]},) like images, got {labels.dtype} {labels.shape}"
        )
    k = manifest.n_classes
    if labels.size == 0:
        raise BundleError(f"{fpath}: pool must hold >= 1 image per class ({k} classes), got 0 images")
    if labels.min() < 0 or labels.max() >= k:
        raise BundleError(f"{fpath}: labels must lie in [0, {k - 1}], got [{int(labels.min())}, {int(labels.max())}]")
    if np.any(np.diff(labels) < 0):
        raise BundleError(f"{fpath}: labels must be sorted ascending, got an unsorted array")
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise BundleError(
            f"{fpath}: pool class {int(empty[0])} ({manifest.class_names[int(empty[0])]!r}) has 0 images, "
            f"every class needs >= 1 (empty classes: {empty.tolist()})"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_splits(fpath: Path, data: bytes, manifest: Manifest, n_pool: int) -> dict[str, NDArray[np.int64]]:
    """The splits from ``splits.npz``'s bytes: sizes as in the manifest, in range, no repeats, pool = every pool
    image, and the disjointness rule."""
    arrays = _npz(fpath, data, SPLIT_NAMES)
    n_images = manifest.dataset.n_images
    splits: dict[str, NDArray[np.int64]] = {}
    for name in SPLIT_NAMES:
        arr = arrays[name]
        if arr.dtype != np.int64 or arr.ndim != 1:
            raise BundleError(f"{fpath}: split {name!r} must be a 1-D int64 array, got {arr.dtype} {arr.shape}")
        expected = getattr(manifest.splits, name)
        if arr.size != expected:
            raise BundleError(
                f"{fpath}: split {name!r} size must match the manifest, expected {expected}, got {arr.size}"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= n_images):
            raise BundleError(
                f"{fpath}: split {name!r} must index [0, {n_images - 1}], got [{int(arr.min())}, {int(arr.max())}]"
            )
        if np.unique(arr).size != arr.size:
            raise BundleError(
                f"{fpath}: split {name!r} must not repeat an index, got {arr.size - np.unique(arr).size} repeats"
            )
        arr.setflags(write=False)
        splits[name] = arr
    if splits["pool"].size != n_pool:
        raise BundleError(
            f"{fpath}: split 'pool' must index every pool image, expected {n_pool} indices, got {splits['pool'].size}"
        )
    forbidden = (
        ("test", "train"),
        ("test", "pool"),
        ("test", "calibration"),
        ("calibration", "train"),
        ("calibration", "pool"),
    )
    for a, b in forbidden:
        shared = np.intersect1d(splits[a], splits[b])
        if shared.size:
            raise BundleError(
                f"{fpath}: splits {a!r} and {b!r} must be disjoint, got {shared.size} shared indices "
                f"(first {shared[:5].tolist()})"
            )
    return splits


def check_model(fpath: Path, data: bytes, manifest: Manifest, pool_shape: tuple[int, ...]) -> None:
    """Parse the ONNX bytes and check their input/output signature against the manifest and the pool."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BundleError(f"{fpath}: expected a valid self-contained ONNX model, got a corrupt file ({exc})") from exc
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise BundleError(f"{fpath}: expected a self-contained model, got external data for {init.name!r}")
    try:
        check_signature(
            read_signature(model),
            input_name=manifest.input.name,
            output_name=manifest.input.output_name,
            pool_shape=tuple(pool_shape),
            expected_shape=tuple(manifest.input.shape),
            expected_classes=manifest.n_classes,
        )
    except ValueError as exc:
        raise BundleError(f"{fpath}: {exc}") from exc
