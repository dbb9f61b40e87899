"""Batched Mixup Inference (SPEC sections 4 and 6): one clean forward, one PL forward, OL only where flagged."""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.backends.base import Images, MixingBackend, PartnerIndices, Probs
from service.errors import InvalidInputError
from service.mi.detection import detection_gap, is_flagged
from service.mi.params import Branch, MIParams, Mode
from service.mi.pool import PoolIndex

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partners:
    """Pool images used as blend partners: int64 flat indices into the pool's ``images``.

    Attributes:
        pl: (B, N_PL); -1 rows where PL did not run (modes ``ol`` and ``off``).
        ol: (B, N_OL); -1 rows where OL did not run (unflagged images, modes ``pl`` and ``off``).
    """

    pl: PartnerIndices
    ol: PartnerIndices


@dataclass(frozen=True)
class MIResult:
    """Per-image results of one engine call (all arrays have leading dimension B).

    Attributes:
        label: int64 (B,), argmax of ``probs`` (ties: lowest index).
        probs: float32 (B, K), the distribution actually returned (q_PL, q_OL or the plain softmax).
        clean_probs: float32 (B, K), the plain softmax p(x).
        gap: float32 (B,), detection gap c - max q_PL; NaN where PL did not run (modes ``ol``, ``off``).
        flagged: bool (B,), gap >= threshold; False where no gap was computed.
        branch: the branch that answered each image.
        n_mixes: int64 (B,), blends computed for each image (0 in mode ``off``).
        partners: the partners used, only when the caller asked for them (tests and evaluation only).
    """

    label: NDArray[np.int64]
    probs: Probs
    clean_probs: Probs
    gap: NDArray[np.float32]
    flagged: NDArray[np.bool_]
    branch: tuple[Branch, ...]
    n_mixes: NDArray[np.int64]
    partners: Partners | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])


class MIEngine:
    """Mixup Inference over a :class:`MixingBackend` that holds the pool.

    Randomness (partner draws) comes from the engine's numpy ``Generator``, seeded from OS entropy unless a seed
    is configured (tests and offline evaluation only), or from ``rng``/``partners`` passed per call by trusted
    in-process callers. Clients of the HTTP API can never choose any of these.

    Thread safety: the backend (ONNX Runtime) may be called concurrently, and draws from the engine's own generator
    are serialised by a lock, so one engine can serve several worker threads. With a fixed seed, results are only
    reproducible when calls arrive in the same order (one worker).

    Args:
        backend: runs the network; owns the pool images.
        pool_labels: int64 (P,), label of each pool image, sorted by label.
        params: MI parameters from the manifest.
        seed: fixed seed for reproducible draws; None draws from OS entropy.
    """

    def __init__(
        self,
        backend: MixingBackend,
        pool_labels: NDArray[np.int64],
        params: MIParams,
        *,
        seed: int | None = None,
    ) -> None:
        self.backend = backend
        self.params = params
        self.n_classes = backend.n_classes
        self.pool = PoolIndex(pool_labels, self.n_classes)
        self._rng = np.random.default_rng(seed)
        # numpy Generators are not thread-safe: draws from the engine's own generator are serialised
        self._rng_lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images: Images,
        mode: Mode = Mode.COMBINED,
        *,
        rng: np.random.Generator | None = None,
        partners: Partners | None = None,
        return_partners: bool = False,
    ) -> MIResult:
        """Classify a batch with Mixup Inference.

        Args:
            images: float32 (B, C, H, W) in [0, 1], the model's input shape.
            mode: combined (default), pl, ol or off.
            rng: generator for this call's draws (default: the engine's own).
            partners: explicit partner indices (tests, evaluation); PL rows are used as given, OL rows are used
                for the images that take the OL branch. They must have the configured N for each branch.
            return_partners: attach the partners used to the result.

        Returns:
            An :class:`MIResult` with one entry per input image.
        """
        x = self._check_images(images)
        gen = rng if rng is not None else self._rng
        draw_lock = self._rng_lock if rng is None else nullcontext()
        b = x.shape[0]
        p = self.params
        clean = self.backend.probs(x)
        y_hat = clean.argmax(axis=1).astype(np.int64)

        gap = np.full(b, np.nan, dtype=np.float32)
        flagged = np.zeros(b, dtype=bool)
        n_mixes = np.zeros(b, dtype=np.int64)
        pl_idx = np.full((b, p.n_pl), -1, dtype=np.int64)
        ol_spec = p.ol_standalone if mode is Mode.OL else p.ol_combined
        ol_idx = np.full((b, ol_spec.n), -1, dtype=np.int64)
        probs = clean.copy()
        branch = [Branch.OFF] * b

        if mode in (Mode.COMBINED, Mode.PL):
            given_pl = self._partners(partners.pl if partners else None, "pl", p.n_pl, b)
            if given_pl is not None:
                pl_idx = given_pl
            else:
                with draw_lock:
                    pl_idx = self.pool.sample_same(y_hat, p.n_pl, gen)
            q_pl = self.backend.mean_mix_probs(x, pl_idx, p.lam_pl)
            gap = detection_gap(clean, q_pl)
            probs = q_pl
            n_mixes += p.n_pl
            branch = [Branch.PL] * b
            if mode is Mode.COMBINED:
                flagged = is_flagged(gap, p.threshold)

        ol_rows = np.flatnonzero(flagged) if mode is Mode.COMBINED else np.arange(b) if mode is Mode.OL else None
        if ol_rows is not None and ol_rows.size:
            given = self._partners(partners.ol if partners else None, "ol", ol_spec.n, b)
            if given is not None:
                rows_idx = given[ol_rows]
            else:
                with draw_lock:
                    rows_idx = self.pool.sample_other(y_hat[ol_rows], ol_spec.n, gen)
            ol_idx[ol_rows] = rows_idx
            probs[ol_rows] = self.backend.mean_mix_probs(x[ol_rows], rows_idx, ol_spec.lam)
            n_mixes[ol_rows] += ol_spec.n
            for r in ol_rows:
                branch[r] = Branch.OL

        label = probs.argmax(axis=1).astype(np.int64)
        used = Partners(pl=pl_idx, ol=ol_idx) if return_partners else None
        return MIResult(label, probs, clean, gap, flagged, tuple(branch), n_mixes, used)

    # ---------------------------------------------------------------------------------------------------------
    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Run the backend's plain and mix paths at each batch size with every configured N.

        Uses fixed partners (index 0), so the engine's random stream is not advanced: a seeded engine gives the
        same draws with or without warm-up.
        """
        p = self.params
        self.backend.warmup(batch_sizes, tuple(sorted({p.n_pl, p.ol_combined.n, p.ol_standalone.n})))
        LOGGER.info("engine warmed up at batch sizes %s", batch_sizes)

    # ---------------------------------------------------------------------------------------------------------
    def _check_images(self, images: Images) -> Images:
        expected = (-1, *self.backend.input_shape)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.backend.input_shape:
            raise InvalidInputError(f"images must be shaped {expected} (B,C,H,W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise InvalidInputError("images must hold at least 1 image, got 0")
        return np.ascontiguousarray(images, dtype=np.float32)

    @staticmethod
    def _partners(given: PartnerIndices | None, which: str, n: int, b: int) -> PartnerIndices | None:
        if given is None:
            return None
        arr = np.asarray(given, dtype=np.int64)
        if arr.shape != (b, n):
            raise ValueError(f"{which} partners must be shaped ({b}, {n}), got {arr.shape}")
        return arr
