"""Datasets, splits and pool: canonical order, safe CIFAR reading, disjoint deterministic splits."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest

from service.training.datasets import CIFAR10_MD5, DatasetError, load_dataset
from service.training.pool import pool_arrays, pool_sha256, write_pool
from service.training.splits import SplitError, Splits, make_splits


def _md5(path):
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _fake_cifar10(root, per_batch=20, seed=0):
    """Tiny CIFAR-10-format python batches (pickle protocol 2, bytes keys, like the real files)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{k}".encode() for k in range(10)], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {p.name: _md5(p) for p in root.iterdir()}


def test_mnist5k_is_the_embedded_subset_in_canonical_order():
    ds = load_dataset("mnist5k")
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [500] * 10
    assert ds.class_names == tuple("0123456789")
    assert len(ds.sha256) == 64 and ds.sha256 == load_dataset("mnist5k").sha256


def test_mnist5k_default_splits_have_the_specified_sizes_and_are_disjoint():
    ds = load_dataset("mnist5k")
    s = make_splits(ds.labels, 10, seed=0, test_size=1000, calibration_size=500, pool_per_class=100)
    assert s.sizes() == {"train": 3500, "pool": 1000, "calibration": 500, "test": 1000}
    assert np.bincount(ds.labels[s.test]).tolist() == [100] * 10
    assert np.bincount(ds.labels[s.calibration]).tolist() == [50] * 10
    assert np.bincount(ds.labels[s.pool]).tolist() == [100] * 10
    assert np.isin(s.pool, s.train).all()
    everything = np.concatenate([s.train, s.calibration, s.test])
    assert np.unique(everything).size == 5000
    assert not np.intersect1d(s.test, np.concatenate([s.train, s.pool, s.calibration])).size
    assert not np.intersect1d(s.calibration, np.concatenate([s.train, s.pool])).size


