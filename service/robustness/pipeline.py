"""Mixup Inference as a differentiable torch function of the input, built from the served bundle.

The same pool images, labels, lambda, N and threshold as :class:`service.mi.engine.MIEngine`, and the same
partner samplers (:class:`service.mi.pool.PoolIndex`), so that for the same partners both give the same
probabilities (a parity test pins them to 1e-4). Torch only supplies gradients: final adversarial inputs are scored
by the served ONNX engine (:mod:`service.robustness.served`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch
from numpy.typing import NDArray

from service.mi.detection import is_flagged
from service.mi.params import MIParams, MixSpec, Mode
from service.mi.pool import PoolIndex

if TYPE_CHECKING:
    from service.store import Bundle

LOGGER = logging.getLogger(__name__)

#: float32 (B, C, H, W) in [0, 1]
TImages: TypeAlias = torch.Tensor
#: int64 (E, B, N) flat pool indices: E independent draws of N partners for each of B images
DrawIndices: TypeAlias = NDArray[np.int64]


@dataclass(frozen=True)
class MIOutput:
    """Differentiable outputs of E independent pipeline draws for B images (K classes).

    Attributes:
        probs: (E, B, K) the distribution MI returns in each draw (q_PL, q_OL or the plain softmax).
        clean: (B, K) plain softmax p(x) (deterministic, shared by all draws).
        q_pl: (E, B, K) MI-PL average, or None when PL did not run (modes ``ol``, ``off``).
        q_ol: (E, B, K) MI-OL average where computed (flagged rows in ``combined``), else equal to ``probs``.
        gap: (E, B) detection gap c - max q_PL (None when PL did not run).
        flagged: (E, B) bool, gap >= threshold (all False outside ``combined``).
    """

    probs: torch.Tensor
    clean: torch.Tensor
    q_pl: torch.Tensor | None
    q_ol: torch.Tensor | None
    gap: torch.Tensor | None
    flagged: torch.Tensor


class DifferentiableMI:
    """MI-PL, MI-OL and MI-Combined over a torch classifier, batched over draws, images and blends.

    Args:
        model: torch module, float32 (B, C, H, W) in [0, 1] -> logits (B, K); set to eval mode, weights frozen.
        pool_images: uint8 (P, C, H, W), the bundle's pool (label-sorted).
        pool_labels: int64 (P,), sorted ascending.
        params: the bundle's MI parameters.
        max_mixes_per_call: largest batch given to the network in one call (bounds memory).
        device: torch device of the network, the pool and every tensor the pipeline makes (inputs must be on it);
            partners are still drawn on the host by the engine's samplers.

    Example:
        >>> mi = DifferentiableMI.from_bundle(load_bundle(path, require_weights=True))
        >>> out = mi(x, Mode.COMBINED, draws=8)          # out.probs: (8, B, K), differentiable in x
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pool_images: NDArray[np.uint8],
        pool_labels: NDArray[np.int64],
        params: MIParams,
        *,
        max_mixes_per_call: int = 4096,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.params = params
        self.pool_x = torch.from_numpy(np.array(pool_images, dtype=np.float32)).to(self.device).div_(255.0)
        self.input_shape: tuple[int, int, int] = tuple(int(s) for s in pool_images.shape[1:])  # type: ignore[assignment]
        with torch.no_grad():
            self.n_classes = int(self.model(self.pool_x[:1]).shape[1])
        self.pool = PoolIndex(np.asarray(pool_labels, dtype=np.int64), self.n_classes)
        self.max_mixes_per_call = max_mixes_per_call

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, *, device: torch.device | str = "cpu", max_mixes_per_call: int = 4096
    ) -> DifferentiableMI:
        """Build from a loaded bundle: its weights, pool and manifest parameters (nothing else)."""
        from service.training.models import load_bundle_model

        model = load_bundle_model(bundle)
        return cls(
            model,
            bundle.pool_images,
            bundle.pool_labels,
            bundle.manifest.mi,
            max_mixes_per_call=max_mixes_per_call,
            device=device,
        )

    # --- network calls -------------------------------------------------------------------------------------
    def logits(self, x: TImages) -> torch.Tensor:
        """Base-model logits (B, K); the network is called in chunks of at most ``max_mixes_per_call``."""
        if x.shape[0] <= self.max_mixes_per_call:
            return self.model(x)
        return torch.cat([self.model(c) for c in torch.split(x, self.max_mixes_per_call)])

    def clean_probs(self, x: TImages) -> torch.Tensor:
        """softmax(f(x)), (B, K)."""
        return torch.softmax(self.logits(x), dim=1)

    def mix_probs(self, x: TImages, partners: torch.Tensor, lam: float) -> torch.Tensor:
        """mean_j softmax(f(lam * x[b] + (1 - lam) * pool[partners[b, j]])).

        Args:
            x: (B, C, H, W).
            partners: int64 (B, N) flat pool indices.
            lam: weight of the input.

        Returns:
            (B, K), differentiable in x.
        """
        b, n = partners.shape
        blends = lam * x[:, None] + (1.0 - lam) * self.pool_x[partners]
        probs = torch.softmax(self.logits(blends.reshape(b * n, *x.shape[1:])), dim=1)
        return probs.view(b, n, -1).mean(dim=1)

    def _on_device(self, indices: NDArray[np.int64]) -> torch.Tensor:
        return torch.from_numpy(indices).to(self.device)

    # --- draws ----------------------------------------------------------------------------------------------
    def draw(self, y_hat: NDArray[np.int64], n: int, draws: int, same: bool, gen: np.random.Generator) -> DrawIndices:
        """Partners for ``draws`` independent pipeline draws: (E, B, n), with the engine's samplers."""
        y_rep = np.tile(np.asarray(y_hat, dtype=np.int64), draws)
        idx = self.pool.sample_same(y_rep, n, gen) if same else self.pool.sample_other(y_rep, n, gen)
        return idx.reshape(draws, -1, n)

    # --- the pipeline ---------------------------------------------------------------------------------------
    def __call__(
        self,
        x: TImages,
        mode: Mode = Mode.COMBINED,
        *,
        draws: int = 1,
        gen: np.random.Generator | None = None,
        pl_partners: DrawIndices | None = None,
        ol_partners: DrawIndices | None = None,
        ol_spec: MixSpec | None = None,
    ) -> MIOutput:
        """Run E = ``draws`` independent MI draws on B images, differentiably.

        The discrete choices (predicted class, partner classes, branch) are made exactly as the served engine
        makes them; the blends, the network and the softmax averages carry gradients.

        Args:
            x: float32 (B, C, H, W) in [0, 1] (may require grad).
            mode: combined, pl, ol or off.
            draws: E, independent partner draws (EOT); ignored where partners are given.
            gen: numpy generator of the draws (default: fresh OS entropy).
            pl_partners: (E, B, N_PL) explicit PL partners (parity tests, EOT-gradient tests).
            ol_partners: (E, B, N_OL) explicit OL partners; in ``combined`` only flagged rows use them.
            ol_spec: override the OL branch (default: ``ol_combined`` in combined, ``ol_standalone`` in ol).

        Returns:
            An :class:`MIOutput`.
        """
        p = self.params
        gen = gen if gen is not None else np.random.default_rng()
        b = x.shape[0]
        clean = self.clean_probs(x)
        y_hat = clean.detach().argmax(dim=1).cpu().numpy().astype(np.int64)
        if pl_partners is not None:
            draws = pl_partners.shape[0]
        elif ol_partners is not None:
            draws = ol_partners.shape[0]
        k = clean.shape[1]
        flagged = torch.zeros(draws, b, dtype=torch.bool, device=x.device)
        if mode is Mode.OFF:
            probs = clean.unsqueeze(0).expand(draws, b, k)
            return MIOutput(probs, clean, None, None, None, flagged)

        x_rep = x.unsqueeze(0).expand(draws, *x.shape).reshape(draws * b, *x.shape[1:])
        q_pl: torch.Tensor | None = None
        gap: torch.Tensor | None = None
        if mode in (Mode.COMBINED, Mode.PL):
            pl = pl_partners if pl_partners is not None else self.draw(y_hat, p.n_pl, draws, True, gen)
            q_pl = self.mix_probs(x_rep, self._on_device(pl.reshape(draws * b, -1)), p.lam_pl).view(draws, b, k)
            gap = clean.max(dim=1).values.unsqueeze(0) - q_pl.max(dim=2).values
            if mode is Mode.PL:
                return MIOutput(q_pl, clean, q_pl, None, gap, flagged)
            flagged = is_flagged(gap.detach(), p.threshold)

        spec = ol_spec if ol_spec is not None else (p.ol_standalone if mode is Mode.OL else p.ol_combined)
        ol = ol_partners if ol_partners is not None else self.draw(y_hat, spec.n, draws, False, gen)
        ol_flat = self._on_device(ol.reshape(draws * b, -1))
        if mode is Mode.OL:
            q_ol = self.mix_probs(x_rep, ol_flat, spec.lam).view(draws, b, k)
            return MIOutput(q_ol, clean, None, q_ol, None, flagged)

        assert q_pl is not None  # combined
        rows = torch.nonzero(flagged.reshape(-1)).squeeze(1)
        probs_flat = q_pl.reshape(draws * b, k)
        if rows.numel():
            q_rows = self.mix_probs(x_rep[rows], ol_flat[rows], spec.lam)
            probs_flat = probs_flat.index_copy(0, rows, q_rows)
        probs = probs_flat.view(draws, b, k)
        return MIOutput(probs, clean, q_pl, probs, gap, flagged)

    def branches(
        self, x: TImages, *, draws: int, gen: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both branches of MI-Combined on every row, whatever the detector decides (attacks on the switch).

        Returns:
            (q_PL (E, B, K), q_OL with the ``ol_combined`` spec (E, B, K), gap (E, B)), all differentiable in x,
            from independent PL and OL draws made by the engine's samplers.
        """
        pl = self(x, Mode.PL, draws=draws, gen=gen)
        ol = self(x, Mode.OL, draws=draws, gen=gen, ol_spec=self.params.ol_combined)
        assert pl.gap is not None
        return pl.probs, ol.probs, pl.gap


def twin_or_reason(bundle: Bundle, device: str) -> tuple[DifferentiableMI | None, str | None]:
    """The differentiable twin, or None and the reason (an imported graph that cannot be converted faithfully)."""
    if bundle.manifest.imported is None:
        return DifferentiableMI.from_bundle(bundle, device=device), None
    from service.importing.twin import TwinUnavailableError

    try:
        return DifferentiableMI.from_bundle(bundle, device=device), None
    except TwinUnavailableError as exc:
        reason = f"black-box attacks only: {exc}"
        LOGGER.warning("%s", reason)
        return None, reason
