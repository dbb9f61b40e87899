"""A new version of a finished bundle: its files copied byte for byte into ``<store>/<name>/<version>``.

Used by ``mixinfer calibrate --new-version`` to ship changed MI parameters (a λ the sweep measured better) without
editing the served version in place. Only the files the manifest lists are copied, each read once, checked against
its recorded sha256 and written; the caller writes the new manifest last (``finish_bundle``), so a stopped copy
never looks like a finished bundle, and removes the directory if calibration fails.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from service.manifest import Manifest

LOGGER = logging.getLogger(__name__)


def copy_version(bundle_dir: Path, manifest: Manifest, version: str) -> Path:
    """Copy ``bundle_dir``'s listed files into the sibling directory ``version`` and return it.

    Raises:
        SystemExit: ``version`` is not a positive integer, equals the source's, or already exists, or a file no
            longer matches its recorded sha256 (the source changed since it was loaded).
    """
    if not version.isdigit() or int(version) < 1:
        raise SystemExit(f"--new-version: expected a positive integer, got {version!r}")
    target = bundle_dir.parent / version
    if target.exists():
        raise SystemExit(f"--new-version: {target} exists; a version is never overwritten (pick another)")
    target.mkdir()
    try:
        for name, digest in sorted(manifest.files.items()):
            data = (bundle_dir / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise SystemExit(f"{bundle_dir / name} does not match its manifest's sha256; not copied")
            (target / name).write_bytes(data)
    except BaseException:
        for p in target.iterdir():
            p.unlink()
        target.rmdir()
        raise
    LOGGER.info("copied %d files of %s into %s", len(manifest.files), bundle_dir, target)
    return target
