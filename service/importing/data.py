"""The user's labelled images for an import: the dataset in the model's class order, plus an optional held-out
test folder, split with the same seeded rules as ``mixinfer bundle``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from service.importing.options import ImportRefusedError
from service.training.bundle import dataset_splits
from service.training.datasets import Dataset, DatasetError, imagefolder_files, load_dataset, load_imagefolder
from service.training.splits import SplitError, Splits

LOGGER = logging.getLogger(__name__)


def read_class_names(path: Path) -> tuple[str, ...]:
    """One class name per line (blank lines ignored, a UTF-8 byte-order mark dropped), in the model's output order."""
    try:
        names = tuple(line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip())
    except OSError as exc:
        raise ImportRefusedError(
            f"--class-names {path}: expected a readable text file, got {exc.strerror or exc}"
        ) from None
    if len(set(names)) != len(names):
        raise ImportRefusedError(f"--class-names {path}: expected unique names, got duplicates in {list(names)}")
    return names


def _reorder(ds: Dataset, order: tuple[str, ...], where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels of ``ds`` re-indexed so that class k is ``order[k]``."""
    if set(order) != set(ds.class_names):
        missing = sorted(set(order) - set(ds.class_names))
        extra = sorted(set(ds.class_names) - set(order))
        raise ImportRefusedError(
            f"{where}: expected the classes {list(order)}, got {list(ds.class_names)} "
            f"(missing {missing}, extra {extra})"
        )
    remap = np.asarray([order.index(n) for n in ds.class_names], dtype=np.int64)
    return remap[ds.labels], order


def _refuse_seen_test_images(data: np.ndarray, test: np.ndarray, test_dir: Path | None) -> None:
    """--test-dir is the user's word that the model never saw those images: pixel-identical copies of --data-dir
    images (whose pool the server mixes with) contradict it."""
    seen = {hashlib.sha256(img.tobytes()).digest() for img in data}
    dups = [i for i, img in enumerate(test) if hashlib.sha256(img.tobytes()).digest() in seen]
    if dups:
        _, files = imagefolder_files(test_dir)
        raise ImportRefusedError(
            f"--test-dir {test_dir}: expected images the model never trained on, got {len(dups)} of {len(test)} "
            f"pixel-identical to --data-dir images (e.g. {files[dups[0]][1]})"
        )


def import_dataset(
    name: str,
    data_dir: Path | None,
    class_names: tuple[str, ...] | None,
    test_dir: Path | None,
    channels: int | None = None,
) -> Dataset:
    """The images of an import in canonical order: the dataset's, then the ``test_dir`` folder's (the fixed test
    split); labels follow ``class_names`` (the model's output order) when given, else the dataset's order. Image
    folders are read in the model's ``channels`` as the server reads them (RGB-saved greyscale pictures for a
    1-channel model).

    Raises:
        ImportRefusedError: unreadable data, class folders that differ between the two directories or from the names.
    """
    try:
        ds = load_imagefolder(data_dir, channels=channels) if name == "imagefolder" else load_dataset(name, data_dir)
        test = load_imagefolder(test_dir, channels=channels) if test_dir is not None else None
    except DatasetError as exc:
        raise ImportRefusedError(f"data: {exc}") from None
    order = class_names or ds.class_names
    labels, order = _reorder(ds, order, f"--data-dir {data_dir}")
    images, fixed_test = ds.images, ds.fixed_test
    test_size, calibration_size = ds.test_size, ds.calibration_size
    if test is not None:
        t_labels, _ = _reorder(test, order, f"--test-dir {test_dir}")
        if test.images.shape[1:] != ds.images.shape[1:]:
            raise ImportRefusedError(
                f"--test-dir {test_dir}: expected images shaped {ds.images.shape[1:]} like --data-dir, "
                f"got {test.images.shape[1:]}"
            )
        _refuse_seen_test_images(ds.images, test.images, test_dir)
        n = ds.images.shape[0]
        images = np.concatenate([ds.images, test.images])
        labels = np.concatenate([labels, t_labels])
        fixed_test = np.arange(n, n + test.images.shape[0], dtype=np.int64)
        calibration_size = max(len(order), round(0.1 * n))
    return Dataset(
        name=ds.name,
        images=np.ascontiguousarray(images),
        labels=labels.astype(np.int64),
        class_names=order,
        test_size=test_size,
        calibration_size=calibration_size,
        pool_per_class=ds.pool_per_class,
        fixed_test=fixed_test,
    )


def import_splits(ds: Dataset, seed: int) -> Splits:
    """Seeded pool / calibration / test splits (pool and test disjoint by construction, checked again here).

    Raises:
        ImportRefusedError: a class with too few images for one pool, one calibration and one test image.
    """
    outside = np.ones(ds.labels.size, dtype=bool)
    if ds.fixed_test is not None:
        outside[ds.fixed_test] = False
    need = 2 if ds.fixed_test is not None else 3
    counts = np.bincount(ds.labels[outside], minlength=ds.n_classes)
    for k in np.flatnonzero(counts < need):
        raise ImportRefusedError(
            f"class {ds.class_names[k]!r}: expected >= {need} images (pool, calibration"
            f"{'' if need == 2 else ' and test'} need one each), got {int(counts[k])}"
        )
    try:
        splits = dataset_splits(ds, seed)
        splits.check(ds.labels.size)
    except SplitError as exc:
        raise ImportRefusedError(f"splits: {exc}") from None
    if np.intersect1d(splits.pool, splits.test).size:  # make_splits guarantees it; this is the stated check
        raise ImportRefusedError("splits: expected pool and test disjoint, got shared images")
    pool_hashes = {hashlib.sha256(ds.images[i].tobytes()).digest() for i in splits.pool}
    dup = sum(hashlib.sha256(ds.images[i].tobytes()).digest() in pool_hashes for i in splits.test)
    if dup:
        LOGGER.warning("%d test images are pixel-identical to pool images (duplicate files in the data?)", dup)
    LOGGER.info("splits (seed %d): %s", seed, splits.sizes())
    return splits
