"""Read-once loading: every bundle file is opened once, hashed, and those same bytes are what is served; the
symlink rule of the store (nothing below the store root is followed)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from tinybundle import make_tiny_bundle, tiny_onnx_model, tiny_weights

from service.errors import BundleError
from service.manifest import MODEL_FILE, POOL_FILE, SPLITS_FILE
from service.store import load_bundle, open_backend, resolve_bundle

_WATCHED: list[Path] = []
_OPENED: Counter[str] = Counter()


def _record_opens(event: str, args: tuple) -> None:
    """An audit hook (they cannot be removed): counts opens of files below the watched directories."""
    if event != "open" or not _WATCHED or not isinstance(args[0], (str, bytes, Path)):
        return
    path = Path(args[0].decode() if isinstance(args[0], bytes) else args[0])
    for root in _WATCHED:
        if path.is_relative_to(root):
            _OPENED[path.name] += 1


sys.addaudithook(_record_opens)


@pytest.fixture
def opened(tiny_bundle: Path):
    """Counts, per file name, how often files of ``tiny_bundle`` are opened while the test runs."""
    _OPENED.clear()
    _WATCHED.append(tiny_bundle)
    yield _OPENED
    _WATCHED.remove(tiny_bundle)


def test_loading_a_bundle_and_serving_it_opens_every_file_once(tiny_bundle: Path, opened: Counter) -> None:
    bundle = load_bundle(tiny_bundle, require_weights=True)
    backend = open_backend(bundle, mixing="fused")
    backend.probs(np.zeros((2, 1, 8, 8), np.float32))
    assert {name: opened[name] for name in bundle.manifest.files} == dict.fromkeys(bundle.manifest.files, 1)


def test_a_model_replaced_after_loading_is_not_served(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    before = open_backend(bundle).probs(np.full((1, 1, 8, 8), 0.3, np.float32))
    other = tiny_onnx_model(tiny_weights(4, (1, 8, 8), seed=9), (1, 8, 8), 4)
    onnx.save_model(other, str(tiny_bundle / MODEL_FILE))  # swapped on disk after the hash check
    after = open_backend(bundle).probs(np.full((1, 1, 8, 8), 0.3, np.float32))
    np.testing.assert_array_equal(after, before)


def test_the_served_pool_and_splits_are_the_hashed_bytes(tiny_bundle: Path, opened: Counter) -> None:
    bundle = load_bundle(tiny_bundle)
    assert opened[POOL_FILE] == 1 and opened[SPLITS_FILE] == 1
    with np.load(tiny_bundle / POOL_FILE) as data:
        np.testing.assert_array_equal(bundle.pool_images, data["images"])


# --- symlinks: one rule for files and directories ----------------------------------------------------------------
def test_a_symlinked_bundle_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.npz"
    (tiny_bundle / POOL_FILE).rename(real)
    (tiny_bundle / POOL_FILE).symlink_to(real)
    with pytest.raises(BundleError, match=r"pool.npz must be a regular file, got a symbolic link"):
        load_bundle(tiny_bundle)


def test_a_symlinked_version_directory_is_refused_like_a_symlinked_file(tmp_path: Path) -> None:
    real = make_tiny_bundle(tmp_path / "outside", version="1")
    store = tmp_path / "store"
    (store / "tiny").mkdir(parents=True)
    (store / "tiny" / "1").symlink_to(real, target_is_directory=True)
    path = resolve_bundle(store, "tiny")
    with pytest.raises(BundleError, match=r"bundle directory .*tiny/1 must be a real directory, got a symbolic link"):
        load_bundle(path)


def test_a_symlinked_model_directory_is_refused(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "outside", version="1")
    store = tmp_path / "store"
    store.mkdir()
    (store / "tiny").symlink_to(tmp_path / "outside" / "tiny", target_is_directory=True)
    with pytest.raises(BundleError, match=r"model directory .*store/tiny must be a real directory, got a symbolic"):
        load_bundle(store / "tiny" / "1")


def test_a_symlinked_store_root_is_fine(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "volume", version="1")
    (tmp_path / "store").symlink_to(tmp_path / "volume", target_is_directory=True)
    assert load_bundle(resolve_bundle(tmp_path / "store", "tiny")).manifest.version == "1"


def test_a_named_pipe_in_a_bundle_is_refused_at_once_instead_of_blocking_the_load(tiny_bundle: Path) -> None:
    """A FIFO named like a listed file: opening it for reading used to wait for a writer forever (a hot swap then
    held the swap lock for good, ``mixinfer serve`` never started)."""
    import concurrent.futures
    import os

    fifo = tiny_bundle / POOL_FILE
    fifo.unlink()
    os.mkfifo(fifo)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        loading = pool.submit(load_bundle, tiny_bundle)
        try:
            with pytest.raises(BundleError, match=r"pool.npz must be a regular file, got a named pipe"):
                loading.result(timeout=10)
        finally:
            if not loading.done():  # unblock the reader so the test run does not hang with it
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
