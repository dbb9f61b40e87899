"""The model store: ``model_store/<name>/<version>/`` bundles, verified file by file before anything is served.

``load_bundle`` refuses a bundle (``BundleError``, message: what, expected, got) when a file is missing, extra or
does not match its sha256; when the manifest has an unknown schema version, a name or version that disagrees with
its directory, or out-of-range MI parameters; when the ONNX model is corrupt or its input disagrees with the
manifest and the pool; when a pool class is empty; and when the recorded splits break the disjointness rule
(test ∩ (train ∪ pool ∪ calibration) = ∅, calibration ∩ (train ∪ pool) = ∅).

Read once: every bundle file is read exactly once; its bytes are hashed, and those same bytes are parsed (pool,
splits), checked (the ONNX model) and handed on (``Bundle.model_bytes``, ``Bundle.weights``), so a file replaced
after the check is never served. Symlinks: nothing below the store root is followed; the model directory, the
version directory and every bundle file must be real (the store root itself may be a link, e.g. to a volume).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from service.bundle_content import PoolImages, PoolLabels, check_model, load_pool, load_splits
from service.errors import BundleError, BundleNotFoundError
from service.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    POOL_FILE,
    RETIRED_SCHEMAS,
    SCHEMA_VERSION,
    SPLITS_FILE,
    VERSION_PATTERN,
    WEIGHTS_FILE,
    Manifest,
)

if TYPE_CHECKING:
    from service.backends.onnx import OrtBackend

LOGGER = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(VERSION_PATTERN)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Bundle:
    """A verified bundle, ready to serve.

    Attributes:
        path: the bundle directory ``<store>/<name>/<version>``.
        manifest: the parsed, validated ``manifest.json``.
        model_bytes: the bytes of ``model.onnx`` that were hashed and checked (input against manifest and pool).
        pool_images: uint8 (P, C, H, W), the reference pool, sorted by label.
        pool_labels: int64 (P,), ascending; every class 0..K-1 has at least one image.
        splits: int64 index arrays ``train``, ``pool``, ``calibration``, ``test`` (disjointness checked).
        weights: the hashed bytes of ``weights.safetensors`` when present, else None.
    """

    path: Path
    manifest: Manifest
    model_bytes: bytes
    pool_images: PoolImages
    pool_labels: PoolLabels
    splits: dict[str, NDArray[np.int64]]
    weights: bytes | None

    @property
    def model_source(self) -> str:
        """Where the model came from, for messages (``<bundle>/model.onnx``)."""
        return str(self.path / MODEL_FILE)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- store layout --------------------------------------------------------------------------------------------
def list_versions(store_root: Path, name: str) -> list[str]:
    """Versions of model ``name`` under ``store_root`` that have a manifest, in numeric order (oldest first)."""
    if not _NAME_RE.fullmatch(name):
        raise BundleNotFoundError(f"model name {name!r} is not valid, expected {_NAME_RE.pattern}")
    model_dir = Path(store_root) / name
    if not model_dir.is_dir():
        return []
    versions = [
        d.name
        for d in model_dir.iterdir()
        if d.is_dir() and _VERSION_RE.fullmatch(d.name) and (d / MANIFEST_FILE).is_file()
    ]
    return sorted(versions, key=int)


def resolve_bundle(store_root: Path, name: str, version: str | None = None) -> Path:
    """Directory of ``name``/``version``; the highest version when ``version`` is None.

    Raises:
        BundleNotFoundError: invalid name or version, or no such bundle in the store.
    """
    versions = list_versions(store_root, name)
    if version is None:
        if not versions:
            raise BundleNotFoundError(
                f"model {name!r}: expected at least one <version>/{MANIFEST_FILE} under {Path(store_root) / name}, "
                "got none"
            )
        version = versions[-1]
    elif not _VERSION_RE.fullmatch(str(version)):
        raise BundleNotFoundError(f"model version {version!r} is not valid, expected a positive integer")
    elif str(version) not in versions:
        raise BundleNotFoundError(f"model {name!r} version {version!r} not found, available versions: {versions}")
    return Path(store_root) / name / str(version)


# --- loading -------------------------------------------------------------------------------------------------
def load_bundle(path: Path, require_weights: bool = False) -> Bundle:
    """Verify and load a bundle directory.

    Args:
        path: ``<store>/<name>/<version>``.
        require_weights: also require ``weights.safetensors`` (gradient-based evaluation); serving does not.

    Returns:
        The verified :class:`Bundle`.

    Raises:
        BundleNotFoundError: the directory or its manifest does not exist.
        BundleError: anything else is wrong; the message says what, expected, got.
    """
    path = Path(path)
    _check_real_directories(path)
    if not path.is_dir():
        raise BundleNotFoundError(f"bundle directory {path} does not exist")
    manifest = _read_manifest(path)
    _check_identity(path, manifest)
    blobs = _read_files(path, manifest, require_weights)
    pool_images, pool_labels = load_pool(path / POOL_FILE, blobs[POOL_FILE], manifest)
    splits = load_splits(path / SPLITS_FILE, blobs[SPLITS_FILE], manifest, n_pool=int(pool_labels.shape[0]))
    check_model(path / MODEL_FILE, blobs[MODEL_FILE], manifest, pool_images.shape[1:])
    LOGGER.info(
        "loaded bundle %s/%s: %d classes, pool %d images, input %s",
        manifest.name,
        manifest.version,
        manifest.n_classes,
        pool_labels.shape[0],
        manifest.input.shape,
    )
    return Bundle(
        path=path,
        manifest=manifest,
        model_bytes=blobs[MODEL_FILE],
        pool_images=pool_images,
        pool_labels=pool_labels,
        splits=splits,
        weights=blobs.get(WEIGHTS_FILE),
    )


def _check_real_directories(path: Path) -> None:
    """The symlink rule for directories: the version and the model directory are not links (files: _read_file)."""
    for what, directory in (("model directory", path.parent), ("bundle directory", path)):
        if directory.is_symlink():
            raise BundleError(f"{what} {directory} must be a real directory, got a symbolic link")


def _read_file(path: Path, fname: str) -> bytes:
    """The bytes of ``path/fname``, refusing a symbolic link (not followed) or anything but a regular file.

    Opened non-blocking, so a named pipe is refused at once instead of waiting for a writer (reads of a regular file
    are unaffected by the flag)."""
    fpath = path / fname
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(fpath, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"bundle {path}: {fname} must be a regular file, got a symbolic link") from exc
        raise BundleError(f"bundle {path}: cannot read {fname} ({exc})") from exc
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device"
            raise BundleError(f"bundle {path}: {fname} must be a regular file, got {kind}")
        return fh.read()


def _read_manifest(path: Path) -> Manifest:
    mpath = path / MANIFEST_FILE
    if not mpath.is_file() and not mpath.is_symlink():
        raise BundleNotFoundError(f"bundle {path}: expected {MANIFEST_FILE}, got no such file")
    text = _read_file(path, MANIFEST_FILE)
    try:
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath}: expected a JSON object, got unreadable content ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{mpath}: expected a JSON object, got {type(raw).__name__}")
    got_version = raw.get("schema_version")
    if isinstance(got_version, int) and got_version in RETIRED_SCHEMAS:
        raise BundleError(
            f"{mpath}: schema_version {got_version} is no longer read ({RETIRED_SCHEMAS[got_version]}), expected "
            f"{SCHEMA_VERSION}: re-export the bundle with this mixinfer, `mixinfer export --run-dir <its training "
            "run> --out <store>/<name>/<version>`, or rebuild it with `mixinfer bundle --name <name> --version "
            "<version> --force`"
        )
    if got_version != SCHEMA_VERSION:
        raise BundleError(
            f"{mpath}: unknown schema_version, expected {SCHEMA_VERSION}, got {got_version!r} "
            "(a newer mixinfer may be needed)"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{mpath}: invalid manifest: {_format_validation(exc)}") from exc


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}, got {err.get('input')!r}")
    return "; ".join(parts)


def _check_identity(path: Path, manifest: Manifest) -> None:
    if manifest.name != path.parent.name:
        raise BundleError(
            f"bundle {path}: manifest name must equal the directory name, expected {path.parent.name!r}, "
            f"got {manifest.name!r}"
        )
    if manifest.version != path.name:
        raise BundleError(
            f"bundle {path}: manifest version must equal the directory name, expected {path.name!r}, "
            f"got {manifest.version!r}"
        )


def _read_files(path: Path, manifest: Manifest, require_weights: bool) -> dict[str, bytes]:
    """Exactly the listed files, each read once and hashed. Returns their bytes by file name."""
    on_disk = {p.name for p in path.iterdir() if p.name != MANIFEST_FILE}
    listed = set(manifest.files)
    extra = sorted(on_disk - listed)
    if extra:
        raise BundleError(
            f"bundle {path}: extra file(s) {extra} not listed in manifest files, expected only {sorted(listed)}"
        )
    missing = sorted(listed - on_disk)
    weights_optional = not require_weights and missing == [WEIGHTS_FILE]
    if missing and not weights_optional:
        raise BundleError(f"bundle {path}: missing file(s) {missing}, expected all of {sorted(listed)}")
    if weights_optional:
        LOGGER.warning("bundle %s has no %s: serving is fine, gradient-based evaluation is not", path, WEIGHTS_FILE)
    blobs: dict[str, bytes] = {}
    for fname in sorted(listed & on_disk):
        data = _read_file(path, fname)
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.files[fname]:
            raise BundleError(
                f"bundle {path}: sha256 mismatch for {fname}, expected {manifest.files[fname]}, got {digest}"
            )
        blobs[fname] = data
    return blobs


def open_backend(bundle: Bundle, **options: Any) -> OrtBackend:
    """An :class:`~service.backends.onnx.OrtBackend` over a verified bundle: its hashed model bytes and pool, with
    the manifest's input and output names, input shape and class count; ``options`` as in ``OrtBackend``."""
    from service.backends.onnx import OrtBackend

    spec = bundle.manifest.input
    return OrtBackend(
        bundle.model_bytes,
        bundle.pool_images,
        input_name=spec.name,
        output_name=spec.output_name,
        expected_input_shape=spec.shape,
        expected_n_classes=bundle.manifest.n_classes,
        source=bundle.model_source,
        **options,
    )


