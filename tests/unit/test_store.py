"""The model store: every refusal of a broken bundle, with its message, and version resolution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from tinybundle import make_tiny_bundle, rehash, tiny_onnx_model, tiny_weights

from service.errors import BundleError, BundleNotFoundError
from service.manifest import MANIFEST_FILE, Manifest
from service.store import finalize_bundle, list_versions, load_bundle, resolve_bundle, sha256_file


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def _write_manifest(bundle: Path, data: dict) -> None:
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))


def _rewrite_splits(bundle: Path, **changes: np.ndarray) -> None:
    with np.load(bundle / "splits.npz") as data:
        splits = {k: data[k] for k in data.files}
    splits.update(changes)
    np.savez(bundle / "splits.npz", **splits)


# --- a good bundle --------------------------------------------------------------------------------------------
def test_a_finished_bundle_loads_with_everything_in_place(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle, require_weights=True)
    assert bundle.manifest.name == "tiny" and bundle.manifest.version == "1"
    assert bundle.pool_images.dtype == np.uint8 and bundle.pool_images.shape == (24, 1, 8, 8)
    assert bundle.pool_labels.tolist() == sorted(bundle.pool_labels.tolist())
    assert np.bincount(bundle.pool_labels).tolist() == [6, 6, 6, 6]
    assert set(bundle.splits) == {"train", "pool", "calibration", "test"}
    assert bundle.weights == (tiny_bundle / "weights.safetensors").read_bytes()
    assert bundle.model_bytes == (tiny_bundle / "model.onnx").read_bytes()
    for fname, digest in bundle.manifest.files.items():
        assert hashlib.sha256((tiny_bundle / fname).read_bytes()).hexdigest() == digest
    assert not bundle.pool_images.flags.writeable  # shared read-only by every engine


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # crosses the 1 MiB chunk boundary
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_weights_are_optional_to_serve_but_required_for_evaluation(tiny_bundle: Path) -> None:
    (tiny_bundle / "weights.safetensors").unlink()
    assert load_bundle(tiny_bundle).weights is None
    with pytest.raises(BundleError, match=r"missing file\(s\) \['weights.safetensors'\]"):
        load_bundle(tiny_bundle, require_weights=True)


def test_an_extra_file_listed_with_its_hash_is_accepted(tiny_bundle: Path) -> None:
    (tiny_bundle / "README.txt").write_text("notes")
    rehash(tiny_bundle)
    assert "README.txt" in load_bundle(tiny_bundle).manifest.files


# --- every refusal of issue 3 section 1 ---------------------------------------------------------------------------
def test_refuses_a_hash_mismatch(tiny_bundle: Path) -> None:
    expected = _manifest(tiny_bundle)["files"]["splits.npz"]
    _rewrite_splits(tiny_bundle, test=np.array([], dtype=np.int64))
    got = sha256_file(tiny_bundle / "splits.npz")
    with pytest.raises(BundleError, match=rf"sha256 mismatch for splits.npz, expected {expected}, got {got}"):
        load_bundle(tiny_bundle)


def test_refuses_a_missing_file(tiny_bundle: Path) -> None:
    (tiny_bundle / "pool.npz").unlink()
    with pytest.raises(BundleError, match=r"missing file\(s\) \['pool.npz'\], expected all of \["):
        load_bundle(tiny_bundle)


def test_refuses_an_unlisted_extra_file(tiny_bundle: Path) -> None:
    (tiny_bundle / "notes.txt").write_text("not hashed")
    with pytest.raises(BundleError, match=r"extra file\(s\) \['notes.txt'\] not listed in manifest files"):
        load_bundle(tiny_bundle)


def test_refuses_an_unknown_schema_version(tiny_bundle: Path) -> None:
    data = _manifest(tiny_bundle)
    data["schema_version"] = 3
    _write_manifest(tiny_bundle, data)
    with pytest.raises(BundleError, match=r"unknown schema_version, expected 2, got 3"):
        load_bundle(tiny_bundle)


def test_a_schema_version_1_manifest_is_refused_with_how_to_re_export(tiny_bundle: Path) -> None:
    data = _manifest(tiny_bundle)
    data["schema_version"] = 1
    data["input"]["range"] = [0.0, 1.0]  # what version 1 wrote
    _write_manifest(tiny_bundle, data)
    with pytest.raises(BundleError, match=r"schema_version 1 .*input\.range.* re-export .*mixinfer export --run-dir"):
        load_bundle(tiny_bundle)


def test_refuses_a_manifest_that_is_not_json(tiny_bundle: Path) -> None:
    (tiny_bundle / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json: expected a JSON object, got unreadable content"):
        load_bundle(tiny_bundle)


def test_refuses_a_name_that_differs_from_the_directory(tiny_bundle: Path) -> None:
    moved = tiny_bundle.parent.parent / "other" / "1"
    moved.parent.mkdir()
    tiny_bundle.rename(moved)
    with pytest.raises(BundleError, match=r"manifest name must equal the directory name, expected 'other', got 'tiny'"):
        load_bundle(moved)


def test_refuses_a_version_that_differs_from_the_directory(tiny_bundle: Path) -> None:
    moved = tiny_bundle.parent / "2"
    tiny_bundle.rename(moved)
    with pytest.raises(BundleError, match=r"manifest version must equal the directory name, expected '2', got '1'"):
        load_bundle(moved)


def test_refuses_a_model_whose_input_shape_disagrees_with_the_pool(tiny_bundle: Path) -> None:
    shape = (1, 9, 9)
    onnx.save_model(tiny_onnx_model(tiny_weights(4, shape, 0), shape, 4), str(tiny_bundle / "model.onnx"))
    rehash(tiny_bundle)
    with pytest.raises(BundleError, match=r"model input shape must agree .* expected \(1, 8, 8\) .* got \(1, 9, 9\)"):
        load_bundle(tiny_bundle)


def test_refuses_a_pool_whose_shape_disagrees_with_the_manifest(tiny_bundle: Path) -> None:
    rehash(tiny_bundle, input={"shape": [1, 8, 9]})
    with pytest.raises(
        BundleError, match=r"pool image shape must equal the manifest input shape, expected \(1, 8, 9\)"
    ):
        load_bundle(tiny_bundle)


def test_refuses_a_pool_class_with_no_images(tiny_bundle: Path) -> None:
    with np.load(tiny_bundle / "pool.npz") as data:
        images, labels = data["images"], data["labels"]
    keep = labels != 2
    np.savez(tiny_bundle / "pool.npz", images=images[keep], labels=labels[keep])
    rehash(tiny_bundle)
    with pytest.raises(BundleError, match=r"pool class 2 \('class2'\) has 0 images, every class needs >= 1"):
        load_bundle(tiny_bundle)


def test_refuses_unsorted_pool_labels(tiny_bundle: Path) -> None:
    with np.load(tiny_bundle / "pool.npz") as data:
        images, labels = data["images"], data["labels"]
    np.savez(tiny_bundle / "pool.npz", images=images, labels=labels[::-1].copy())
    rehash(tiny_bundle)
    with pytest.raises(BundleError, match=r"labels must be sorted ascending"):
        load_bundle(tiny_bundle)


def test_refuses_a_float_pool(tiny_bundle: Path) -> None:
    with np.load(tiny_bundle / "pool.npz") as data:
        images, labels = data["images"], data["labels"]
    np.savez(tiny_bundle / "pool.npz", images=images.astype(np.float32) / 255, labels=labels)
    rehash(tiny_bundle)
    with pytest.raises(BundleError, match=r"images must be uint8 \(P,C,H,W\), got float32"):
        load_bundle(tiny_bundle)


def test_a_pool_saved_as_a_single_npy_array_is_refused_as_a_bundle_error(tiny_bundle: Path) -> None:
    """``np.save`` instead of ``np.savez``: np.load hands back a bare array, not an archive (was a TypeError)."""
    with np.load(tiny_bundle / "pool.npz") as data:
        images = data["images"]
    with (tiny_bundle / "pool.npz").open("wb") as fh:
        np.save(fh, images)
    rehash(tiny_bundle)
    with pytest.raises(BundleError, match=r"pool.npz: expected a numpy .npz archive of arrays .* got a single .npy"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize(
    ("mi", "where"),
    [
        ({"lam_pl": 0.0}, "mi.lam_pl"),
        ({"lam_pl": 1.5}, "mi.lam_pl"),
        ({"n_pl": 0}, "mi.n_pl"),
        ({"threshold": -0.1}, "mi.threshold"),
        ({"threshold": 1.01}, "mi.threshold"),
        ({"ol_combined": {"lam": 0.0}}, "mi.ol_combined.lam"),
        ({"ol_standalone": {"n": 0}}, "mi.ol_standalone.n"),
    ],
)
def test_refuses_out_of_range_mi_parameters(tiny_bundle: Path, mi: dict, where: str) -> None:
    rehash(tiny_bundle, mi=mi)
    value = next(iter(mi.values()))
    got = next(iter(value.values())) if isinstance(value, dict) else value
    with pytest.raises(BundleError, match=rf"invalid manifest: {where}: Input should be .*, got {got}"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize(
    ("a", "b"),
    [("test", "train"), ("test", "pool"), ("test", "calibration"), ("calibration", "train"), ("calibration", "pool")],
)
def test_refuses_splits_that_break_disjointness(tiny_bundle: Path, a: str, b: str) -> None:
    with np.load(tiny_bundle / "splits.npz") as data:
        splits = {k: data[k] for k in data.files}
    leaked = int(splits[b][0])
    changed = np.sort(np.concatenate([splits[a][1:], [leaked]])).astype(np.int64)  # same size, one shared index
    changes = {a: changed}
    if b == "pool":  # the pool is inside train by default: take the leaked image out of train so only pool shares it
        changes["train"] = splits["train"][splits["train"] != leaked]
    _rewrite_splits(tiny_bundle, **changes)
    rehash(tiny_bundle, splits={"train": int(changes.get("train", splits["train"]).size)})
    with pytest.raises(
        BundleError, match=rf"splits '{a}' and '{b}' must be disjoint, got \d+ shared indices \(first \[{leaked}"
    ):
        load_bundle(tiny_bundle)


def test_pool_inside_train_is_allowed(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert np.isin(bundle.splits["pool"], bundle.splits["train"]).all()


def test_refuses_a_split_size_that_differs_from_the_manifest(tiny_bundle: Path) -> None:
    _rewrite_splits(tiny_bundle, test=np.array([0], dtype=np.int64)[:0])
    rehash(tiny_bundle)
    with pytest.raises(BundleError, match=r"split 'test' size must match the manifest, expected 10, got 0"):
        load_bundle(tiny_bundle)


def test_refuses_a_corrupted_onnx_model(tiny_bundle: Path) -> None:
    raw = (tiny_bundle / "model.onnx").read_bytes()
    (tiny_bundle / "model.onnx").write_bytes(raw[: len(raw) // 2])
    rehash(tiny_bundle)
    with pytest.raises(
        BundleError, match=r"model.onnx: expected a valid self-contained ONNX model, got a corrupt file"
    ):
        load_bundle(tiny_bundle)


def test_refuses_a_model_with_a_fixed_batch_axis(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save_model(model, str(tiny_bundle / "model.onnx"))
    rehash(tiny_bundle)
    with pytest.raises(BundleError, match=r"must have a dynamic batch axis, got fixed size 1"):
        load_bundle(tiny_bundle)


def test_refuses_a_model_with_the_wrong_number_of_classes(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path, n_classes=3)
    onnx.save_model(tiny_onnx_model(tiny_weights(5, (1, 8, 8), 0), (1, 8, 8), 5), str(bundle / "model.onnx"))
    rehash(bundle)
    with pytest.raises(BundleError, match=r"output 'logits' must be \(B, 3\) logits, got \[None, 5\]"):
        load_bundle(bundle)


def test_a_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(BundleNotFoundError, match="does not exist"):
        load_bundle(tmp_path / "nope" / "1")


# --- finalize, list, resolve ------------------------------------------------------------------------------------------
def test_finalize_writes_the_manifest_last_and_removes_it_when_the_bundle_is_invalid(tiny_bundle: Path) -> None:
    fields = _manifest(tiny_bundle)
    (tiny_bundle / MANIFEST_FILE).unlink()
    manifest = finalize_bundle(tiny_bundle, {k: v for k, v in fields.items() if k != "files"})
    assert isinstance(manifest, Manifest) and manifest.files == fields["files"]
    (tiny_bundle / "pool.npz").write_bytes(b"not an npz")
    with pytest.raises(BundleError, match=r"pool.npz: expected a numpy .npz"):
        finalize_bundle(tiny_bundle, {k: v for k, v in fields.items() if k != "files"})
    assert not (tiny_bundle / MANIFEST_FILE).exists()


def test_finalize_refuses_invalid_fields_with_their_location(tiny_bundle: Path) -> None:
    fields = {k: v for k, v in _manifest(tiny_bundle).items() if k != "files"}
    fields["class_names"] = ["a", "a", "b", "c"]
    with pytest.raises(BundleError, match=r"class_names: Value error, class_names must be unique"):
        finalize_bundle(tiny_bundle, fields)


def test_versions_are_listed_in_numeric_order_and_the_highest_is_resolved(tmp_path: Path) -> None:
    for version in ("2", "10", "1"):
        make_tiny_bundle(tmp_path, version=version)
    (tmp_path / "tiny" / "11").mkdir()  # no manifest: not a finished version
    (tmp_path / "tiny" / "draft").mkdir()
    assert list_versions(tmp_path, "tiny") == ["1", "2", "10"]
    assert resolve_bundle(tmp_path, "tiny") == tmp_path / "tiny" / "10"
    assert resolve_bundle(tmp_path, "tiny", "2") == tmp_path / "tiny" / "2"
    assert list_versions(tmp_path, "absent") == []


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("tiny", "3", r"model 'tiny' version '3' not found, available versions: \['1'\]"),
        ("tiny", "../1", r"model version '../1' is not valid"),
        ("../tiny", None, r"model name '../tiny' is not valid"),
        ("absent", None, r"model 'absent': expected at least one <version>/manifest.json"),
    ],
)
def test_resolve_refuses_unknown_or_unsafe_names(
    tiny_store: Path, name: str, version: str | None, message: str
) -> None:
    with pytest.raises(BundleNotFoundError, match=message):
        resolve_bundle(tiny_store, name, version)


@pytest.mark.parametrize(("n_classes", "shape"), [(2, (1, 4, 4)), (10, (3, 32, 32))])
def test_tiny_bundles_of_other_sizes_load(tmp_path: Path, n_classes: int, shape: tuple[int, int, int]) -> None:
    bundle = load_bundle(make_tiny_bundle(tmp_path, n_classes=n_classes, shape=shape, pool_per_class=2))
    assert bundle.manifest.n_classes == n_classes and bundle.pool_images.shape == (2 * n_classes, *shape)
