"""Per-attack, per-seed cache of adversarial inputs, so that a stopped evaluation resumes where it stopped.

One ``.npz`` per attack (no pickle: arrays only, read with ``allow_pickle=False``): the raw (unrounded) adversarial
inputs and the attack's loss curve. The file name carries the attack's name and generator seed and a hash of
everything that changes its output (the sha256 of the bundle's files, its MI parameters, budget, threat model,
image indices, ``CACHE_VERSION``), so a changed budget or bundle never reuses a stale entry, while a manifest field
that cannot change an attack (a schema addition) does not invalidate it. MI parameters that only some attacks read
(:data:`SCOPED_MI`: the stand-alone MI-OL mode's, MI-Combined's OL branch) enter only the keys of the attacks that
:data:`READS` lists as reading them: a new bundle version that changes them (same files, another OL λ) reuses every
other attack's inputs, which are the same arrays by construction (a test regenerates the whole plan under each changed
field). Scoring is not cached: it is cheap and uses this run's seeds.
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
#: manifest ``mi`` fields that only some attacks read: the stand-alone MI-OL mode's and MI-Combined's OL branch
SCOPED_MI: tuple[str, ...] = ("ol_standalone", "ol_combined")
#: the SCOPED_MI fields each attack reads, by its name without ``@eps`` (see :func:`family`); every other attack's key
#: leaves them out. An attack missing here reads all of them (fail closed: its key changes with any, so a new attack
#: never reuses inputs made under another λ). Tests regenerate the whole plan under each changed field (an attack
#: outside its readers must produce the same inputs), check that every attack of every plan is listed, and pin the
#: keys of the entries cached before this table existed.
READS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("pgd-pred", "pgd-gt", "pgd-targeted", "transfer", "transfer-surrogate"), ()),
    **dict.fromkeys(("pl-aware", "pl-aware-targeted"), ()),
    **dict.fromkeys(("eot-gaussian", "eot-rotation", "eot-crop_pad", "eot-crop_resize"), ()),
    "ol-standalone": ("ol_standalone",),
    **dict.fromkeys(
        (
            *("eot-combined", "eot-combined-targeted", "eot-combined-from-transfer", "ol-direct"),
            *("force-flagged", "force-flagged-targeted", "smooth-switch", "smooth-switch-targeted"),
            *("apgd-eot", "apgd-force-flagged", "square-full", "square-label", "autoattack-rand"),
        ),
        ("ol_combined",),
    ),
}
#: the plateau runs' cache names, as :func:`plateau_name` writes them for plateau.run_plateau's knobs and eps ladder
PLATEAU_NAME = re.compile(r"plateau-(?P<attack>.+)-(?:base|stepsx2|eotx2|restartsx2|eps[0-9.e+-]+)")


def plateau_name(attack: str, knob: str) -> str:
    """The cache name of one plateau run: ``plateau-<attack>-<knob without spaces>`` (``steps x2``, ``eps0.5``)."""
    return f"plateau-{attack}-{knob.replace(' ', '')}"


def family(name: str) -> str | None:
    """The :data:`READS` entry of a cache name (``force-flagged-targeted@0.3``: ``force-flagged-targeted``; the
    plateau run ``plateau-force-flagged-eotx2``: ``force-flagged``), or None when none matches exactly."""
    plateau = PLATEAU_NAME.fullmatch(name)
    attack = plateau["attack"] if plateau else name.split("@", maxsplit=1)[0]
    return attack if attack in READS else None


def reads(name: str) -> tuple[str, ...]:
    """The SCOPED_MI fields the attack ``name`` reads: all of them for an unknown family (fail closed)."""
    fam = family(name)
    if fam is None:
        LOGGER.warning("attack %s is not in cache.READS: its cache key includes every scoped MI field", name)
        return SCOPED_MI
    return READS[fam]


class AttackCache:
    """Adversarial inputs keyed by (attack name, attack seed, run configuration).

    Args:
        root: directory of the entries (created on first write); None disables caching.
        config: everything the attacks' outputs depend on besides name and seed (JSON-serialisable).
    """

    def __init__(self, root: Path | None, config: dict[str, Any], scoped: dict[str, Any] | None = None) -> None:
        self.root = root
        self.digest = _digest({"v": CACHE_VERSION, **config})
        self.scoped = scoped or {}  #: SCOPED_MI field -> its value, added to the keys of the attacks that read it

    @classmethod
    def for_run(cls, root: Path | None, bundle: Any, budget: Any, threat: Any, indices: Any) -> AttackCache:
        """The cache of one run: keyed by the bundle's files and MI parameters, the budget, the threat model and the
        image indices (everything an attack's output depends on besides its name and seed)."""
        mi = bundle.manifest.mi.model_dump(mode="json")
        scoped = {field: mi.pop(field) for field in SCOPED_MI}
        config = {"files": bundle.manifest.files, "mi": mi}
        config |= {"budget": budget.as_dict(), "threat": threat.as_dict(), "indices": indices.tolist()}
        return cls(root, config, scoped)

    def key(self, name: str) -> str:
        """The digest in ``name``'s file name: the run's, extended by the scoped MI fields the attack reads."""
        read = {f: v for f, v in self.scoped.items() if f in reads(name)}
        return _digest({"run": self.digest, **read}) if read else self.digest

    def path(self, name: str, seed: int) -> Path | None:
        if self.root is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        return self.root / f"{safe}-s{seed}-{self.key(name)}.npz"

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


def _digest(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