# --- writing -------------------------------------------------------------------------------------------------
def finalize_bundle(bundle_dir: Path, manifest_fields: dict[str, Any]) -> Manifest:
    """Hash every file of a bundle, write ``manifest.json`` last, then verify the bundle with ``load_bundle``.

    ``name`` and ``version`` default to the directory names, ``created`` to now (UTC); ``files`` is always
    computed here. If verification fails, ``manifest.json`` is removed again so that no half-valid bundle is left
    that looks finished.

    Args:
        bundle_dir: ``<store>/<name>/<version>`` holding model.onnx, pool.npz, splits.npz, weights.safetensors.
        manifest_fields: every other manifest field (see :class:`service.manifest.Manifest`).

    Returns:
        The written manifest.

    Raises:
        BundleError: the fields do not validate or the finished bundle fails verification.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    fields = dict(manifest_fields)
    fields.setdefault("schema_version", SCHEMA_VERSION)
    fields.setdefault("name", bundle_dir.parent.name)
    fields.setdefault("version", bundle_dir.name)
    fields.setdefault("created", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    mpath = bundle_dir / MANIFEST_FILE
    if mpath.exists():
        mpath.unlink()
    fields["files"] = {
        p.name: sha256_file(p) for p in sorted(bundle_dir.iterdir()) if p.is_file() and p.name != MANIFEST_FILE
    }
    try:
        manifest = Manifest.model_validate(fields)
    except ValidationError as exc:
        raise BundleError(f"{mpath}: invalid manifest: {_format_validation(exc)}") from exc
    tmp = bundle_dir.parent / f".{bundle_dir.name}.{MANIFEST_FILE}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(mpath)
    try:
        load_bundle(bundle_dir, require_weights=True)
    except BundleError:
        mpath.unlink(missing_ok=True)
        raise
    LOGGER.info("finalized bundle %s (%d files)", bundle_dir, len(manifest.files))
    return manifest