def test_same_seed_gives_same_splits_and_pool_hash_other_seed_differs():
    ds = load_dataset("mnist5k")
    kw = dict(test_size=1000, calibration_size=500, pool_per_class=100)
    a, b, c = (make_splits(ds.labels, 10, seed=s, **kw) for s in (7, 7, 8))
    for name in ("train", "pool", "calibration", "test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert pool_sha256(*pool_arrays(ds, a)) == pool_sha256(*pool_arrays(ds, b))
    assert pool_sha256(*pool_arrays(ds, a)) != pool_sha256(*pool_arrays(ds, c))
    assert not np.array_equal(a.test, c.test)


def test_split_check_refuses_overlap():
    s = Splits(
        train=np.array([0, 1, 2], dtype=np.int64),
        pool=np.array([0], dtype=np.int64),
        calibration=np.array([3], dtype=np.int64),
        test=np.array([2, 4], dtype=np.int64),
    )
    with pytest.raises(SplitError, match="test and train share 1"):
        s.check(5)


def test_splits_round_trip_through_npz(tmp_path):
    ds = load_dataset("mnist5k")
    s = make_splits(ds.labels, 10, seed=1, test_size=100, calibration_size=50, pool_per_class=5)
    s.save(tmp_path / "splits.npz")
    back = Splits.load(tmp_path / "splits.npz")
    assert all(np.array_equal(getattr(s, n), getattr(back, n)) for n in ("train", "pool", "calibration", "test"))


def test_pool_file_is_label_sorted_and_matches_the_pool_split(tmp_path):
    ds = load_dataset("mnist5k")
    s = make_splits(ds.labels, 10, seed=3, test_size=1000, calibration_size=500, pool_per_class=100)
    write_pool(tmp_path / "pool.npz", ds, s)
    with np.load(tmp_path / "pool.npz", allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    assert images.dtype == np.uint8 and images.shape == (1000, 1, 28, 28) and labels.dtype == np.int64
    assert np.all(np.diff(labels) >= 0)
    assert np.array_equal(images, ds.images[s.pool]) and np.array_equal(labels, ds.labels[s.pool])


def test_cifar10_batches_load_in_canonical_order_with_the_official_test_split(tmp_path):
    md5 = _fake_cifar10(tmp_path / "c10")
    ds = load_dataset("cifar10", tmp_path / "c10", checksums=md5)
    assert ds.images.shape == (120, 3, 32, 32) and ds.class_names[0] == "class0"
    raw = pickle.loads((tmp_path / "c10" / "test_batch").read_bytes())
    assert np.array_equal(ds.images[100:], raw[b"data"].reshape(-1, 3, 32, 32))
    assert np.array_equal(ds.fixed_test, np.arange(100, 120))
    s = make_splits(
        ds.labels, 10, seed=0, test_size=0, calibration_size=10, pool_per_class=1000, fixed_test=ds.fixed_test
    )
    assert np.array_equal(s.test, np.arange(100, 120)) and s.calibration.size == 10


def test_cifar_reader_checks_the_published_md5_by_default(tmp_path):
    _fake_cifar10(tmp_path / "c10")
    with pytest.raises(DatasetError, match=r"md5 .* does not match the published"):
        load_dataset("cifar10", tmp_path / "c10")
    assert CIFAR10_MD5["test_batch"] == "40351d587109b95175f43aff81a1287e"


def test_cifar_reader_names_the_directory_and_missing_files(tmp_path):
    md5 = _fake_cifar10(tmp_path / "c10")
    (tmp_path / "c10" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"c10 lacks \['data_batch_3'\]"):
        load_dataset("cifar10", tmp_path / "c10", checksums=md5)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    md5 = _fake_cifar10(tmp_path / "c10")
    evil = tmp_path / "c10" / "data_batch_1"
    evil.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    md5["data_batch_1"] = _md5(evil)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_dataset("cifar10", tmp_path / "c10", checksums=md5)


def test_imagefolder_uses_sorted_class_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("zebra", "ant", "cat"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.class_names == ("ant", "cat", "zebra")
    assert ds.images.shape == (18, 3, 8, 10)
    assert np.bincount(ds.labels).tolist() == [6, 6, 6]
    first = np.asarray(Image.open(tmp_path / "ant" / "0.png")).transpose(2, 0, 1)
    assert np.array_equal(ds.images[0], first)
    s = make_splits(
        ds.labels, 3, seed=0, test_size=ds.test_size, calibration_size=ds.calibration_size, pool_per_class=2
    )
    s.check(18)


def test_imagefolder_refuses_mixed_sizes(tmp_path):
    from PIL import Image

    for cls, size in (("a", (8, 8)), ("b", (9, 8))):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros(size, dtype=np.uint8)).save(tmp_path / cls / "x.png")
    with pytest.raises(DatasetError, match="expected 8x8"):
        load_dataset("imagefolder", tmp_path)


def _server_pixels(path, channels, size):
    """What ``mixinfer serve`` makes of the file: uint8 (C, H, W)."""
    from service.preprocess import ImageSpec, decode_image

    x = decode_image(path.read_bytes(), ImageSpec(channels, size, size, strict_size=True))
    return np.rint(x * 255.0).astype(np.uint8)


def test_imagefolder_decodes_files_as_the_server_does(tmp_path):
    """16-bit PNGs (scaled, not clipped), EXIF-rotated JPEGs (upright) and transparent pixels (onto black): the
    images the pool, calibration and test are made of must be the pixels the server sees for the same file."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "a" / "x16.png")  # a 16-bit PNG
    upright = np.zeros((8, 8, 3), np.uint8)
    upright[:4] = 250  # top half bright
    rotated = Image.fromarray(upright[::-1, ::-1].copy())  # stored upside down, EXIF orientation 3 says so
    exif = Image.Exif()
    exif[0x0112] = 3
    rotated.save(tmp_path / "a" / "x_exif.jpg", quality=100, exif=exif)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :4, 3] = 255  # left half opaque white, right half transparent white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / "x_alpha.png")
    ds = load_dataset("imagefolder", tmp_path)
    files = sorted((tmp_path / "a").iterdir())
    got = {p.name: ds.images[i] for i, p in enumerate(files)}
    assert np.array_equal(got["x16.png"], np.repeat(grey[None], 3, axis=0))
    assert np.abs(got["x_exif.jpg"].astype(int) - upright.transpose(2, 0, 1)).max() < 16
    assert (got["x_alpha.png"][:, :, :4] == 255).all() and (got["x_alpha.png"][:, :, 4:] == 0).all()
    for i, p in enumerate(files):
        assert np.array_equal(ds.images[i], _server_pixels(p, 3, 8)), p.name


def test_imagefolder_skips_hidden_files_and_names_an_unreadable_image(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble companion
    (tmp_path / "a" / ".DS_Store").write_bytes(b"Bud1")
    (tmp_path / "b" / "README.txt").write_text("not an image")
    ds = load_dataset("imagefolder", tmp_path)
    assert np.bincount(ds.labels).tolist() == [3, 3]
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DatasetError, match=r"broken\.jpg.*expected a readable"):
        load_dataset("imagefolder", tmp_path)
