"""A new version of a finished bundle: its files copied byte for byte, for ``mixinfer calibrate --new-version``.

Ships changed MI parameters (a λ the sweep measured better) without editing the served version in place. The
version is checked against the store's own pattern before any work; only the files the source's manifest lists are
copied, each read once, checked against its recorded sha256 and written into a staging directory (the caller's
``staged_bundle``), which moves into the store only once the new manifest is written and verified, so neither a
failure nor a killed process leaves a half-made version in the store.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from service.manifest import VERSION_PATTERN, Manifest

LOGGER = logging.getLogger(__name__)


def check_new_version(bundle_dir: Path, version: str) -> None:
    """Refuse (SystemExit) a version the store would not load, or one that exists beside ``bundle_dir``."""
    if not re.fullmatch(VERSION_PATTERN, version, flags=re.ASCII):
        raise SystemExit(
            f"--new-version: expected a positive integer without leading zeros (1-999999999), got {version!r}"
        )
    target = bundle_dir.parent / version
    if target.exists() or target.is_symlink():
        raise SystemExit(f"--new-version: {target} exists; a version is never overwritten (pick another)")


def copy_version(bundle_dir: Path, manifest: Manifest, staging: Path) -> None:
    """Copy ``bundle_dir``'s listed files into ``staging``, each checked against its manifest sha256.

    Raises:
        SystemExit: a file no longer matches its recorded sha256 (the source changed since it was loaded).
    """
    for name, digest in sorted(manifest.files.items()):
        data = (bundle_dir / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"{bundle_dir / name} does not match its manifest's sha256; not copied")
        (staging / name).write_bytes(data)
    LOGGER.info("copied %d files of %s into %s", len(manifest.files), bundle_dir, staging)
