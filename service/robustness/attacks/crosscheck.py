"""Cross-check with a well-kept implementation: torchattacks' AutoAttack(version='rand') through MI.

Papers: Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020 (APGD-CE/DLR; the 'rand' version is APGD-CE + APGD-DLR with 20 EOT draws, for randomised
defences). Threat model: white box, L-inf eps, ground-truth labels. The defence is wrapped once, as torchattacks
expects: an ``nn.Module`` whose every forward draws fresh MI partners and returns log-probabilities of what
MI-Combined returns (softmax of log-probabilities gives the returned probabilities back, so CE and DLR see MI's
output).

torchattacks 3.5.1's APGD (inside AutoAttack) attacks only the images one random clean forward gets right and
returns clean inputs for images no draw misclassified; the evaluation's own APGD-EOT (:mod:`apgd`) attacks every
image and keeps the best iterate, so this row is a cross-check only.

Shapes: x float32 (B, C, H, W) in [0, 1]; y int64 (B,); returns float32 (B, C, H, W).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from service.mi.params import Mode
from service.robustness.pipeline import DifferentiableMI

LOGGER = logging.getLogger(__name__)


class MIModule(torch.nn.Module):
    """MI as a torchattacks model: each call is one fresh pipeline draw; output log of the returned probabilities."""

    def __init__(self, mi: DifferentiableMI, mode: Mode, gen: np.random.Generator) -> None:
        super().__init__()
        self.net = mi.model  # registers the parameters torchattacks inspects for the device
        self.mi = mi
        self.mode = mode
        self.gen = gen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.mi(x, self.mode, draws=1, gen=self.gen).probs[0]
        return torch.log(probs.clamp_min(1e-12))


def autoattack_rand(
    mi: DifferentiableMI,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    gen: np.random.Generator,
    mode: Mode = Mode.COMBINED,
) -> torch.Tensor:
    """torchattacks.AutoAttack(version='rand'): APGD-CE then APGD-DLR, 20 EOT draws each, on what survived."""
    import torchattacks

    attack = torchattacks.AutoAttack(
        MIModule(mi, mode, gen), norm="Linf", eps=eps, version="rand", n_classes=mi.n_classes, seed=0
    )
    return attack(x, y).detach()
