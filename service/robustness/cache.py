"""Per-attack, per-seed cache of adversarial inputs, so that a stopped evaluation resumes where it stopped.

One ``.npz`` per attack (no pickle: arrays only, read with ``allow_pickle=False``): the raw (unrounded) adversarial
inputs and the attack's loss curve. The file name carries the attack's name and generator seed and a hash of
everything that changes its output (the sha256 of the bundle's files, its MI parameters, budget, threat model,
image indices, ``CACHE_VERSION``), so a changed budget or bundle never reuses a stale entry, while a manifest field
that cannot change an attack (a schema addition) does not invalidate it. Scoring is not cached: it is cheap and
uses this run's seeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

LOGGER = logging.getLogger(__name__)

#: bump when an attack's algorithm changes so old entries stop matching
CACHE_VERSION = 2


class AttackCache:
    """Adversarial inputs keyed by (attack name, attack seed, run configuration).

    Args:
        root: directory of the entries (created on first write); None disables caching.
        config: everything the attacks' outputs depend on besides name and seed (JSON-serialisable).
    """

    def __init__(self, root: Path | None, config: dict[str, Any]) -> None:
        self.root = root
        blob = json.dumps({"v": CACHE_VERSION, **config}, sort_keys=True, default=str).encode()
        self.digest = hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def for_run(cls, root: Path | None, bundle: Any, budget: Any, threat: Any, indices: Any) -> AttackCache:
        """The cache of one run: keyed by the bundle's files and MI parameters, the budget, the threat model and the
        image indices (everything an attack's output depends on besides its name and seed)."""
        config = {"files": bundle.manifest.files, "mi": bundle.manifest.mi.model_dump(mode="json")}
        return cls(root, config | {"budget": budget.as_dict(), "threat": threat.as_dict(), "indices": indices.tolist()})

    def path(self, name: str, seed: int) -> Path | None:
        if self.root is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        return self.root / f"{safe}-s{seed}-{self.digest}.npz"

    def load(self, name: str, seed: int) -> tuple[NDArray[np.float32], list[float], float | None] | None:
        """The cached (x_adv, loss curve, seconds the attack took when it ran) of an attack, or None.

        The seconds are None for entries written before they were recorded.
        """
        path = self.path(name, seed)
        if path is None or not path.exists():
            return None
        with np.load(path, allow_pickle=False) as f:
            LOGGER.info("%s: resumed from %s", name, path)
            seconds = float(f["seconds"]) if "seconds" in f.files else None
            return f["x_adv"].astype(np.float32), [float(v) for v in f["trace"]], seconds

    def save(
        self, name: str, seed: int, x_adv: NDArray[np.float32], trace: list[float], seconds: float | None = None
    ) -> None:
        """Store an attack's output, its loss curve and how long it ran (shown again when a report resumes it)."""
        path = self.path(name, seed)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        arrays: dict[str, NDArray[Any]] = {"x_adv": x_adv.astype(np.float32), "trace": np.asarray(trace, np.float64)}
        if seconds is not None:
            arrays["seconds"] = np.asarray(seconds, dtype=np.float64)
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
